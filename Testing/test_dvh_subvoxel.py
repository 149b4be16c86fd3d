"""Sub-voxel dose metrics against analytic cases: spheres and boxes in linear dose gradients.

Reference values are derived here by hand (never from the engine):
- a sphere of radius R centred at c in the dose D(p) = a + g (u . p) (|u| = 1): Dmean = D50% = a + g (u . c);
  the hottest volume v is a spherical cap of height t with v = pi t^2 (3R - t) / 3, so D(v) = a + g (u.c + R - t);
  V(x Gy) is the cap of height t = u.c + R - (x - a) / g; mean of D^2 = Dmean^2 + g^2 R^2 / 5 (var of u.p = R^2/5).
- a box [x0, x1] x ... in D = a + g x: D(v) = a + g (x1 - v / A) with A the y-z cross-section.
The dose lives on a 2.5 mm grid (trilinear interpolation reproduces a linear dose exactly); structure masks are
made from voxel centres on finer grids that cover only the structure's neighbourhood.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ReirradiationNPCLib import dvh
from ReirradiationNPCLib.analysis import CourseData, StructureData, compute, constraint_status, evaluate_constraints
from ReirradiationNPCLib.geometry import Grid, Volume
from ReirradiationNPCLib.protocol import parse_protocol
from ReirradiationNPCLib.results import StructureResult
from ReirradiationNPCLib.sampling import TARGET_SAMPLES, choose_factors, sample_structure

DOSE_SPACING = 2.5


# ------------------------------------------------------------------------------------------ hand formulas

def cap_volume_mm3(t: float, R: float) -> float:
    return math.pi * t * t * (3 * R - t) / 3.0


def cap_height(v_mm3: float, R: float) -> float:
    """Height t of the spherical cap of volume v (bisection on the monotone cap volume)."""
    lo, hi = 0.0, 2 * R
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cap_volume_mm3(mid, R) < v_mm3:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def radius_of(volume_cc: float) -> float:
    return (volume_cc * 1000.0 * 3.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


def sphere_mask(R: float, centre, h: float) -> tuple[np.ndarray, Grid]:
    """Voxel-centre mask of a sphere on an h-mm grid covering only the sphere (+2 voxels)."""
    n = int(math.ceil(R / h)) + 3
    base = np.floor(np.asarray(centre) / h) * h - n * h
    size = 2 * n + 1
    g = Grid((size, size, size), tuple(float(v) for v in base), (h, h, h))
    ax = base[0] + h * np.arange(size), base[1] + h * np.arange(size), base[2] + h * np.arange(size)
    z, y, x = np.meshgrid(ax[2], ax[1], ax[0], indexing="ij")
    m = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= R * R
    return m, g


def linear_dose(a: float, g: float, u, size=(24, 24, 24), origin=(-30.0, -30.0, -30.0)) -> Volume:
    """D = a + g (u . p) sampled on a 2.5 mm grid."""
    grid = Grid(size, origin, (DOSE_SPACING,) * 3)
    k, j, i = np.indices(grid.shape, dtype=np.float64)
    x, y, z = (origin[0] + DOSE_SPACING * i, origin[1] + DOSE_SPACING * j, origin[2] + DOSE_SPACING * k)
    d = a + g * (u[0] * x + u[1] * y + u[2] * z)
    return Volume(d.astype(np.float32), grid, "dose")


def sphere_reference(volume_cc, R, centre, a, g, u) -> dict:
    uc = float(np.dot(u, centre))
    v_mm3 = 4.0 / 3.0 * math.pi * R ** 3
    ref = {"Dmean": a + g * uc, "D50%": a + g * uc, "Dmax": a + g * (uc + R), "Dmin": a + g * (uc - R)}
    for cc in (0.03, 0.05):
        ref[f"D{cc:g}cc"] = a + g * (uc + R - cap_height(cc * 1000.0, R))
    for p in (2, 5, 95, 98):
        ref[f"D{p}%"] = a + g * (uc + R - cap_height(p / 100.0 * v_mm3, R))
    x = a + g * uc + 0.4 * g * R          # an isodose cutting the sphere
    ref["Vx_cc"] = (x, cap_volume_mm3(uc + R - (x - a) / g, R) / 1000.0)
    return ref


U_OBLIQUE = np.array([0.48, -0.6, 0.64])   # unit vector: 0.2304 + 0.36 + 0.4096 = 1


# ------------------------------------------------------------------------------------------ spheres

@pytest.mark.parametrize("volume_cc,mask_mm", [(0.1, 0.25), (0.1, 0.4), (0.4, 0.5), (0.4, 0.4)])
@pytest.mark.parametrize("centre", [(0.3, -0.7, 1.1), (-1.23, 0.41, 0.17), (0.0, 0.0, 0.0)])
def test_small_sphere_in_gradient(volume_cc, mask_mm, centre):
    R = radius_of(volume_cc)
    a, g = 30.0, 1.5                                   # Gy, Gy/mm: ~ +-4 Gy across the 0.1 cc sphere
    dose = linear_dose(a, g, U_OBLIQUE)
    mask, mgrid = sphere_mask(R, centre, mask_mm)
    s = sample_structure(mask, mgrid)
    assert s.n >= 10_000                              # supersampled: a 0.1 cc organ is ~6 dose voxels
    d = s.dose(dose.array, dose.grid)
    ref = sphere_reference(volume_cc, R, centre, a, g, U_OBLIQUE)
    names = ["Dmean", "D50%", "D0.03cc", "D0.05cc", "D2%", "D5%", "D95%", "D98%", "Dmax", "Dmin"]
    got = dvh.metrics(d, s.sample_volume_cc, names)
    assert s.volume_cc == pytest.approx(volume_cc, rel=0.01)
    for n in ("Dmean", "D50%", "D2%", "D5%", "D95%", "D98%"):
        assert got[n] == pytest.approx(ref[n], rel=0.01), n
    for n in ("D0.03cc", "D0.05cc"):                  # organs under 0.5 cc: 2 %
        assert got[n] == pytest.approx(ref[n], rel=0.02), n
    # Dmax/Dmin: the mask's voxels reach at most half a mask-voxel diagonal beyond the sphere
    tol = g * mask_mm * math.sqrt(3) / 2
    assert got["Dmax"] == pytest.approx(ref["Dmax"], abs=tol)
    assert got["Dmin"] == pytest.approx(ref["Dmin"], abs=tol)
    x, v_ref = ref["Vx_cc"]
    assert dvh.metrics(d, s.sample_volume_cc, [f"V{x:.6f}Gy"])[f"V{x:.6f}Gy"] == pytest.approx(v_ref, rel=0.03)


def test_voxel_sampling_of_a_small_organ_is_worse():
    """Control: the same 0.1 cc sphere taken as whole 2.5 mm dose voxels misses D0.03cc by far more than 2 %
    (shows the analytic test above can fail)."""
    R = radius_of(0.1)
    a, g = 30.0, 1.5
    centre = (0.3, -0.7, 1.1)
    dose = linear_dose(a, g, U_OBLIQUE)
    mask, mgrid = sphere_mask(R, centre, DOSE_SPACING)
    s = sample_structure(mask, mgrid, factors=(1, 1, 1))
    d = s.dose(dose.array, dose.grid)
    ref = sphere_reference(0.1, R, centre, a, g, U_OBLIQUE)
    got = dvh.metrics(d, s.sample_volume_cc, ["D0.03cc"])["D0.03cc"]
    assert abs(got / ref["D0.03cc"] - 1) > 0.02 or abs(s.volume_cc / 0.1 - 1) > 0.05


def test_large_sphere_dose_interpolated_between_grids():
    """A 30 cc sphere (mask 1 mm, dose 2.5 mm, gradient along z): Dmean, D95 %, D5 %, D2cc and volume."""
    R = radius_of(30.0)
    a, g, u = 40.0, 0.8, np.array([0.0, 0.0, 1.0])
    centre = (1.3, -2.2, 0.6)
    dose = linear_dose(a, g, u, size=(40, 40, 40), origin=(-50.0, -50.0, -50.0))
    mask, mgrid = sphere_mask(R, centre, 1.0)
    s = sample_structure(mask, mgrid)
    d = s.dose(dose.array, dose.grid)
    got = dvh.metrics(d, s.sample_volume_cc, ["Dmean", "D95%", "D5%", "D2cc"])
    uc = centre[2]
    v = 4 / 3 * math.pi * R ** 3
    assert s.volume_cc == pytest.approx(30.0, rel=0.01)
    assert got["Dmean"] == pytest.approx(a + g * uc, rel=0.01)
    assert got["D95%"] == pytest.approx(a + g * (uc + R - cap_height(0.95 * v, R)), rel=0.01)
    assert got["D5%"] == pytest.approx(a + g * (uc + R - cap_height(0.05 * v, R)), rel=0.01)
    assert got["D2cc"] == pytest.approx(a + g * (uc + R - cap_height(2000.0, R)), rel=0.01)


# ------------------------------------------------------------------------------------------ boxes

@pytest.mark.parametrize("mask_mm", [1.0, 0.5])
def test_box_in_gradient(mask_mm):
    """Box x in [-6, 6], y in [-2, 3], z in [-3, 1] mm (0.24 cc) in D = 20 + 2 x (Gy, x in mm)."""
    x0, x1, y0, y1, z0, z1 = -6.0, 6.0, -2.0, 3.0, -3.0, 1.0
    a, g = 20.0, 2.0
    h = mask_mm
    # mask grid: voxel faces on the box faces; extends 2 voxels around
    origin = (x0 - 1.5 * h, y0 - 1.5 * h, z0 - 1.5 * h)
    size = tuple(int(round((hi - lo) / h)) + 4 for lo, hi in ((x0, x1), (y0, y1), (z0, z1)))
    mgrid = Grid(size, origin, (h, h, h))
    k, j, i = np.indices(mgrid.shape)
    x, y, z = origin[0] + h * i, origin[1] + h * j, origin[2] + h * k
    mask = (x > x0) & (x < x1) & (y > y0) & (y < y1) & (z > z0) & (z < z1)
    dose = linear_dose(a, g, (1.0, 0.0, 0.0))
    s = sample_structure(mask, mgrid)
    d = s.dose(dose.array, dose.grid)
    area = (y1 - y0) * (z1 - z0)                       # mm^2
    vol = area * (x1 - x0) / 1000.0
    got = dvh.metrics(d, s.sample_volume_cc, ["Dmean", "D0.03cc", "D0.1cc", "D50%", "D95%", "V25Gy", "V25Gy%",
                                              "Dmax", "Dmin"])
    assert s.volume_cc == pytest.approx(vol, rel=1e-9)
    assert got["Dmean"] == pytest.approx(a + g * (x0 + x1) / 2, rel=1e-6)
    assert got["D0.03cc"] == pytest.approx(a + g * (x1 - 30.0 / area), rel=0.002)
    assert got["D0.1cc"] == pytest.approx(a + g * (x1 - 100.0 / area), rel=0.002)
    assert got["D50%"] == pytest.approx(a + g * (x0 + x1) / 2, rel=0.002)
    assert got["D95%"] == pytest.approx(a + g * (x1 - 0.95 * (x1 - x0)), rel=0.002)
    v25 = area * (x1 - (25.0 - a) / g) / 1000.0
    assert got["V25Gy"] == pytest.approx(v25, rel=0.005)
    assert got["V25Gy%"] == pytest.approx(100.0 * v25 / vol, rel=0.005)
    hs = s.info["sample_spacing_mm"][0]
    assert got["Dmax"] == pytest.approx(a + g * (x1 - hs / 2), abs=1e-4)
    assert got["Dmin"] == pytest.approx(a + g * (x0 + hs / 2), abs=1e-4)


def test_rotated_mask_grid_and_partial_dose_grid():
    """A mask grid rotated 90 degrees about z, half of a box beyond the dose grid (read as 0 Gy, reported)."""
    h = 0.5
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)   # i axis -> +y, j axis -> -x
    mgrid = Grid((20, 20, 20), (0.0, 0.0, 0.0), (h, h, h), direction)
    mask = np.zeros(mgrid.shape, bool)
    mask[4:16, 4:16, 4:16] = True                      # 6 mm cube = 0.216 cc
    pts = mgrid.index_to_physical(np.array([[3.5, 3.5, 3.5], [15.5, 15.5, 15.5]]))
    lo, hi = pts.min(axis=0), pts.max(axis=0)          # physical box of the cube
    # dose grid whose last voxel centre sits on the cube's mid-plane in y (extent ends 1.25 mm beyond it)
    ymid = 0.5 * (lo[1] + hi[1]) - 1.25
    size = (20, 20, 20)
    origin = (-30.0, ymid - 19 * DOSE_SPACING, -20.0)
    grid = Grid(size, origin, (DOSE_SPACING,) * 3)
    dose = Volume(np.full(grid.shape, 10.0, np.float32), grid)
    s = sample_structure(mask, mgrid)
    assert s.volume_cc == pytest.approx(0.216, rel=1e-9)
    assert s.outside_fraction(grid) == pytest.approx(0.5, abs=0.02)
    d = s.dose(dose.array, dose.grid)
    got = dvh.metrics(d, s.sample_volume_cc, ["Dmean", "Dmax", "Dmin"])
    assert got["Dmean"] == pytest.approx(10.0 * (1 - s.outside_fraction(grid)), rel=1e-6)
    assert got["Dmax"] == pytest.approx(10.0) and got["Dmin"] == 0.0


# ------------------------------------------------------------------------------------------ sampling choice

def test_sampling_choice_recorded_and_bounded():
    small = choose_factors((2.5, 2.5, 2.5), n_voxels=8, box_voxels=27)        # 0.125 cc on the dose grid
    assert np.prod(small) * 8 >= TARGET_SAMPLES
    big = choose_factors((1.0, 1.0, 2.5), n_voxels=2_000_000, box_voxels=3_000_000)
    assert big == (1, 1, 1)
    capped = choose_factors((3.0, 3.0, 3.0), n_voxels=500, box_voxels=400_000, max_box=1_000_000)
    assert np.prod(capped) * 400_000 <= 1_000_000
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    s = sample_structure(m, Grid((5, 5, 5), (0.0, 0.0, 0.0), (2.5, 2.5, 2.5)))
    info = s.info
    assert info["samples"] == s.n >= TARGET_SAMPLES * 0.5
    assert info["sub_voxels_per_mask_voxel"] == int(np.prod(info["subdivision_ijk"])) > 1
    assert info["volume_cc"] == pytest.approx(27 * 2.5 ** 3 / 1000.0)


def test_isolated_voxel_is_never_lost():
    m = np.zeros((3, 3, 3), bool)
    m[1, 1, 1] = True
    for f in ((2, 2, 2), (3, 3, 3), (5, 5, 5)):
        s = sample_structure(m, Grid((3, 3, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), factors=f)
        assert s.n > 0 and s.volume_cc == pytest.approx(0.001)


# ------------------------------------------------------------------------------------------ dvh definitions

def test_continuous_dose_at_volume_and_volume_at_dose():
    # ten 1 cc samples at 0.5, 1.5, ..., 9.5 Gy stand for a dose spread evenly over 0-10 Gy:
    # D(v) = 10 - v and V(x) = 10 - x between the first and last mid-points (a step DVH would say D2.5cc = 7.5)
    d = np.arange(10) + 0.5
    s = dvh.SortedSamples(d, 1.0)
    assert s.dose_at_volume(2.5) == pytest.approx(7.5)
    assert s.dose_at_volume(4.0) == pytest.approx(6.0)
    assert s.volume_at_dose(3.2) == pytest.approx(6.8)
    assert s.dose_at_volume(0.2) == pytest.approx(9.5)    # within the hottest sample: Dmax
    assert s.dose_at_volume(10.0) == pytest.approx(0.5)   # the whole volume: Dmin
    assert s.dose_at_volume(10.5) is None
    assert s.volume_at_dose(0.5) == pytest.approx(10.0) and s.volume_at_dose(9.6) == 0.0
    got = dvh.metrics(d, 1.0, ["Dmax", "Dmin", "Dmean", "D25%", "V5Gy", "V5Gy%"])
    assert got == pytest.approx({"Dmax": 9.5, "Dmin": 0.5, "Dmean": 5.0, "D25%": 7.5, "V5Gy": 5.0,
                                 "V5Gy%": 50.0})


def test_uniform_dose_and_plateau_at_max():
    got = dvh.metrics(np.full(100, 60.0), 0.01, ["Dmax", "Dmin", "Dmean", "D0.03cc", "D95%", "V60Gy", "V60Gy%"])
    assert got == pytest.approx({"Dmax": 60, "Dmin": 60, "Dmean": 60, "D0.03cc": 60, "D95%": 60, "V60Gy": 1.0,
                                 "V60Gy%": 100.0})
    s = dvh.SortedSamples(np.r_[np.full(30, 70.0), np.linspace(10, 50, 70)], 0.01)
    assert s.volume_at_dose(70.0) == pytest.approx(0.30)   # the whole plateau at the maximum counts


def test_weighted_samples_and_cumulative_dvh():
    s = dvh.SortedSamples(np.array([10.0, 30.0, 20.0]), np.array([1.0, 2.0, 3.0]))
    assert s.total_cc == 6.0
    assert s.metric(dvh.parse("Dmean")) == pytest.approx((10 + 60 + 60) / 6)
    # curve points: (30, 1.0), (20, 2 + 1.5 = 3.5), (10, 5 + 0.5 = 5.5)
    assert s.volume_at_dose(25.0) == pytest.approx(2.25)
    assert s.dose_at_volume(4.5) == pytest.approx(15.0)
    dose, vol = s.cumulative_dvh(5.0)
    assert dose.tolist() == [0, 5, 10, 15, 20, 25, 30, 35]
    assert vol.tolist() == pytest.approx([6.0, 6.0, 6.0, 4.5, 3.5, 2.25, 2.0, 0.0])


def test_metric_names():
    assert dvh.parse("V30Gy%").kind == "vpct"
    with pytest.raises(ValueError):
        dvh.parse("V30cc")


# ------------------------------------------------------------------------------------------ in the analysis

def test_analysis_uses_subvoxel_samples_physical_and_eqd2():
    """A 0.1 cc organ given on a 0.25 mm mask grid, dose on 2.5 mm; EQD2 metrics with the organ's alpha/beta."""
    R = radius_of(0.1)
    centre = (0.3, -0.7, 1.1)
    a, g = 30.0, 1.5
    dose = linear_dose(a, g, U_OBLIQUE)
    mask, mgrid = sphere_mask(R, centre, 0.25)
    protocol = parse_protocol({
        "name": "t", "version": "1", "alpha_beta": {"default": 3.0}, "recovery": {"model": "none"},
        "warn_tolerance_percent": 5,
        "organs": {"chiasm": {"aliases": ["OpticChiasm"], "alpha_beta": 2.0, "constraints": [
            {"metric": "D0.03cc", "limit_gy": 100, "scope": "cumulative", "source": "t", "verified": False}]}}},
        "test")
    course = CourseData("c1", dose.array, 30, None, True)
    sd = StructureData("OpticChiasm", np.zeros((0, 0, 0), bool), (slice(0, 0),) * 3, protocol.organs["chiasm"],
                       source_mask=mask, source_grid=mgrid)
    res = compute(dose.grid, [course], [sd], protocol).structures[0]
    ref = sphere_reference(0.1, R, centre, a, g, U_OBLIQUE)
    assert res.volume_cc == pytest.approx(0.1, rel=0.01)
    assert res.sampling["samples"] >= 10_000 and res.sampling["samples_per_dose_voxel"] > 100
    phys = res.metrics_physical["c1"]
    assert phys["Dmean"] == pytest.approx(ref["Dmean"], rel=0.01)
    assert phys["D0.03cc"] == pytest.approx(ref["D0.03cc"], rel=0.02)

    def eqd2(D, n=30, ab=2.0):
        return D * (D / n + ab) / (2 + ab)
    e = res.metrics["cumulative"]
    assert e["D0.03cc"] == pytest.approx(eqd2(ref["D0.03cc"]), rel=0.02)   # EQD2 is monotone in D
    mean_d2 = ref["Dmean"] ** 2 + g ** 2 * R ** 2 / 5.0
    assert e["Dmean"] == pytest.approx((mean_d2 / 30 + 2.0 * ref["Dmean"]) / 4.0, rel=0.01)


