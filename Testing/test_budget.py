"""Violation segments, headroom and remaining-dose maps on hand-calculated dose gradients.

Hand formulas (float64, written out here independently of the engine):
    EQD2 = D (D / n + ab) / (2 + ab);   D for an EQD2 rise E in n fractions: (n / 2) (-ab + sqrt(ab^2 + 4 E (2 + ab) / n))
Worked numbers used below:
- n = 20, ab = 2: EQD2 50 Gy <=> D = 10 (-2 + sqrt(44)) = 46.3325 Gy; EQD2 47.5 Gy (95 %) <=> D = 44.8074 Gy.
- Prior 45 Gy / 15 fx (3 Gy/fx): EQD2 = 45 * 5 / 4 = 56.25 Gy at ab 2, 45 * 6 / 5 = 54 Gy at ab 3.
- Brainstem (ab 2, credit 25 %, cumulative limit 64): budget 64 - 0.75 * 56.25 = 21.8125 Gy; minus the 0.005 Gy
  safety = 21.8075 Gy -> 30 fx: D = 15 (-2 + sqrt(4 + 4 * 21.8075 * 4 / 30)) = 29.3035 Gy.
- Lobe (ab 3, no credit, limit 60): budget 6 - 0.005 = 5.995 Gy -> D = 15 (-3 + sqrt(9 + 4 * 5.995 * 5 / 30))
  = 9.0763 Gy.
- Brainstem current-course limit 49: D = 15 (-2 + sqrt(4 + 4 * 48.995 * 4 / 30)) = 52.3371 Gy (not binding).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ReirradiationNPCLib import budget
from ReirradiationNPCLib.analysis import CourseData, StructureData
from ReirradiationNPCLib.geometry import Grid, bounding_box
from ReirradiationNPCLib.protocol import parse_protocol
from ReirradiationNPCLib.results import ConstraintResult

GRID = Grid((100, 4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
SHAPE = GRID.shape
X = np.broadcast_to(np.arange(100, dtype=np.float64), SHAPE)


def hand_eqd2(d, n, ab):
    return d * (d / n + ab) / (2.0 + ab)


def make_protocol(brainstem: list, lobe: list, recovery=None):
    return parse_protocol({
        "name": "t", "version": "1", "alpha_beta": {"default": 3},
        "recovery": recovery or {"model": "none"},
        "organs": {"brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2, "constraints": brainstem},
                   "lobe": {"aliases": ["Lobe"], "alpha_beta": 3, "constraints": lobe},
                   "gtv": {"role": "target", "aliases": ["GTVp"], "alpha_beta": 10}}}, "t.yaml")


def con(metric, limit, scope="cumulative", basis="credited"):
    # the hand numbers of this file credit recovery on the cumulative limits (basis: credited) unless told otherwise
    return {"metric": metric, "limit_gy": limit, "scope": scope, "source": "test", "verified": False,
            **({"basis": basis} if scope == "cumulative" else {})}


def structure(name, full_mask, protocol):
    box = bounding_box(full_mask)
    return StructureData(name, full_mask[box].copy(), box, protocol.match(name))


def course(name, dose, n, interval=None):
    return CourseData(name, np.ascontiguousarray(dose, dtype=np.float32), n, interval, interval is None)


def cresult(structure_name, organ, metric, limit, status, scope="cumulative"):
    return ConstraintResult(organ=organ, structure=structure_name, metric=metric, scope=scope, value=0.0,
                            limit=limit, unit="Gy", status=status, source="test", verified=False,
                            basis="credited" if scope == "cumulative" else None)


# ------------------------------------------------------------------------------------------------ violations

def test_violation_voxels_are_exactly_those_above_the_limit_in_a_gradient():
    prot = make_protocol([con("D0.03cc", 50)], [])
    organ = X >= 0  # the whole grid is brainstem
    s = structure("Brainstem", organ, prot)
    courses = [course("c1", np.zeros(SHAPE), 30, interval=24), course("c2", X, 20)]
    cons = [cresult("Brainstem", "brainstem", "D0.03cc", 50.0, "fail"),
            cresult("Brainstem", "brainstem", "D0.03cc", 50.0, "warn"),
            cresult("Brainstem", "brainstem", "Dmax", 50.0, "pass"),
            cresult("Brainstem", "brainstem", "V40Gy", 1.0, "fail")]
    cons[3].unit = "cc"
    v = budget.violations(cons, [s], courses, prot, GRID)
    assert [x.status for x in v] == ["fail", "warn", "fail"]  # a pass gives no segment
    fail, warn, vol = v
    assert fail.name == "Brainstem D0.03cc > 50 Gy" and fail.color == budget.RED
    full = np.zeros(SHAPE, bool)
    full[fail.box] = fail.mask
    assert np.array_equal(full, X >= 47)                       # D 47 Gy > 46.33 Gy; 46 Gy is not
    assert fail.volume_cc == pytest.approx(53 * 16 / 1000.0)
    # warn: voxels above 95 % of the limit (47.5 Gy EQD2 <=> 44.81 Gy physical)
    assert warn.color == budget.AMBER and warn.threshold_gy == pytest.approx(47.5)
    assert warn.name.startswith("Brainstem D0.03cc > 47.5 Gy (warn")
    full[:] = False
    full[warn.box] = warn.mask
    assert np.array_equal(full, X >= 45)
    # V40Gy > 1 cc: the region is the organ volume receiving >= 40 Gy EQD2. At x Gy in 20 fx (ab 2),
    # EQD2 = x (x / 20 + 2) / 4 = 40 exactly at x = 40 (2 Gy per fraction), so the region is x >= 40.
    assert vol.name == "Brainstem V40Gy > 1 cc" and vol.color == budget.RED
    assert vol.unit == "cc" and vol.limit == 1.0 and vol.limit_gy is None and vol.threshold_gy == 40.0
    full[:] = False
    full[vol.box] = vol.mask
    assert np.array_equal(full, X >= 40)
    assert vol.volume_cc == pytest.approx(60 * 16 / 1000.0)


def test_violation_uses_organ_credit_and_current_scope():
    rec = {"model": "step", "table": [{"min_months": 0, "fraction": 0}, {"min_months": 6, "fraction": 0.5}],
           "organs": ["brainstem"]}
    prot = make_protocol([con("D0.03cc", 40), con("D0.03cc", 30, "current")], [], rec)
    s = structure("Brainstem", X >= 0, prot)
    # prior 2 Gy/fx: EQD2 = physical at any ab; 60 Gy x (1 - 0.5) = 30 Gy. Current x Gy in x/2 fx? keep 2 Gy/fx:
    courses = [course("c1", np.full(SHAPE, 60.0), 30, interval=12), course("c2", X * 0.5, 25)]
    # cumulative: 30 + EQD2(0.5 x, 25, 2) > 40 <=> EQD2 > 10; current: EQD2(0.5 x, 25, 2) > 30
    cum_cur = hand_eqd2(0.5 * X, 25, 2.0)
    v = budget.violations([cresult("Brainstem", "brainstem", "D0.03cc", 40.0, "fail"),
                           cresult("Brainstem", "brainstem", "D0.03cc", 30.0, "fail", scope="current")],
                          [s], courses, prot, GRID)
    f = np.zeros(SHAPE, bool)
    f[v[0].box] = v[0].mask
    assert np.array_equal(f, 30.0 + cum_cur > 40.0)
    f[:] = False
    f[v[1].box] = v[1].mask
    assert np.array_equal(f, cum_cur > 30.0)
    assert v[1].name.endswith("(current course)")


# -------------------------------------------------------------------------------------------------- headroom

def test_headroom_limit_minus_cumulative_smallest_where_organs_overlap():
    """One limit set with the remaining dose: point-type limits only (the lobe's Dmean 60 is not represented)."""
    prot = make_protocol([con("D0.03cc", 50)], [con("Dmean", 60), con("D0.03cc", 70)])
    stem = structure("Brainstem", X < 40, prot)
    lobe = structure("Lobe", X >= 20, prot)
    other = structure("GTVp", X >= 95, prot)                   # a target: no headroom
    courses = [course("c1", np.zeros(SHAPE), 30, interval=24), course("c2", X, 20)]
    h = budget.headroom_map([stem, lobe, other], courses, prot, SHAPE)
    # x = 10: brainstem only: 50 - 10 (0.5 + 2) / 4 = 43.75
    assert h[0, 0, 10] == pytest.approx(43.75, abs=1e-4)
    # x = 30: brainstem 50 - 30 (1.5 + 2) / 4 = 23.75; lobe (D0.03cc 70) 70 - 30 (1.5 + 3) / 5 = 43 -> 23.75
    assert h[0, 0, 30] == pytest.approx(23.75, abs=1e-4)
    # x = 80: lobe only: 70 - 80 (4 + 3) / 5 = -42 (negative where violated)
    assert h[0, 0, 80] == pytest.approx(-42.0, abs=1e-4)
    assert np.isnan(h[0, 0, :]).sum() == 0                    # every x is covered by an organ with a limit
    prot2 = make_protocol([con("D0.03cc", 50)], [])
    h2 = budget.headroom_map([structure("Brainstem", X < 40, prot2)], courses, prot2, SHAPE)
    assert np.isnan(h2[..., 40:]).all() and not np.isnan(h2[..., :40]).any()
    # a current-course point limit counts too: brainstem current Dmax 30 at x = 30: 30 - 26.25 = 3.75 < 23.75
    prot3 = make_protocol([con("D0.03cc", 50), con("Dmax", 30, "current")], [])
    h3 = budget.headroom_map([structure("Brainstem", X < 40, prot3)], courses, prot3, SHAPE)
    assert h3[0, 0, 30] == pytest.approx(3.75, abs=1e-4)


# -------------------------------------------------------------------------------------------- remaining dose

REC = {"model": "step", "table": [{"min_months": 0, "fraction": 0}, {"min_months": 6, "fraction": 0.25}],
       "organs": ["brainstem"]}


def remaining_case(prior):
    prot = make_protocol([con("D0.03cc", 64), con("D0.03cc", 49, "current"), con("Dmean", 20)],
                         [con("Dmax", 60), con("D2cc", 10)], REC)
    stem = structure("Brainstem", (X >= 10) & (X < 60), prot)
    lobe = structure("Lobe", (X >= 50) & (X < 90), prot)
    courses = [course("c1", prior, 15, interval=8), course("c2", np.zeros(SHAPE), 30)]
    return prot, [stem, lobe], courses


def test_remaining_dose_hand_numbers():
    prior = np.full(SHAPE, 45.0)
    prior[..., 85:] = 60.0            # lobe: 60 Gy / 15 fx = 84 Gy EQD2 > 60: no dose left
    prot, structs, courses = remaining_case(prior)
    r = budget.remaining_dose(structs, courses, prot, SHAPE)
    a = r.array
    assert a.dtype == np.float32
    assert (a[..., :10] == budget.UNCONSTRAINED).all() and (a[..., 90:] == budget.UNCONSTRAINED).all()
    assert a[..., 10:50] == pytest.approx(29.3035, abs=2e-4)      # brainstem only
    assert a[..., 50:85] == pytest.approx(9.0763, abs=2e-4)       # lobe binds (overlap 50-59 too)
    assert (a[..., 85:90] == 0).all()                             # budget exhausted
    s = r.summary()
    assert s["fractions"] == 30 and s["unconstrained_value"] == -1.0
    lobe = [o for o in s["structures"] if o["structure"] == "Lobe"][0]
    assert lobe["voxels_already_over_limit_from_prior_courses"] == 5 * 16
    assert [x["metric"] for x in lobe["limits"]] == ["Dmax"]      # D2cc is not point-type
    stem = [o for o in s["structures"] if o["structure"] == "Brainstem"][0]
    assert {(x["metric"], x["scope"]) for x in stem["limits"]} == {("D0.03cc", "cumulative"), ("D0.03cc", "current")}


def test_feeding_the_remaining_dose_back_reaches_every_limit_never_above():
    """Gradient prior (30 -> 49.8 Gy in 15 fx): with the map as the current course (30 fx), in every constrained
    voxel the binding organ's cumulative EQD2 sits within 0.1 Gy below its limit, and no organ's limit is exceeded."""
    prior = 30.0 + 0.2 * X
    prot, structs, courses = remaining_case(prior)
    r = budget.remaining_dose(structs, courses, prot, SHAPE)
    dose = np.maximum(r.array.astype(np.float64), 0.0)
    stem = (X >= 10) & (X < 60)
    lobe = (X >= 50) & (X < 90)
    # independent hand calculation of each organ's cumulative EQD2 with the fed-back dose
    cum_stem = 0.75 * hand_eqd2(prior, 15, 2.0) + hand_eqd2(dose, 30, 2.0)
    cur_stem = hand_eqd2(dose, 30, 2.0)
    cum_lobe = hand_eqd2(prior, 15, 3.0) + hand_eqd2(dose, 30, 3.0)
    head = np.full(SHAPE, np.inf)
    head = np.where(stem, np.minimum(head, np.minimum(64.0 - cum_stem, 49.0 - cur_stem)), head)
    head = np.where(lobe, np.minimum(head, 60.0 - cum_lobe), head)
    constrained = stem | lobe
    assert np.array_equal(constrained, r.array >= 0)
    exhausted = lobe & (hand_eqd2(prior, 15, 3.0) >= 60.0)
    assert not exhausted.any()            # lobe's hottest prior (x = 89): 47.8 Gy / 15 fx = 59.15 Gy EQD2 < 60
    assert head[constrained].min() >= 0.0                         # never above any limit
    assert head[constrained].max() <= 0.1                         # the binding limit is reached within 0.1 Gy
    # the engine's own organ EQD2 agrees (the feedback a user would run)
    fed = [courses[0], course("c2", r.array.clip(0), 30)]
    e = budget.organ_eqd2(structs[0], fed, prot, "cumulative")
    assert (64.0 - e[structs[0].mask]).min() >= 0.0


def test_remaining_dose_marks_organs_with_limits_it_cannot_represent():
    """Dmean and D2cc limits constrain a DVH, not a voxel: the organs are marked -2 (never 'no limit' -1, never a
    dose) and named; the part of the grid under no organ stays -1."""
    v40 = {"metric": "V40Gy", "limit_cc": 1.0, "scope": "cumulative", "source": "test", "verified": False}
    prot = make_protocol([con("Dmean", 20)], [con("D2cc", 10), v40])
    structs = [structure("Brainstem", X < 50, prot), structure("Lobe", (X >= 50) & (X < 90), prot)]
    courses = [course("c1", np.zeros(SHAPE), 15, interval=8), course("c2", np.zeros(SHAPE), 30)]
    r = budget.remaining_dose(structs, courses, prot, SHAPE)
    assert (r.array[..., :90] == budget.NOT_REPRESENTED).all() and (r.array[..., 90:] == budget.UNCONSTRAINED).all()
    assert r.organs == []
    s = r.summary()
    assert s["not_represented_value"] == -2.0 and s["not_represented_voxels"] == 90 * 16
    named = {x["structure"]: [l["metric"] for l in x["limits"]] for x in s["not_represented"]}
    assert named == {"Brainstem": ["Dmean"], "Lobe": ["D2cc", "V40Gy"]}
    assert all(x["marked_on_map"] for x in s["not_represented"])
    # no map limit: no headroom either (NaN), the same limit set
    assert np.isnan(budget.headroom_map(structs, courses, prot, SHAPE)).all()


def test_point_limit_organ_keeps_its_budget_and_names_the_rest():
    prot, structs, courses = remaining_case(np.full(SHAPE, 45.0))
    r = budget.remaining_dose(structs, courses, prot, SHAPE)
    assert (r.array[..., 10:90] >= 0).all()                       # both organs have point-type limits
    named = {x["structure"]: ([l["metric"] for l in x["limits"]], x["marked_on_map"]) for x in r.not_represented}
    assert named == {"Brainstem": (["Dmean"], False), "Lobe": (["D2cc"], False)}


def test_hand_numbers_of_the_docstring():
    # guard the worked values quoted above against typos (plain math, not the engine)
    assert 10 * (-2 + math.sqrt(44)) == pytest.approx(46.3325, abs=1e-4)
    assert 15 * (-2 + math.sqrt(4 + 4 * 21.8075 * 4 / 30)) == pytest.approx(29.3035, abs=1e-4)
    assert 15 * (-3 + math.sqrt(9 + 4 * 5.995 * 5 / 30)) == pytest.approx(9.0763, abs=1e-4)


# ------------------------------------------------------------------------------------ synthetic case, end to end

def test_synthetic_case_planning_outputs_and_feedback(synthetic_case, tmp_path):
    from ReirradiationNPCLib import planning
    from ReirradiationNPCLib.analysis import compute
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.io import read_segmentation
    from ReirradiationNPCLib.pipeline import prepare
    import SimpleITK as sitk

    prep = prepare(load_case(synthetic_case))
    analysis = compute(prep.grid, prep.courses, prep.structures, prep.protocol)
    plan = planning.compute(prep, analysis)
    files: dict[str, str] = {}
    planning.write(plan, prep.grid, tmp_path, files)
    assert set(files) == {"margins.seg.nrrd", "violations.seg.nrrd", "headroom.nrrd", "remaining_dose.nrrd",
                          "remaining_dose_regions.seg.nrrd"}
    segs = read_segmentation(tmp_path / "margins.seg.nrrd")
    assert [s.name for s in segs] == ["GTV", "CTV (GTV + 5 mm)", "PTV (CTV + 3 mm)"]
    # the margins' GTV is the GTVp mask itself (same CT grid)
    gtvp = sitk.GetArrayFromImage(sitk.ReadImage(str(synthetic_case.parent / "structures" / "GTVp.nrrd")))
    assert int(segs[0].mask.sum()) == int(gtvp.sum())
    assert plan.reirradiation_type["type"] == 1                   # the recurrence sits in the prior high dose
    fails = {(c.structure, c.metric, c.limit) for c in analysis.constraints if c.status in ("fail", "warn")}
    vsegs = read_segmentation(tmp_path / "violations.seg.nrrd")
    assert len(vsegs) == len(fails) == len(plan.violations)     # dose and volume limits alike
    for v in plan.violations:
        assert (v.structure, v.metric, v.limit) in fails
    # feedback: the remaining-dose map as the current course keeps every point-type limit, reaching the binding one
    rd = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "remaining_dose.nrrd")))
    assert np.array_equal(rd, plan.remaining.array)
    fed = [c for c in prep.courses if not c.is_current]
    fed.append(CourseData("fed", np.maximum(rd, 0), prep.courses[-1].fractions, None, True))
    head = np.full(prep.grid.shape, np.inf)
    for s in prep.structures:
        lims = budget.point_limits(s)
        if not lims or not s.mask.size:
            continue
        # each cumulative limit on its own recovery basis; current and per-course limits on the current course
        cum = {b: budget.organ_eqd2(s, fed, prep.protocol, "cumulative", credit=b == "credited")
               for b in ("credited", "undiscounted")}
        cur = budget.organ_eqd2(s, fed, prep.protocol, "current")
        h = np.min([(c.limit - (cum[c.basis] if c.scope == "cumulative" else cur)) for c in lims], axis=0)
        sub = head[s.box]
        np.minimum(sub, h, out=sub, where=s.mask)
    constrained = rd >= 0
    assert np.array_equal(constrained, np.isfinite(head))
    # where dose is left, the binding limit is reached and none exceeded; where none is left (the demo's first course
    # already took a temporal lobe over its limit), the prior courses alone are at or over a limit
    left = rd > 0
    assert head[left].min() >= 0.0 and head[left].max() <= 0.1
    assert (head[constrained & ~left] <= 0.1).all()


