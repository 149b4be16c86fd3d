"""Dose-volume metrics from dose samples and the volume each sample stands for.

A structure is described by samples: a dose (Gy) and a volume (cc) per sample. Voxel-based metrics use one
sample per voxel (volume = voxel volume); sub-voxel sampling (``sampling.py``) uses many samples with smaller
volumes. Definitions (clinical facts section 10), units explicit:

- ``Dmax`` / ``Dmin`` (Gy): largest / smallest sampled dose; ``Dmean`` (Gy): volume-weighted mean.
- ``D<x>cc`` (Gy): the minimum dose received by the hottest ``x`` cc. Undefined (None) if ``x`` exceeds the
  structure volume.
- ``D<x>%`` (Gy): as ``D<x>cc`` with ``x`` percent of the structure volume.
- ``V<x>Gy`` (cc): volume receiving at least ``x`` Gy; ``V<x>Gy%`` the same in percent of the structure volume.

Continuous-dose convention. Samples stand for small volumes over which the dose varies; treating each sample as a
step biases D<x>cc and V<x>Gy by up to half a sample layer (for a 0.1 cc organ in a gradient, several percent).
So the cumulative DVH is the piecewise-linear curve through the points (dose level, volume with a higher dose +
half the volume at that level), one point per distinct sampled dose: each sample's volume is taken as spread
evenly around its dose (the mid-point plotting position). D<x>cc and V<x>Gy are read off that curve by linear
interpolation; below the first point the curve is flat at Dmax, beyond the last point flat at Dmin. For a
structure in a linear dose gradient this makes D<x>cc exact for a prism-shaped slab of samples and reduces the
error elsewhere from O(h) to O(h^2) in the sample spacing h.
"""

from __future__ import annotations

import math

import numpy as np

from .protocol import Metric, parse_metric

DEFAULT_METRICS = ("Dmax", "Dmean", "Dmin", "D0.03cc")


def parse(name: str) -> Metric:
    """A metric name: the protocol's names (``parse_metric``) plus ``V<x>Gy%`` (volume in percent)."""
    text = str(name).strip()
    if text.endswith("Gy%"):
        base = parse_metric(text[:-1])
        return Metric(text, "vpct", base.param)
    return parse_metric(text)


def weighted_mean(doses: np.ndarray, volumes_cc: np.ndarray, total_cc: float) -> float:
    """Volume-weighted mean dose (Gy) of samples ``doses`` (Gy) of volumes ``volumes_cc`` (cc) totalling ``total_cc``
    (> 0). numpy's own (pairwise) sum of the products, as np.average: np.dot would call the BLAS, whose last bits
    depend on its thread count and which wakes its threads for every call (0.1 s for 19 structures). The one
    formula for :class:`SortedSamples` and the robustness scenarios."""
    return float(np.multiply(doses, volumes_cc).sum() / total_cc)


def _float32_copy(doses: np.ndarray) -> np.ndarray | None:
    """``doses`` (float64) as float32 when that loses nothing (-0.0 read as 0.0), else None."""
    single = doses.astype(np.float32)
    single += np.float32(0.0)                      # -0.0 -> 0.0: the sort keys below order by bit pattern
    return single if np.array_equal(single, doses) else None


def _descending_order(doses: np.ndarray, single: np.ndarray | None) -> np.ndarray:
    """Indices of ``doses`` by decreasing dose. With float32 doses (``single``) one sort of 64-bit keys -- the dose's
    bits, mapped so that unsigned order is numeric order, above the sample index -- which is 3-4x faster than an
    argsort; ties come in decreasing index order (so a tail of the samples sums each level's volumes in the order the
    whole set does). Otherwise an argsort (a stable one is 3x slower on float64): ties in no set order."""
    n = doses.size
    if single is None or n >= 2 ** 32:
        return np.argsort(doses)[::-1]
    bits = single.view(np.uint32).astype(np.uint64)
    negative = bits >> np.uint64(31)               # sign bit: negative floats order reversed, below the positive
    bits ^= (np.uint64(0xFFFFFFFF) * negative) | np.uint64(0x80000000)
    bits <<= np.uint64(32)
    bits |= np.arange(n, dtype=np.uint64)
    bits.sort()
    return (bits[::-1] & np.uint64(0xFFFFFFFF)).astype(np.intp)


