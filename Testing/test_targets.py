"""Target checks against the prescription and the ESTRO-EORTC re-irradiation type, on analytic cases.

Hand numbers:
- 65 Gy / 54 fx at ab 10: EQD2 = 65 (65/54 + 10) / 12 = 60.6867 Gy (clinical facts: 60.69).
- 40 Gy / 54 fx at ab 10: EQD2 = 40 (40/54 + 10) / 12 = 35.8025 Gy.
- Overlap of a ball (r 10 mm, centre x = 5) with the half-space x < 0: cap of height 5 mm,
  pi h^2 (3r - h) / 3 = pi 25 (30 - 5) / 3 = 654.50 mm^3 = 0.6545 cc.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ReirradiationNPCLib.analysis import CourseData
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.geometry import Grid, bounding_box
from ReirradiationNPCLib.protocol import Prescription, ReirradiationTypeRule, parse_protocol
from ReirradiationNPCLib.targets import Target, check_targets, reirradiation_type

GRID = Grid((40, 40, 40), (-20.0, -20.0, -20.0), (1.0, 1.0, 1.0))


def xyz():
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in GRID.shape), indexing="ij")
    return -20.0 + i, -20.0 + j, -20.0 + k


X, Y, Z = xyz()


def target(name, mask, origin="margins"):
    box = bounding_box(mask)
    return Target(name, origin, mask[box].copy(), box)


def course(name, dose, n, current):
    return CourseData(name, np.asarray(dose, dtype=np.float32), n, None if current else 24.0, current)


RX = Prescription(scope="current", alpha_beta=10.0, eqd2_min_gy=60.0, eqd2_max_gy=66.0, dose_gy=65.0, fractions=54,
                  v95_min_percent=95.0, d95_min_percent=None, d98_min_percent=95.0, d2_max_percent=107.0,
                  source="test", verified=False)


def checks(entry):
    return {c["check"]: c for c in entry["checks"]}


def _grow(mask):
    """The mask grown by one voxel (faces, edges and corners): a dose uniform there is uniform at every sub-voxel
    sample of ``mask`` (trilinear interpolation reads the 8 surrounding voxels)."""
    out = mask.copy()
    for ax in range(3):
        for sh in (-1, 1):
            out |= np.roll(out, sh, axis=ax)
    return out


def test_uniform_prescription_dose_passes():
    box = (np.abs(X) <= 5) & (np.abs(Y) <= 5) & (np.abs(Z) <= 5)
    courses = [course("c1", np.full(GRID.shape, 30.0), 15, False),
               course("c2", np.where(_grow(box), 65.0, 0.0), 54, True)]
    out = check_targets([target("PTV", box)], courses, RX, GRID)
    assert [(e["structure"], e["scope"]) for e in out] == [("PTV", "current"), ("PTV", "cumulative")]
    cur, cum = out
    assert cur["reference_eqd2_gy"] == pytest.approx(60.6867, abs=1e-4)
    assert cur["volume_cc"] == pytest.approx(1.331)
    for m in ("D98%", "D95%", "D50%", "D2%", "Dmean"):
        assert cur["metrics"][m] == pytest.approx(60.6867, abs=1e-3)
        assert cur["metrics_physical"][m] == pytest.approx(65.0, abs=1e-3)
    assert cur["metrics"]["V95%"] == 100.0 and cur["metrics_physical"]["V95%"] == 100.0
    c = checks(cur)
    assert c["D50% within prescribed range"]["status"] == "pass"
    assert "EQD2" in c["D50% within prescribed range"]["basis"]
    assert c["V95%"]["status"] == "pass"
    assert c["D95%"]["status"] == "no_limit"                   # the protocol gives no D95% criterion
    # ICRU 83: on the physical dose of the current course relative to its 65 Gy prescription; EQD2 beside
    d98 = c["D98% (near-minimum)"]
    assert d98["threshold"] == pytest.approx(0.95 * 65.0, abs=1e-9)
    assert d98["value"] == pytest.approx(65.0, abs=1e-3) and d98["value_eqd2"] == pytest.approx(60.6867, abs=1e-3)
    assert "physical dose of the current course" in d98["basis"]
    assert c["D2% (near-maximum)"]["status"] == "pass"
    # cumulative at ab 10, no credit for targets: 30 Gy / 15 fx = 30 (2 + 10) / 12 = 30 Gy, + 60.6867
    assert cum["metrics"]["Dmean"] == pytest.approx(90.6867, abs=1e-3)
    assert cum["checks"] == [] and "current" in cum["note"]


def test_half_underdosed_target_fails_coverage():
    box = (np.abs(X) <= 5) & (np.abs(Y) <= 5) & (Z >= -5) & (Z <= 4)   # 10 slices: 5 at 65 Gy, 5 at 40 Gy
    big = _grow(box)
    dose = np.where(big & (Z >= 0), 65.0, np.where(big, 40.0, 0.0))
    courses = [course("c1", np.zeros(GRID.shape), 15, False), course("c2", dose, 54, True)]
    cur = check_targets([target("PTV", box)], courses, RX, GRID)[0]
    # at most the hot half (samples between the slices z = -1 and z = 0 see an interpolated dose; V is read off the
    # continuous mid-point DVH, which spreads the two dose plateaus of this artificial step)
    assert 25.0 < cur["metrics_physical"]["V95%"] <= 50.0
    assert cur["metrics"]["D98%"] == pytest.approx(35.8025, abs=1e-3)     # near-minimum in the cold half
    assert cur["metrics_physical"]["D98%"] == pytest.approx(40.0, abs=1e-3)
    assert cur["metrics"]["D2%"] == pytest.approx(60.6867, abs=1e-3)
    c = checks(cur)
    assert c["V95%"]["status"] == "fail" and c["D98% (near-minimum)"]["status"] == "fail"
    assert c["D2% (near-maximum)"]["status"] == "pass"


def test_overdose_fails_near_maximum_and_range():
    box = (np.abs(X) <= 3) & (np.abs(Y) <= 3) & (np.abs(Z) <= 3)
    courses = [course("c1", np.zeros(GRID.shape), 15, False),
               course("c2", np.where(_grow(box), 75.0, 0.0), 54, True)]
    cur = check_targets([target("GTV", box)], courses, RX, GRID)[0]
    # 75 Gy / 54 fx: 75 (75/54 + 10) / 12 = 71.1806 Gy > 66; physical D2% 75 Gy > 1.07 x 65 = 69.55 Gy
    assert cur["metrics"]["D50%"] == pytest.approx(71.1806, abs=1e-3)
    c = checks(cur)
    assert c["D50% within prescribed range"]["status"] == "fail"
    assert c["D2% (near-maximum)"]["status"] == "fail"
    assert c["D2% (near-maximum)"]["threshold"] == pytest.approx(1.07 * 65.0)


def test_without_physical_prescription_the_criteria_use_eqd2_and_say_so():
    from dataclasses import replace
    rx = replace(RX, dose_gy=None, fractions=None)             # reference = range minimum 60 Gy EQD2
    box = (np.abs(X) <= 5) & (np.abs(Y) <= 5) & (np.abs(Z) <= 5)
    courses = [course("c1", np.zeros(GRID.shape), 15, False), course("c2", np.where(_grow(box), 65.0, 0.0), 54, True)]
    cur = check_targets([target("PTV", box)], courses, rx, GRID)[0]
    d98 = checks(cur)["D98% (near-minimum)"]
    assert d98["threshold"] == pytest.approx(57.0) and d98["value"] == pytest.approx(60.6867, abs=1e-3)
    assert "EQD2" in d98["basis"] and "no physical prescription" in d98["basis"]
    assert "metrics_physical" not in cur


# ----------------------------------------------------------------- sphere in a linear gradient (issue 9, judged)

def _frac_above(z0, r):
    """Fraction of a ball's volume (radius r, centre 0) with z >= z0: cap h^2 (3r - h) / (4 r^3), h = r - z0."""
    if z0 <= -r:
        return 1.0
    if z0 >= r:
        return 0.0
    h = r - z0
    return h * h * (3 * r - h) / (4 * r ** 3)


