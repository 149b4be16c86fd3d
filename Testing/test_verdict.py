"""No false all-clear (issue 9): recovery basis of every cumulative limit, conditions of a limit, per-course limits on
every course, the verdict code and what it does not know.

Cord cases with uniform doses so that every number is a hand calculation. At 2 Gy per fraction EQD2 equals the
physical dose for any alpha/beta, so e.g. 44 Gy in 22 fractions is 44 Gy EQD2 at the cord's alpha/beta 2.
Nieder et al. 2006 (the shipped protocol's spinal-cord rows): cumulative <= 67.75 Gy EQD2 on the undiscounted sum,
interval >= 6 months, each course <= 49 Gy EQD2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from analytic import box, write_image, write_yaml
from ReirradiationNPCLib.cli import main
from ReirradiationNPCLib.protocol import load_protocol, parse_protocol, protocols_dir
from ReirradiationNPCLib.results import ConstraintResult
from ReirradiationNPCLib.verdict import HEADLINES, VERDICT_CODES, summarize, verdict_line

SHAPE = (6, 10, 10)
ORIGIN, SPACING = (0.0, 0.0, 0.0), (2.0, 2.0, 2.0)
HALF_CREDIT = {"model": "step", "table": [{"min_months": 0, "fraction": 0.0}, {"min_months": 6, "fraction": 0.5}],
               "organs": ["spinal_cord"], "source": "test: 50 % spinal-cord credit", "verified": False}


def shipped(edit=None) -> dict:
    data = yaml.safe_load((protocols_dir() / "npc-reirradiation.yaml").read_text(encoding="utf-8"))
    if edit:
        edit(data)
    return data


def cord_case(root, prior_gy, prior_fx, current_gy, current_fx, months, protocol: dict, structures=("SpinalCord",)):
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / "d1.nrrd", np.full(SHAPE, prior_gy, np.float32), ORIGIN, SPACING, units="Gy")
    write_image(root / "d2.nrrd", np.full(SHAPE, current_gy, np.float32), ORIGIN, SPACING, units="Gy")
    for n, name in enumerate(structures):
        write_image(root / "masks" / f"{name}.nrrd", box(SHAPE, (1, 5), (1 + 4 * n, 4 + 4 * n), (2, 8)
                                                          ).astype(np.uint8), ORIGIN, SPACING)
    write_yaml(root / "protocol.yaml", protocol)
    write_yaml(root / "case.yaml", {
        "reference": {"structures": "masks"}, "protocol": "protocol.yaml",
        "courses": [{"name": "first", "dose": "d1.nrrd", "fractions": prior_fx, "interval_months": months},
                    {"name": "reRT", "dose": "d2.nrrd", "fractions": current_fx}]})
    out = root / "out"
    r = CliRunner().invoke(main, ["run", str(root / "case.yaml"), "--output", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text()), r.output, out


def cord_rows(res):
    return [c for c in res["constraints"] if c["organ"] == "spinal_cord"]


def row(res, scope, course=None):
    found = [c for c in cord_rows(res) if c["scope"] == scope and (course is None or c["course"] == course)]
    assert len(found) == 1, (scope, course, cord_rows(res))
    return found[0]


# ------------------------------------------------------------------------------- recovery basis (judged case 1)

@pytest.mark.parametrize("current_gy, undiscounted, credited, status", [
    (30.0, 74.0, 52.0, "fail"),    # 44 + 30 = 74 > 67.75 although the credited 22 + 30 = 52 would pass
    (20.0, 64.0, 42.0, "pass"),    # 44 + 20 = 64 <= 67.75 x 0.95 = 64.36: clear of the warning band
    (22.0, 66.0, 44.0, "warn"),    # 64.36 < 66 <= 67.75
])
def test_nieder_row_judged_undiscounted_with_a_50_percent_cord_credit(tmp_path, current_gy, undiscounted, credited,
                                                                      status):
    """Shipped protocol + a 50 % spinal-cord recovery block (unverified): the Nieder cumulative row compares the
    plain sum with 67.75 Gy; the credited sum is shown beside it and judged nowhere."""
    res, out, _ = cord_case(tmp_path, 44.0, 22, current_gy, int(current_gy / 2), 24,
                            shipped(lambda d: d.update(recovery=HALF_CREDIT)))
    c = row(res, "cumulative")
    assert c["basis"] == "undiscounted" and c["limit"] == 67.75 and c["verified"] is True
    assert c["value_undiscounted"] == pytest.approx(undiscounted, abs=1e-3)
    assert c["value_credited"] == pytest.approx(credited, abs=1e-3)
    assert c["value"] == c["value_undiscounted"]
    assert c["margin"] == pytest.approx(67.75 - undiscounted, abs=1e-3)
    assert c["status"] == status
    assert all(x["met"] for x in c["conditions"])  # 24 months; 44 and current <= 49 Gy
    assert res["structures"][0]["cumulative_undiscounted"]["D0.03cc"] == pytest.approx(undiscounted, abs=1e-3)
    # the credit did not change any judged value: it is not counted as an unverified assumption used
    assert res["summary"]["unverified_recovery_credit_used"] == 0
    expected = {"fail": "limits_exceeded", "warn": "warnings", "pass": "incomplete"}[status]
    assert res["summary"]["verdict_code"] == expected
    # CLI table: both sums and the basis on the row; the verdict code in the last lines
    line = [ln for ln in out.splitlines() if ln.startswith(("FAIL", "pass", "WARN")) and "cumulative" in ln][0]
    assert "undiscounted" in line and f"{undiscounted:.2f}" in line and f"{credited:.2f}" in line
    assert f"verdict_code: {expected}" in out


def test_remaining_dose_honours_the_undiscounted_basis(tmp_path):
    """Using all of remaining_dose.nrrd as the current course keeps the undiscounted cord sum at 67.75 Gy, not
    above (with a 50 % credit the old map allowed 67.75 on the credited sum, i.e. far more)."""
    import SimpleITK as sitk
    _, _, out = cord_case(tmp_path, 44.0, 22, 10.0, 15, 24, shipped(lambda d: d.update(recovery=HALF_CREDIT)))
    rd = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "remaining_dose.nrrd")))
    cord = box(SHAPE, (1, 5), (1, 4), (2, 8))
    d = rd[cord].astype(np.float64)
    e = d * (d / 15 + 2.0) / 4.0
    # budget: cumulative 67.75 - 44 = 23.75 Gy; per course 49 Gy: the cumulative one binds
    assert (44.0 + e).max() <= 67.75 and (44.0 + e).min() >= 67.7


# ----------------------------------------------------------------------------- conditions (judged cases 2, 3)

def test_interval_below_six_months_no_cord_row_passes(tmp_path):
    """40 Gy / 20 fx then 20 Gy / 10 fx, 3 months apart: 60 Gy EQD2 undiscounted is under 67.75 Gy, but the interval
    condition of Nieder's limit fails: every cord row is condition_not_met and the verdict says so."""
    res, out, _ = cord_case(tmp_path, 40.0, 20, 20.0, 10, 3, shipped(lambda d: d.update(recovery=HALF_CREDIT)))
    rows = cord_rows(res)
    assert len(rows) == 3  # cumulative + per_course for each of the two courses
    assert all(c["status"] != "pass" for c in rows)
    assert all(c["status"] == "condition_not_met" for c in rows)
    c = row(res, "cumulative")
    assert c["value"] == pytest.approx(60.0, abs=1e-3)
    interval = [x for x in c["conditions"] if "interval" in x["condition"]]
    assert interval == [{"condition": "interval since course first >= 6 months", "required": 6.0, "actual": 3.0,
                         "met": False}]
    assert "condition not met" in c["note"] and "interval" in c["note"]
    s = res["summary"]
    assert s["verdict_code"] == "conditions_not_met" != "all_limits_met"
    assert any("interval since course first >= 6 months" in x for x in s["conditions_not_met"])
    assert "CONDITION_NOT_MET" in out and "verdict_code: conditions_not_met" in out
    report = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert 'data-verdict-code="conditions_not_met"' in report and HEADLINES["conditions_not_met"] in report