# ------------------------------------------------------------------------------------------ warn status

@pytest.mark.parametrize("value,status", [
    (40.0, "pass"), (47.5, "pass"), (47.5001, "warn"), (49.99, "warn"), (50.0, "warn"), (50.0001, "fail"),
    (70.0, "fail")])
def test_constraint_status_boundaries(value, status):
    st, margin = constraint_status(value, 50.0, 5.0)
    assert st == status
    assert margin == pytest.approx(50.0 - value)


def test_zero_tolerance_and_zero_limit():
    assert constraint_status(50.0, 50.0, 0.0)[0] == "pass"   # no tolerance band: at the limit passes
    assert constraint_status(50.001, 50.0, 0.0)[0] == "fail"
    assert constraint_status(0.0, 0.0, 5.0)[0] == "pass"
    assert constraint_status(0.001, 0.0, 5.0)[0] == "fail"


def test_evaluate_constraints_warn_uses_protocol_tolerance():
    protocol = parse_protocol({
        "name": "t", "version": "1", "alpha_beta": {"default": 3.0}, "recovery": {"model": "none"},
        "warn_tolerance_percent": 10,
        "organs": {"brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2.0, "constraints": [
            {"metric": "D0.03cc", "limit_gy": 50, "scope": "cumulative", "source": "src A", "verified": True,
             "priority": 1},
            {"metric": "Dmean", "limit_gy": 30, "scope": "cumulative", "source": "src B", "verified": False},
            {"metric": "V40Gy", "limit_cc": 1.0, "scope": "cumulative", "source": "src C", "verified": False},
            {"metric": "D2cc", "limit_gy": None, "scope": "cumulative", "source": "src D", "verified": False}]}}},
        "test")
    r = StructureResult("Brainstem", "brainstem", "oar", 2.0, 20.0,
                        {"cumulative": {"D0.03cc": 46.0, "Dmean": 26.9, "V40Gy": 1.2, "D2cc": 40.0}}, {})
    out = {c.metric: c for c in evaluate_constraints(protocol, [], [r], "c1")}
    assert out["D0.03cc"].status == "warn" and out["D0.03cc"].margin == pytest.approx(4.0)   # 46 > 45
    assert out["D0.03cc"].priority == 1 and out["D0.03cc"].verified and out["D0.03cc"].source == "src A"
    assert out["Dmean"].status == "pass" and out["Dmean"].margin == pytest.approx(3.1)       # 26.9 <= 27
    assert out["V40Gy"].status == "fail" and out["V40Gy"].margin == pytest.approx(-0.2)
    assert out["D2cc"].status == "no_limit" and out["D2cc"].margin is None


