"""The fast paths of ``metrics`` (issue 15) give exactly what the plain paths give.

- ``dicom_rt.evenodd_coverage`` counts, per pixel, the n x n sub-samples inside the polygons by the even-odd rule
  without making the sub-sample array: hand-counted cases, and equality with the block sums of
  ``dicom_rt.evenodd_fill`` (the plain fill) on random, self-intersecting, nested and clipped polygons.
- ``structure_metrics`` can rasterise and evaluate structures two at a time in threads (``THREADS = 2``): the same masks, numbers and
  warnings, in the same order, as one at a time.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ReirradiationNPCLib import dicom_rt as dr
from ReirradiationNPCLib import structure_metrics as sm
from ReirradiationNPCLib.dicom_export import write_rtdose, write_rtstruct
from ReirradiationNPCLib.geometry import Grid, Volume


def _rect(x0, x1, y0, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _block_sums(polys, x0, n, ni, y0, nj):
    inside = dr.evenodd_fill(polys, x0, 1.0 / n, ni * n, y0, 1.0 / n, nj * n)
    return inside.reshape(nj, n, ni, n).sum(axis=(1, 3))


def test_coverage_of_a_rectangle_with_a_hole_counted_by_hand():
    # n = 3: pixel I holds the sub-samples at I - 1/3, I, I + 1/3 (x0 = -0.5 + 1/6 = -1/3), rows likewise.
    # x in [-0.6, 1.9): pixel 0 all 3 columns, pixel 1 all 3, pixel 2 only 1.667 (2.0 and 2.333 are out);
    # y in [-0.6, 0.4): the 3 sub-rows of pixel row 0, none of row 1. So row 0 counts 9, 9, 3, 0.
    n, x0 = 3, -0.5 + 0.5 / 3
    outer = _rect(-0.6, 1.9, -0.6, 0.4)
    [got] = dr.evenodd_coverage([[outer]], x0, n, 4, x0, 2)
    assert got.tolist() == [[9, 9, 3, 0], [0, 0, 0, 0]]
    # a hole around the sub-sample (1.0, 0.0) only (even-odd: inside twice = outside): pixel 1 loses one
    hole = _rect(0.9, 1.1, -0.1, 0.1)
    [got] = dr.evenodd_coverage([[outer, hole]], x0, n, 4, x0, 2)
    assert got.tolist() == [[9, 8, 3, 0], [0, 0, 0, 0]]
    # two planes at once: each plane counted on its own; an empty plane list entry gives zeros
    got = dr.evenodd_coverage([[hole], [outer], []], x0, n, 4, x0, 2)
    assert got[0].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert got[1].tolist() == [[9, 9, 3, 0], [0, 0, 0, 0]]
    assert not got[2].any()


def test_coverage_of_polygons_beyond_the_grid_is_clipped():
    # n = 5, a 3 x 2 pixel grid; the rectangle covers everything and more: every pixel 25
    n, x0 = 5, -0.5 + 0.5 / 5
    [got] = dr.evenodd_coverage([[_rect(-10.0, 10.0, -10.0, 10.0)]], x0, n, 3, x0, 2)
    assert got.tolist() == [[25, 25, 25], [25, 25, 25]]
    # entirely left of / above the grid: nothing
    [got] = dr.evenodd_coverage([[_rect(-10.0, -5.0, -10.0, 10.0)], ], x0, n, 3, x0, 2)
    assert not got.any()


_coord = st.floats(-3.0, 9.0, allow_nan=False, allow_infinity=False)
_poly = st.lists(st.tuples(_coord, _coord), min_size=3, max_size=9).map(lambda p: np.array(p, dtype=float))


@settings(max_examples=150, deadline=None)
@given(planes=st.lists(st.lists(_poly, min_size=0, max_size=3), min_size=1, max_size=4),
       n=st.sampled_from([3, 5]), ni=st.integers(1, 7), nj=st.integers(1, 7),
       shift=st.tuples(st.floats(-1.0, 1.0), st.floats(-1.0, 1.0)))
def test_coverage_equals_block_sums_of_the_plain_fill(planes, n, ni, nj, shift):
    """Random (often self-intersecting) polygons, several per plane, partly beyond the grid, on several planes."""
    x0, y0 = shift[0] - 0.5 + 0.5 / n, shift[1] - 0.5 + 0.5 / n
    got = dr.evenodd_coverage(planes, x0, n, ni, y0, nj)
    assert got.shape == (len(planes), nj, ni)
    for p, polys in enumerate(planes):
        want = _block_sums(polys, x0, n, ni, y0, nj) if polys else np.zeros((nj, ni), dtype=int)
        np.testing.assert_array_equal(got[p], want)


def test_a_row_with_an_odd_number_of_crossings_runs_to_its_end(monkeypatch):
    """Closed polygons cross every row an even number of times; should a row ever get an odd count, the inside
    run it opens goes to the end of the row in both the plain fill and the counts (the parity's behaviour)."""
    n, ni, nj = 3, 4, 2
    rows = np.array([1, 1, 1, 4], dtype=np.int64)          # sub-row 1: three crossings; sub-row 4: one
    cols = np.array([2, 5, 7, 3], dtype=np.int64)
    monkeypatch.setattr(dr, "_crossings", lambda *a, **k: (rows, cols))
    [got] = dr.evenodd_coverage([[_rect(0, 1, 0, 1)]], 0.0, n, ni, 0.0, nj)
    want = _block_sums([_rect(0, 1, 0, 1)], 0.0, n, ni, 0.0, nj)
    np.testing.assert_array_equal(got, want)
    # by hand: sub-row 1 is inside on columns 2, 3, 4 and 7 .. 11; sub-row 4 on columns 3 .. 11
    assert got.tolist() == [[1, 2, 2, 3], [0, 3, 3, 3]]


def _ellipse(cx, cy, rx, ry, z, m=40):
    t = np.linspace(0, 2 * np.pi, m, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t), np.full(m, z)], axis=1)