def test_prior_course_alone_above_49_gy_fails_its_per_course_row(tmp_path):
    """Prior 54 Gy / 27 fx = 54 Gy EQD2 > 49 Gy: the per-course row of the PRIOR course fails; the current course's
    row (10 Gy / 5 fx = 10 Gy EQD2, 2 Gy per fraction) is below its own limit but carries the unmet per-course
    condition; the cumulative row (54 + 10 = 64 Gy, below 67.75 Gy) is condition_not_met."""
    res, _, _ = cord_case(tmp_path, 54.0, 27, 10.0, 5, 24, shipped())
    prior = row(res, "per_course", "first")
    assert prior["status"] == "fail" and prior["value"] == pytest.approx(54.0, abs=1e-3)
    assert prior["limit"] == 49.0 and prior["margin"] == pytest.approx(-5.0, abs=1e-3)
    cur = row(res, "per_course", "reRT")
    assert cur["value"] == pytest.approx(10.0, abs=1e-3)
    assert cur["status"] == "condition_not_met"
    cum = row(res, "cumulative")
    assert cum["value"] == pytest.approx(64.0, abs=1e-3) and cum["status"] == "condition_not_met"
    unmet = [x for x in cum["conditions"] if not x["met"]]
    assert unmet == [{"condition": "course first D0.03cc <= 49 Gy EQD2 (its own EQD2, no recovery credit)",
                      "required": 49.0, "actual": pytest.approx(54.0, abs=1e-3), "met": False}]
    assert res["summary"]["verdict_code"] == "limits_exceeded"


