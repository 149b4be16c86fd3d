"""Violation segments, headroom map and remaining-dose map (what the new plan may still deliver).

All maps are on the evaluation grid and are computed per organ structure inside its bounding box, with the organ's
own alpha/beta and recovery credit (the same rules as the per-organ metrics of :mod:`.analysis`):

    organ EQD2 (cumulative)  = sum over courses of (1 - r_course,organ) * EQD2(D_course, n_course, ab_organ)
    organ EQD2 (current)     = EQD2(D_current, n_current, ab_organ)

- Violations: for every constraint with status ``fail`` or ``warn`` on a dose metric (Gy), the organ's voxels whose
  EQD2 (cumulative or current, as the constraint's scope) exceeds the limit (``fail``) or the warning threshold
  limit x (1 - tolerance) (``warn``).
- One limit set for the voxel maps (:func:`map_limits`): the point-type dose limits (Dmax, D<=0.1cc;
  :attr:`Metric.is_point`) of scope cumulative or current. Limits a voxel map cannot represent (Dmean, D>0.1cc,
  D<x>%, V<x>Gy) are listed as ``not_represented`` in the outputs; an organ with only such limits is marked on the
  remaining-dose map with ``NOT_REPRESENTED = -2`` (never a dose, never "no limit").
- Headroom (Gy EQD2): per voxel the smallest over the organ's map limits of limit - organ EQD2 (cumulative or
  current, as the limit's scope); where organs overlap, the smallest headroom; NaN elsewhere.
- Remaining dose (physical Gy of the current course): per voxel, the largest dose the current course (with its own
  fraction count) may deliver so that every point-type limit (Dmax, D<=0.1cc; :attr:`Metric.is_point`) covering the
  voxel still holds given the prior courses and recovery:
      budget E = limit - sum over prior courses of (1 - r) * EQD2_prior   (cumulative limits; r = 0 for a limit
                                                                           on the undiscounted basis)
      budget E = limit                                                     (current-course and per-course limits)
      D = physical_dose_for_eqd2(E - SAFETY_EQD2_GY, n_current, ab_organ), 0 where E <= 0
  and the minimum over every limit covering the voxel. Voxels under no limit at all hold ``UNCONSTRAINED = -1``;
  voxels of organs whose limits are all not representable (and under no map limit) hold ``NOT_REPRESENTED = -2``
  (see docs/outputs.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .analysis import CourseData, StructureData, course_dose
from .eqd2 import eqd2, physical_dose_for_eqd2
from .geometry import Grid
from .protocol import Protocol, judged_with_credit, parse_metric

log = logging.getLogger(__name__)

#: value of ``remaining_dose.nrrd`` where no limit applies (a dose can never be negative)
UNCONSTRAINED = -1.0
#: value of ``remaining_dose.nrrd`` on organs whose limits (Dmean, V<x>Gy, D>0.1cc) a voxel map cannot represent:
#: not free dose; the organ's limits must be judged on the plan's DVH
NOT_REPRESENTED = -2.0
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
    for c in courses_in_scope(courses, scope, course):
        if c.is_current and not include_current:
            continue
        d, fx = course_dose(c, lambda a: a[s.box].astype(np.float64))   # every fraction group its own term
        e = eqd2(d, fx, ab)
        r = 0.0 if (c.is_current or not credit or scope == "per_course") else protocol.recovery.credit(
            key, c.interval_months)
        out += (1.0 - r) * e
    return out


def courses_in_scope(courses: list[CourseData], scope: str, course: str | None = None) -> list[CourseData]:
    """The courses a row of ``scope`` judges: ``current`` the current course, ``per_course`` the course named
    ``course``, ``cumulative`` all of them."""
    if scope == "current":
        return [c for c in courses if c.is_current]
    if scope == "per_course":
        return [c for c in courses if c.name == course]
    return list(courses)


def region_structure(c, by_name: dict):
    """The structure on which constraint row ``c`` gets a violation region, or None: rows without a limit or a
    structure, Dmin-type dose rows (lower bounds) and structures absent or empty get none."""
    if c.limit is None or c.structure is None:
        return None
    if c.unit == "Gy" and parse_metric(c.metric).kind == "min":
        return None
    s = by_name.get(c.structure)
    return None if s is None or s.mask.size == 0 else s


def constraint_eqd2(s: StructureData, courses: list[CourseData], protocol: Protocol, c) -> np.ndarray:
    """The organ EQD2 a constraint row (or a Violation) is judged on: its scope, recovery basis and course."""
    scope = getattr(c, "scope", "cumulative")
    return organ_eqd2(s, courses, protocol, scope, credit=judged_with_credit(c),
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
        s = region_structure(c, by_name) if c.status in ("fail", "warn") else None
        if s is None:
            continue
        metric = parse_metric(c.metric)
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

def map_limits(s: StructureData) -> tuple[list, list]:
    """The organ's limits split into (represented on voxel maps, not represented).

    Represented: point-type (Dmax, D<=0.1cc) upper dose limits in Gy with a value, scope cumulative, current or
    per_course (a per-course ceiling holds for the current course alone, as a current limit does): a voxel map can
    hold them exactly (every voxel of the organ at or under the limit). Not represented: every other upper limit
    with a value (Dmean, D>0.1cc, D<x>%, V<x>Gy): they constrain the organ's DVH, not any one voxel. Lower bounds (Dmin, coverage) are neither."""
    if s.organ is None or s.organ.role == "body":
        return [], []
    rep, other = [], []
    for c in s.organ.constraints:
        if c.limit is None or c.metric.kind == "min":
            continue
        if (c.metric.is_point and c.unit == "Gy" and c.scope in ("cumulative", "current", "per_course")
                and c.metric.kind in _UPPER_KINDS):
            rep.append(c)
        else:
            other.append(c)
    return rep, other