def test_very_large_structure_sampled_by_weighted_blocks(monkeypatch):
    """Above MAX_SAMPLES mask voxels, blocks of voxels weighted by their mask volume: volume exact, Dmean of a
    box in a linear dose exact (block centres of full blocks average to the box centre)."""
    from ReirradiationNPCLib import sampling
    monkeypatch.setattr(sampling, "MAX_SAMPLES", 5000)
    mgrid = Grid((60, 50, 40), (-30.0, -25.0, -20.0), (1.0, 1.0, 1.0))
    m = np.zeros(mgrid.shape, bool)
    m[5:35, 3:47, 10:50] = True                        # 30 x 44 x 40 voxels = 52.8 cc, 52800 voxels
    s = sample_structure(m, mgrid)
    assert s.n <= 5000 and s.info["mask_voxels_per_sample"] > 1
    assert s.volume_cc == pytest.approx(52.8, rel=1e-12)
    dose = linear_dose(10.0, 0.5, (1.0, 0.0, 0.0), size=(30, 30, 30), origin=(-35.0, -35.0, -35.0))
    d = s.dose(dose.array, dose.grid)
    got = dvh.metrics(d, s.sample_volume_cc, ["Dmean", "V10Gy"])
    x_centre = -30.0 + (10 + 49) / 2.0                 # mask voxels i 10..49
    assert got["Dmean"] == pytest.approx(10.0 + 0.5 * x_centre, abs=0.5 * max(s.info["sample_spacing_mm"]) / 2)


