"""RTDOSE DoseSummationType (DICOM PS3.3 C.8.8.3), plausibility both ways, RBE-weighted doses, and the pure
header check ``dicom_rt.check_rtdose_header`` (issue 10, items 1-2).

Expected numbers come from the construction: known stored pixels x a known DoseGridScaling, times the fraction
count of the named fraction group (FRACTION_SESSION) or the stated RBE (physical particle dose), or nothing
(PLAN, FRACTION, EFFECTIVE).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ReirradiationNPCLib import dicom_export as dx
from ReirradiationNPCLib import dicom_rt as dr
from ReirradiationNPCLib.cli import main
from ReirradiationNPCLib.errors import InputError

from test_dicom_rt import IDENT, known_pixels, make_rtdose

PX_MAX = 3438          # known_pixels().max() = 1000*3 + 100*4 + 7*5 + 3


def make_plan(path: Path, groups: list[tuple[int, int]], *, ion: bool = False, radiation: str = "PHOTON") -> Path:
    """A hand-built RTPLAN: ``groups`` = [(FractionGroupNumber, NumberOfFractionsPlanned), ...]; ``ion`` writes an
    RT Ion Plan with an IonBeamSequence (RadiationType ``radiation``), else a BeamSequence."""
    sop = dr.RT_ION_PLAN_STORAGE if ion else dr.RT_PLAN_STORAGE
    ds = dx._dataset(sop, "RTPLAN", IDENT, series_description="test plan")
    ds.RTPlanLabel = "TEST"
    items = []
    for num, n in groups:
        g = Dataset()
        g.FractionGroupNumber, g.NumberOfFractionsPlanned = num, n
        items.append(g)
    ds.FractionGroupSequence = Sequence(items)
    b = Dataset()
    b.BeamNumber, b.RadiationType = 1, radiation
    setattr(ds, "IonBeamSequence" if ion else "BeamSequence", Sequence([b]))
    dx.save(ds, path)
    return path


def plan_ref(plan: dr.PlanInfo, group: int | None = None) -> Sequence:
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = dr.RT_PLAN_STORAGE, plan.sop_instance_uid
    if group is not None:
        fg = Dataset()
        fg.ReferencedFractionGroupNumber = group
        ref.ReferencedFractionGroupSequence = Sequence([fg])
    return Sequence([ref])


# ----------------------------------------------------------------------------------- summation types

def test_fraction_is_one_fraction_group_taken_as_is(tmp_path):
    """FRACTION = the entire delivery of one fraction group: NOT multiplied. Plan: one group of 30 fractions;
    0.02 Gy per unit -> maximum 68.76 Gy (2.29 Gy/fx)."""
    plan = dr.read_rtplan(make_plan(tmp_path / "p.dcm", [(1, 30)]))
    f = make_rtdose(tmp_path / "d.dcm", known_pixels(), "0.02", DoseSummationType="FRACTION",
                    ReferencedRTPlanSequence=plan_ref(plan))
    vol = dr.read_rtdose(f, plan=plan)
    np.testing.assert_allclose(vol.array, known_pixels() * 0.02, rtol=1e-6)
    assert float(vol.array.max()) == pytest.approx(68.76, rel=1e-6)
    assert vol.meta["fractions"] == 30 and vol.meta["header_check"].scale == 1.0
    assert vol.meta["header_check"].fraction_group == 1 and vol.meta["header_check"].whole_course
    with pytest.raises(InputError, match="plan:") as exc:           # without the plan the group is unknown
        dr.read_rtdose(f, fractions=30)
    assert exc.value.field == "DoseSummationType" and str(f) in str(exc.value)
    with pytest.raises(InputError, match="disagrees") as exc:       # stated 35, the group has 30
        dr.read_rtdose(f, plan=plan, fractions=35)


def test_fraction_group_resolved_through_the_plan(tmp_path):
    """Plan with two groups (1: 25 fx, 2: 5 fx). The dose names group 2 -> 5 fractions; naming none or a group the
    plan lacks is refused; a PLAN dose of a two-group plan is refused (separate EQD2 terms needed)."""
    plan = dr.read_rtplan(make_plan(tmp_path / "p.dcm", [(1, 25), (2, 5)]))
    assert plan.group_numbers == [1, 2] and plan.fractions is None and plan.group_fractions(2) == 5
    g2 = make_rtdose(tmp_path / "g2.dcm", known_pixels(), "0.003", DoseSummationType="FRACTION",
                     ReferencedRTPlanSequence=plan_ref(plan, 2))          # max 10.31 Gy over 5 fx
    vol = dr.read_rtdose(g2, plan=plan)
    assert vol.meta["fractions"] == 5 and not vol.meta["header_check"].whole_course
    np.testing.assert_allclose(vol.array, known_pixels() * 0.003, rtol=1e-6)
    none = make_rtdose(tmp_path / "n.dcm", known_pixels(), "0.003", DoseSummationType="FRACTION",
                       ReferencedRTPlanSequence=plan_ref(plan))
    with pytest.raises(InputError, match="cannot be resolved") as exc:
        dr.read_rtdose(none, plan=plan)
    assert exc.value.field == "ReferencedFractionGroupSequence"
    g3 = make_rtdose(tmp_path / "g3.dcm", known_pixels(), "0.003", DoseSummationType="FRACTION",
                     ReferencedRTPlanSequence=plan_ref(plan, 3))
    with pytest.raises(InputError, match="group 3 is not in the plan"):
        dr.read_rtdose(g3, plan=plan)
    whole = make_rtdose(tmp_path / "w.dcm", known_pixels(), "0.02", ReferencedRTPlanSequence=plan_ref(plan))
    with pytest.raises(InputError, match="2 fraction groups"):
        dr.read_rtdose(whole, plan=plan)


def test_fraction_session_is_multiplied_by_its_groups_fractions(tmp_path):
    """FRACTION_SESSION: 0.0005 Gy per unit, maximum 1.719 Gy in one session; group 2 has 5 fractions ->
    course-group total = pixels x 0.0005 x 5, maximum 8.595 Gy; the warning says sessions are assumed identical."""
    plan = dr.read_rtplan(make_plan(tmp_path / "p.dcm", [(1, 25), (2, 5)]))
    f = make_rtdose(tmp_path / "s.dcm", known_pixels(), "0.0005", DoseSummationType="FRACTION_SESSION",
                    ReferencedRTPlanSequence=plan_ref(plan, 2))
    vol = dr.read_rtdose(f, plan=plan)
    np.testing.assert_allclose(vol.array, known_pixels() * 0.0005 * 5, rtol=1e-6)
    assert float(vol.array.max()) == pytest.approx(8.595, rel=1e-6)
    assert vol.meta["fractions"] == 5 and vol.meta["header_check"].scale == 5.0
    assert any("identical" in n and "5 fractions" in n for n in vol.meta["notes"])


def test_plausibility_both_ways(tmp_path):
    """A session above 30 Gy (0.01 Gy/unit: 34.38 Gy) and a whole course below 0.5 Gy per fraction at its maximum
    (0.001 Gy/unit: 3.438 Gy / 30 fx = 0.115 Gy/fx) are refused, naming the file."""
    plan = dr.read_rtplan(make_plan(tmp_path / "p.dcm", [(1, 30)]))
    hot = make_rtdose(tmp_path / "hot.dcm", known_pixels(), "0.01", DoseSummationType="FRACTION_SESSION",
                      ReferencedRTPlanSequence=plan_ref(plan))
    with pytest.raises(InputError, match="implausibly high") as exc:
        dr.read_rtdose(hot, plan=plan)
    assert str(hot) in str(exc.value)
    for summation in ("PLAN", "FRACTION"):
        low = make_rtdose(tmp_path / f"low_{summation}.dcm", known_pixels(), "0.001", DoseSummationType=summation,
                          ReferencedRTPlanSequence=plan_ref(plan))
        with pytest.raises(InputError, match="implausibly low") as exc:
            dr.read_rtdose(low, plan=plan)
        assert str(low) in str(exc.value) and "0.115 Gy per fraction" in str(exc.value)
    # the same low dose read for physical metrics only (no fraction count) is not judged
    assert float(dr.read_rtdose(tmp_path / "low_PLAN.dcm").array.max()) == pytest.approx(3.438, rel=1e-6)
    # just above the threshold: 0.005 Gy/unit -> 17.19 Gy / 30 = 0.573 Gy/fx accepted
    ok = make_rtdose(tmp_path / "ok.dcm", known_pixels(), "0.005", ReferencedRTPlanSequence=plan_ref(plan))
    assert dr.read_rtdose(ok, plan=plan).meta["fractions"] == 30


def test_multi_plan_needs_one_confirmed_fraction_count(tmp_path):
    f = make_rtdose(tmp_path / "m.dcm", known_pixels(), "0.02", DoseSummationType="MULTI_PLAN")
    with pytest.raises(InputError, match="one confirmed fraction count"):
        dr.read_rtdose(f, require_fractions=True)
    vol = dr.read_rtdose(f, fractions=30, require_fractions=True)
    assert vol.meta["fractions"] == 30 and any("MULTI_PLAN" in n for n in vol.meta["notes"])
    np.testing.assert_allclose(vol.array, known_pixels() * 0.02, rtol=1e-6)
    plan = dr.read_rtplan(make_plan(tmp_path / "p.dcm", [(1, 33)]))
    with pytest.raises(InputError, match="share one fraction count"):
        dr.read_rtdose(f, fractions=30, plan=plan)


@pytest.mark.parametrize("summation", ["BEAM", "BEAM_SESSION", "BRACHY", "BRACHY_SESSION", "CONTROL_POINT",
                                       "RECORD", "PLAN_OVERVIEW", "SOMETHING_ELSE"])
def test_refused_summation_types_say_what_to_export(tmp_path, summation):
    f = make_rtdose(tmp_path / "d.dcm", known_pixels(), "0.02", DoseSummationType=summation)
    with pytest.raises(InputError) as exc:
        dr.read_rtdose(f, fractions=30)
    msg = str(exc.value)
    assert exc.value.field == "DoseSummationType" and str(f) in msg and "\n" not in msg
    assert "export the plan sum as DoseSummationType PLAN" in msg


# ------------------------------------------------------------------------------- the pure header check

def test_header_check_on_a_dict_as_read_from_a_dicom_database():
    """The same checks on plain dicts (Slicer's DICOM database): FRACTION_SESSION naming group 2 of a
    (25, 5)-fraction plan -> scale 5, fractions 5; a maximum of 31 Gy in one session is refused."""
    plan = dr.plan_info_from_dataset({"Modality": "RTPLAN", "SOPInstanceUID": "1.2.3.7", "FractionGroupSequence": [
        {"FractionGroupNumber": 1, "NumberOfFractionsPlanned": 25},
        {"FractionGroupNumber": 2, "NumberOfFractionsPlanned": "5"}]}, "plan.dcm")
    header = {"Modality": "RTDOSE", "DoseUnits": "GY", "DoseType": "PHYSICAL",
              "DoseSummationType": "FRACTION_SESSION",
              "ReferencedRTPlanSequence": [{"ReferencedSOPInstanceUID": "1.2.3.7",
                                            "ReferencedFractionGroupSequence": [{"ReferencedFractionGroupNumber": 2}]}]}
    chk = dr.check_rtdose_header(header, plan=plan, max_dose_gy=2.0, source="dose.dcm")
    assert (chk.scale, chk.fractions, chk.fraction_group, chk.rbe) == (5.0, 5, 2, None)
    assert chk.assumptions()["sessions_assumed_identical"] is True
    with pytest.raises(InputError, match="implausibly high"):
        dr.check_rtdose_header(header, plan=plan, max_dose_gy=31.0, source="dose.dcm")
    with pytest.raises(InputError, match="BEAM") as exc:
        dr.check_rtdose_header(dict(header, DoseSummationType="BEAM"), plan=plan, source="dose.dcm")
    assert str(exc.value).startswith("dose.dcm: DoseSummationType: ")


# ---------------------------------------------------------------------------------------------- RBE

def test_rbe_physical_particle_dose_multiplied_once(tmp_path):
    """A PHYSICAL dose of an RT Ion (proton) plan: refused without rbe; with rbe 1.1 it is x 1.1 once
    (0.02 Gy/unit: maximum 68.76 Gy physical -> 75.636 Gy RBE-weighted)."""
    plan = dr.read_rtplan(make_plan(tmp_path / "p.dcm", [(1, 30)], ion=True, radiation="PROTON"))
    assert plan.is_particle and plan.radiation_types == ["PROTON"]
    f = make_rtdose(tmp_path / "d.dcm", known_pixels(), "0.02", ReferencedRTPlanSequence=plan_ref(plan))
    with pytest.raises(InputError, match="rbe") as exc:
        dr.read_rtdose(f, plan=plan)
    assert exc.value.field == "DoseType"
    vol = dr.read_rtdose(f, plan=plan, rbe=1.1)
    np.testing.assert_allclose(vol.array, known_pixels() * 0.02 * 1.1, rtol=1e-6)
    assert float(vol.array.max()) == pytest.approx(75.636, rel=1e-6)
    chk = vol.meta["header_check"]
    assert chk.rbe == 1.1 and chk.rbe_applied and chk.radiation == "proton"
    # without a plan, the case's radiation: proton says the same
    vol2 = dr.read_rtdose(make_rtdose(tmp_path / "np.dcm", known_pixels(), "0.02"), fractions=30, rbe=1.1,
                          radiation="proton")
    np.testing.assert_allclose(vol2.array, vol.array, rtol=1e-6)
    with pytest.raises(InputError, match="physical dose of radiation proton"):
        dr.read_rtdose(tmp_path / "np.dcm", fractions=30, radiation="proton")


def test_rbe_rtdose_referencing_an_ion_plan_is_particle_without_the_plan(tmp_path):
    """A PHYSICAL RTDOSE whose ReferencedRTPlanSequence names an RT Ion Plan (by ReferencedSOPClassUID) is a particle
    dose even when the plan file is not given (e.g. `metrics` without --plan): refused without rbe, x 1.1 once with
    rbe 1.1 (0.02 Gy/unit: maximum 68.76 Gy physical -> 75.636 Gy), refused when the case says photon."""
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = dr.RT_ION_PLAN_STORAGE, "1.2.3.4.5"
    f = make_rtdose(tmp_path / "d.dcm", known_pixels(), "0.02", ReferencedRTPlanSequence=Sequence([ref]))
    with pytest.raises(InputError, match="RT Ion plan") as exc:
        dr.read_rtdose(f, fractions=30)
    assert exc.value.field == "DoseType" and str(f) in str(exc.value)
    vol = dr.read_rtdose(f, fractions=30, rbe=1.1)
    assert float(vol.array.max()) == pytest.approx(75.636, rel=1e-6)
    assert vol.meta["header_check"].rbe_applied
    with pytest.raises(InputError, match="RT Ion Plan"):
        dr.read_rtdose(f, fractions=30, radiation="photon")
    # a photon plan's reference changes nothing: read as is (68.76 Gy)
    ref.ReferencedSOPClassUID = dr.RT_PLAN_STORAGE
    g = make_rtdose(tmp_path / "g.dcm", known_pixels(), "0.02", ReferencedRTPlanSequence=Sequence([ref]))
    assert float(dr.read_rtdose(g, fractions=30).array.max()) == pytest.approx(68.76, rel=1e-6)


def test_rbe_effective_dose_recorded_not_applied(tmp_path):
    """An EFFECTIVE (RBE-weighted) dose is refused unless the case states dose_type EFFECTIVE and the RBE; then it
    is taken as is (the RBE is recorded, never applied again)."""
    f = make_rtdose(tmp_path / "e.dcm", known_pixels(), "0.02", DoseType="EFFECTIVE", Manufacturer="SomeTPS",
                    SeriesDescription="proton plan RBE dose")
    with pytest.raises(InputError, match="dose_type: EFFECTIVE") as exc:
        dr.read_rtdose(f, fractions=30)
    assert exc.value.field == "DoseType"
    with pytest.raises(InputError, match="dose_type: EFFECTIVE"):
        dr.read_rtdose(f, fractions=30, rbe=1.1)                        # the RBE alone is not enough
    vol = dr.read_rtdose(f, fractions=30, dose_type="EFFECTIVE", rbe=1.1)
    np.testing.assert_allclose(vol.array, known_pixels() * 0.02, rtol=1e-6)   # not x 1.1
    chk = vol.meta["header_check"]
    assert chk.rbe == 1.1 and not chk.rbe_applied and "recorded, not applied" in chk.assumptions()["rbe_rule"]
    phys = make_rtdose(tmp_path / "p.dcm", known_pixels(), "0.02")
    with pytest.raises(InputError, match="DoseType is PHYSICAL"):
        dr.read_rtdose(phys, fractions=30, dose_type="EFFECTIVE", rbe=1.1)
    with pytest.raises(InputError, match="not a proton/ion course"):
        dr.read_rtdose(phys, fractions=30, rbe=1.1)                      # photons (no ion plan, nothing stated)
    photon_plan = dr.read_rtplan(make_plan(tmp_path / "pp.dcm", [(1, 30)]))
    with pytest.raises(InputError, match="disagrees with the plan's RadiationType"):
        dr.read_rtdose(phys, plan=photon_plan, rbe=1.1, radiation="proton")


def test_own_eqd2_output_refused_even_when_stated_effective(tmp_path):
    from ReirradiationNPCLib.geometry import Grid, Volume
    grid = Grid((4, 3, 2), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    path = tmp_path / "cumulative_eqd2.dcm"
    dx.write_rtdose(Volume(np.full(grid.shape, 60.0, np.float32), grid), IDENT, path,
                    series_description="Cumulative EQD2 (Gy) LQ a/b per organ", dose_type="EFFECTIVE",
                    summation="MULTI_PLAN")
    with pytest.raises(InputError, match="EQD2 map") as exc:
        dr.read_rtdose(path, fractions=30, dose_type="EFFECTIVE", rbe=1.1)
    assert exc.value.field == "DoseType"
    other = make_rtdose(tmp_path / "o.dcm", known_pixels(), "0.02", DoseType="EFFECTIVE", Manufacturer="TPS",
                        SeriesDescription="EQD2 sum")
    with pytest.raises(InputError, match="EQD2 map"):
        dr.read_rtdose(other, fractions=30, dose_type="EFFECTIVE", rbe=1.1)


def test_case_file_rbe_keys(tmp_path):
    from ReirradiationNPCLib.case import parse_case
    base = {"reference": {"structures": "s"}, "protocol": "p",
            "courses": [{"name": "c1", "dose": "d.nrrd", "fractions": 30}]}

    def parse(**course):
        data = json.loads(json.dumps(base))
        data["courses"][0].update(course)
        return parse_case(data, tmp_path / "case.yaml")
    c = parse(dose_type="effective", rbe=1.1).courses[0]
    assert (c.dose_type, c.rbe, c.radiation) == ("EFFECTIVE", 1.1, None)
    for kw, key in (({"dose_type": "EFFECTIVE"}, "rbe"), ({"rbe": 0.9}, "rbe"), ({"rbe": True}, "rbe"),
                    ({"dose_type": "RBE"}, "dose_type"), ({"radiation": "gamma"}, "radiation"),
                    ({"radiation": "photon", "rbe": 1.1}, "rbe")):
        with pytest.raises(InputError) as exc:
            parse(**kw)
        assert exc.value.field == f"courses[0].{key}", kw


# ------------------------------------------------------------- the demo's DICOM case through the pipeline

@pytest.fixture(scope="module")
def demo_dicom(tmp_path_factory) -> Path:
    from ReirradiationNPCLib.synthetic_dicom import generate_dicom
    return generate_dicom(tmp_path_factory.mktemp("dicom_summation") / "case").parent


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """Rewrite an RTDOSE with pydicom: set attributes; ``pixel_divisor`` divides the stored pixel values."""
    ds = pydicom.dcmread(src)
    div = changes.pop("pixel_divisor", None)
    if div is not None:
        px = ds.pixel_array.astype(np.float64)
        ds.PixelData = np.rint(px / div).astype(ds.pixel_array.dtype).tobytes()
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(dst)
    return dst


def _case_with(folder: Path, name: str, course: int, **keys) -> Path:
    data = yaml.safe_load((folder / "case_identity.yaml").read_text())
    data["courses"][course].update(keys)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _analyse(case: Path):
    """The pipeline up to results.json's content (no files written): (cumulative EQD2 map, results dict)."""
    from ReirradiationNPCLib.analysis import compute
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import build_results, prepare
    prep = prepare(load_case(case))
    analysis = compute(prep.grid, prep.courses, prep.structures, prep.protocol)
    return analysis.cumulative.astype(np.float64), build_results(prep, analysis).to_dict()


@pytest.fixture(scope="module")
def plan_map(demo_dicom):
    return _analyse(demo_dicom / "case_identity.yaml")[0]


def test_demo_current_dose_as_fraction_and_fraction_session_equals_plan(demo_dicom, plan_map):
    """The current RTDOSE (65 Gy / 54 fx, one fraction group) rewritten as FRACTION (the same pixels) and as
    FRACTION_SESSION (pixels / 54): the cumulative EQD2 maps equal the PLAN run within 0.01 Gy."""
    assert plan_map.max() > 60.0                              # a real re-irradiation map, not an empty one
    src = demo_dicom / "rtdose_course2.dcm"
    frac = _rewrite(src, demo_dicom / "rtdose_course2_fraction.dcm", DoseSummationType="FRACTION")
    sess = _rewrite(src, demo_dicom / "rtdose_course2_session.dcm", DoseSummationType="FRACTION_SESSION",
                    pixel_divisor=54)
    assert pydicom.dcmread(sess).pixel_array.max() < pydicom.dcmread(src).pixel_array.max() / 53.9
    for dose, tag in ((frac, "fraction"), (sess, "session")):
        got, res = _analyse(_case_with(demo_dicom, f"case_{tag}.yaml", 1, dose=dose.name))
        assert np.abs(got - plan_map).max() < 0.01, tag
        kind = res["assumptions"]["courses"][1]["dose"]
        assert kind["dose_summation_type"] == ("FRACTION" if tag == "fraction" else "FRACTION_SESSION")
        assert kind["fractions"] == 54 and kind["fraction_group"] == 1
        if tag == "session":
            assert kind["scale"] == 54 and any("identical" in w for w in res["warnings"])


def test_demo_beam_dose_exit_2_one_line(demo_dicom, tmp_path):
    beam = _rewrite(demo_dicom / "rtdose_course2.dcm", demo_dicom / "rtdose_course2_beam.dcm",
                    DoseSummationType="BEAM")
    case = _case_with(demo_dicom, "case_beam.yaml", 1, dose=beam.name)
    r = CliRunner().invoke(main, ["run", str(case), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "rtdose_course2_beam.dcm" in lines[0] and "DoseSummationType" in lines[0]
    assert "export the plan sum as DoseSummationType PLAN" in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()


def test_demo_prior_dose_rbe_weighted(demo_dicom, plan_map, tmp_path):
    """The prior RTDOSE rewritten (a) as EFFECTIVE (RBE-weighted, same pixels) with dose_type EFFECTIVE and rbe 1.1:
    identical maps, RBE recorded not applied; (b) as a proton PHYSICAL dose with pixels / 1.1 and rbe 1.1: x 1.1
    once gives the PLAN run back within 0.01 Gy. The RBE shows in results.json's course assumptions and the
    report."""
    from ReirradiationNPCLib.pipeline import run_case
    src = demo_dicom / "rtdose_course1_registered.dcm"
    eff = _rewrite(src, demo_dicom / "rtdose_course1_effective.dcm", DoseType="EFFECTIVE", Manufacturer="TPS",
                   SeriesDescription="proton RBE-weighted dose")
    case = _case_with(demo_dicom, "case_eff_missing.yaml", 0, dose=eff.name)
    r = CliRunner().invoke(main, ["run", str(case), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "dose_type: EFFECTIVE" in r.output
    got, res = _analyse(_case_with(demo_dicom, "case_eff.yaml", 0, dose=eff.name, dose_type="EFFECTIVE", rbe=1.1))
    assert np.abs(got - plan_map).max() < 0.01
    a = res["assumptions"]["courses"]
    assert a[0]["rbe"] == 1.1 and a[0]["dose"]["rbe_applied"] is False and a[1]["rbe"] is None
    phys = _rewrite(src, demo_dicom / "rtdose_course1_proton.dcm", pixel_divisor=1.1)
    case = _case_with(demo_dicom, "case_proton.yaml", 0, dose=phys.name, radiation="proton", rbe=1.1)
    out = tmp_path / "proton"
    run_case(case, out)
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cumulative_eqd2.nrrd"))).astype(np.float64)
    assert np.abs(got - plan_map).max() < 0.01
    a = json.loads((out / "results.json").read_text())["assumptions"]["courses"]
    assert a[0]["rbe"] == 1.1 and a[0]["dose"]["rbe_applied"] is True and a[0]["dose"]["radiation"] == "proton"
    report = (out / "report.html").read_text()
    assert "RBE 1.10: physical dose multiplied once by the stated RBE 1.1" in report


def test_fraction_groups_of_one_plan_all_needed(tmp_path):
    """A course whose plan has two fraction groups (25 + 5 fx): one FRACTION dose per group, each group once.
    Both given: the course holds both groups (each one EQD2 term: test_fraction_groups.py)."""
    from ReirradiationNPCLib.case import CourseSpec
    from ReirradiationNPCLib.pipeline import load_course_doses
    pp = make_plan(tmp_path / "p.dcm", [(1, 25), (2, 5)])
    plan = dr.read_rtplan(pp)
    g1 = make_rtdose(tmp_path / "g1.dcm", known_pixels(), "0.015", DoseSummationType="FRACTION",
                     ReferencedRTPlanSequence=plan_ref(plan, 1))               # 51.57 Gy / 25 fx
    g2 = make_rtdose(tmp_path / "g2.dcm", known_pixels(), "0.003", DoseSummationType="FRACTION",
                     ReferencedRTPlanSequence=plan_ref(plan, 2))               # 10.31 Gy / 5 fx

    def course(*doses):
        return CourseSpec(name="c1", dose=doses[0], doses=list(doses), fractions=30, interval_months=24.0,
                          plan=pp)
    with pytest.raises(InputError, match=r"group\(s\) 2 of the plan have no dose"):
        load_course_doses(course(g1), 0)
    with pytest.raises(InputError, match="group 1 is given twice"):
        load_course_doses(course(g1, make_rtdose(tmp_path / "g1b.dcm", known_pixels(), "0.015",
                                                 DoseSummationType="FRACTION",
                                                 ReferencedRTPlanSequence=plan_ref(plan, 1))), 0)
    vol = load_course_doses(course(g2, g1), 0)       # in the plan's group order, each with its own fractions
    assert [v.meta["fractions"] for v in vol.meta["groups"]] == [25, 5]
    assert [v.meta["header_check"].fraction_group for v in vol.meta["groups"]] == [1, 2]


def test_metrics_cli_reads_a_session_dose_through_its_plan(tmp_path):
    """metrics --plan: a FRACTION_SESSION RTDOSE (0.0005 Gy/unit, maximum 1.719 Gy) of a one-group 30-fraction plan
    is multiplied by 30: Dmax of a structure covering the whole grid = 3438 x 0.0005 x 30 = 51.57 Gy. Without
    --plan it is refused (exit 2, one line)."""
    from ReirradiationNPCLib.geometry import Volume
    plan_path = make_plan(tmp_path / "p.dcm", [(1, 30)])
    plan = dr.read_rtplan(plan_path)
    f = make_rtdose(tmp_path / "s.dcm", known_pixels(), "0.0005", DoseSummationType="FRACTION_SESSION",
                    ReferencedRTPlanSequence=plan_ref(plan))
    grid = dr.read_rtdose(f, plan=plan).grid
    sitk.WriteImage(Volume(np.ones(grid.shape, np.uint8), grid).to_sitk(), str(tmp_path / "Body.nrrd"))
    out = tmp_path / "m.json"
    r = CliRunner().invoke(main, ["metrics", "--dose", str(f), "--plan", str(plan_path), "--structures",
                                  str(tmp_path / "Body.nrrd"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())["structures"][0]["metrics"]
    assert m["Dmax"] == pytest.approx(51.57, abs=1e-4)
    assert m["Dmin"] == pytest.approx(3 * 0.0005 * 30, abs=1e-6)     # the smallest stored value, 3 -> 0.045 Gy
    r = CliRunner().invoke(main, ["metrics", "--dose", str(f), "--structures", str(tmp_path / "Body.nrrd")])
    assert r.exit_code == 2 and len([ln for ln in r.output.splitlines() if ln.strip()]) == 1
    assert "plan" in r.output and "FRACTION_SESSION" in r.output