def _solve(f, lo, hi):
    for _ in range(200):  # bisection of the monotone cap fraction
        mid = 0.5 * (lo + hi)
        if (f(lo) > 0) == (f(mid) > 0):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("mask_mm", [2.5, 1.0])
def test_sphere_ptv_in_a_linear_gradient_d98_v95_within_1_percent(mask_mm):
    """A ball PTV (r 20 mm, centre off the grid points) in a dose linear in z on a 2.5 mm dose grid, prescription
    60 Gy / 30 fx: D(z) = 60 + 0.5 (z - zc) Gy. Analytic: D98% = 60 + 0.5 z98 with cap(z98) = 0.98 (z98 = -16.64 mm:
    51.68 Gy); V95% = cap((57 - 60) / 0.5 = -6 mm) = 71.825 %. The mask is given on a 2.5 mm or a 1 mm grid (the
    staircase of the voxelised ball is the only approximation); both within 1 % of the analytic values."""
    from ReirradiationNPCLib.sampling import crop_to_structure
    r, c = 20.0, (1.3, -0.7, 0.4)
    z98 = _solve(lambda z: _frac_above(z, r) - 0.98, -r, r)
    d98 = 60.0 + 0.5 * z98
    v95 = 100.0 * _frac_above((0.95 * 60.0 - 60.0) / 0.5, r)
    assert d98 == pytest.approx(51.68, abs=0.01) and v95 == pytest.approx(71.825, abs=1e-6)
    dose_grid = Grid((32, 32, 32), (-40.0, -40.0, -40.0), (2.5, 2.5, 2.5))
    k, j, i = np.meshgrid(*(np.arange(32, dtype=float) for _ in range(3)), indexing="ij")
    dose = (60.0 + 0.5 * (-40.0 + 2.5 * k - c[2])).astype(np.float32)
    n = int(round(90 / mask_mm))
    mg = Grid((n, n, n), (-45.0 + mask_mm / 2,) * 3, (mask_mm,) * 3)
    kk, jj, ii = np.meshgrid(*(np.arange(n, dtype=float) for _ in range(3)), indexing="ij")
    xs, ys, zs = (-45.0 + mask_mm / 2 + mask_mm * a for a in (ii, jj, kk))
    ball = (xs - c[0]) ** 2 + (ys - c[1]) ** 2 + (zs - c[2]) ** 2 <= r * r
    src, src_grid = crop_to_structure(ball, mg)
    ev = np.zeros((1, 1, 1), bool)
    t = Target("PTV", "structures", ev, (slice(0, 1),) * 3, src, src_grid)
    rx = Prescription(scope="current", alpha_beta=10.0, eqd2_min_gy=50.0, eqd2_max_gy=70.0, dose_gy=60.0,
                      fractions=30, v95_min_percent=95.0, d95_min_percent=None, d98_min_percent=95.0,
                      d2_max_percent=107.0, source="test", verified=False)
    courses = [course("c1", np.zeros(dose_grid.shape), 30, False), course("c2", dose, 30, True)]
    cur = check_targets([t], courses, rx, dose_grid)[0]
    got = checks(cur)
    assert got["D98% (near-minimum)"]["value"] == pytest.approx(d98, rel=0.01)
    assert got["V95%"]["value"] == pytest.approx(v95, rel=0.01)
    assert cur["volume_cc"] == pytest.approx(4.0 / 3.0 * math.pi * r ** 3 / 1000.0, rel=0.01)
    # 2 Gy per fraction at the prescription: the EQD2 beside differs only through the local dose per fraction
    assert got["D98% (near-minimum)"]["value_eqd2"] == pytest.approx(d98 * (d98 / 30 + 10) / 12, rel=0.01)


