"""The blocked, threaded course + cumulative EQD2 maps equal the LQ formula evaluated by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ReirradiationNPCLib import eqd2 as lq
from ReirradiationNPCLib.errors import InputError


def _hand(D, n, ab):
    D = np.asarray(D, dtype=np.float64)
    return D * (D / n + ab) / (2.0 + ab)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_blocked_maps_equal_hand_formula(monkeypatch, threads):
    monkeypatch.setattr(lq, "BLOCK", 1000)  # many blocks and a ragged tail on a small grid
    rng = np.random.default_rng(7)
    shape = (7, 23, 31)  # 4991 voxels: 5 blocks, the last one partial
    d1 = (rng.random(shape) * 80).astype(np.float32)
    d2 = (rng.random(shape) * 70).astype(np.float32)
    ab = np.where(rng.random(shape) < 0.5, 2.0, 10.0).astype(np.float32)
    r = np.where(rng.random(shape) < 0.3, 0.25, 0.0).astype(np.float32)
    maps, cum = lq.course_and_cumulative_eqd2([d1, d2], [33, 54], ab, [1.0 - r, 1.0], threads=threads)
    e1, e2 = _hand(d1, 33, ab.astype(np.float64)), _hand(d2, 54, ab.astype(np.float64))
    assert maps[0].dtype == np.float32 and cum.shape == shape
    assert np.abs(maps[0] - e1).max() < 1e-4 and np.abs(maps[1] - e2).max() < 1e-4
    assert np.abs(cum - ((1.0 - r) * e1 + e2)).max() < 1e-4
    # the cumulative map alone (one division of the weighted sum by 2 + ab) is the same map
    none, cum_only = lq.course_and_cumulative_eqd2([d1, d2], [33, 54], ab, [1.0 - r, 1.0], threads=threads,
                                                   keep_courses=False)
    assert none == [] and np.abs(cum_only - ((1.0 - r) * e1 + e2)).max() < 1e-4


def test_worked_values_and_scalar_alpha_beta():
    # clinical facts: 70 Gy / 33 fx -> 71.70 Gy EQD2 at a/b 3; 65 Gy / 54 fx -> 54.65 Gy at a/b 3
    d1 = np.full((2, 2, 2), 70.0)
    d2 = np.full((2, 2, 2), 65.0)
    maps, cum = lq.course_and_cumulative_eqd2([d1, d2], [33, 54], 3.0, [0.5, 1.0])
    assert maps[0][0, 0, 0] == pytest.approx(71.70, abs=0.005)
    assert maps[1][0, 0, 0] == pytest.approx(54.65, abs=0.005)
    assert cum[1, 1, 1] == pytest.approx(0.5 * 70 * (70 / 33 + 3) / 5 + 65 * (65 / 54 + 3) / 5, abs=1e-9)
    # 2 Gy per fraction: EQD2 = physical dose for any alpha/beta
    maps, cum = lq.course_and_cumulative_eqd2([np.full((3, 3, 3), 60.0)], [30], 2.5, [1.0])
    assert np.all(maps[0] == 60.0) and np.all(cum == 60.0)


def test_bad_alpha_beta_refused():
    d = np.ones((4, 4, 4), np.float32)
    ab = np.full((4, 4, 4), 3.0, np.float32)
    ab[1, 2, 3] = np.nan
    with pytest.raises(InputError):
        lq.course_and_cumulative_eqd2([d], [10], ab, [1.0])
    ab[1, 2, 3] = 0.0
    with pytest.raises(InputError):
        lq.course_and_cumulative_eqd2([d], [10], ab, [1.0])
    with pytest.raises(InputError):
        lq.course_and_cumulative_eqd2([d], [0], 3.0, [1.0])


def test_cumulative_only_and_non_contiguous(monkeypatch):
    monkeypatch.setattr(lq, "BLOCK", 64)
    rng = np.random.default_rng(3)
    d1 = (rng.random((5, 6, 7)) * 60).astype(np.float32)
    d2 = (rng.random((5, 6, 7)) * 60).astype(np.float32)
    maps, cum = lq.course_and_cumulative_eqd2([d1, d2], [30, 20], 2.0, [0.75, 1.0], keep_courses=False)
    assert maps == []
    assert np.abs(cum - (0.75 * _hand(d1, 30, 2.0) + _hand(d2, 20, 2.0))).max() < 1e-4
    # a transposed (non-contiguous) dose takes the full-array path with the same result
    t1, t2 = d1.transpose(2, 1, 0), d2.transpose(2, 1, 0)
    maps, cum = lq.course_and_cumulative_eqd2([t1, t2], [30, 20], 2.0, [0.75, 1.0])
    assert np.abs(maps[0] - _hand(t1, 30, 2.0)).max() < 1e-4
    assert np.abs(cum - (0.75 * _hand(t1, 30, 2.0) + _hand(t2, 20, 2.0))).max() < 1e-4


@pytest.mark.parametrize("keep", [True, False])
def test_uniform_and_mixed_alpha_beta_blocks(monkeypatch, keep):
    """Blocks with one alpha/beta take scalar arithmetic, mixed blocks the per-voxel one: same map."""
    monkeypatch.setattr(lq, "BLOCK", 128)
    rng = np.random.default_rng(11)
    shape = (6, 16, 16)                       # 1536 voxels: 12 blocks
    d1 = (rng.random(shape) * 75).astype(np.float32)
    d2 = (rng.random(shape) * 65).astype(np.float32)
    ab = np.full(shape, 3.0, np.float32)
    ab[2:4, 5:9, 5:9] = 2.0                   # an organ: some blocks mixed, most uniform
    maps, cum = lq.course_and_cumulative_eqd2([d1, d2], [33, 54], ab, [0.5, 1.0], threads=2, keep_courses=keep)
    abd = ab.astype(np.float64)
    expect = 0.5 * _hand(d1, 33, abd) + _hand(d2, 54, abd)
    assert np.abs(cum - expect).max() < 1e-4
    if keep:
        assert np.abs(maps[0] - _hand(d1, 33, abd)).max() < 1e-4