def test_remaining_dose_written_as_nrrd_and_rtdose(tmp_path):
    """remaining_dose.nrrd keeps -1 for unconstrained voxels; on a DICOM reference CT, remaining_dose.dcm holds the
    same doses with 0 there (RTDOSE pixels are unsigned)."""
    import SimpleITK as sitk
    from ReirradiationNPCLib import dicom_rt, planning
    from ReirradiationNPCLib.geometry import Volume

    prot, structs, courses = remaining_case(np.full(SHAPE, 45.0))
    r = budget.remaining_dose(structs, courses, prot, SHAPE)
    ident = {"PatientName": "Test^Budget", "PatientID": "T-003", "StudyInstanceUID": "1.2.3.4.5",
             "FrameOfReferenceUID": "1.2.3.4.6"}
    ct = Volume(np.zeros(SHAPE, np.int16), GRID, "ct", {"dicom": ident})
    files: dict[str, str] = {}
    planning.write(planning.Planning(remaining=r, reference_image=ct), GRID, tmp_path, files)
    assert set(files) == {"remaining_dose.nrrd", planning.REMAINING_DCM, planning.REMAINING_RTSTRUCT,
                          "remaining_dose_regions.seg.nrrd"}
    img = sitk.ReadImage(str(tmp_path / "remaining_dose.nrrd"))
    assert img.GetMetaData("unconstrained_value") == "-1" and img.GetMetaData("fractions") == "30"
    nrrd = sitk.GetArrayFromImage(img)
    np.testing.assert_array_equal(nrrd, r.array)
    assert nrrd[0, 0, 5] == -1.0 and nrrd[0, 0, 20] == pytest.approx(29.3035, abs=2e-4)
    dcm = dicom_rt.read_rtdose(tmp_path / planning.REMAINING_DCM)
    assert dcm.grid.same_as(GRID)
    np.testing.assert_allclose(dcm.array, np.maximum(r.array, 0), atol=1e-6)
    import pydicom
    ds = pydicom.dcmread(str(tmp_path / planning.REMAINING_DCM), stop_before_pixels=True)
    assert ds.SeriesDescription.startswith("NOT A PLAN DOSE") and "not a dose" in ds.DoseComment
    assert "NOT A PLAN DOSE" in ds.ImageComments and "ReferencedRTPlanSequence" not in ds
    assert img.GetMetaData("not_represented_value") == "-2" and "NOT A PLAN DOSE" in img.GetMetaData("description")
    # where 0 means "no dose allowed": the RTSTRUCT's LIMIT APPLIES region = the constrained voxels, exactly
    rs = pydicom.dcmread(str(tmp_path / planning.REMAINING_RTSTRUCT))
    assert [x.ROIName for x in rs.StructureSetROISequence] == ["LIMIT APPLIES (0 = no dose allowed)",
                                                                "NOT REPRESENTED: Brainstem, Lobe"]
    from ReirradiationNPCLib.io import read_segmentation
    segs = read_segmentation(tmp_path / "remaining_dose_regions.seg.nrrd")
    assert [x.name for x in segs] == ["LIMIT APPLIES (0 = no dose allowed)", "NOT REPRESENTED: Brainstem, Lobe"]
    # the LIMIT APPLIES region is exactly the map's values >= 0 (brainstem x 10-59, lobe x 50-89)
    assert int(segs[0].mask.sum()) == int((r.array >= 0).sum()) == 80 * 16


