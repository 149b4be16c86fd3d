"""A plan with several fraction groups: each group is one EQD2 term with its own fractions (issue 10 item 1).

Hand values (EQD2 = D (D/n + ab) / (2 + ab)):
- 46 Gy / 23 fx (2 Gy/fx) + 20 Gy / 10 fx (2 Gy/fx): 46 + 20 = 66.0 Gy at every alpha/beta.
- 46 Gy / 23 fx + 20 Gy / 5 fx (4 Gy/fx): ab 2: 46 + 20 (4 + 2)/4 = 76.0; ab 3: 46 + 20 (4 + 3)/5 = 74.0;
  ab 10: 46 + 20 (4 + 10)/12 = 69.3333. The summed dose in the summed fractions (66 Gy / 28 fx) would give at
  ab 2 66 (66/28 + 2)/4 = 71.8929, 4.1 Gy less: the test below fails on that shortcut.
- prior 70 Gy / 35 fx (2 Gy/fx) = 70.0 at every alpha/beta.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from click.testing import CliRunner

from ReirradiationNPCLib import analysis, budget
from ReirradiationNPCLib import dicom_rt as dr
from ReirradiationNPCLib.analysis import CourseData, DoseTerm, StructureData
from ReirradiationNPCLib.cli import main
from ReirradiationNPCLib.eqd2 import effective_fractions, eqd2
from ReirradiationNPCLib.geometry import Grid, Volume, bounding_box
from ReirradiationNPCLib.protocol import parse_protocol

from test_dicom_rt import known_pixels, make_rtdose
from test_dose_summation import make_plan, plan_ref


def hand(d, n, ab):
    return d * (d / n + ab) / (2.0 + ab)


SHAPE = (8, 8, 16)


def two_group_course(d1=46.0, n1=23, d2=20.0, n2=5, shape=SHAPE, name="cur"):
    a = np.full(shape, d1, np.float32)
    b = np.full(shape, d2, np.float32)
    return CourseData(name, a + b, n1 + n2, None, True, groups=[DoseTerm(a, n1, "group 1"), DoseTerm(b, n2, "g2")])


def protocol(constraints_a=(), constraints_b=()):
    return parse_protocol({"name": "t", "version": "1", "alpha_beta": {"default": 10}, "recovery": {"model": "none"},
                           "warn_tolerance_percent": 0,
                           "organs": {"a": {"aliases": ["A"], "alpha_beta": 2, "constraints": list(constraints_a)},
                                      "b": {"aliases": ["B"], "alpha_beta": 3, "constraints": list(constraints_b)}}},
                          "t.yaml")


def organs(p):
    """A (ab 2) on i 2-8, B (ab 3) on i 6-11 (overlap i 6-8), inside the grid (uniform doses sample exactly)."""
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    a[2:6, 2:6, 2:9] = True
    b[2:6, 2:6, 6:12] = True
    out = []
    for name, m in (("A", a), ("B", b)):
        box = bounding_box(m)
        out.append(StructureData(name, m[box].copy(), box, p.match(name)))
    return out


@pytest.mark.parametrize("ab,two_gy,four_gy", [(2.0, 66.0, 76.0), (3.0, 66.0, 74.0), (10.0, 66.0, 69.333333)])
def test_two_groups_are_two_eqd2_terms(ab, two_gy, four_gy):
    assert float(analysis.course_eqd2(two_group_course(n2=10), ab)[0, 0, 0]) == pytest.approx(two_gy, abs=1e-4)
    got = analysis.course_eqd2(two_group_course(), ab)
    np.testing.assert_allclose(got, four_gy, atol=1e-4)
    assert abs(hand(66.0, 28, ab) - four_gy) > 1.0      # the shortcut (summed dose, summed fractions) is wrong
    d, n = analysis.course_dose(two_group_course())     # one term: the sum and its effective fractions
    np.testing.assert_allclose(d, 66.0)
    np.testing.assert_allclose(n, 66.0 ** 2 / (46.0 ** 2 / 23 + 20.0 ** 2 / 5), rtol=1e-12)


def test_one_group_equals_the_single_course_path():
    rng = np.random.default_rng(7)
    dose = rng.uniform(0, 80, SHAPE).astype(np.float32)
    single = CourseData("c", dose, 33, None, True)
    listed = CourseData("c", dose, 33, None, True, groups=[DoseTerm(dose, 33)])
    for ab in (2.0, 3.0, 10.0):
        assert np.array_equal(analysis.course_eqd2(single, ab), analysis.course_eqd2(listed, ab))
        assert np.array_equal(analysis.course_eqd2(single, ab), eqd2(dose, 33, ab))


def test_effective_fractions_scale_free_and_bounded():
    """n_eff = P^2 / sum D_g^2/n_g: unchanged when every dose is scaled (dose uncertainty), between the smallest n_g
    and the sum of the n_g; where no group gives dose it is the course's fractions."""
    d1 = np.array([46.0, 0.0, 10.0, 0.0])
    d2 = np.array([20.0, 5.0, 0.0, 0.0])
    p, n = effective_fractions([d1, d2], [23, 5], 28)
    p2, n2 = effective_fractions([1.05 * d1, 1.05 * d2], [23, 5], 28)
    np.testing.assert_allclose(n2, n, rtol=1e-12)
    np.testing.assert_allclose(p, [66.0, 5.0, 10.0, 0.0])
    np.testing.assert_allclose(n, [66.0 ** 2 / 172.0, 5.0, 23.0, 28.0], rtol=1e-12)   # 46^2/23 + 20^2/5 = 172
    # scaled by 1.05: ab 2 -> 48.3 (2.1 + 2)/4 + 21 (4.2 + 2)/4 = 49.5075 + 32.55
    assert float(eqd2(p2[:1], n2[:1], 2.0)[0]) == pytest.approx(49.5075 + 32.55, abs=1e-9)