def _rule(**kw):
    return ReirradiationTypeRule(20.0, "test", False, **kw)


BALL = (X - 5.0) ** 2 + Y ** 2 + Z ** 2 <= 100.0        # current irradiated volume (r 10 mm, centre x = 5)


def test_type_1_from_the_irradiated_volumes_with_analytic_overlap():
    """Current course 60 Gy in the ball, prior 60 Gy for x < 0: the irradiated volumes overlap in the cap of the
    ball left of the voxel boundary x = -0.5 (height 4.5 mm): pi h^2 (3r - h) / 3."""
    current = np.where(BALL, 60.0, 0.0)
    courses = [course("c1", np.where(X < 0, 60.0, 0.0), 30, False), course("c2", current, 54, True)]
    res = reirradiation_type(courses, _rule(both_courses_dose_gy=10.0), GRID, ptv=target("PTV", BALL))
    assert res["category"] == "Type 1" and res["type"] == 1 and res["status"] == "evaluated"
    analytic = math.pi * 4.5 ** 2 * (30 - 4.5) / 3 / 1000.0
    assert res["overlap_cc"] == pytest.approx(analytic, rel=0.03)
    assert res["overlap_cc"] == pytest.approx(float((BALL & (X < 0)).sum()) / 1000.0)
    assert res["courses"][0]["overlap_with_current_cc"] == res["overlap_cc"]
    assert res["courses"][0]["irradiated_cc"] == pytest.approx(float((X < 0).sum()) / 1000.0)
    assert res["current_irradiated_cc"] == pytest.approx(float(BALL.sum()) / 1000.0)
    assert "20 Gy" in res["rule"]