def headroom_map(structures: list[StructureData], courses: list[CourseData], protocol: Protocol,
                 shape) -> np.ndarray:
    """min over the organ's map limits (:func:`map_limits`) of limit - organ EQD2 in the limit's scope (Gy, float32)
    on the organ's voxels; overlapping organs give the smallest headroom; NaN elsewhere."""
    h = np.full(shape, np.nan, dtype=np.float32)
    for s in structures:
        lims = map_limits(s)[0]
        if not lims or s.mask.size == 0:
            continue
        cache: dict[tuple, np.ndarray] = {}
        val = None
        for c in lims:
            # each limit in its own scope and on its own recovery basis; a per-course ceiling holds for every
            # course alone (no credit), so its headroom is the smallest over the courses
            if c.scope == "per_course":
                keys = [("per_course", k.name) for k in courses]
            elif c.scope == "cumulative":
                keys = [("cumulative", judged_with_credit(c))]
            else:
                keys = [(c.scope, None)]
            for key in keys:
                if key not in cache:
                    if key[0] == "per_course":
                        cache[key] = organ_eqd2(s, courses, protocol, "per_course", course=key[1])
                    elif key[0] == "cumulative":
                        cache[key] = organ_eqd2(s, courses, protocol, "cumulative", credit=key[1])
                    else:
                        cache[key] = organ_eqd2(s, courses, protocol, key[0])
                v = c.limit - cache[key]
                val = v if val is None else np.minimum(val, v)
        sub = h[s.box]
        np.fmin(sub, val.astype(np.float32), out=sub, where=s.mask)
    return h


def cumulative_dose_limit(s: StructureData) -> float | None:
    """The smallest cumulative map limit of the organ (Gy), None without one."""
    lims = [c.limit for c in map_limits(s)[0] if c.scope == "cumulative"]
    return min(lims) if lims else None


def not_represented(structures: list[StructureData], constraints=None) -> list[dict]:
    """Per structure, the limits the voxel maps do not represent (with the table's status when ``constraints``,
    the analysis' constraint rows, are given) and whether the organ has map limits as well."""
    status = {}
    for r in constraints or []:
        status[(r.structure, r.metric, r.scope)] = r.status
    out = []
    for s in structures:
        rep, other = map_limits(s)
        if not other or s.mask.size == 0 or not s.mask.any():
            continue
        out.append({"structure": s.name, "organ": s.organ.key,
                    "limits": [{"metric": c.metric.name, "scope": c.scope, "limit": c.limit, "unit": c.unit,
                                "verified": c.verified, "status": status.get((s.name, c.metric.name, c.scope))}
                               for c in other],
                    "marked_on_map": not rep,
                    "note": ("no voxel budget: marked NOT_REPRESENTED (-2) on remaining_dose.nrrd" if not rep else
                             "the map's values in this organ come from its point-type limits only; these limits "
                             "must be judged on the plan's DVH")})
    return out


# -------------------------------------------------------------------------------------- remaining dose

@dataclass
class RemainingDose:
    array: np.ndarray                         # physical Gy (float32); UNCONSTRAINED / NOT_REPRESENTED markers
    fractions: int
    organs: list[dict] = field(default_factory=list)
    not_represented: list[dict] = field(default_factory=list)
    #: (structure name, bool crop, box) of every organ with limits the map does not represent (marked or not)
    not_represented_masks: list = field(default_factory=list)

    def summary(self) -> dict:
        constrained = self.array >= 0
        n = int(constrained.sum())
        return {"fractions": self.fractions, "unconstrained_value": UNCONSTRAINED,
                "not_represented_value": NOT_REPRESENTED,
                "limit_set": "point-type dose limits (Dmax, D<=0.1cc), cumulative and current scope; the same set "
                             "for headroom.nrrd",
                "not_represented": self.not_represented,
                "not_represented_voxels": int((self.array == NOT_REPRESENTED).sum()),
                "safety_eqd2_gy": SAFETY_EQD2_GY, "constrained_voxels": n,
                "zero_dose_voxels": int((self.array == 0).sum()),
                "min_gy": float(self.array[constrained].min()) if n else None,
                "structures": self.organs}


def point_limits(s: StructureData) -> list:
    """The organ's point-type (Dmax, D<=0.1cc) dose limits that have a value: the map limits of :func:`map_limits`."""
    return map_limits(s)[0]


def remaining_dose(structures: list[StructureData], courses: list[CourseData], protocol: Protocol,
                   shape, constraints=None) -> RemainingDose:
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
                credited = judged_with_credit(c)  # an undiscounted limit counts the prior courses in full
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
    nrep = not_represented(structures, constraints)
    by_name = {s.name: s for s in structures}
    masks = []
    for item in nrep:
        s = by_name[item["structure"]]
        masks.append((s.name, s.mask, s.box))
        if item["marked_on_map"]:
            sub = out[s.box]
            sub[s.mask & np.isnan(sub)] = NOT_REPRESENTED
    out[np.isnan(out)] = UNCONSTRAINED
    return RemainingDose(out, n, organs, nrep, masks)


def _float32_down(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 never rounding up (a rounded-up dose could exceed the limit)."""
    res = x.astype(np.float32)
    up = res > x
    res[up] = np.nextafter(res[up], np.float32(0))
    return res
