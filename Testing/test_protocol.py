"""Protocol files: the shipped protocols, validation errors naming file and key, recovery steps, aliases."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from click.testing import CliRunner

from ReirradiationNPCLib.cli import main
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.protocol import load_protocol, parse_metric, shipped_protocols

BASE = {
    "name": "Test protocol",
    "version": "1",
    "alpha_beta": {"default": 3},
    "recovery": {"model": "step",
                 "table": [{"min_months": 0, "fraction": 0.0}, {"min_months": 6, "fraction": 0.25},
                           {"min_months": 12, "fraction": 0.5}],
                 "organs": ["spinal_cord"]},
    "organs": {
        "spinal_cord": {"aliases": ["SpinalCord", "Spinal Cord", "Cord"], "alpha_beta": 2,
                        "constraints": [{"metric": "D0.03cc", "limit_gy": 67.75, "scope": "cumulative",
                                         "source": "Nieder 2006", "verified": True}]},
        "brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2,
                      "constraints": [{"metric": "Dmax", "limit_gy": None, "scope": "cumulative",
                                       "source": "pending", "verified": False}]},
    },
}


def write(tmp_path, data, name="proto.yaml"):
    p = tmp_path / name
    if name.endswith(".json"):
        p.write_text(json.dumps(data), encoding="utf-8")
    else:
        p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return p


def expect_error(tmp_path, data, field, what=None):
    p = write(tmp_path, data)
    with pytest.raises(InputError) as ei:
        load_protocol(str(p))
    msg = str(ei.value)
    assert str(p) in msg, msg            # names the file
    assert field in msg, msg             # names the key
    assert ei.value.field == field
    assert "\n" not in msg
    if what:
        assert what in msg.lower(), msg
    return msg


# ---------------------------------------------------------------------------------------- shipped files

def test_shipped_protocols_listed():
    names = shipped_protocols()
    assert "npc-reirradiation" in names and "synthetic-demo" in names


def test_npc_protocol_spinal_cord_only_verified_limits():
    p = load_protocol("npc-reirradiation")
    assert p.synthetic is False
    assert p.default_alpha_beta == 3
    assert p.recovery.model == "none"
    cord = p.organs["spinal_cord"]
    assert cord.alpha_beta == 2
    cum = [c for c in cord.constraints if c.scope == "cumulative" and c.metric.name == "D0.03cc"]
    assert len(cum) == 1
    assert cum[0].limit == 67.75 and cum[0].unit == "Gy" and cum[0].verified is True
    assert "Nieder" in cum[0].source
    # every other organ: no limit and not verified
    for organ in p.organs.values():
        if organ.key == "spinal_cord":
            continue
        for c in organ.constraints:
            assert c.limit is None, (organ.key, c)
            assert c.verified is False, (organ.key, c)


def test_npc_protocol_organs_and_alpha_beta():
    p = load_protocol("npc-reirradiation")
    # clinical facts section 4: CNS 2 Gy, temporal lobes 2-3 Gy, tumour 10 Gy
    for key in ("brainstem", "spinal_cord", "optic_chiasm", "optic_nerve_l", "optic_nerve_r"):
        assert p.organs[key].alpha_beta == 2, key
    for key in ("temporal_lobe_l", "temporal_lobe_r"):
        assert 2 <= p.organs[key].alpha_beta <= 3
    assert p.match("GTVp").alpha_beta == 10
    # TG-263 names of clinical facts section 8 all match an organ
    for name in ("Brainstem", "SpinalCord", "OpticChiasm", "OpticNrv_L", "OpticNrv_R", "Lobe_Temporal_L",
                 "Lobe_Temporal_R", "A_Carotid_L", "A_Carotid_R", "Cochlea_L", "Cochlea_R", "Bone_Mandible",
                 "Joint_TM_L", "Joint_TM_R", "Parotid_L", "Parotid_R", "Pituitary", "External", "GTVp"):
        assert p.match(name) is not None, name
    assert p.match("External").role == "body"


def test_synthetic_demo_protocol_loads_and_is_labelled():
    p = load_protocol("synthetic-demo")
    assert p.synthetic is True
    assert "synthetic" in p.name.lower()
    assert p.recovery.model == "step"
    assert p.recovery.organs == ("spinal_cord",)


def test_protocol_show_cli():
    r = CliRunner().invoke(main, ["protocol", "show", "npc-reirradiation"])
    assert r.exit_code == 0, r.output
    assert "67.75" in r.stdout and "spinal_cord" in r.stdout
    r = CliRunner().invoke(main, ["protocol", "show"])
    assert r.exit_code == 0 and "synthetic-demo" in r.stdout


# ------------------------------------------------------------------------------------------ recovery

@pytest.mark.parametrize("months, credit", [
    (0, 0.0), (3, 0.0), (5.999, 0.0), (6, 0.25), (6.001, 0.25), (11.999, 0.25), (12, 0.5), (30, 0.5), (240, 0.5)])
def test_recovery_steps_at_boundaries(months, credit):
    p = load_protocol("synthetic-demo")
    assert p.recovery.credit("spinal_cord", months) == credit
    # only the organs named get credit
    assert p.recovery.credit("brainstem", months) == 0.0
    assert p.recovery.credit(None, months) == 0.0


def test_recovery_table_without_zero_row(tmp_path):
    d = copy.deepcopy(BASE)
    d["recovery"]["table"] = [{"min_months": 6, "fraction": 0.25}, {"min_months": 12, "fraction": 0.5}]
    p = load_protocol(str(write(tmp_path, d)))
    assert p.recovery.credit("spinal_cord", 5.9) == 0.0
    assert p.recovery.credit("spinal_cord", 6.0) == 0.25
    assert p.recovery.credit("spinal_cord", 12.0) == 0.5


def test_recovery_none_gives_no_credit():
    p = load_protocol("npc-reirradiation")
    assert p.recovery.credit("spinal_cord", 100) == 0.0


# ------------------------------------------------------------------------------------------ aliases

@pytest.mark.parametrize("name", ["SpinalCord", "spinalcord", "SPINALCORD", "spinal cord", "  Cord  ", "CORD",
                                  "spinal_cord"])
def test_alias_matching_case_insensitive(tmp_path, name):
    p = load_protocol(str(write(tmp_path, BASE)))
    assert p.match(name).key == "spinal_cord"


@pytest.mark.parametrize("name", ["Spinal-Cord", "SpinalCord2", "Cord_PRV", "brain stem", ""])
def test_unknown_names_are_not_guessed(tmp_path, name):
    p = load_protocol(str(write(tmp_path, BASE)))
    assert p.match(name) is None


def test_duplicate_alias_across_organs_rejected(tmp_path):
    d = copy.deepcopy(BASE)
    d["organs"]["brainstem"]["aliases"] = ["Brainstem", "CORD"]
    expect_error(tmp_path, d, "organs.brainstem.aliases")


# ------------------------------------------------------------------------------------------ metrics

@pytest.mark.parametrize("text, kind, param", [
    ("Dmax", "max", None), ("Dmean", "mean", None), ("D0.03cc", "dcc", 0.03), ("D2cc", "dcc", 2.0),
    ("D95%", "dpct", 95.0), ("V20Gy", "vgy", 20.0), ("V40.5Gy", "vgy", 40.5)])
def test_parse_metric(text, kind, param):
    m = parse_metric(text)
    assert m.kind == kind and m.param == param and m.name == text


@pytest.mark.parametrize("text", ["D0.03ml", "Dfoo", "V20", "D", "Dmax2", "D120%", "V20cGy", "dmax"])
def test_parse_metric_rejects(text):
    with pytest.raises(ValueError):
        parse_metric(text)


# ------------------------------------------------------------------------------------------ validation

def test_base_protocol_is_valid(tmp_path):
    p = load_protocol(str(write(tmp_path, BASE)))
    assert p.organs["spinal_cord"].constraints[0].limit == 67.75
    assert p.organs["brainstem"].constraints[0].limit is None


def test_json_accepted(tmp_path):
    p = load_protocol(str(write(tmp_path, BASE, "proto.json")))
    assert p.organs["spinal_cord"].alpha_beta == 2
    assert p.recovery.credit("spinal_cord", 12) == 0.5


def test_bad_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError) as ei:
        load_protocol(str(path))
    assert str(path) in str(ei.value)


def test_unknown_top_level_key(tmp_path):
    d = copy.deepcopy(BASE)
    d["organz"] = {}
    expect_error(tmp_path, d, "organz", "unknown key")


def test_unknown_organ_key(tmp_path):
    d = copy.deepcopy(BASE)
    d["organs"]["spinal_cord"]["alpha_betta"] = 2
    expect_error(tmp_path, d, "organs.spinal_cord.alpha_betta", "unknown key")


def test_unknown_constraint_key(tmp_path):
    d = copy.deepcopy(BASE)
    d["organs"]["spinal_cord"]["constraints"][0]["limt_gy"] = 3
    expect_error(tmp_path, d, "organs.spinal_cord.constraints[0].limt_gy", "unknown key")


@pytest.mark.parametrize("metric", ["D0.03ml", "Dfoo", "V20", "D120%"])
def test_bad_metric(tmp_path, metric):
    d = copy.deepcopy(BASE)
    d["organs"]["spinal_cord"]["constraints"][0]["metric"] = metric
    expect_error(tmp_path, d, "organs.spinal_cord.constraints[0].metric")


@pytest.mark.parametrize("ab", [0, -2, "two", None])
def test_organ_alpha_beta_not_positive(tmp_path, ab):
    d = copy.deepcopy(BASE)
    d["organs"]["spinal_cord"]["alpha_beta"] = ab
    expect_error(tmp_path, d, "organs.spinal_cord.alpha_beta")


@pytest.mark.parametrize("ab", [0, -3])
def test_default_alpha_beta_not_positive(tmp_path, ab):
    d = copy.deepcopy(BASE)
    d["alpha_beta"]["default"] = ab
    expect_error(tmp_path, d, "alpha_beta.default", "> 0")


def test_verified_without_limit(tmp_path):
    d = copy.deepcopy(BASE)
    d["organs"]["brainstem"]["constraints"][0]["verified"] = True
    expect_error(tmp_path, d, "organs.brainstem.constraints[0].verified")


def test_unknown_recovery_organ(tmp_path):
    d = copy.deepcopy(BASE)
    d["recovery"]["organs"] = ["spinal_cord", "optic_chiasm"]
    msg = expect_error(tmp_path, d, "recovery.organs")
    assert "optic_chiasm" in msg


@pytest.mark.parametrize("table, field", [
    ([{"min_months": 0, "fraction": 0.0}, {"min_months": 12, "fraction": 0.5}, {"min_months": 6, "fraction": 0.25}],
     "recovery.table[2].min_months"),
    ([{"min_months": 6, "fraction": 0.25}, {"min_months": 6, "fraction": 0.5}], "recovery.table[1].min_months"),
])
def test_non_increasing_step_table(tmp_path, table, field):
    d = copy.deepcopy(BASE)
    d["recovery"]["table"] = table
    expect_error(tmp_path, d, field, "increasing")


def test_recovery_fraction_of_one_rejected(tmp_path):
    d = copy.deepcopy(BASE)
    d["recovery"]["table"][2]["fraction"] = 1.0
    expect_error(tmp_path, d, "recovery.table[2].fraction")


def test_unknown_recovery_model(tmp_path):
    d = copy.deepcopy(BASE)
    d["recovery"] = {"model": "exponential"}
    expect_error(tmp_path, d, "recovery.model")


def test_bad_scope(tmp_path):
    d = copy.deepcopy(BASE)
    d["organs"]["spinal_cord"]["constraints"][0]["scope"] = "total"
    expect_error(tmp_path, d, "organs.spinal_cord.constraints[0].scope")


def test_volume_metric_needs_volume_limit(tmp_path):
    d = copy.deepcopy(BASE)
    d["organs"]["spinal_cord"]["constraints"][0]["metric"] = "V40Gy"
    expect_error(tmp_path, d, "organs.spinal_cord.constraints[0].limit_gy")


@pytest.mark.parametrize("missing", ["name", "version", "alpha_beta", "recovery", "organs"])
def test_missing_top_level_key(tmp_path, missing):
    d = copy.deepcopy(BASE)
    del d[missing]
    expect_error(tmp_path, d, missing, "missing")


def test_missing_protocol_file(tmp_path):
    with pytest.raises(InputError) as ei:
        load_protocol(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in str(ei.value)


def test_unknown_shipped_name():
    with pytest.raises(InputError) as ei:
        load_protocol("no-such-protocol")
    assert "no-such-protocol" in str(ei.value) and "npc-reirradiation" in str(ei.value)