def test_maps_metrics_rows_and_budget_use_the_group_terms():
    """Prior 70 Gy / 35 fx + current 46/23 + 20/5. Display map: A only 146, overlap max(146, 144) = 146, B only 144,
    no organ (ab 10) 139.3333; course map of the current course 76 / 76 / 74 / 69.3333; check maps ab 2: 146, ab 3:
    144 everywhere. Table: A current Dmean 76, cumulative 146; B 74, 144. A per-course limit of 75 Gy fails on the
    current course of A (76) and passes on B (74); its max_course_eqd2_gy 75 condition likewise."""
    lim = {"metric": "Dmax", "limit_gy": 75, "scope": "per_course", "source": "test", "verified": False,
           "conditions": {"max_course_eqd2_gy": 75}}
    p = protocol([lim], [lim])
    grid = Grid((SHAPE[2], SHAPE[1], SHAPE[0]), (0.0, 0.0, 0.0), (2.5, 2.5, 2.5))
    prior = CourseData("prior", np.full(SHAPE, 70.0, np.float32), 35, 24.0, False)
    courses = [prior, two_group_course()]
    structs = organs(p)
    course, cum, ab, _ = analysis.display_maps(courses, structs, p)
    np.testing.assert_allclose(cum[2:6, 2:6, 2:6], 146.0, atol=1e-3)
    np.testing.assert_allclose(cum[2:6, 2:6, 6:9], 146.0, atol=1e-3)
    np.testing.assert_allclose(cum[2:6, 2:6, 9:12], 144.0, atol=1e-3)
    np.testing.assert_allclose(cum[:, :, 13:], 139.333333, atol=1e-3)
    np.testing.assert_allclose(course["cur"][2:6, 2:6, 2:9], 76.0, atol=1e-3)
    np.testing.assert_allclose(course["cur"][2:6, 2:6, 9:12], 74.0, atol=1e-3)
    np.testing.assert_allclose(course["cur"][:, :, 13:], 69.333333, atol=1e-3)
    np.testing.assert_allclose(course["prior"], 70.0, atol=1e-3)
    maps, _ = analysis.check_maps(courses, structs, p)
    assert [m.alpha_beta for m in maps] == [2.0, 3.0]
    np.testing.assert_allclose(maps[0].compute(courses), 146.0, atol=1e-3)
    np.testing.assert_allclose(maps[1].compute(courses), 144.0, atol=1e-3)

    res = analysis.compute(grid, courses, structs, p)
    by = {s.name: s for s in res.structures}
    assert by["A"].metrics["cur"]["Dmean"] == pytest.approx(76.0, abs=1e-3)
    assert by["A"].metrics["cur"]["Dmax"] == pytest.approx(76.0, abs=1e-3)
    assert by["A"].metrics["cumulative"]["Dmean"] == pytest.approx(146.0, abs=1e-3)
    assert by["B"].metrics["cur"]["D0.03cc"] == pytest.approx(74.0, abs=1e-3)
    assert by["B"].metrics["cumulative"]["Dmean"] == pytest.approx(144.0, abs=1e-3)
    assert by["A"].metrics_physical["cur"]["Dmean"] == pytest.approx(66.0, abs=1e-4)   # physical: the sum
    rows = {(c.structure, c.course): c for c in res.constraints}
    assert rows[("A", "cur")].status == "fail" and rows[("A", "cur")].value == pytest.approx(76.0, abs=1e-3)
    assert rows[("B", "cur")].status == "pass" and rows[("B", "cur")].value == pytest.approx(74.0, abs=1e-3)
    assert rows[("A", "prior")].status == "condition_not_met"     # 70 <= 75, but course cur of A has 76 > 75
    cond = rows[("B", "prior")].conditions
    assert [c["actual"] for c in cond] == pytest.approx([70.0, 74.0], abs=1e-3) and all(c["met"] for c in cond)
    a = next(x for x in res.course_assumptions if x["name"] == "cur")
    assert a["fractions"] == 28 and [g["fractions"] for g in a["fraction_groups"]] == [23, 5]
    assert a["max_dose_per_fraction_gy"] == pytest.approx(4.0)       # group 2: 20 Gy / 5
    e = budget.organ_eqd2(structs[0], courses, p, "per_course", course="cur")
    np.testing.assert_allclose(e, 76.0, atol=1e-9)
    e = budget.organ_eqd2(structs[1], courses, p, "cumulative")
    np.testing.assert_allclose(e, 144.0, atol=1e-9)