def test_per_course_eqd2_uses_each_course_own_fractionation(tmp_path):
    """Prior 60 Gy / 25 fx (2.4 Gy/fx): EQD2 at ab 2 = 60 (2.4 + 2) / 4 = 66 Gy > 49: fails; current 30 Gy / 10 fx
    (3 Gy/fx): 30 x 5 / 4 = 37.5 Gy; the per-course values are never discounted by the (unverified) credit."""
    res, _, _ = cord_case(tmp_path, 60.0, 25, 30.0, 10, 24, shipped(lambda d: d.update(recovery=HALF_CREDIT)))
    assert row(res, "per_course", "first")["value"] == pytest.approx(66.0, abs=1e-3)
    assert row(res, "per_course", "first")["status"] == "fail"
    assert row(res, "per_course", "reRT")["value"] == pytest.approx(37.5, abs=1e-3)
    c = row(res, "cumulative")
    assert c["value_undiscounted"] == pytest.approx(103.5, abs=1e-3)
    assert c["value_credited"] == pytest.approx(0.5 * 66.0 + 37.5, abs=1e-3)


# ------------------------------------------------------------------------------ verdict code and completeness

def _minimal(cord_rows_, organs_extra=None, recovery=None):
    return {"name": "t", "version": "1", "alpha_beta": {"default": 3},
            "recovery": recovery or {"model": "none"},
            "organs": {"spinal_cord": {"aliases": ["SpinalCord"], "alpha_beta": 2, "constraints": cord_rows_},
                       **(organs_extra or {})}}


def _lim(limit, scope="cumulative", **kw):
    return {"metric": "D0.03cc", "limit_gy": limit, "scope": scope, "source": "t", "verified": True, **kw}


