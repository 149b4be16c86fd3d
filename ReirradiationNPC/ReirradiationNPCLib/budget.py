"""Violation segments, headroom map and remaining-dose map (what the new plan may still deliver).

All maps are on the evaluation grid and are computed per organ structure inside its bounding box, with the organ's
own alpha/beta and recovery credit (the same rules as the per-organ metrics of :mod:`.analysis`):

    organ EQD2 (cumulative)  = sum over courses of (1 - r_course,organ) * EQD2(D_course, n_course, ab_organ)
    organ EQD2 (current)     = EQD2(D_current, n_current, ab_organ)

- Violations: for every constraint with status ``fail`` or ``warn`` on a dose metric (Gy), the organ's voxels whose
  EQD2 (cumulative or current, as the constraint's scope) exceeds the limit (``fail``) or the warning threshold
  limit x (1 - tolerance) (``warn``).
- Headroom (Gy EQD2): limit - cumulative organ EQD2 on the voxels of organs with a cumulative dose limit (the
  smallest limit of the organ; where organs overlap, the smallest headroom); NaN elsewhere.
- Remaining dose (physical Gy of the current course): per voxel, the largest dose the current course (with its own
  fraction count) may deliver so that every point-type limit (Dmax, D<=0.1cc; :attr:`Metric.is_point`) covering the
  voxel still holds given the prior courses and recovery:
      budget E = limit - sum over prior courses of (1 - r) * EQD2_prior   (cumulative limits; r = 0 for a limit
                                                                           on the undiscounted basis)
      budget E = limit                                                     (current-course and per-course limits)
      D = physical_dose_for_eqd2(E - SAFETY_EQD2_GY, n_current, ab_organ), 0 where E <= 0
  and the minimum over every limit covering the voxel. Voxels under no point-type limit hold
  ``UNCONSTRAINED = -1`` (see docs/outputs.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .analysis import CourseData, StructureData
from .eqd2 import eqd2, physical_dose_for_eqd2
from .geometry import Grid
from .protocol import Protocol, parse_metric

log = logging.getLogger(__name__)

#: value of ``remaining_dose.nrrd`` where no point-type limit applies (a dose can never be negative)
UNCONSTRAINED = -1.0
#: EQD2 (Gy) kept back from every budget so that float32 rounding can never push a voxel over its limit
SAFETY_EQD2_GY = 0.005
RED = (0.90, 0.10, 0.10)
AMBER = (1.00, 0.65, 0.00)
_UPPER_KINDS = ("max", "dcc", "dpct", "mean")


def organ_eqd2(s: StructureData, courses: list[CourseData], protocol: Protocol, scope: str,
               include_current: bool = True, credit: bool = True, course: str | None = None) -> np.ndarray:
    """EQD2 (Gy, float64) over the structure's bounding box with the organ's alpha/beta and credit.

    ``scope`` ``cumulative``: every prior course weighted by (1 - r) (r = 0 when ``credit`` is False: the
    undiscounted basis) plus (if ``include_current``) the current course; ``current``: the current course only;
    ``per_course``: the course named ``course`` alone, in its own EQD2 (no credit).
    """
    ab = s.organ.alpha_beta if s.organ is not None else protocol.default_alpha_beta
    key = s.organ.key if s.organ is not None else None
    out = np.zeros(s.mask.shape, dtype=np.float64)
    for c in courses:
        if c.is_current and not include_current:
            continue
        if scope == "current" and not c.is_current:
            continue
        if scope == "per_course" and c.name != course:
            continue
        e = eqd2(c.dose[s.box].astype(np.float64), c.fractions, ab)
        r = 0.0 if (c.is_current or not credit or scope == "per_course") else protocol.recovery.credit(
            key, c.interval_months)
        out += (1.0 - r) * e
    return out


def constraint_eqd2(s: StructureData, courses: list[CourseData], protocol: Protocol, c) -> np.ndarray:
    """The organ EQD2 a constraint row (or a Violation) is judged on: its scope, recovery basis and course."""
    scope = getattr(c, "scope", "cumulative")
    return organ_eqd2(s, courses, protocol, scope, credit=getattr(c, "basis", None) == "credited",
                      course=getattr(c, "course", None))


# ------------------------------------------------------------------------------------------ violations

@dataclass
class Violation:
    name: str                 # segment name "<structure> <metric> > <threshold> Gy"
    structure: str
    organ: str
    metric: str
    scope: str
    status: str               # fail | warn
    limit: float              # the constraint's limit, in ``unit``
    threshold_gy: float       # EQD2 from which voxels are marked (D metrics: the limit or the warning threshold;
                              # V<x>Gy metrics: x, the dose level whose volume exceeds its limit)
    color: tuple[float, float, float]
    mask: np.ndarray          # bool crop over ``box``
    box: tuple[slice, slice, slice]
    volume_cc: float
    unit: str = "Gy"          # Gy (dose metrics) | cc | % (volume metrics)
    basis: str | None = None  # cumulative rows: undiscounted | credited (the EQD2 the region is drawn on)
    course: str | None = None  # per_course rows: the course

    @property
    def limit_gy(self) -> float | None:
        return self.limit if self.unit == "Gy" else None

    def summary(self) -> dict:
        return {"segment": self.name, "structure": self.structure, "organ": self.organ, "metric": self.metric,
                "scope": self.scope, "basis": self.basis, "course": self.course, "status": self.status,
                "limit": self.limit, "unit": self.unit,
                "limit_gy": self.limit_gy, "threshold_gy": self.threshold_gy, "volume_cc": self.volume_cc,
                "color": "red" if self.status == "fail" else "amber"}


def warn_threshold(limit: float, constraint, protocol: Protocol) -> float:
    """EQD2 (Gy) from which a ``warn`` constraint's voxels are marked: limit x (1 - tolerance/100)."""
    tol = getattr(constraint, "warn_tolerance_percent", None)
    if tol is None:
        tol = protocol.warn_tolerance_percent
    return limit * (1.0 - tol / 100.0)