# ------------------------------------------------------------------ the DICOM path: one RTDOSE per fraction group

PROTOCOL_YAML = {"name": "groups-test", "version": "1", "alpha_beta": {"default": 10}, "recovery": {"model": "none"},
                 "organs": {"a": {"aliases": ["A"], "alpha_beta": 3}}}


def group_case(tmp_path: Path, *, doses=("g1.dcm", "g2.dcm"), extra_dose=None) -> Path:
    """RTPLAN with two fraction groups (1: 23 fx, 2: 5 fx). g1.dcm: FRACTION (whole group 1), stored pixels x
    0.01 Gy (maximum 34.38 Gy / 23 fx); g2.dcm: FRACTION_SESSION of group 2, pixels x 0.001 Gy per session, x 5
    sessions (maximum 17.19 Gy / 5 fx). Structure A (ab 3) covers the inner dose voxels."""
    pp = make_plan(tmp_path / "plan.dcm", [(1, 23), (2, 5)])
    plan = dr.read_rtplan(pp)
    make_rtdose(tmp_path / "g1.dcm", known_pixels(), "0.01", DoseSummationType="FRACTION",
                ReferencedRTPlanSequence=plan_ref(plan, 1))
    make_rtdose(tmp_path / "g2.dcm", known_pixels(), "0.001", DoseSummationType="FRACTION_SESSION",
                ReferencedRTPlanSequence=plan_ref(plan, 2))
    if extra_dose:
        extra_dose(tmp_path, plan)
    grid = dr.read_rtdose(tmp_path / "g1.dcm", plan=plan).grid
    m = np.zeros(grid.shape, np.uint8)
    m[1:3, 1:4, 1:5] = 1
    (tmp_path / "structs").mkdir(exist_ok=True)
    sitk.WriteImage(Volume(m, grid).to_sitk(), str(tmp_path / "structs" / "A.nrrd"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(PROTOCOL_YAML))
    case = {"reference": {"structures": "structs"}, "protocol": "p.yaml",
            "courses": [{"name": "c1", "plan": "plan.dcm", "dose": list(doses)}]}
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(case, sort_keys=False))
    return path


def _prepared(case: Path):
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import build_results, prepare
    prep = prepare(load_case(case))
    res = analysis.compute(prep.grid, prep.courses, prep.structures, prep.protocol)
    return prep, res, build_results(prep, res).to_dict()