def test_structures_in_threads_give_what_one_at_a_time_gives(tmp_path, monkeypatch):
    # an RTSTRUCT of four ROIs (one far outside the dose grid) and a dose in a gradient
    ct_grid = Grid((64, 64, 24), (-31.5, -31.5, -30.0), (1.0, 1.0, 2.5))
    k, j, i = np.meshgrid(*[np.arange(s) for s in ct_grid.shape], indexing="ij")
    x, y, z = i - 31.5, j - 31.5, k * 2.5 - 30.0
    masks = {"Big": (x / 20) ** 2 + (y / 14) ** 2 + (z / 20) ** 2 <= 1,
             "Small": (x - 8) ** 2 + (y + 5) ** 2 + (z - 2) ** 2 <= 9,
             "Ring": ((x + 10) ** 2 + y ** 2 <= 64) & ((x + 10) ** 2 + y ** 2 >= 9) & (np.abs(z) <= 5),
             "Edge": (x - 28) ** 2 + (y - 28) ** 2 + z ** 2 <= 16}
    ct = Volume(np.zeros(ct_grid.shape, np.int16), ct_grid)
    frame = "1.2.826.0.1.3680043.8.498.77"
    ct.meta["dicom"] = {"FrameOfReferenceUID": frame, "PatientID": "T"}
    write_rtstruct(list(masks.values()), list(masks), [(1.0, 0.0, 0.0)] * len(masks), ct, tmp_path / "RS.dcm")
    dgrid = Grid((20, 20, 16), (-25.0, -25.0, -20.0), (2.5, 2.5, 2.5))
    kk, jj, ii = np.meshgrid(*[np.arange(s) for s in dgrid.shape], indexing="ij")
    dose = Volume((20.0 + 1.5 * ii + 0.7 * jj + 0.3 * kk).astype(np.float32), dgrid)
    write_rtdose(dose, {"FrameOfReferenceUID": frame, "PatientID": "T"}, tmp_path / "RD.dcm",
                 series_description="test dose")
    d = dr.load_dose_any(tmp_path / "RD.dcm", "--dose")
    names = list(sm.DEFAULT_SET) + ["V30Gy", "V25Gy%"]

    def run():
        warnings: list[str] = []
        structs = sm.load_structures(tmp_path / "RS.dcm", d.grid, warnings)
        return structs, sm.compute(d, structs, names), warnings

    monkeypatch.setattr(sm, "THREADS", 2)
    s2, r2, w2 = run()
    monkeypatch.setattr(sm, "THREADS", 1)
    s1, r1, w1 = run()
    assert [s.name for s in s2] == [s.name for s in s1] == list(masks)
    for a, b in zip(s1, s2):
        assert a.grid == b.grid
        np.testing.assert_array_equal(a.mask, b.mask)
    assert r2 == r1 and w2 == w1
    assert any("Edge" in w and "outside the dose grid" in w for w in r1["warnings"])
    assert r1["structures"][1]["metrics"]["Dmax"] is not None


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
       block=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)), seed=st.integers(0, 1000),
       fill=st.floats(0.0, 1.0))
def test_block_counts_equal_the_reshaped_sum(shape, block, seed, fill):
    from ReirradiationNPCLib.sampling import _block_counts
    bk, bj, bi = block
    nk, nj, ni = shape
    a = np.random.default_rng(seed).random((nk * bk, nj * bj, ni * bi)) < fill
    want = a.reshape(nk, bk, nj, bj, ni, bi).sum(axis=(1, 3, 5))
    got = _block_counts(a, bk, bj, bi)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, want)


def test_block_counts_by_hand():
    from ReirradiationNPCLib.sampling import _block_counts
    a = np.zeros((2, 2, 4), dtype=bool)
    a[0, 0, :3] = True           # block (0, 0, 0) holds a[:, :, 0:2]: 2 set; block (0, 0, 1) a[:, :, 2:4]: 1 set
    a[1, 1, 3] = True            # block (0, 0, 1) gets one more
    assert _block_counts(a, 2, 2, 2).tolist() == [[[2, 2]]]
    big = np.ones((1, 300, 300), dtype=bool)      # 90 000 per block: past uint16
    assert _block_counts(big, 1, 300, 300).tolist() == [[[90000]]]