def violations(constraints, structures: list[StructureData], courses: list[CourseData], protocol: Protocol,
               grid: Grid) -> list[Violation]:
    """One :class:`Violation` per ``fail``/``warn`` constraint of a present structure.

    Dose metrics (Dmax, D<x>cc, ...): the organ voxels whose EQD2 exceeds the limit (fail) or the warning threshold
    (warn). Volume metrics V<x>Gy: the organ voxels receiving at least x Gy EQD2, i.e. the volume whose size breaks
    (or nears) the limit. Dmin-type metrics are lower bounds and get no region.
    """
    by_name = {s.name: s for s in structures}
    out = []
    cache: dict[tuple[str, str], np.ndarray] = {}
    for c in constraints:
        if c.status not in ("fail", "warn") or c.limit is None or c.structure is None:
            continue
        metric = parse_metric(c.metric)
        if c.unit == "Gy" and metric.kind == "min":
            continue
        s = by_name.get(c.structure)
        if s is None or s.mask.size == 0:
            continue
        key = (s.name, c.scope, getattr(c, "basis", None), getattr(c, "course", None))
        if key not in cache:
            cache[key] = constraint_eqd2(s, courses, protocol, c)
        dose = cache[key]
        extra = {"basis": getattr(c, "basis", None), "course": getattr(c, "course", None)}
        where = f" (course {c.course})" if c.scope == "per_course" else ""
        if metric.is_volume:
            thr = float(metric.param)
            name = f"{s.name} {c.metric} > {c.limit:g} {c.unit}"
            if c.status == "warn":
                name += " (warn: within tolerance)"
            if c.scope == "current":
                name += " (current course)"
            name += where
            mask = s.mask & (dose >= thr)
            out.append(Violation(name, s.name, c.organ, c.metric, c.scope, c.status, float(c.limit), thr,
                                 RED if c.status == "fail" else AMBER, mask, s.box,
                                 float(mask.sum()) * grid.voxel_volume_cc, unit=c.unit, **extra))
            continue
        if c.status == "fail":
            thr = float(c.limit)
            name = f"{s.name} {c.metric} > {c.limit:g} Gy"
        else:
            thr = warn_threshold(float(c.limit), c, protocol)
            name = f"{s.name} {c.metric} > {thr:.4g} Gy (warn: within tolerance of {c.limit:g} Gy)"
        if c.scope == "current":
            name += " (current course)"
        name += where
        mask = s.mask & (dose > thr)
        out.append(Violation(name, s.name, c.organ, c.metric, c.scope, c.status, float(c.limit), thr,
                             RED if c.status == "fail" else AMBER, mask, s.box,
                             float(mask.sum()) * grid.voxel_volume_cc, **extra))
    return out


# -------------------------------------------------------------------------------------------- headroom