def test_dicom_two_fraction_groups_hand_eqd2(tmp_path):
    """Per voxel: D1 = pixels x 0.01 in 23 fx, D2 = pixels x 0.001 x 5 in 5 fx; the ab 3 check map equals
    hand(D1, 23, 3) + hand(D2, 5, 3) and the display map outside A hand(., 10); the course is 28 fractions; every
    group is listed in results.json with its file, summation type, group, fractions and scale."""
    prep, res, out = _prepared(group_case(tmp_path))
    px = known_pixels().astype(np.float64)
    d1, d2 = px * 0.01, px * 0.001 * 5
    c = prep.courses[0]
    assert c.fractions == 28 and [t.fractions for t in c.groups] == [23, 5]
    np.testing.assert_allclose(c.dose, d1 + d2, rtol=1e-6)
    maps, _ = analysis.check_maps(prep.courses, prep.structures, prep.protocol)
    ab3 = next(m for m in maps if m.alpha_beta == 3.0).compute(prep.courses)
    np.testing.assert_allclose(ab3, hand(d1, 23, 3.0) + hand(d2, 5, 3.0), rtol=1e-5, atol=1e-4)
    outside = res.alpha_beta == 10.0
    assert outside.any()
    np.testing.assert_allclose(res.cumulative[outside], (hand(d1, 23, 10.0) + hand(d2, 5, 10.0))[outside],
                               rtol=1e-5, atol=1e-4)
    kind = out["assumptions"]["courses"][0]["dose"]
    groups = kind["fraction_groups"]
    assert [(Path(g["file"]).name, g["dose_summation_type"], g["fraction_group"], g["fractions"], g["scale"])
            for g in groups] == [("g1.dcm", "FRACTION", 1, 23, 1.0), ("g2.dcm", "FRACTION_SESSION", 2, 5, 5.0)]
    assert out["assumptions"]["courses"][0]["fractions"] == 28
    assert any("identical" in w for w in out["warnings"])          # the session dose: sessions assumed identical


def test_dicom_group_order_in_the_case_does_not_matter(tmp_path):
    prep, _, out = _prepared(group_case(tmp_path, doses=("g2.dcm", "g1.dcm")))
    assert [t.fractions for t in prep.courses[0].groups] == [23, 5]
    assert [g["fraction_group"] for g in out["assumptions"]["courses"][0]["dose"]["fraction_groups"]] == [1, 2]


def _copy_g1(tmp_path, plan):
    shutil.copyfile(tmp_path / "g1.dcm", tmp_path / "g1_copy.dcm")


def _group3(tmp_path, plan):
    make_rtdose(tmp_path / "g3.dcm", known_pixels(), "0.01", DoseSummationType="FRACTION",
                ReferencedRTPlanSequence=plan_ref(plan, 3))


