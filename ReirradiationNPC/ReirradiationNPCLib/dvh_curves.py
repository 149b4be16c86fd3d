"""Cumulative dose-volume histogram curves for display (report plots).

A curve is computed from the same weighted samples as the metrics (dose in Gy, volume per sample in cc) with a
fixed dose bin: ``volume_cc[b]`` is the volume receiving at least ``dose_gy[b]`` Gy, exact at every bin edge.
The curves are for drawing only; the reported numbers come from :mod:`dvh` (never read values off a curve).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Dose bin (Gy) of the display curves: far finer than a printed plot can show.
BIN_GY = 0.1


@dataclass
class DVHCurve:
    """Cumulative DVH: ``volume_cc[b]`` = volume (cc) receiving >= ``dose_gy[b]`` (Gy)."""

    dose_gy: np.ndarray
    volume_cc: np.ndarray
    total_cc: float

    @property
    def volume_percent(self) -> np.ndarray:
        return 100.0 * self.volume_cc / self.total_cc if self.total_cc > 0 else np.zeros_like(self.volume_cc)


def cumulative_dvh(doses: np.ndarray, volumes_cc: np.ndarray | float, bin_gy: float = BIN_GY) -> DVHCurve:
    """Cumulative DVH of samples ``doses`` (Gy) each standing for ``volumes_cc`` (cc; scalar or per sample).

    O(n) (one ``bincount``), no sort. Negative doses are not expected (doses are validated on input); they
    would be counted in the first bin.
    """
    d = np.asarray(doses, dtype=np.float64).ravel()
    if d.size == 0:
        return DVHCurve(np.zeros(1), np.zeros(1), 0.0)
    w = np.broadcast_to(np.asarray(volumes_cc, dtype=np.float64), d.shape)
    idx = np.clip(np.floor(d / bin_gy), 0, None).astype(np.int64)
    hist = np.bincount(idx, weights=w)
    vol = np.cumsum(hist[::-1])[::-1]            # volume with dose >= bin's left edge
    dose = np.arange(vol.size + 1, dtype=np.float64) * bin_gy
    vol = np.append(vol, 0.0)                    # nothing receives more than the last edge
    return DVHCurve(dose, vol, float(vol[0]))