def headroom_map(structures: list[StructureData], courses: list[CourseData], protocol: Protocol,
                 shape) -> np.ndarray:
    """limit - cumulative organ EQD2 (Gy, float32) on voxels of organs with a cumulative upper dose limit; NaN
    elsewhere. An organ with several such limits uses the smallest; overlapping organs give the smallest headroom."""
    h = np.full(shape, np.nan, dtype=np.float32)
    for s in structures:
        if cumulative_dose_limit(s) is None or s.mask.size == 0:
            continue
        for basis in ("undiscounted", "credited"):  # each limit on its own recovery basis
            lims = [c.limit for c in _cumulative_dose_limits(s) if c.basis == basis]
            if not lims:
                continue
            val = (min(lims) - organ_eqd2(s, courses, protocol, "cumulative", credit=basis == "credited")
                   ).astype(np.float32)
            sub = h[s.box]
            np.fmin(sub, val, out=sub, where=s.mask)
    return h


def _cumulative_dose_limits(s: StructureData) -> list:
    if s.organ is None or s.organ.role != "oar":
        return []
    return [c for c in s.organ.constraints
            if c.scope == "cumulative" and c.unit == "Gy" and c.limit is not None and c.metric.kind in _UPPER_KINDS]


def cumulative_dose_limit(s: StructureData) -> float | None:
    if s.organ is None or s.organ.role != "oar":
        return None
    lims = [c.limit for c in s.organ.constraints
            if c.scope == "cumulative" and c.unit == "Gy" and c.limit is not None and c.metric.kind in _UPPER_KINDS]
    return min(lims) if lims else None


# -------------------------------------------------------------------------------------- remaining dose

@dataclass
class RemainingDose:
    array: np.ndarray                         # physical Gy (float32); UNCONSTRAINED where no point-type limit
    fractions: int
    organs: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        constrained = self.array >= 0
        n = int(constrained.sum())
        return {"fractions": self.fractions, "unconstrained_value": UNCONSTRAINED,
                "safety_eqd2_gy": SAFETY_EQD2_GY, "constrained_voxels": n,
                "zero_dose_voxels": int((self.array == 0).sum()),
                "min_gy": float(self.array[constrained].min()) if n else None,
                "structures": self.organs}


def point_limits(s: StructureData) -> list:
    """The organ's point-type (Dmax, D<=0.1cc) dose limits that have a value."""
    if s.organ is None or s.organ.role == "body":
        return []
    return [c for c in s.organ.constraints
            if c.metric.is_point and c.unit == "Gy" and c.limit is not None
            and c.scope in ("cumulative", "current", "per_course")]


def remaining_dose(structures: list[StructureData], courses: list[CourseData], protocol: Protocol,
                   shape) -> RemainingDose:
    """The remaining-dose map of the current course (the last of ``courses``); see the module docstring."""
    current = courses[-1]
    n = current.fractions
    out = np.full(shape, np.nan, dtype=np.float32)
    organs = []
    for s in structures:
        lims = point_limits(s)
        if not lims or s.mask.size == 0 or not s.mask.any():
            continue
        ab = s.organ.alpha_beta
        over = None  # voxels where the prior courses alone already exceed a cumulative limit
        priors = {}
        binding = np.full(s.mask.shape, np.inf)
        for c in lims:
            if c.scope == "cumulative":
                credited = c.basis == "credited"  # an undiscounted limit counts the prior courses in full
                if credited not in priors:
                    priors[credited] = organ_eqd2(s, courses, protocol, "cumulative", include_current=False,
                                                  credit=credited)
                hit = priors[credited] > c.limit
                over = hit if over is None else (over | hit)
                budget = c.limit - priors[credited]
            else:  # current and per_course limits: the current course alone
                budget = np.full(s.mask.shape, float(c.limit))
            budget -= SAFETY_EQD2_GY
            np.minimum(binding, physical_dose_for_eqd2(budget, n, ab), out=binding)
        sub = out[s.box]
        np.fmin(sub, _float32_down(binding), out=sub, where=s.mask)
        vals = binding[s.mask]
        exceeded = int(over[s.mask].sum()) if over is not None else 0
        organs.append({"structure": s.name, "organ": s.organ.key, "alpha_beta": ab,
                       "limits": [{"metric": c.metric.name, "scope": c.scope, "basis": c.basis,
                                   "limit_gy": c.limit, "verified": c.verified} for c in lims],
                       "min_remaining_gy": float(vals.min()), "max_remaining_gy": float(vals.max()),
                       "voxels": int(vals.size), "zero_dose_voxels": int((vals <= 0).sum()),
                       "voxels_already_over_limit_from_prior_courses": exceeded})
    out[np.isnan(out)] = UNCONSTRAINED
    return RemainingDose(out, n, organs)


def _float32_down(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 never rounding up (a rounded-up dose could exceed the limit)."""
    res = x.astype(np.float32)
    up = res > x
    res[up] = np.nextafter(res[up], np.float32(0))
    return res