@pytest.mark.parametrize("doses,extra,file,field,text", [
    (("g1.dcm",), None, "g1.dcm", "courses[0].dose", "group(s) 2 of the plan have no dose"),
    (("g1.dcm", "g1_copy.dcm"), _copy_g1, "g1.dcm", "courses[0].dose", "fraction group 1 is given twice"),
    (("g1.dcm", "g3.dcm"), _group3, "g3.dcm", "ReferencedFractionGroupNumber", "group 3 is not in the plan"),
])
def test_dicom_group_errors_exit_2_one_line(tmp_path, doses, extra, file, field, text):
    case = group_case(tmp_path, doses=doses, extra_dose=extra)
    r = CliRunner().invoke(main, ["run", str(case), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert text in lines[0] and field in lines[0] and file in lines[0], lines[0]
    assert not (tmp_path / "o" / "results.json").exists()


# ------------------------------------- the demo with each course split into groups of the same dose per fraction

@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from ReirradiationNPCLib.synthetic_dicom import generate_dicom
    return generate_dicom(tmp_path_factory.mktemp("groups_demo") / "case").parent


def _split_plan(src: Path, dst: Path, fractions: list[int]) -> Path:
    ds = pydicom.dcmread(src)
    first = ds.FractionGroupSequence[0]
    items = []
    for g, n in enumerate(fractions, start=1):
        it = copy.deepcopy(first)
        it.FractionGroupNumber, it.NumberOfFractionsPlanned = g, n
        items.append(it)
    ds.FractionGroupSequence = pydicom.sequence.Sequence(items)
    ds.save_as(dst)
    return dst


def _group_dose(src: Path, dst: Path, group: int, part: float) -> Path:
    """The same pixels as a FRACTION dose of ``group`` carrying ``part`` of the course (DoseGridScaling x part)."""
    ds = pydicom.dcmread(src)
    ds.DoseSummationType = "FRACTION"
    ds.DoseGridScaling = f"{float(ds.DoseGridScaling) * part:.10e}"
    fg = pydicom.dataset.Dataset()
    fg.ReferencedFractionGroupNumber = group
    ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence = pydicom.sequence.Sequence([fg])
    ds.save_as(dst)
    return dst


def _run_all(case: Path):
    from ReirradiationNPCLib import planning, robustness
    prep, res, out = _prepared(case)
    return prep, res, planning.compute(prep, res), robustness.compute(prep, res)


def test_demo_courses_split_into_groups_equal_their_one_term_equivalents(demo):
    """The prior course's dose D as two groups: D/3 in 22 fx (D/66 per fx) and 2D/3 in 11 fx (D/16.5 per fx). Its
    EQD2, sum_g p_g D (p_g D/n_g + ab)/(2 + ab) = D (D (1/9/22 + 4/9/11) + ab)/(2 + ab) = D (D/22 + ab)/(2 + ab), is
    that of D in 22 equal fractions (not in 33: the summed fractions would be wrong). The current course (65 Gy /
    54 fx) as 27 + 27 fx carrying 1/2 each. Every EQD2 output equals the run with the prior as one dose in 22
    fractions (within 0.01 Gy): cumulative and course maps, constraint rows (per-course rows included), remaining
    dose, headroom, target checks, robustness worst/best values (the prior shifted for registration uncertainty)
    and the worst-case map."""
    from test_dose_summation import _case_with
    _split_plan(demo / "rtplan_course1.dcm", demo / "plan1_split.dcm", [22, 11])
    _split_plan(demo / "rtplan_course2.dcm", demo / "plan2_split.dcm", [27, 27])
    p1 = [_group_dose(demo / "rtdose_course1_registered.dcm", demo / f"d1_g{g}.dcm", g, part).name
          for g, part in ((1, 1 / 3), (2, 2 / 3))]
    p2 = [_group_dose(demo / "rtdose_course2.dcm", demo / f"d2_g{g}.dcm", g, 0.5).name for g in (1, 2)]
    ref = _case_with(demo, "case_prior22.yaml", 0, fractions=22)
    data = yaml.safe_load(ref.read_text())
    data["courses"][0].pop("plan")
    ref.write_text(yaml.safe_dump(data, sort_keys=False))
    base = _run_all(ref)
    case = _case_with(demo, "case_split.yaml", 0, dose=p1, plan="plan1_split.dcm")
    data = yaml.safe_load(case.read_text())
    data["courses"][1].update(dose=p2, plan="plan2_split.dcm")
    case.write_text(yaml.safe_dump(data, sort_keys=False))
    split = _run_all(case)
    assert [len(c.groups) for c in split[0].courses] == [2, 2]
    assert [c.fractions for c in split[0].courses] == [33, 54] and [c.fractions for c in base[0].courses] == [22, 54]
    np.testing.assert_allclose(split[1].cumulative, base[1].cumulative, atol=0.01)
    for name in ("course1", "course2"):
        np.testing.assert_allclose(split[1].course_eqd2[name], base[1].course_eqd2[name], atol=0.01)
    # the shortcut (the summed dose in 33 fractions) differs by Gy where the prior is hot
    from ReirradiationNPCLib.eqd2 import eqd2 as _eqd2
    prior = base[0].courses[0].dose
    assert float(np.abs(_eqd2(prior, 33, 2.0) - _eqd2(prior, 22, 2.0)).max()) > 5.0
    rows_b, rows_s = base[1].constraints, split[1].constraints
    assert len(rows_b) == len(rows_s) and sum(r.value is not None for r in rows_b) > 10
    assert any(r.scope == "per_course" for r in rows_b)
    for rb, rs in zip(rows_b, rows_s):
        assert (rb.structure, rb.metric, rb.course, rb.status) == (rs.structure, rs.metric, rs.course, rs.status)
        if rb.value is not None:
            assert rs.value == pytest.approx(rb.value, abs=0.01), (rb.structure, rb.metric)
    pb, ps = base[2], split[2]
    np.testing.assert_allclose(ps.remaining.array, pb.remaining.array, atol=0.01)
    assert ps.remaining.fractions == 54
    np.testing.assert_allclose(np.nan_to_num(ps.headroom), np.nan_to_num(pb.headroom), atol=0.01)
    assert len(pb.target_checks) == len(ps.target_checks) > 0
    for tb, ts in zip(pb.target_checks, ps.target_checks):
        for k, v in tb["metrics"].items():
            if isinstance(v, float):
                assert ts["metrics"][k] == pytest.approx(v, abs=0.01), (tb["structure"], k)
    rb_, rs_ = base[3], split[3]
    assert rb_.available and rs_.available
    n = 0
    for a, b in zip(rb_.rows, rs_.rows):
        if a is None:
            assert b is None
            continue
        n += 1
        assert b["worst_value"] == pytest.approx(a["worst_value"], abs=0.01)
        assert b["best_value"] == pytest.approx(a["best_value"], abs=0.01)
    assert n > 5
    assert any((a or {}).get("registration_mm", {}).get("course1", 0) > 0 for a in rb_.rows)
    np.testing.assert_allclose(rs_.worst_map, rb_.worst_map, atol=0.01)


def test_slicer_panel_refuses_one_group_of_several_with_one_line(tmp_path):
    """The panel takes one whole-course dose per course: a FRACTION dose naming group 2 of a two-group plan is refused
    there (the command line takes one RTDOSE per group)."""
    from ReirradiationNPCLib.mrml_headless import unavailable_reason
    if unavailable_reason() is not None:
        pytest.skip(f"slicer-core not available: {unavailable_reason()}")
    from ReirradiationNPCLib import mrml_headless
    mrml_headless.start()
    from ReirradiationNPCLib.errors import InputError
    from ReirradiationNPCLib.mrml_provenance import check_rtdose_header
    pp = make_plan(tmp_path / "plan.dcm", [(1, 23), (2, 5)])
    plan = dr.read_rtplan(pp)
    f = make_rtdose(tmp_path / "g2.dcm", known_pixels(), "0.005", DoseSummationType="FRACTION",
                    ReferencedRTPlanSequence=plan_ref(plan, 2))
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    with pytest.raises(InputError, match="fraction group 2 of a plan with 2 fraction groups") as exc:
        check_rtdose_header(ds, 5, plan, src=str(f), max_dose_gy=17.19)
    assert exc.value.field == "DoseSummationType" and "\n" not in str(exc.value)


def test_metrics_cli_on_one_group_says_it_is_not_the_course(tmp_path):
    """metrics --plan on a FRACTION dose of group 2 (5 fx) of a two-group plan: the group's own metrics (Dmax =
    3438 x 0.005 = 17.19 Gy; EQD2 at ab 3 with its 5 fractions: 17.19 (17.19/5 + 3)/5 = 22.1384 Gy) and a warning
    that the other group is not included."""
    pp = make_plan(tmp_path / "plan.dcm", [(1, 23), (2, 5)])
    plan = dr.read_rtplan(pp)
    f = make_rtdose(tmp_path / "g2.dcm", known_pixels(), "0.005", DoseSummationType="FRACTION",
                    ReferencedRTPlanSequence=plan_ref(plan, 2))
    grid = dr.read_rtdose(f, plan=plan).grid
    sitk.WriteImage(Volume(np.ones(grid.shape, np.uint8), grid).to_sitk(), str(tmp_path / "Body.nrrd"))
    out = tmp_path / "m.json"
    r = CliRunner().invoke(main, ["metrics", "--dose", str(f), "--plan", str(pp), "--structures",
                                  str(tmp_path / "Body.nrrd"), "--fractions", "5", "--alpha-beta", "3",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "fraction group 2 of a plan with 2 fraction groups" in r.output
    m = json.loads(out.read_text())["structures"][0]["metrics"]
    assert m["Dmax"] == pytest.approx(hand(17.19, 5, 3.0), abs=1e-3)


def test_report_table_and_provenance_name_every_group(tmp_path):
    """The report's course table shows 23+5 = 28 fractions and each group; provenance hashes every group's file."""
    from ReirradiationNPCLib import provenance, report
    from ReirradiationNPCLib.case import load_case
    case = group_case(tmp_path)
    _, _, out = _prepared(case)
    html = report._courses(out)
    assert "23+5 = 28" in html and "2 fraction groups, each its own EQD2 term" in html
    assert "group 2: FRACTION_SESSION, 5 fx (one session \u00d7 5, sessions assumed identical)" in html
    paths = provenance.case_input_paths(load_case(case))
    assert paths["courses[0].dose[0]"].name == "g1.dcm" and paths["courses[0].dose[1]"].name == "g2.dcm"
