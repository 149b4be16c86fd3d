"""Issue 16: patient selection panel, prescription and fractionation checks (case file -> results.json -> report).

Hand values: a box GTV of 25 x 25 x 7 voxels of 2 mm = 4375 x 8 mm3 = 35.000 cc; 65 Gy in 54 fractions at
alpha/beta 10 = 65 (65/54 + 10) / 12 = 60.69 Gy EQD2 (clinical facts section 2); 65/54 = 1.2037 Gy per fraction.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from analytic import box, write_image, write_yaml
from ReirradiationNPCLib import prescription as rx_mod
from ReirradiationNPCLib import selection
from ReirradiationNPCLib.cli import main
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.protocol import parse_protocol

SHAPE = (12, 30, 30)
ORIGIN, SPACING = (0.0, 0.0, 0.0), (2.0, 2.0, 2.0)
GTV_BOX = ((2, 9), (2, 27), (2, 27))          # 7 x 25 x 25 voxels of 8 mm3 = 35.000 cc

BASE_PROTOCOL = {
    "name": "small", "version": "1", "alpha_beta": {"default": 3}, "recovery": {"model": "none"},
    "organs": {
        "spinal_cord": {"aliases": ["Cord"], "alpha_beta": 2, "constraints": [
            {"metric": "D0.03cc", "limit_gy": 67.75, "scope": "cumulative", "source": "Nieder 2006",
             "verified": True}]},
        "gtv": {"role": "target", "aliases": ["GTVp", "GTVn"], "alpha_beta": 10}}}

RX = {"scope": "current", "alpha_beta": 10, "eqd2_gy": {"min": 25, "max": 35}, "source": "test prescription",
      "verified": False,
      "fractionation": {"min_hours_between_fractions": {"value": 6, "source": "You R et al. Lancet 2023",
                                                        "verified": True}}}


def make_case(root, clinical=None, schedule=None, prescription=None, gtv_box=GTV_BOX, extra_structures=()):
    """Two courses (40 Gy / 20 fx prior, 30 Gy / 15 fx current, uniform), a cord and a GTVp box."""
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / "dose1.nrrd", np.full(SHAPE, 40.0, np.float32), ORIGIN, SPACING, units="Gy")
    write_image(root / "dose2.nrrd", np.full(SHAPE, 30.0, np.float32), ORIGIN, SPACING, units="Gy")
    write_image(root / "masks" / "Cord.nrrd", box(SHAPE, (1, 4), (2, 6), (2, 6)).astype(np.uint8), ORIGIN, SPACING)
    if gtv_box is not None:
        write_image(root / "masks" / "GTVp.nrrd", box(SHAPE, *gtv_box).astype(np.uint8), ORIGIN, SPACING)
    for name, b in extra_structures:
        write_image(root / "masks" / f"{name}.nrrd", box(SHAPE, *b).astype(np.uint8), ORIGIN, SPACING)
    protocol = json.loads(json.dumps(BASE_PROTOCOL))
    if prescription is not None:
        protocol["prescription"] = prescription
    write_yaml(root / "protocol.yaml", protocol)
    case = {"reference": {"structures": "masks"}, "protocol": "protocol.yaml",
            "courses": [{"name": "first", "dose": "dose1.nrrd", "fractions": 20, "interval_months": 18},
                        {"name": "second", "dose": "dose2.nrrd", "fractions": 15}]}
    if clinical is not None:
        case["clinical"] = clinical
    if schedule is not None:
        case["courses"][1]["schedule"] = schedule
    return write_yaml(root / "case.yaml", case)


def run(case, out):
    r = CliRunner().invoke(main, ["run", str(case), "--output", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads((out / "results.json").read_text())


def by_factor(res):
    return {f["factor"]: f for f in res["patient_selection"]}


# ------------------------------------------------------------------------------------- patient selection

def test_judged_selection_case_marks_factors_and_keeps_the_verdict(tmp_path):
    clinical = {"kps": 60, "age": 58, "rT_stage": "rT4", "late_complications": ["temporal lobe necrosis"]}
    with_block = run(make_case(tmp_path / "a", clinical=clinical), tmp_path / "out_a")
    without = run(make_case(tmp_path / "b"), tmp_path / "out_b")
    f = by_factor(with_block)
    assert f["gtv_volume"]["value"] == pytest.approx(35.0, abs=1e-6)   # 4375 voxels x 8 mm3
    assert f["gtv_volume"]["structure"] == "GTVp"
    for k in ("kps", "age", "rT_stage", "gtv_volume", "late_complications"):
        assert f[k]["adverse"] is True, (k, f[k])
        assert f[k]["source"].startswith("Tian YM et al. Br J Cancer 2014"), f[k]
    assert f["nodal_recurrence"]["adverse"] is None and f["nodal_recurrence"]["value"] is None
    assert f["kps"]["value"] == 60 and f["age"]["value"] == 58 and f["rT_stage"]["value"] == "rT4"
    assert f["late_complications"]["value"] == ["temporal lobe necrosis"]
    # interval 18 months >= 12: not adverse, and said to be measured to the start of the current course
    assert f["interval_first_course"]["adverse"] is False and f["interval_first_course"]["value"] == 18
    assert "NCT02456506" in f["interval_first_course"]["source"]
    assert with_block["patient_selection_summary"]["adverse_count"] == 5
    assert with_block["patient_selection_summary"]["not_recorded_count"] == 1
    # information only: the verdict, its code and every constraint row are the same as without the block
    assert with_block["summary"] == without["summary"]
    assert with_block["summary"].get("verdict_code") == without["summary"].get("verdict_code")
    assert [(c["organ"], c["status"], c["value"]) for c in with_block["constraints"]] == \
        [(c["organ"], c["status"], c["value"]) for c in without["constraints"]]
    # without the block: every clinical factor is "not recorded", the GTV volume is still computed
    g = by_factor(without)
    assert [k for k, v in g.items() if v["adverse"] is None] == ["kps", "age", "rT_stage", "late_complications",
                                                                  "nodal_recurrence"]
    assert g["gtv_volume"]["adverse"] is True
    assert without["patient_selection_summary"]["adverse_count"] == 1


def test_selection_thresholds_at_their_boundaries():
    class Course:
        def __init__(self, name, interval, current=False):
            self.name, self.interval_months, self.is_current = name, interval, current

    def rows(clinical, vol, interval=11.9):
        structs = [{"name": "GTVp", "role": "target", "volume_cc": vol}]
        return {r["factor"]: r for r in selection.patient_selection(
            selection.parse_clinical(clinical, "case.yaml"), structs, None,
            [Course("c1", interval), Course("c2", None, True)])}

    r = rows({"kps": 70, "age": 50, "rT_stage": "rT3", "rN_stage": "rN1", "late_complications": []}, 30.0)
    assert r["kps"]["adverse"] is True          # KPS <= 70
    assert r["age"]["adverse"] is False         # age > 50 only
    assert r["rT_stage"]["adverse"] is True
    assert r["gtv_volume"]["adverse"] is False  # > 30 cc only
    assert r["late_complications"]["adverse"] is False and r["late_complications"]["value"] == []
    assert r["nodal_recurrence"]["adverse"] is True and "rN1" in r["nodal_recurrence"]["note"]
    assert r["interval_first_course"]["adverse"] is True   # 11.9 < 12 months
    r = rows({"kps": 80, "age": 50.5, "rT_stage": "t2", "nodal_recurrence": False,
              "recurrence_interval_months": 12}, 30.01, interval=40)
    assert (r["kps"]["adverse"], r["age"]["adverse"], r["rT_stage"]["adverse"], r["gtv_volume"]["adverse"]) == \
        (False, True, False, True)
    assert r["rT_stage"]["value"] == "rT2"
    assert r["nodal_recurrence"]["adverse"] is False
    assert r["interval_first_course"]["value"] == 12 and r["interval_first_course"]["adverse"] is False


def test_gtv_structure_follows_the_protocol_margins_list_and_skips_nodal_gtv():
    class M:
        gtv = ("GTVp", "GTV")

    class P:
        margins = M()

    structs = [{"name": "GTVn", "role": "target", "volume_cc": 5.0}, {"name": "gtv", "role": "target",
                                                                       "volume_cc": 12.0},
               {"name": "GTVp", "role": "target", "volume_cc": 31.0}]
    s, others = selection.gtv_structure(structs, P())
    assert s["name"] == "GTVp" and others == ["gtv"]
    s, others = selection.gtv_structure(structs[:2], None)   # no margins: target structures GTV*, not GTVn
    assert s["name"] == "gtv" and others == []
    assert selection.gtv_structure(structs[:1], None) == (None, [])


@pytest.mark.parametrize("clinical, field, needle", [
    ({"kps": "seventy"}, "clinical.kps", "must be a number"),
    ({"kps": 75.5}, "clinical.kps", "whole number"),
    ({"kps": 110}, "clinical.kps", "0-100"),
    ({"age": -1}, "clinical.age", "0-120"),
    ({"rT_stage": "rT5"}, "clinical.rT_stage", "rT1, rT2, rT3 or rT4"),
    ({"rN_stage": 2}, "clinical.rN_stage", "rN0"),
    ({"late_complications": "trismus"}, "clinical.late_complications", "list of texts"),
    ({"nodal_recurrence": "yes"}, "clinical.nodal_recurrence", "true or false"),
    ({"nodal_recurrence": False, "rN_stage": "rN2"}, "clinical.nodal_recurrence", "contradicts rN_stage rN2"),
    ({"ecog": 1}, "clinical.ecog", "unknown key"),
    (["kps", 70], "clinical", "must be a mapping"),
])
def test_bad_clinical_block_one_line_naming_file_and_field(tmp_path, clinical, field, needle):
    case = make_case(tmp_path / "c", clinical=clinical)
    r = CliRunner().invoke(main, ["run", str(case), "--output", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output
    assert "case.yaml" in lines[0] and field in lines[0] and needle in lines[0], lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_panel_rows_for_the_slicer_module():
    res = {"patient_selection": [
        {"factor": "kps", "label": "Karnofsky performance status", "value": 60, "unit": "", "adverse": True,
         "threshold": "KPS <= 70", "source": selection.TIAN_2014, "note": ""},
        {"factor": "gtv_volume", "label": "GTV", "value": 35.0, "unit": "cc", "adverse": True, "threshold": "> 30",
         "source": "s", "note": ""},
        {"factor": "nodal_recurrence", "label": "N", "value": None, "unit": "", "adverse": None, "threshold": "t",
         "source": "s", "note": ""}]}
    rows = selection.panel_rows(res)
    assert [r["Adverse"] for r in rows] == ["ADVERSE", "ADVERSE", "not recorded"]
    assert [r["Value"] for r in rows] == ["60", "35.0 cc", "not recorded"]
    assert selection.panel_rows({}) == []


# -------------------------------------------------------------------------------- prescription checks

def test_judged_twice_daily_gap_below_protocol_minimum_fails(tmp_path):
    case = make_case(tmp_path / "c", prescription=RX,
                     schedule={"fractions_per_day": 2, "min_hours_between_fractions": 4})
    res = run(case, tmp_path / "out")
    gap = [r for r in res["prescription_checks"] if r["check"] == "min_hours_between_fractions"]
    assert len(gap) == 1
    g = gap[0]
    assert g["status"] == "fail" and g["met"] is False
    assert g["required"] == 6 and g["actual"] == 4 and g["course"] == "second"
    assert "gap" in g["message"] and "4 h" in g["message"] and "6 h" in g["message"]
    assert g["source"] == "You R et al. Lancet 2023" and g["verified"] is True
    # the LQ full-repair assumption is flagged in the warnings and the assumptions
    assert any("full-repair" in w and "second" in w for w in res["warnings"]), res["warnings"]
    flags = res["assumptions"]["fractionation"]["full_repair_flags"]
    assert [f["course"] for f in flags] == ["second"] and flags[0]["required_hours"] == 6
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="prescription_checks"' in html and "FAIL" in html.split('id="prescription_checks"')[1]
    # a failed fractionation check is never an all-clear: the verdict lists it
    assert res["summary"]["verdict_code"] != "all_limits_met"
    assert len(res["summary"]["prescription_checks_failed"]) == 1
    assert "min_hours_between_fractions" in res["summary"]["prescription_checks_failed"][0]
    assert "1 prescription/fractionation check(s) failed" in res["summary"]["verdict"]


def test_gap_meeting_the_protocol_passes_and_is_not_flagged(tmp_path):
    case = make_case(tmp_path / "c", prescription=RX,
                     schedule={"fractions_per_day": 2, "min_hours_between_fractions": 6, "prescribed_dose_gy": 30})
    res = run(case, tmp_path / "out")
    st = {r["check"]: r for r in res["prescription_checks"]}
    assert st["min_hours_between_fractions"]["status"] == "pass"
    # 30 Gy in 15 fractions = 2 Gy per fraction: EQD2 30 Gy for any alpha/beta, inside 25-35
    assert st["prescribed_eqd2"]["actual"] == pytest.approx(30.0, abs=1e-9)
    assert st["prescribed_eqd2"]["status"] == "pass"
    assert res["assumptions"]["fractionation"]["full_repair_flags"] == []
    assert not any("full-repair" in w for w in res["warnings"])


def test_check_course_hand_values_and_missing_inputs():
    rx = parse_protocol({**BASE_PROTOCOL, "prescription": {
        "scope": "current", "alpha_beta": 10, "eqd2_gy": {"min": 60, "max": 66}, "source": "You 2023",
        "verified": False, "fractionation": {
            "min_hours_between_fractions": {"value": 6, "source": "You 2023", "verified": True},
            "dose_per_fraction_gy": {"min": 1.1, "max": 1.3, "source": "centre", "verified": False}}}},
        "p.yaml").prescription

    class Course:
        def __init__(self, schedule, fractions=54):
            self.name, self.fractions, self.schedule = "rt2", fractions, schedule

    rows = {r["check"]: r for r in rx_mod.check_course(
        Course(rx_mod.Schedule(2, 6.0, 65.0)), rx)}
    assert rows["min_hours_between_fractions"]["status"] == "pass"
    assert rows["dose_per_fraction"]["actual"] == pytest.approx(65 / 54, abs=1e-12)   # 1.2037 Gy
    assert rows["dose_per_fraction"]["status"] == "pass"
    assert rows["prescribed_eqd2"]["actual"] == pytest.approx(65 * (65 / 54 + 10) / 12, abs=1e-9)  # 60.69
    assert rows["prescribed_eqd2"]["actual"] == pytest.approx(60.69, abs=0.005)
    # 60 Gy / 27 fx = 2.22 Gy per fraction: outside 1.1-1.3; once daily: the gap does not apply
    rows = {r["check"]: r for r in rx_mod.check_course(Course(rx_mod.Schedule(1, None, 60.0), 27), rx)}
    assert rows["dose_per_fraction"]["status"] == "fail" and rows["dose_per_fraction"]["met"] is False
    assert rows["min_hours_between_fractions"]["status"] == "not_applicable"
    assert rows["prescribed_eqd2"]["actual"] == pytest.approx(61.11, abs=0.005)
    # nothing stated: not evaluated, saying what is missing; never a pass
    rows = {r["check"]: r for r in rx_mod.check_course(Course(None), rx)}
    assert rows["min_hours_between_fractions"]["status"] == "not_evaluated"
    assert "fractions_per_day" in rows["min_hours_between_fractions"]["message"]
    assert rows["dose_per_fraction"]["status"] == "not_evaluated"
    assert "prescribed_eqd2" not in rows
    rows = {r["check"]: r for r in rx_mod.check_course(Course(rx_mod.Schedule(2, None, None)), rx)}
    assert rows["min_hours_between_fractions"]["status"] == "not_evaluated"
    # a course of two fraction groups (e.g. 25 x 1.2 Gy + 29 x 1.2 Gy, or 50 x 1.2 + 4 x 3 Gy: the mean 65/54 Gy
    # passes 1.1-1.3 either way): neither the dose per fraction nor the nominal EQD2 is judged from the total
    grouped = Course(rx_mod.Schedule(2, 6.0, 65.0))
    grouped.doses = ["g1.dcm", "g2.dcm"]
    rows = {r["check"]: r for r in rx_mod.check_course(grouped, rx)}
    assert rows["dose_per_fraction"]["status"] == "not_evaluated" and rows["dose_per_fraction"]["actual"] is None
    assert "2 fraction groups" in rows["dose_per_fraction"]["message"]
    assert "1.2037" in rows["dose_per_fraction"]["message"]
    assert rows["prescribed_eqd2"]["status"] == "not_evaluated" and rows["prescribed_eqd2"]["actual"] is None
    assert rows["min_hours_between_fractions"]["status"] == "pass"        # the schedule's gap still applies
    flags = rx_mod.repair_flags([Course(rx_mod.Schedule(2, None, None))], rx)
    assert len(flags) == 1 and "no stated gap" in flags[0]["statement"]


@pytest.mark.parametrize("schedule, field, needle", [
    ({"fractions_per_day": 2.5}, "courses[1].schedule.fractions_per_day", "whole number 1-4"),
    ({"fractions_per_day": 2, "min_hours_between_fractions": 30}, "courses[1].schedule.min_hours_between_fractions",
     "< 24 hours"),
    ({"fractions_per_day": 1, "min_hours_between_fractions": 6}, "courses[1].schedule.min_hours_between_fractions",
     "one fraction a day"),
    ({"prescribed_dose_gy": "65 Gy"}, "courses[1].schedule.prescribed_dose_gy", "must be a number"),
    ({"gap": 6}, "courses[1].schedule.gap", "unknown key"),
])
def test_bad_schedule_one_line_naming_file_and_field(tmp_path, schedule, field, needle):
    case = make_case(tmp_path / "c", schedule=schedule)
    r = CliRunner().invoke(main, ["run", str(case), "--output", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "case.yaml" in lines[0] and field in lines[0] and needle in lines[0], lines


@pytest.mark.parametrize("frac, field", [
    ({"min_hours_between_fractions": {"value": 6, "verified": True}},
     "prescription.fractionation.min_hours_between_fractions.source"),
    ({"min_hours_between_fractions": {"value": 30, "source": "s", "verified": True}},
     "prescription.fractionation.min_hours_between_fractions.value"),
    ({"dose_per_fraction_gy": {"min": 1.3, "max": 1.1, "source": "s", "verified": False}},
     "prescription.fractionation.dose_per_fraction_gy"),
    ({"gap_hours": 6}, "prescription.fractionation.gap_hours"),
])
def test_bad_protocol_fractionation(frac, field):
    with pytest.raises(InputError) as exc:
        parse_protocol({**BASE_PROTOCOL, "prescription": {**RX, "fractionation": frac}}, "p.yaml")
    assert exc.value.field == field, str(exc.value)


def test_report_has_a_patient_selection_section(tmp_path):
    case = make_case(tmp_path / "c", clinical={"kps": 60, "age": 58, "rT_stage": "rT4",
                                               "late_complications": ["temporal lobe necrosis"]})
    run(case, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    sec = html.split('<section id="patient_selection">')[1].split("</section>")[0]
    assert "Patient selection" in sec and "5 adverse factor(s)" in sec
    assert sec.count("ADVERSE") == 5 and "not recorded" in sec and "Tian YM" in sec and "NCT02456506" in sec
    assert "temporal lobe necrosis" in sec and "35.0 cc" in sec


def test_cli_prints_prescription_checks_and_selection_count(tmp_path):
    case = make_case(tmp_path / "c", prescription=RX, clinical={"kps": 60, "age": 58},
                     schedule={"fractions_per_day": 2, "min_hours_between_fractions": 4})
    r = CliRunner().invoke(main, ["run", str(case), "--output", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    rx_line = next(ln for ln in lines if ln.startswith("prescription checks (second): "))
    assert "gap between same-day fractions FAIL" in rx_line and "4 h apart" in rx_line and "6 h" in rx_line
    sel = next(ln for ln in lines if ln.startswith("patient selection (information only"))
    # kps 60 (<= 70), age 58 (> 50), GTV 35 cc (> 30): 3 adverse; rT, late complications, nodal not recorded
    assert "3 adverse factor(s) of 7 (kps, age, gtv_volume); 3 not recorded" in sel
