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


class SortedSamples:
    """Samples sorted once by decreasing dose, for any number of metrics."""

    def __init__(self, doses: np.ndarray, volumes_cc: np.ndarray | float):
        doses = np.asarray(doses, dtype=np.float64).ravel()
        if doses.size and not np.isfinite(doses).all():
            raise ValueError("dose samples contain NaN or infinite values")
        uniform = np.ndim(volumes_cc) == 0
        if uniform:  # equal sample volumes (the usual case): a plain sort is enough
            d = np.sort(doses)[::-1]
            unit = float(volumes_cc)
            self.total_cc = unit * d.size
            self._mean = float(doses.mean()) if d.size and unit > 0 else float("nan")
        else:
            vols = np.broadcast_to(np.asarray(volumes_cc, dtype=np.float64), doses.shape)
            order = np.argsort(doses)[::-1]  # ties need no particular order: levels merge them
            d = doses[order]
            v = vols[order]
            self.total_cc = float(v.sum()) if d.size else 0.0
            self._mean = weighted_mean(doses, vols, self.total_cc) if self.total_cc > 0 else float("nan")
        self.n = int(d.size)
        if d.size:
            # distinct dose levels (descending) and the volume at each
            start = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
            self.levels = d[start]
            w = (np.diff(np.r_[start, d.size]) * unit if uniform else np.add.reduceat(v, start))
            cum = np.cumsum(w)
            self.level_cum = cum - 0.5 * w          # curve points: volume above + half the level (cc)
            self.level_above = cum                  # volume at >= level (cc)
        else:
            self.levels = self.level_cum = self.level_above = np.zeros(0)

    def mapped(self, fn, mean: float) -> "SortedSamples":
        """The same samples with every dose passed through ``fn``, which must be strictly increasing (e.g. EQD2 of
        a physical dose at fixed fractions and alpha/beta): the order is kept, so no new sort. ``mean``: the
        volume-weighted mean of the mapped doses (a mean does not map through a non-linear ``fn``)."""
        out = object.__new__(SortedSamples)
        out.n, out.total_cc, out._mean = self.n, self.total_cc, float(mean)
        out.levels = np.asarray(fn(self.levels), dtype=np.float64)
        out.level_cum, out.level_above = self.level_cum, self.level_above
        if out.levels.size > 1 and not np.all(np.diff(out.levels) <= 0):
            raise ValueError("mapping must be increasing")
        return out

    def metrics(self, names: list[str]) -> dict[str, float | None]:
        return {n: self.metric(parse(n)) for n in names}

    @property
    def dmax(self) -> float | None:
        return float(self.levels[0]) if self.n else None

    @property
    def dmin(self) -> float | None:
        return float(self.levels[-1]) if self.n else None

    def dose_at_volume(self, x_cc: float) -> float | None:
        """D<x>cc (Gy): minimum dose of the hottest ``x_cc`` cc; None when ``x_cc`` exceeds the volume."""
        if self.total_cc <= 0 or x_cc < 0 or x_cc > self.total_cc * (1 + 1e-9):
            return None
        # curve volume increases while dose decreases: interpolate dose against volume
        return float(np.interp(x_cc, self.level_cum, self.levels))

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