def _curve(doses: np.ndarray, unit: float | None, vols: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels, level_cum, level_above) of samples ``doses`` (Gy, finite) of equal volume ``unit`` (cc) or of volumes
    ``vols`` (cc): the distinct doses descending, the mid-point curve points and the volume at or above each."""
    if not doses.size:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    single = _float32_copy(doses)  # the doses as float32 when every one is a float32 value (doses read off a
    if vols is None:               # float32 grid): sorted 2-3x faster, the same order and values
        d = (np.sort(doses) if single is None else np.sort(single).astype(np.float64))[::-1]
    else:
        order = _descending_order(doses, single)  # ties need no particular order: levels merge them
        d = doses[order]
        v = vols[order]
    start = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    w = np.diff(np.r_[start, d.size]) * unit if vols is None else np.add.reduceat(v, start)
    cum = np.cumsum(w)
    return d[start], cum - 0.5 * w, cum


class SortedSamples:
    """The samples of one structure for any number of metrics.

    The whole cumulative DVH (every distinct dose level, descending, with its curve point: :attr:`levels`,
    :attr:`level_cum`, :attr:`level_above`) is made by one sort the first time something needs it (a curve,
    V<x>Gy, :meth:`mapped`). Dmax, Dmin and Dmean need no sort; D<x>cc and D<x>% read the same curve on the hot or
    cold tail of the samples alone when that tail is small (:meth:`_tail`): the same value as the whole curve's --
    to the bit on the hot tail (doses read off a float32 grid, or equal sample volumes; float64 doses of unequal
    volumes sum a tied level's volumes in another order: the last bits), within a few units in the last place of
    the volumes on the cold one."""

    def __init__(self, doses: np.ndarray, volumes_cc: np.ndarray | float):
        doses = np.asarray(doses, dtype=np.float64).ravel()
        if doses.size and not np.isfinite(doses).all():
            raise ValueError("dose samples contain NaN or infinite values")
        self.n = int(doses.size)
        self._doses = doses
        self._unit = float(volumes_cc) if np.ndim(volumes_cc) == 0 else None   # equal sample volumes (cc)
        if self._unit is not None:
            self._vols = None
            self.total_cc = self._unit * self.n
            self._mean = float(doses.mean()) if self.n and self._unit > 0 else float("nan")
        else:
            self._vols = np.broadcast_to(np.asarray(volumes_cc, dtype=np.float64), doses.shape)
            self.total_cc = float(self._vols.sum()) if self.n else 0.0
            self._mean = weighted_mean(doses, self._vols, self.total_cc) if self.total_cc > 0 else float("nan")
        self._curve: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._tails: dict[bool, tuple[float, np.ndarray, np.ndarray]] = {}

    def _sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(levels, level_cum, level_above): the whole curve, made once."""
        if self._curve is None:
            self._curve = _curve(self._doses, self._unit, self._vols)
        return self._curve

    @property
    def levels(self) -> np.ndarray:
        """Distinct sampled doses (Gy), descending."""
        return self._sorted()[0]

    @property
    def level_cum(self) -> np.ndarray:
        """Curve points (cc): the volume above each level plus half the volume at it."""
        return self._sorted()[1]

    @property
    def level_above(self) -> np.ndarray:
        """Volume (cc) at or above each level."""
        return self._sorted()[2]

    def mapped(self, fn, mean: float) -> "SortedSamples":
        """The same samples with every dose passed through ``fn``, which must be strictly increasing (e.g. EQD2 of
        a physical dose at fixed fractions and alpha/beta): the order is kept, so no new sort. ``mean``: the
        volume-weighted mean of the mapped doses (a mean does not map through a non-linear ``fn``)."""
        levels, level_cum, level_above = self._sorted()
        out = object.__new__(SortedSamples)
        out.n, out.total_cc, out._mean = self.n, self.total_cc, float(mean)
        out._doses = out._unit = out._vols = None
        out._tails = {}
        out._curve = (np.asarray(fn(levels), dtype=np.float64), level_cum, level_above)
        if out.levels.size > 1 and not np.all(np.diff(out.levels) <= 0):
            raise ValueError("mapping must be increasing")
        return out

    def metrics(self, names: list[str]) -> dict[str, float | None]:
        parsed = [parse(n) for n in names]
        # the D<x> needing the largest tail first: the smaller ones on the same side then read that tail
        first = sorted(range(len(parsed)), key=lambda i: -self._tail_need(parsed[i]))
        values = {i: self.metric(parsed[i]) for i in first}
        return {n: values[i] for i, n in enumerate(names)}

    def _tail_need(self, m: Metric) -> float:
        """Volume (cc) of the hot or cold tail that decides the D metric ``m`` (0 for any other metric)."""
        if m.kind not in ("dcc", "dpct") or self.total_cc <= 0:
            return 0.0
        x = m.param if m.kind == "dcc" else self.total_cc * m.param / 100.0
        return x if x <= 0.5 * self.total_cc else self.total_cc - x

    @property
    def dmax(self) -> float | None:
        if not self.n:
            return None
        return float(self._curve[0][0] if self._curve is not None else self._doses.max())

    @property
    def dmin(self) -> float | None:
        if not self.n:
            return None
        return float(self._curve[0][-1] if self._curve is not None else self._doses.min())

    def dose_at_volume(self, x_cc: float) -> float | None:
        """D<x>cc (Gy): minimum dose of the hottest ``x_cc`` cc; None when ``x_cc`` exceeds the volume."""
        if self.total_cc <= 0 or x_cc < 0 or x_cc > self.total_cc * (1 + 1e-9):
            return None
        if self._curve is None:
            got = self._tail_dose(float(x_cc))
            if got is not None:
                return got
        # curve volume increases while dose decreases: interpolate dose against volume
        return float(np.interp(x_cc, self.level_cum, self.levels))

    def _tail_dose(self, x: float) -> float | None:
        """D(x) read on the curve of the hot tail (x up to half the volume) or of the cold tail alone; None when the
        tail would be a large part of the samples (then the whole curve serves).

        Hot tail: the samples at or above a dose t chosen by selection (np.partition): every level >= t is whole in
        it, so its curve points from the top are the whole curve's first points -- summed in the same order, so to
        the bit -- and D(x) is read between the same two points when x lies at or before its last point. Cold tail:
        the samples at or below t; its curve points are the whole curve's last points less the volume above t
        (added back: the same values up to rounding of that sum), and x must lie at or after its first point.
        The tail grows 4x until it reaches x; beyond a quarter of the samples the whole curve is made instead."""
        hot = x <= 0.5 * self.total_cc
        need = x if hot else self.total_cc - x           # the tail's volume that decides D(x) (cc)
        cached = self._tails.get(hot)
        k = int(math.ceil(1.25 * need * self.n / self.total_cc)) + 16
        while True:
            if cached is not None:
                offset, levels, cum = cached
                if (hot and cum[-1] >= x) or (not hot and cum[0] + offset <= x):
                    return float(np.interp(x, cum + offset if offset else cum, levels))
            if k >= self.n // 4:
                return None
            cached = self._tail(hot, k)
            self._tails[hot] = cached
            k *= 4

    def _tail(self, hot: bool, k: int) -> tuple[float, np.ndarray, np.ndarray]:
        """(volume above the tail (cc, 0 for the hot tail), levels, level_cum) of the hot or cold tail holding at
        least the ``k`` hottest or coldest samples and every sample at the cut dose."""
        d = self._doses
        if hot:
            sel = d >= np.partition(d, self.n - k)[self.n - k]
        else:
            sel = d <= np.partition(d, k - 1)[k - 1]
        vols = None if self._vols is None else self._vols[sel]
        levels, cum, _ = _curve(d[sel], self._unit, vols)
        if hot:
            return 0.0, levels, cum
        if vols is None:
            return self._unit * (self.n - int(np.count_nonzero(sel))), levels, cum
        return self.total_cc - float(vols.sum()), levels, cum

    def volume_at_dose(self, x_gy: float) -> float:
        """V<x>Gy (cc): volume receiving at least ``x_gy`` Gy (total volume at or below Dmin, 0 above Dmax)."""
        return float(self.volumes_at(np.asarray([x_gy], dtype=np.float64))[0])

    def volumes_at(self, x_gy: np.ndarray) -> np.ndarray:
        """V(x) (cc) for an array of doses ``x_gy`` (Gy); see :meth:`volume_at_dose`."""
        x = np.asarray(x_gy, dtype=np.float64)
        if self.n == 0:
            return np.zeros_like(x)
        vol = np.interp(x, self.levels[::-1], self.level_cum[::-1])
        vol[x == self.levels[0]] = self.level_above[0]  # all of the volume at the maximum (a plateau counts whole)
        vol[x <= self.levels[-1]] = self.total_cc
        vol[x > self.levels[0]] = 0.0
        return vol

    def cumulative_dvh(self, bin_width_gy: float = 0.1, max_dose_gy: float | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative DVH: doses 0, w, 2w, ... (Gy) up to just past Dmax and the volume (cc) at >= each dose."""
        if bin_width_gy <= 0:
            raise ValueError("bin width must be > 0 Gy")
        top = max_dose_gy if max_dose_gy is not None else (self.dmax or 0.0)
        edges = np.arange(int(math.floor(top / bin_width_gy)) + 2) * bin_width_gy
        return edges, self.volumes_at(edges)

    def metric(self, m: Metric) -> float | None:
        if self.n == 0:
            return None
        if m.kind == "max":
            return self.dmax
        if m.kind == "min":
            return self.dmin
        if m.kind == "mean":
            return self._mean
        if m.kind == "dcc":
            return self.dose_at_volume(m.param)
        if m.kind == "dpct":
            return self.dose_at_volume(self.total_cc * m.param / 100.0)
        if m.kind == "vgy":
            return self.volume_at_dose(m.param)
        if m.kind == "vpct":
            return 100.0 * self.volume_at_dose(m.param) / self.total_cc if self.total_cc > 0 else None
        raise ValueError(m.kind)


def metrics(doses: np.ndarray, volumes_cc: np.ndarray | float, names: list[str]) -> dict[str, float | None]:
    """Metric name -> value (Gy for D metrics, cc for V<x>Gy, percent for V<x>Gy%)."""
    s = SortedSamples(doses, volumes_cc)
    return {n: s.metric(parse(n)) for n in names}