def test_type_1_is_judged_on_the_irradiated_volume_not_the_ptv():
    """The current dose spills 3 mm beyond a PTV that does not itself reach the prior irradiated volume: still Type 1
    (the irradiated volumes overlap), with 0 cc overlap of the PTV reported for information."""
    ptv = (X - 10.0) ** 2 + Y ** 2 + Z ** 2 <= 64.0          # x from 2 to 18
    spill = (X - 10.0) ** 2 + Y ** 2 + Z ** 2 <= 121.0        # x from -1 to 21
    courses = [course("c1", np.where(X < 0, 60.0, 0.0), 30, False), course("c2", np.where(spill, 60.0, 0.0), 54, True)]
    res = reirradiation_type(courses, _rule(both_courses_dose_gy=10.0), GRID, ptv=target("PTV", ptv))
    assert res["category"] == "Type 1" and res["overlap_cc"] > 0
    assert res["courses"][0]["overlap_with_ptv_cc"] == 0.0


def _organ_structure(mask):
    from ReirradiationNPCLib.analysis import StructureData
    prot = parse_protocol({"name": "t", "version": "1", "alpha_beta": {"default": 3}, "recovery": {"model": "none"},
                           "organs": {"brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2}}}, "t.yaml")
    box = bounding_box(mask)
    return StructureData("Brainstem", mask[box].copy(), box, prot.match("Brainstem"))


def test_no_overlap_type_2_or_repeat_by_the_protocol_rule():
    current = np.where(BALL, 60.0, 0.0)                      # x from -5 to 15
    # prior 19.9 Gy for x < 0: below the 20 Gy threshold (no overlap), but >= 10 Gy where the current course gives
    # >= 10 Gy: a cumulative-toxicity concern by the stated rule -> Type 2
    low = [course("c1", np.where(X < 0, 19.9, 0.0), 30, False), course("c2", current, 54, True)]
    res = reirradiation_type(low, _rule(both_courses_dose_gy=10.0), GRID)
    assert res["category"] == "Type 2" and res["type"] == 2 and res["overlap_cc"] == 0.0
    assert res["concern"] is True and "receive >= 10 Gy" in res["concern_reasons"][0]
    # the same without a Type 2 rule in the protocol: not decided, never guessed
    res = reirradiation_type(low, _rule(), GRID)
    assert res["category"] is None and res["status"] == "not_evaluated" and "type2_rule" in res["reason"]
    # far apart (prior 60 Gy for x < -12): no overlap, no voxel with >= 10 Gy from both
    far = [course("c1", np.where(X < -12, 60.0, 0.0), 30, False), course("c2", current, 54, True)]
    res = reirradiation_type(far, _rule(both_courses_dose_gy=10.0), GRID)
    assert res["category"] == "repeat irradiation" and res["type"] is None
    # an organ at risk reaching into both irradiated volumes: repeat organ irradiation
    organ = _organ_structure((np.abs(Y) <= 2) & (np.abs(Z) <= 2) & (X >= -16) & (X <= 0))
    res = reirradiation_type(far, _rule(both_courses_dose_gy=10.0), GRID, structures=[organ])
    assert res["category"] == "repeat organ irradiation" and res["organs_irradiated_by_both"] == ["Brainstem"]
    # a cumulative limit row that fails is a concern when the rule says so
    from ReirradiationNPCLib.results import ConstraintResult
    row = ConstraintResult(organ="brainstem", structure="Brainstem", metric="D0.03cc", scope="cumulative",
                           value=70.0, limit=60.0, unit="Gy", status="fail", source="t", verified=False)
    res = reirradiation_type(far, _rule(cumulative_limit_rows=True), GRID, structures=[organ], constraints=[row])
    assert res["category"] == "Type 2" and "cumulative limit brainstem D0.03cc: fail" in res["concern_reasons"]
    # no prior course
    none = reirradiation_type([course("c2", current, 54, True)], _rule(), GRID)
    assert none["category"] is None and none["status"] == "not_evaluated"


def _prot(rx: dict):
    return parse_protocol({"name": "t", "version": "1", "alpha_beta": {"default": 3}, "recovery": {"model": "none"},
                           "organs": {"gtv": {"role": "target", "aliases": ["GTVp"], "alpha_beta": 10}},
                           "prescription": rx, "reirradiation_type": {"threshold_gy": 20, "source": "s",
                                                                      "verified": False}}, "t.yaml")


def test_prescription_block_validation():
    ok = {"scope": "current", "alpha_beta": 10, "eqd2_gy": {"min": 60, "max": 66}, "dose_gy": 65, "fractions": 54,
          "coverage": {"v95_min_percent": 95}, "source": "s", "verified": False}
    p = _prot(ok)
    assert p.prescription.reference_eqd2_gy == pytest.approx(60.6867, abs=1e-4)
    assert p.reirradiation_type.threshold_gy == 20.0
    with pytest.raises(InputError) as e:                        # 60 Gy / 27 fx = 61.11 Gy: outside 62-66
        _prot({**ok, "eqd2_gy": {"min": 62, "max": 66}, "dose_gy": 60, "fractions": 27})
    assert e.value.field == "prescription.dose_gy" and "61.11" in str(e.value)
    with pytest.raises(InputError) as e:
        _prot({**ok, "fractions": None})
    assert e.value.field == "prescription.fractions"
    with pytest.raises(InputError) as e:
        _prot({**ok, "eqd2_gy": {"min": 66, "max": 60}})
    assert e.value.field == "prescription.eqd2_gy"
    with pytest.raises(InputError) as e:
        _prot({**ok, "scope": "both"})
    assert e.value.field == "prescription.scope"
    no_dose = {k: v for k, v in ok.items() if k not in ("dose_gy", "fractions")}
    assert _prot(no_dose).prescription.reference_eqd2_gy == 60.0   # range minimum


def test_protocol_show_lists_margins_prescription_and_type():
    from click.testing import CliRunner
    from ReirradiationNPCLib.cli import main
    res = CliRunner().invoke(main, ["protocol", "show", "npc-reirradiation"])
    assert res.exit_code == 0, res.output
    lines = {ln.split(":")[0]: ln for ln in res.output.splitlines() if ":" in ln}
    assert "+ 5 mm" in lines["margins"] and "verified: NO" in lines["margins"]
    assert "60.69 Gy EQD2" in lines["prescription"] and "verified: NO" in lines["prescription"]
    assert ">= 20 Gy" in lines["re-irradiation type"] and "Type 2" in lines["re-irradiation type"]


def test_d95_criterion_when_the_protocol_gives_one():
    from dataclasses import replace
    rx = replace(RX, d95_min_percent=100.0)
    box = (np.abs(X) <= 5) & (np.abs(Y) <= 5) & (Z >= -5) & (Z <= 4)
    big = _grow(box)
    uniform = [course("c1", np.zeros(GRID.shape), 15, False), course("c2", np.where(big, 65.0, 0.0), 54, True)]
    c = checks(check_targets([target("PTV", box)], uniform, rx, GRID)[0])
    # physical basis: D95% >= 100 % of 65 Gy
    assert c["D95%"]["status"] == "pass" and c["D95%"]["threshold"] == pytest.approx(65.0, abs=1e-9)
    cold = np.where(big & (Z >= 0), 65.0, np.where(big, 40.0, 0.0))
    half = [course("c1", np.zeros(GRID.shape), 15, False), course("c2", cold, 54, True)]
    c = checks(check_targets([target("PTV", box)], half, rx, GRID)[0])
    assert c["D95%"]["status"] == "fail" and c["D95%"]["value"] == pytest.approx(40.0, abs=1e-3)
    assert c["D95%"]["value_eqd2"] == pytest.approx(35.8025, abs=1e-3)
