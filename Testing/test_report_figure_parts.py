"""Parts of the report figures made faster in issue 15, against hand values (display only; no reported number).

- CT slab: a CT whose value is 10 x (its i index) interpolated on a slab shifted by half a CT voxel along i has the
  values 10 (i + 0.5) exactly (linear interpolation of a linear ramp); points outside the CT get -1000 HU.
- Organ outline: the 0.5 iso-line of a 2 x 3 block of ones sampled at unit spacing runs half a sample outside the
  block's samples: x in [1.5, 4.5], y in [1.5, 3.5], a closed line of perimeter 2 (3 + 2) = 10 minus the four cut
  corners (each a diagonal of length sqrt(0.5) instead of two half-steps of 0.5): 6 + 4 sqrt(0.5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ReirradiationNPCLib import report_figures as rf
from ReirradiationNPCLib.geometry import Grid, Volume, resample_linear

pytest.importorskip("matplotlib")


def test_ct_slab_is_the_linear_interpolation_of_the_whole_ct():
    ct_grid = Grid((20, 12, 9), (-5.0, 3.0, 10.0), (1.0, 1.5, 2.0))
    k, j, i = np.meshgrid(np.arange(9), np.arange(12), np.arange(20), indexing="ij")
    ct = Volume((10.0 * i).astype(np.int16), ct_grid)
    slab = Grid((6, 4, 1), (-5.0 + 3.5, 3.0 + 1.5 * 2, 10.0 + 2.0 * 4), (1.0, 1.5, 2.0))   # i 3.5 .. 8.5
    got = rf._ct_on(ct, slab)
    assert got.shape == (1, 4, 6)
    assert np.allclose(got[0], 10.0 * (np.arange(6) + 3.5)[None, :])
    assert np.array_equal(got, resample_linear(ct, slab, default=-1000.0))
    wide = Grid((30, 3, 2), (-12.0, 4.0, 12.0), (1.0, 1.0, 1.0))                         # runs off both ends
    assert np.array_equal(rf._ct_on(ct, wide), resample_linear(ct, wide, default=-1000.0))
    assert np.all(rf._ct_on(ct, wide)[..., :5] == -1000.0)
    far = Grid((3, 3, 1), (500.0, 500.0, 500.0), (1.0, 1.0, 1.0))
    assert np.all(rf._ct_on(ct, far) == -1000.0)


def test_outline_of_a_block():
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    m = np.zeros((6, 7), dtype=bool)
    m[2:4, 2:5] = True
    lines = rf._contour_lines(ax, np.arange(7.0), np.arange(6.0), m, "red", 1.0)
    assert len(lines) == 1
    seg = lines[0]
    assert np.allclose(seg[0], seg[-1])                                  # closed
    assert seg[:, 0].min() == 1.5 and seg[:, 0].max() == 4.5
    assert seg[:, 1].min() == 1.5 and seg[:, 1].max() == 3.5
    length = float(np.sum(np.hypot(*np.diff(seg, axis=0).T)))
    assert length == pytest.approx(6.0 + 4.0 * math.sqrt(0.5))
