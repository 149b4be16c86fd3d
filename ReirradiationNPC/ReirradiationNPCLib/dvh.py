"""Dose-volume metrics from dose samples and the volume each sample stands for.

A structure is described by samples: a dose (Gy) and a volume (cc) per sample. Voxel-based metrics use one
sample per voxel (volume = voxel volume); sub-voxel sampling uses more samples with smaller volumes. The
definitions (clinical facts section 10):

- ``Dmax`` / ``Dmin``: largest / smallest sampled dose; ``Dmean``: volume-weighted mean.
- ``D<x>cc``: the minimum dose received by the hottest ``x`` cc (samples sorted by decreasing dose; the dose of
  the first sample at which the accumulated volume reaches ``x``). Undefined (None) if ``x`` exceeds the volume.
- ``D<x>%``: as ``D<x>cc`` with ``x`` percent of the structure volume.
- ``V<x>Gy``: volume (cc) receiving at least ``x`` Gy.
"""

from __future__ import annotations

import numpy as np

from .protocol import Metric, parse_metric

DEFAULT_METRICS = ("Dmax", "Dmean", "Dmin", "D0.03cc")


class SortedSamples:
    """Samples sorted once by decreasing dose, for any number of metrics."""

    def __init__(self, doses: np.ndarray, volumes_cc: np.ndarray | float):
        doses = np.asarray(doses, dtype=np.float64).ravel()
        vols = np.broadcast_to(np.asarray(volumes_cc, dtype=np.float64), doses.shape)
        order = np.argsort(-doses, kind="stable")
        self.doses = doses[order]
        self.cumvol = np.cumsum(vols[order])
        self.total_cc = float(self.cumvol[-1]) if self.cumvol.size else 0.0
        self._mean = float(np.dot(doses, vols) / self.total_cc) if self.total_cc > 0 else float("nan")

    def dose_at_volume(self, x_cc: float) -> float | None:
        if self.total_cc <= 0 or x_cc > self.total_cc * (1 + 1e-9):
            return None
        i = int(np.searchsorted(self.cumvol, x_cc * (1 - 1e-12), side="left"))
        return float(self.doses[min(i, self.doses.size - 1)])

    def volume_at_dose(self, x_gy: float) -> float:
        n = int(np.searchsorted(-self.doses, -x_gy, side="right"))  # doses >= x_gy
        return float(self.cumvol[n - 1]) if n > 0 else 0.0

    def metric(self, m: Metric) -> float | None:
        if self.doses.size == 0:
            return None
        if m.kind == "max":
            return float(self.doses[0])
        if m.kind == "min":
            return float(self.doses[-1])
        if m.kind == "mean":
            return self._mean
        if m.kind == "dcc":
            return self.dose_at_volume(m.param)
        if m.kind == "dpct":
            return self.dose_at_volume(self.total_cc * m.param / 100.0)
        if m.kind == "vgy":
            return self.volume_at_dose(m.param)
        raise ValueError(m.kind)


def metrics(doses: np.ndarray, volumes_cc: np.ndarray | float, names: list[str]) -> dict[str, float | None]:
    """Metric name -> value (Gy for D metrics, cc for V metrics)."""
    s = SortedSamples(doses, volumes_cc)
    return {n: s.metric(parse_metric(n)) for n in names}
