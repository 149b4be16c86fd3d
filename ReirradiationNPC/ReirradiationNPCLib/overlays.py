"""What the 3D view and the DVH chart show, computed from the analysis arrays (pure numpy, no Slicer).

- Violation regions: for each failed constraint, the organ's voxels whose EQD2 exceeds the limit (D metrics) or
  reaches the metric's dose level (V metrics). EQD2 here is the organ's own: its α/β and its recovery credit on all
  its voxels, cumulative or current course only as the constraint's scope says — the same numbers the constraint
  was evaluated on (analysis.compute), recomputed inside the organ's bounding box.
- Near-limit regions: for passing constraints whose value is within the protocol's ``warn_tolerance_percent`` of
  the limit, the voxels at or above (1 − tolerance) · limit.
- Cumulative DVH of an organ's EQD2 (volume % receiving at least each dose).
Doses in Gy (EQD2), volumes in cc or % as named.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analysis import CourseData, StructureData
from .eqd2 import eqd2
from .protocol import Protocol, parse_metric
from .results import ConstraintResult

VIOLATION_RGB = (0.90, 0.05, 0.05)   # red
NEAR_LIMIT_RGB = (1.00, 0.62, 0.00)  # amber


@dataclass
class Overlay:
    """A region to show: bool ``mask`` cropped to ``box`` (k, j, i slices of the evaluation grid)."""

    name: str
    kind: str                          # violation | near_limit
    mask: np.ndarray
    box: tuple[slice, slice, slice]
    color: tuple[float, float, float]
    constraint: ConstraintResult
    threshold_gy: float                # EQD2 level (Gy) above which voxels are shown
    peak_index: tuple[int, int, int]   # (k, j, i) on the evaluation grid of the region's highest EQD2
    peak_gy: float                     # that EQD2 (Gy)

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def organ_eqd2(courses: list[CourseData], structure: StructureData, protocol: Protocol, scope: str
               ) -> np.ndarray:
    """EQD2 (Gy, float32) on ``structure.box`` with the organ's α/β and recovery credit.

    ``scope`` cumulative: Σ (1 − r) EQD2 over all courses; current: the current (last) course only.
    """
    organ = structure.organ
    ab = organ.alpha_beta if organ is not None else protocol.default_alpha_beta
    shape = tuple(s.stop - s.start for s in structure.box)
    total = np.zeros(shape, dtype=np.float32)
    for c in courses:
        if scope == "current" and not c.is_current:
            continue
        r = 0.0 if c.is_current else protocol.recovery.credit(organ.key if organ else None, c.interval_months)
        total += np.float32(1.0 - r) * eqd2(c.dose[structure.box], c.fractions, ab).astype(np.float32, copy=False)
    return total


def _threshold(con: ConstraintResult, fraction: float = 1.0) -> float | None:
    """EQD2 level (Gy) whose exceedance makes up the region for this constraint."""
    metric = parse_metric(con.metric)
    if metric.is_volume:
        return float(metric.param)
    if con.limit is None:
        return None
    return float(con.limit) * fraction


def violation_overlays(courses: list[CourseData], structures: list[StructureData], protocol: Protocol,
                       constraints: list[ConstraintResult]) -> list[Overlay]:
    """Red regions for failed constraints, amber regions for passing ones within the warning tolerance."""
    by_name = {s.name: s for s in structures}
    tol = protocol.warn_tolerance_percent / 100.0
    out: list[Overlay] = []
    cache: dict[tuple[str, str], np.ndarray] = {}
    for con in constraints:
        s = by_name.get(con.structure or "")
        if s is None or s.mask.size == 0 or con.value is None or con.limit is None:
            continue
        if con.status == "fail":
            kind, color, level = "violation", VIOLATION_RGB, _threshold(con)
        elif con.status == "pass" and con.value >= (1.0 - tol) * con.limit:
            kind, color = "near_limit", NEAR_LIMIT_RGB
            level = _threshold(con) if parse_metric(con.metric).is_volume else _threshold(con, 1.0 - tol)
        else:
            continue
        key = (s.name, con.scope)
        if key not in cache:
            cache[key] = organ_eqd2(courses, s, protocol, con.scope)
        dose = cache[key]
        metric = parse_metric(con.metric)
        region = (dose >= level) if metric.is_volume else (dose > level)
        region &= s.mask
        if not region.any():
            continue
        label = "Violation" if kind == "violation" else "Near limit"
        unit = "Gy" if not metric.is_volume else con.unit
        masked = np.where(region, dose, -np.inf)
        flat = int(np.argmax(masked))
        local = np.unravel_index(flat, region.shape)
        peak = tuple(int(b.start + x) for b, x in zip(s.box, local))
        name = f"{label}: {s.name} {con.metric} {con.scope} ({con.value:.2f} {unit}, limit {con.limit:g} {unit})"
        out.append(Overlay(name, kind, region, s.box, color, con, level, peak, float(dose[local])))
    return out


def worst(overlays: list[Overlay]) -> Overlay | None:
    """The violation whose constraint is exceeded by the largest fraction of its limit (None without one)."""
    viol = [o for o in overlays if o.kind == "violation" and o.constraint.limit]
    if not viol:
        return None
    return max(viol, key=lambda o: (o.constraint.value - o.constraint.limit) / abs(o.constraint.limit))


def cumulative_dvh(doses_gy: np.ndarray, bin_gy: float = 0.5, max_gy: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative DVH of equal-volume samples: dose levels (Gy) and the % of volume receiving at least each."""
    d = np.sort(np.asarray(doses_gy, dtype=np.float64).ravel())
    top = float(d[-1]) if d.size else 0.0
    top = max(top, max_gy or 0.0)
    levels = np.arange(0.0, top + bin_gy, bin_gy)
    if d.size == 0:
        return levels, np.zeros_like(levels)
    at_least = d.size - np.searchsorted(d, levels, side="left")
    return levels, 100.0 * at_least / d.size
