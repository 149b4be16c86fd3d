"""The faster paths of the dose at the samples and of the D<x> metrics (issue 15) give what the plain paths give.

- ``sampling._aligned_linear``: trilinear interpolation by axis when the sampling and dose grids are parallel, with
  ITK's border rule; hand values on a linear dose, and equality with SimpleITK's resampling (the plain path, kept
  for grids that are not parallel) on random grids, orientations and sample boxes reaching past the dose grid.
- ``dvh.SortedSamples`` reads D<x>cc / D<x>% on the hot or cold tail of the samples: hand values, and equality with
  the whole sorted curve (to the bit on the hot tail) on random, tied, weighted and negative samples.
- ``dvh._descending_order`` (one sort of packed keys): a permutation ordering the doses by decreasing dose.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from ReirradiationNPCLib import dvh
from ReirradiationNPCLib.geometry import Grid
from ReirradiationNPCLib.sampling import StructureSamples, _aligned_linear


def _rotation(a: float, b: float) -> tuple[float, ...]:
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    return tuple(float(v) for v in (rz @ rx).ravel())


def _samples(grid: Grid, flat=None) -> StructureSamples:
    n = int(np.prod(grid.size))
    flat = np.arange(n, dtype=np.int64) if flat is None else np.asarray(flat, dtype=np.int64)
    return StructureSamples(grid, flat, 0.001)


# ------------------------------------------------------------------------------------ dose at the samples

def test_linear_dose_is_read_exactly_and_the_border_rule_is_itks():
    # dose f = 1 + 2 i + 3 j + 5 k on a 4 x 4 x 4 grid (spacing 1 mm, origin 0): trilinear interpolation of a
    # linear field is exact inside the voxel centres; within half a voxel beyond them the edge value is extended;
    # a continuous index of exactly -0.5 is inside, one of exactly n - 0.5 outside (ITK's half-open rule).
    grid = Grid((4, 4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    k, j, i = np.meshgrid(np.arange(4), np.arange(4), np.arange(4), indexing="ij")
    dose = (1 + 2 * i + 3 * j + 5 * k).astype(np.float32)
    # samples along i at -0.5, -0.25, 0, 0.75, ..., 3.25 (step 0.25 from -0.5: 16 positions), j = 2.25, k = 0.75
    sgrid = Grid((16, 1, 1), (-0.5, 2.25, 0.75), (0.25, 1.0, 1.0))
    got = _samples(sgrid).dose(dose, grid, outside=-1.0)
    ci = -0.5 + 0.25 * np.arange(16)
    inner = 1 + 2 * np.clip(ci, 0, 3) + 3 * 2.25 + 5 * 0.75
    np.testing.assert_allclose(got, inner, rtol=0, atol=1e-5)       # float32 dose, float32 result
    assert got[0] == pytest.approx(1 + 0 + 6.75 + 3.75, abs=1e-5)  # -0.5: inside, the edge value
    # one more step along i: 3.5 = n - 0.5 is outside
    beyond = Grid((17, 1, 1), (-0.5, 2.25, 0.75), (0.25, 1.0, 1.0))
    assert _samples(beyond).dose(dose, grid, outside=-1.0)[-1] == -1.0
    # below -0.5 along k: outside
    low = Grid((1, 1, 1), (1.0, 1.0, -0.5000001), (1.0, 1.0, 1.0))
    assert _samples(low).dose(dose, grid, outside=-7.0)[0] == -7.0


def test_grids_that_are_not_parallel_go_to_simpleitk():
    grid = Grid((4, 4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    turned = Grid((3, 3, 3), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), _rotation(0.3, 0.0))
    dose = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    assert _aligned_linear(_samples(turned), dose, grid, 0.0) is None
    assert _aligned_linear(_samples(grid), dose.astype(np.int16), grid, 0.0) is None      # not float: ITK's rules
    assert _aligned_linear(_samples(grid, [5, 2, 9]), dose, grid, 0.0) is None             # samples not in order
    np.testing.assert_allclose(_samples(grid, [5, 2, 9]).dose(dose, grid), [5.0, 2.0, 9.0])
    # the dose is still read (SimpleITK): a linear field, so exact inside
    k, j, i = np.meshgrid(np.arange(4), np.arange(4), np.arange(4), indexing="ij")
    lin = (1 + 2 * i + 3 * j + 5 * k).astype(np.float64)
    s = _samples(turned)
    ijk = grid.physical_to_index(s.points_mm)
    np.testing.assert_allclose(s.dose(lin, grid), 1 + ijk @ np.array([2.0, 3.0, 5.0]), atol=1e-9)


@settings(max_examples=80, deadline=None)
@given(size=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
       spacing=st.tuples(*[st.floats(0.4, 3.0)] * 3),
       # no angle within 1e-3 rad of 0 but 0 itself: ITK's SVD of a direction holding a tiny (even a normal 1e-300)
       # cosine error misplaces the samples
       angles=st.tuples(*[st.one_of(st.just(0.0), st.floats(1e-3, 3.0), st.floats(-3.0, -1e-3))] * 2),
       rel_origin=st.tuples(*[st.floats(-2.0, 8.0)] * 3),
       steps=st.tuples(*[st.floats(0.1, 1.5)] * 3),
       ssize=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
       double=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_by_axis_equals_simpleitk(size, spacing, angles, rel_origin, steps, ssize, double, seed):
    rng = np.random.default_rng(seed)
    direction = _rotation(*angles)
    grid = Grid(size, (10.0, -20.0, 30.0), spacing, direction)
    dose = (rng.random(grid.shape) * 70.0).astype(np.float64 if double else np.float32)
    # a sampling grid parallel to the dose grid, starting anywhere from 2 voxels before to past its end
    origin = grid.index_to_physical(np.asarray([rel_origin]))[0]
    sgrid = Grid(ssize, tuple(float(v) for v in origin), tuple(float(s * f) for s, f in zip(spacing, steps)),
                 direction)
    flat = np.flatnonzero(rng.random(int(np.prod(ssize))) < 0.7)
    if flat.size == 0:
        flat = np.array([0])
    s = _samples(sgrid, flat)
    fast = _aligned_linear(s, dose, grid, -1.0)
    plain = s._resample(dose, grid, sitk.sitkLinear, -1.0)
    assert fast is not None and fast.dtype == dose.dtype
    # leave out samples within 1e-6 voxel of a border of the inside rule (there the two computations of the
    # continuous index may fall on either side)
    ijk = grid.physical_to_index(s.points_mm)
    near = np.any(np.minimum(np.abs(ijk + 0.5), np.abs(ijk - (np.asarray(size) - 0.5))) < 1e-6, axis=1)
    keep = ~near
    # float32: a unit or two in the last place of the result; float64: the continuous index's rounding (1e-15
    # voxel) times a gradient of up to 70 Gy per voxel
    eps = 4 * np.finfo(np.float32).eps * 70.0 if dose.dtype == np.float32 else 1e-11
    np.testing.assert_array_equal(fast[keep] == -1.0, plain[keep] == -1.0)
    np.testing.assert_allclose(fast[keep], plain[keep], rtol=0, atol=eps)


# --------------------------------------------------------------------------------------------- D<x> tails

def test_d_metrics_on_the_tails_by_hand():
    # 1000 distinct doses 0.0, 0.1, ..., 99.9 Gy of 0.001 cc each: the curve point of the i-th hottest level
    # (99.9 - 0.1 i Gy) is (i + 1/2) 0.001 cc. D0.0105cc: i = 10 -> 98.9 Gy. D95% (0.95 cc): i = 949.5 -> 4.95 Gy.
    # D0.0101cc: i = 9.6 -> 99.9 - 0.96 = 98.94 Gy.
    doses = np.arange(1000)[::-1] * 0.1
    rng = np.random.default_rng(0)
    rng.shuffle(doses)
    ss = dvh.SortedSamples(doses, 0.001)
    assert ss.dose_at_volume(0.0105) == pytest.approx(98.9, abs=1e-9)
    assert ss.dose_at_volume(0.0101) == pytest.approx(98.94, abs=1e-9)
    assert ss.metric(dvh.parse("D95%")) == pytest.approx(4.95, abs=1e-9)
    assert ss._curve is None and set(ss._tails) == {True, False}     # read on the tails, no whole sort
    assert ss.dmax == 99.9 and ss.dmin == 0.0 and ss._curve is None
    # the same with unequal volumes: 2 x 0.0005 cc per dose (2000 samples) gives the same curve
    ss2 = dvh.SortedSamples(np.repeat(doses, 2), np.full(2000, 0.0005))
    assert ss2.dose_at_volume(0.0105) == pytest.approx(98.9, abs=1e-9)
    assert ss2.metric(dvh.parse("D95%")) == pytest.approx(4.95, abs=1e-9)
    assert ss2._curve is None


_doses = st.sampled_from(["float32", "float64", "ties", "negative"])


@settings(max_examples=120, deadline=None)
@given(n=st.integers(1, 6000), kind=_doses, weighted=st.booleans(), fractions=st.lists(
    st.floats(0.0, 1.0), min_size=1, max_size=6), seed=st.integers(0, 2 ** 31 - 1))
def test_tails_give_the_whole_curves_values(n, kind, weighted, fractions, seed):
    rng = np.random.default_rng(seed)
    if kind == "float32":
        d = (rng.random(n) * 70.0).astype(np.float32).astype(np.float64)
    elif kind == "float64":
        d = rng.normal(30.0, 10.0, n)
        d[rng.random(n) < 0.2] = 31.25                              # float64 doses with ties (argsort path)
    elif kind == "ties":
        d = np.round(rng.random(n) * 12.0).astype(np.float32).astype(np.float64)
    else:
        d = (rng.random(n) * 20.0 - 10.0).astype(np.float32).astype(np.float64)
        d[: n // 7] = -0.0
    vol = rng.integers(1, 26, n) * 0.0004 if weighted else 0.001
    whole = dvh.SortedSamples(d, vol)
    whole._sorted()
    for f in fractions:
        for x in (f * whole.total_cc, f * 0.5):                     # a share of the volume; a few cc at most
            lazy = dvh.SortedSamples(d, vol)
            a, b = lazy.dose_at_volume(x), whole.dose_at_volume(x)
            if b is None:
                assert a is None
                continue
            if x <= 0.5 * whole.total_cc and (kind != "float64" or not weighted):
                assert a == b                                      # hot tail: the same sums in the same order
            elif x <= 0.5 * whole.total_cc:                         # float64 ties of unequal volumes: any order
                assert a == pytest.approx(b, rel=0, abs=1e-12)
            else:
                assert a == pytest.approx(b, rel=0, abs=1e-9)      # cold tail: the volume above added back


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2 ** 31 - 1), ties=st.booleans())
def test_packed_key_order_is_a_descending_permutation(n, seed, ties):
    rng = np.random.default_rng(seed)
    d = (rng.normal(0.0, 30.0, n)).astype(np.float32)
    if ties and n:
        d = np.round(d / 10.0) * 10.0
        d[rng.random(n) < 0.1] = -0.0
    d = d.astype(np.float64)
    single = dvh._float32_copy(d)
    assert single is not None
    order = dvh._descending_order(d, single)
    assert np.array_equal(np.sort(order), np.arange(n))
    assert np.all(np.diff(d[order]) <= 0)
    assert dvh._float32_copy(d + 1e-12 if n else np.array([0.1])) is None       # float64 doses: not packed