def test_all_limits_met_only_when_nothing_is_missing(tmp_path):
    res, out, _ = cord_case(tmp_path / "a", 40.0, 20, 10.0, 5, 24, _minimal([_lim(67.75)]))
    assert res["summary"]["verdict_code"] == "all_limits_met"
    assert res["summary"]["incomplete_because"] == []
    assert out.rstrip().splitlines()[-2] == "verdict_code: all_limits_met"
    # one organ of the protocol without a limit (even if absent): incomplete, and it says which
    res, out, _ = cord_case(tmp_path / "b", 40.0, 20, 10.0, 5, 24, _minimal(
        [_lim(67.75)], {"brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2}}))
    assert res["summary"]["verdict_code"] == "incomplete"
    assert res["summary"]["incomplete_because"] == ["brainstem: no limit in the protocol (absent from the structure "
                                                    "set)"]
    assert "incomplete because (1):" in out
    # an organ with a limit that is absent from the structure set
    res, _, _ = cord_case(tmp_path / "c", 40.0, 20, 10.0, 5, 24, _minimal(
        [_lim(67.75)], {"brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2, "constraints": [_lim(54.0)]}}))
    assert res["summary"]["verdict_code"] == "incomplete"
    assert res["summary"]["incomplete_because"] == ["brainstem: has a limit but is absent from the structure set"]
    assert [c["status"] for c in res["constraints"] if c["organ"] == "brainstem"] == ["not_evaluated"]


def test_unverified_credit_that_changes_a_judged_value_is_counted(tmp_path):
    """A credited-basis limit judged with an unverified credit: counted; the same credit marked verified: not."""
    prot = _minimal([_lim(67.75, basis="credited")], recovery=HALF_CREDIT)
    res, out, _ = cord_case(tmp_path / "u", 44.0, 22, 30.0, 15, 24, prot)
    c = row(res, "cumulative")
    assert c["basis"] == "credited" and c["value"] == pytest.approx(52.0, abs=1e-3) and c["status"] == "pass"
    s = res["summary"]
    assert s["unverified_recovery_credit_used"] == 1
    assert s["unverified_limits_used"] == 0 and s["unverified_assumptions_used"] == 1  # the limit itself is verified
    assert "unverified recovery credit changed 1 judged value(s)" in s["verdict"]
    assert "unverified recovery credit changed 1 judged value(s)" in out
    prot["recovery"] = dict(HALF_CREDIT, verified=True)
    res, _, _ = cord_case(tmp_path / "v", 44.0, 22, 30.0, 15, 24, prot)
    assert res["summary"]["unverified_recovery_credit_used"] == 0


def test_verdict_order_and_line():
    """First that applies: limits_exceeded, conditions_not_met, warnings, incomplete, all_limits_met."""
    prot = parse_protocol(_minimal([_lim(50.0)], {"brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2}}), "t")

    def r(status, conds=()):
        return ConstraintResult(organ="spinal_cord", structure="SpinalCord", metric="D0.03cc", scope="cumulative",
                                value=40.0, limit=50.0, unit="Gy", status=status, source="t", verified=True,
                                basis="undiscounted", conditions=list(conds))
    structs = [{"organ": "spinal_cord"}, {"organ": "brainstem"}]
    bad = {"condition": "x", "required": 6, "actual": 3, "met": False}
    assert summarize([r("fail", [bad]), r("warn")], [], prot, structs)["verdict_code"] == "limits_exceeded"
    assert summarize([r("condition_not_met", [bad]), r("warn")], [], prot, structs)["verdict_code"] == \
        "conditions_not_met"
    assert summarize([r("warn"), r("pass")], [], prot, structs)["verdict_code"] == "warnings"
    s = summarize([r("pass")], [], prot, structs)
    assert s["verdict_code"] == "incomplete" and s["incomplete_because"] == ["brainstem: no limit in the protocol "
                                                                             "(present)"]
    assert s["verdict"] == verdict_line(s) and s["verdict"].startswith(HEADLINES["incomplete"])
    prot2 = parse_protocol(_minimal([_lim(50.0)]), "t")
    s = summarize([r("pass")], [], prot2, structs[:1])
    assert s["verdict_code"] == "all_limits_met" and s["verdict"].startswith("ALL LIMITS MET")
    # a failed target criterion is a warning (never an all-clear); a target check not evaluated: incomplete
    tc = [{"structure": "PTV", "scope": "current", "checks": [{"check": "D98%", "status": "fail", "value": 50.0,
                                                               "criterion": ">= 57"}]}]
    assert summarize([r("pass")], tc, prot2, structs[:1])["verdict_code"] == "warnings"
    tc[0]["checks"][0]["status"] = "not_evaluated"
    s = summarize([r("pass")], tc, prot2, structs[:1])
    assert s["verdict_code"] == "incomplete" and s["incomplete_because"][0].startswith("target PTV D98%")
    assert set(VERDICT_CODES) == set(HEADLINES)


# ---------------------------------------------------------------------------------------- protocol schema

def test_protocol_basis_conditions_and_per_course_validation():
    base = _minimal([_lim(67.75)])
    p = parse_protocol(base, "t")
    assert p.organs["spinal_cord"].constraints[0].basis == "undiscounted"  # default: the conservative reading
    from ReirradiationNPCLib.errors import InputError
    for rows, field in (([_lim(67.75, basis="discounted")], "organs.spinal_cord.constraints[0].basis"),
                        ([_lim(49.0, "current", basis="credited")], "organs.spinal_cord.constraints[0].basis"),
                        ([_lim(49.0, "per_course", conditions={"min_interval": 6})],
                         "organs.spinal_cord.constraints[0].conditions.min_interval"),
                        ([_lim(49.0, "per_course", conditions={"min_interval_months": -1})],
                         "organs.spinal_cord.constraints[0].conditions.min_interval_months"),
                        ([{"metric": "V20Gy", "limit_cc": 1, "scope": "cumulative", "source": "t", "verified": False,
                           "conditions": {"max_course_eqd2_gy": 49}}],
                         "organs.spinal_cord.constraints[0].conditions.max_course_eqd2_gy")):
        with pytest.raises(InputError) as ei:
            parse_protocol(_minimal(rows), "t.yaml")
        assert ei.value.field == field, str(ei.value)


def test_shipped_protocol_states_basis_conditions_and_citations():
    p = load_protocol("npc-reirradiation")
    cord = p.organs["spinal_cord"].constraints
    cum = [c for c in cord if c.scope == "cumulative"]
    per = [c for c in cord if c.scope == "per_course"]
    assert len(cum) == 1 and len(per) == 1 and not [c for c in cord if c.scope == "current"]
    assert cum[0].basis == "undiscounted" and cum[0].limit == 67.75
    for c in cord:  # Nieder's rows carry both conditions
        assert c.conditions.min_interval_months == 6 and c.conditions.max_course_eqd2_gy == 49
    assert per[0].limit == 49
    raw = yaml.safe_load((protocols_dir() / "npc-reirradiation.yaml").read_text(encoding="utf-8"))
    for o in raw["organs"].values():  # every cumulative row states its basis explicitly
        for c in o.get("constraints") or []:
            if c["scope"] == "cumulative":
                assert c.get("basis") in ("undiscounted", "credited")
    assert "verified" in raw["recovery"] and raw["recovery"].get("source")
    # every alpha/beta has a full citation (journal, year, volume, pages) or verified: false
    for o in p.organs.values():
        assert o.alpha_beta_verified is False or ("2006;66(5):1446-1449" in o.alpha_beta_source), o.key
    assert p.default_alpha_beta_verified is False
    # the organs of clinical facts section 7, with or without a limit
    keys = set(p.organs)
    for k in ("temporal_lobe_l", "temporal_lobe_r", "brainstem", "spinal_cord", "optic_chiasm", "optic_nerve_l",
              "optic_nerve_r", "carotid_l", "carotid_r", "nasopharyngeal_mucosa", "cochlea_l", "cochlea_r", "mandible",
              "tm_joint_l", "tm_joint_r", "cranial_nerves", "pituitary", "parotid_l", "parotid_r"):
        assert k in keys and p.organs[k].role == "oar", k
    # first-course target names are not current-course targets
    for name in ("PTV_70", "CTV_70", "PTV_60", "CTV_60", "GTV_70", "PTV70"):
        m = p.match(name)
        assert m is None or m.role != "target", name
    assert p.match("PTV").role == "target" and p.match("rGTV").role == "target"