def test_remaining_dose_undiscounted_limit_counts_the_prior_course_in_full():
    """A cumulative limit on the undiscounted basis ignores the recovery credit: brainstem (ab 2, 25 % credit in
    the protocol) prior 45 Gy / 15 fx = 56.25 Gy EQD2 in full; limit 64 -> budget 64 - 56.25 - 0.005 = 7.745 Gy
    -> 30 fx: D = 15 (-2 + sqrt(4 + 4 * 7.745 * 4 / 30)) = 12.7715 Gy (credited, it would be 29.3035 Gy)."""
    prot = make_protocol([con("D0.03cc", 64, basis="undiscounted")], [], REC)
    stem = structure("Brainstem", (X >= 10) & (X < 60), prot)
    courses = [course("c1", np.full(SHAPE, 45.0), 15, interval=8), course("c2", np.zeros(SHAPE), 30)]
    r = budget.remaining_dose([stem], courses, prot, SHAPE)
    hand = 15.0 * (-2.0 + math.sqrt(4.0 + 4.0 * 7.745 * 4.0 / 30.0))
    assert hand == pytest.approx(12.7715, abs=1e-4)
    assert r.array[..., 10:60] == pytest.approx(hand, abs=2e-4)
    # feeding it back: the undiscounted sum reaches the limit, never above it
    assert (56.25 + hand_eqd2(r.array[0, 0, 10:60].astype(np.float64), 30, 2.0)).max() <= 64.0
    assert (56.25 + hand_eqd2(r.array[0, 0, 10:60].astype(np.float64), 30, 2.0)).min() >= 63.99
    h = budget.headroom_map([stem], courses, prot, SHAPE)
    assert h[0, 0, 20] == pytest.approx(64.0 - 56.25, abs=1e-4)   # headroom on the same (undiscounted) basis


def test_violation_of_a_per_course_row_uses_that_course_alone():
    """A per_course row for the prior course: the region is where that course's own EQD2 (no credit) > limit."""
    rec = {"model": "step", "table": [{"min_months": 0, "fraction": 0}, {"min_months": 6, "fraction": 0.5}],
           "organs": ["brainstem"]}
    prot = make_protocol([con("D0.03cc", 49, "per_course")], [], rec)
    s = structure("Brainstem", X >= 0, prot)
    courses = [course("c1", X, 50, interval=12), course("c2", np.full(SHAPE, 20.0), 10)]
    row = cresult("Brainstem", "brainstem", "D0.03cc", 49.0, "fail", scope="per_course")
    row.course = "c1"
    v = budget.violations([row], [s], courses, prot, GRID)
    f = np.zeros(SHAPE, bool)
    f[v[0].box] = v[0].mask
    assert np.array_equal(f, hand_eqd2(X, 50, 2.0) > 49.0)   # prior course in full, current course not added
    assert v[0].course == "c1" and v[0].name.endswith("(course c1)")