def test_warn_through_the_run_command(tmp_path):
    """Tiny case: uniform 48 Gy in 24 fractions (2 Gy per fraction: EQD2 = 48 Gy for any alpha/beta) on a box organ.
    Limits 50 Gy (48 > 47.5: warn, margin 2), 48 Gy (at the limit: warn, margin 0), 60 Gy (pass) and 45 Gy (fail)
    with a 5 % tolerance: WARN in results.json, the summary counts, the verdict and the printed table."""
    import json

    import SimpleITK as sitk
    import yaml
    from click.testing import CliRunner

    from ReirradiationNPCLib.cli import main

    def write(path, arr, spacing):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((spacing,) * 3)
        sitk.WriteImage(img, str(path))

    write(tmp_path / "dose.nrrd", np.full((12, 12, 12), 48.0, np.float32), 2.5)
    (tmp_path / "s").mkdir()
    m = np.zeros((20, 20, 20), np.uint8)
    m[5:15, 5:15, 5:15] = 1
    write(tmp_path / "s" / "Brainstem.nrrd", m, 1.0)
    write(tmp_path / "s" / "SpinalCord.nrrd", m, 1.0)
    con = {"scope": "cumulative", "source": "test", "verified": False}
    protocol = {"name": "warn test", "version": "1", "alpha_beta": {"default": 3}, "recovery": {"model": "none"},
                "warn_tolerance_percent": 5,
                "organs": {
                    "brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2, "constraints": [
                        {"metric": "D0.03cc", "limit_gy": 50, **con}, {"metric": "Dmax", "limit_gy": 48, **con},
                        {"metric": "Dmean", "limit_gy": 60, **con}]},
                    "spinal_cord": {"aliases": ["SpinalCord"], "alpha_beta": 2, "constraints": [
                        {"metric": "D0.03cc", "limit_gy": 45, **con}]}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(protocol))
    case = {"reference": {"structures": "s"}, "protocol": "p.yaml",
            "courses": [{"name": "c1", "dose": "dose.nrrd", "fractions": 24}]}
    (tmp_path / "case.yaml").write_text(yaml.safe_dump(case))
    r = CliRunner().invoke(main, ["run", str(tmp_path / "case.yaml"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {(c["organ"], c["metric"]): c for c in res["constraints"]}
    assert rows[("brainstem", "D0.03cc")]["status"] == "warn"
    assert rows[("brainstem", "D0.03cc")]["margin"] == pytest.approx(2.0, abs=1e-4)
    assert rows[("brainstem", "Dmax")]["status"] == "warn"
    assert rows[("brainstem", "Dmax")]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert rows[("brainstem", "Dmean")]["status"] == "pass"
    assert rows[("spinal_cord", "D0.03cc")]["status"] == "fail"
    assert rows[("spinal_cord", "D0.03cc")]["margin"] == pytest.approx(-3.0, abs=1e-4)
    assert res["summary"]["counts"] == {"pass": 1, "warn": 2, "fail": 1, "condition_not_met": 0, "no_limit": 0,
                                        "not_evaluated": 0}
    assert res["summary"]["verdict_code"] == "limits_exceeded"
    assert res["summary"]["unverified_limits_used"] == 4
    assert "WARN" in res["summary"]["verdict"]
    assert sum(line.startswith("WARN") and "brainstem" in line for line in r.output.splitlines()) == 2
    assert "2 WARN" in next(line for line in r.output.splitlines() if line.startswith("constraints:"))


def test_mapped_samples_equal_sorting_the_mapped_doses():
    rng = np.random.default_rng(3)
    d = rng.uniform(0, 70, 5000)
    names = ["Dmax", "Dmin", "Dmean", "D0.03cc", "D2cc", "D95%", "V40Gy", "V40Gy%"]

    def f(x):
        return x * (x / 30 + 2.0) / 4.0           # EQD2, 30 fractions, alpha/beta 2 Gy (by hand)
    direct = dvh.metrics(f(d), 0.001, names)
    mapped = dvh.SortedSamples(d, 0.001).mapped(f, mean=float(f(d).mean())).metrics(names)
    assert mapped == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError):
        dvh.SortedSamples(d, 0.001).mapped(lambda x: -x, mean=0.0)


def test_dose_at_samples_is_trilinear_on_an_oblique_mask_grid():
    """Trilinear interpolation reproduces multilinear functions exactly: D = 30 + 0.002 (x+40)(y+40)(z+40) on a
    2.5 mm grid, read at the samples of a mask on a rotated 0.7 mm grid, equals D at each sample's position."""
    c, s_ = math.cos(0.5), math.sin(0.5)
    direction = (c, -s_, 0.0, s_, c, 0.0, 0.0, 0.0, 1.0)
    mgrid = Grid((12, 12, 12), (-3.0, -2.0, -4.0), (0.7, 0.7, 0.7), direction)
    m = np.zeros(mgrid.shape, bool)
    m[2:10, 3:9, 1:11] = True
    dgrid = Grid((16, 16, 16), (-20.0, -20.0, -20.0), (2.5, 2.5, 2.5))
    k, j, i = np.indices(dgrid.shape, dtype=np.float64)
    x, y, z = -20 + 2.5 * i, -20 + 2.5 * j, -20 + 2.5 * k

    def f(x, y, z):
        return 30 + 0.002 * (x + 40) * (y + 40) * (z + 40)
    s = sample_structure(m, mgrid)
    p = s.points_mm
    got = s.dose(f(x, y, z).astype(np.float64), dgrid)
    assert got == pytest.approx(f(p[:, 0], p[:, 1], p[:, 2]), rel=1e-5)
