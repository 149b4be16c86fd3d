"""Sampling of a mask that is much finer in-plane than along z (an RTSTRUCT rasterised on a fine in-plane lattice,
one plane per contour plane): fine mask voxels are merged in-plane and split along z (sampling._merged_samples).

Analytic case: a 0.28 cc cylinder (radius 3 mm, 10 mm long, axis along z) as a 0.05 x 0.05 x 2.5 mm mask, in a
linear dose. Hand formulas: the volume beyond x = xc + t is L (R^2 acos(t/R) - t sqrt(R^2 - t^2)).
"""

import math

import numpy as np
import pytest

from ReirradiationNPCLib import dvh
from ReirradiationNPCLib.geometry import Grid
from ReirradiationNPCLib.sampling import sample_structure

R, L = 3.0, 10.0          # mm
H, DZ = 0.05, 2.5         # mask spacing in-plane and along z (mm)


def _cylinder():
    n = 140                                     # 7 mm in-plane box, cylinder centred at (0, 0)
    c = (np.arange(n) - (n - 1) / 2) * H
    x, y = np.meshgrid(c, c, indexing="xy")
    disc = x ** 2 + y ** 2 <= R ** 2
    mask = np.repeat(disc[None], 4, axis=0)      # planes at z = 0, 2.5, 5, 7.5 -> slab -1.25 .. 8.75 mm
    grid = Grid((n, n, 4), (float(c[0]), float(c[0]), 0.0), (H, H, DZ))
    return mask, grid, float(disc.sum()) * H * H  # pixelated disc area (mm^2), within 0.1 % of pi R^2


def _dose(fn):
    """A dose on a 2.5 mm grid covering the cylinder; ``fn(x, y, z)`` is linear so trilinear is exact."""
    grid = Grid((9, 9, 8), (-10.0, -10.0, -5.0), (2.5, 2.5, 2.5))
    k, j, i = np.meshgrid(np.arange(8), np.arange(9), np.arange(9), indexing="ij")
    return fn(-10.0 + 2.5 * i, -10.0 + 2.5 * j, -5.0 + 2.5 * k).astype(np.float32), grid


def _segment(t: float) -> float:
    return R * R * math.acos(t / R) - t * math.sqrt(R * R - t * t)


def _t_for_volume(v_mm3: float) -> float:
    lo, hi = -R, R                               # segment area decreases from pi R^2 to 0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if L * _segment(mid) > v_mm3 else (lo, mid)
    return 0.5 * (lo + hi)


def test_merged_sampling_matches_the_analytic_cylinder_in_an_x_gradient():
    mask, grid, area = _cylinder()
    s = sample_structure(mask, grid)
    assert s.info["method"].startswith("merged")
    assert s.info["merge_ijk"][0] >= 2 and s.info["subdivision_ijk"][2] >= 2
    assert s.n < 60_000                                          # far fewer samples than the 450 k sub-voxels
    assert s.volume_cc == pytest.approx(area * L / 1000.0, rel=1e-12)   # mask volume kept exactly
    assert s.volume_cc == pytest.approx(math.pi * R * R * L / 1000.0, rel=0.002)
    a0, g = 10.0, 2.0                                            # D = 10 Gy + 2 Gy/mm x
    arr, dgrid = _dose(lambda x, y, z: a0 + g * x)
    m = dvh.metrics(s.dose(arr, dgrid), s.sample_volume_cc, ["Dmean", "D95%", "D5%", "D0.03cc", "Dmax"])
    v = math.pi * R * R * L
    assert m["Dmean"] == pytest.approx(a0, rel=0.005)
    assert m["D95%"] == pytest.approx(a0 + g * _t_for_volume(0.95 * v), rel=0.01)
    assert m["D5%"] == pytest.approx(a0 + g * _t_for_volume(0.05 * v), rel=0.01)
    assert m["D0.03cc"] == pytest.approx(a0 + g * _t_for_volume(30.0), rel=0.02)
    assert m["Dmax"] == pytest.approx(a0 + g * R, abs=g * 0.25)  # a sample centre within 0.25 mm of the edge


def test_merged_sampling_splits_the_contour_slab_along_z():
    mask, grid, _ = _cylinder()
    s = sample_structure(mask, grid)
    arr, dgrid = _dose(lambda x, y, z: 10.0 + 1.0 * z)           # 1 Gy/mm along z; slab -1.25 .. 8.75 mm
    m = dvh.metrics(s.dose(arr, dgrid), s.sample_volume_cc, ["Dmean", "Dmax", "Dmin", "D50%"])
    assert m["Dmean"] == pytest.approx(10.0 + 3.75, rel=1e-6)   # slab centre
    assert m["D50%"] == pytest.approx(10.0 + 3.75, abs=0.15)
    # one sample per contour plane would give 17.5 / 10 Gy; the split samples reach within half a sub-slab
    assert 18.75 - 0.25 <= m["Dmax"] <= 18.75
    assert 8.75 <= m["Dmin"] <= 8.75 + 0.25
