"""Cumulative EQD2 analysis on one evaluation grid: α/β map, recovery, course and cumulative maps, metrics,
constraints. Pure arrays in, arrays and a results tree out (no file access here).

Rules (see docs/science.md):
- Each course is converted to EQD2 voxel by voxel with its own fraction count and the voxel's dose per fraction.
- Voxel α/β map: each organ's α/β on its voxels, the smallest where organ structures overlap, the protocol
  default elsewhere. Body structures (role ``body``) and unmatched structures do not take part.
- Cumulative EQD2 = Σ (1 − r) · EQD2_course; r is the protocol's recovery credit for that prior course's interval,
  only on the organs the protocol names (r = 0 for the current course and elsewhere); where organ structures with
  different credit overlap, the smallest credit.
- Per-structure metrics use the organ's own α/β and own credit on all its voxels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import dvh
from .dvh_curves import DVHCurve, cumulative_dvh
from .eqd2 import course_and_cumulative_eqd2, eqd2
from .geometry import Grid
from .sampling import StructureSamples, describe_for_dose, sample_structure
from .protocol import Organ, Protocol, parse_metric
from .results import ConstraintResult, StructureResult

log = logging.getLogger(__name__)

MODEL_ASSUMPTIONS = [
    "Linear-quadratic model; EQD2 = D (d + a/b) / (2 + a/b) with d = D / n, each voxel's own dose per fraction.",
    "Full repair between fractions is assumed (no incomplete-repair correction for twice-daily fractions; "
    "give hyperfractionated fractions >= 6 h apart). No repopulation or time factor.",
    "Recovery credit discounts the prior course: cumulative = sum over courses of (1 - r) EQD2 (convention A); "
    "tolerances are not raised. r = 0 unless the protocol's recovery model gives credit for that organ.",
    "Every cumulative limit states its recovery basis: 'undiscounted' limits (the default, e.g. Nieder et al. 2006 "
    "for the spinal cord) are judged on the plain sum of the courses' EQD2, 'credited' limits on the sum with the "
    "recovery credit; both values are reported.",
    "A limit's conditions (minimum interval since each prior course, per-course EQD2 ceiling) are checked; where "
    "one does not hold the row is 'condition_not_met', never 'pass'.",
    "Per-organ metrics use the organ's own alpha/beta and recovery credit on all its voxels.",
    "Displayed maps: where organ structures overlap, the smallest alpha/beta and the smallest credit apply. "
    "A smaller alpha/beta is the conservative choice only above 2 Gy per fraction; below 2 Gy per fraction "
    "(e.g. 65 Gy in 54 fractions) it gives a lower EQD2.",
    "Dose metrics use sub-voxel samples of each structure on its own mask grid (small organs supersampled, "
    "every mask voxel split into equal sub-voxels, volume = the mask's volume) with the dose interpolated "
    "trilinearly from the evaluation grid; D<x>cc and V<x>Gy are read off the continuous (mid-point) DVH curve. "
    "The sampling used is recorded per structure.",
    "The product supports a decision; the treating clinician decides.",
]


@dataclass
class CourseData:
    name: str
    dose: np.ndarray              # physical Gy on the evaluation grid, float32
    fractions: int
    interval_months: float | None
    is_current: bool
    registration: str = "identity"
    dose_file: str = ""
    coverage: np.ndarray | None = None  # bool map: voxels covered by this course's own dose grid (None = all)


@dataclass
class StructureData:
    name: str
    mask: np.ndarray                        # bool, cropped to ``box``
    box: tuple[slice, slice, slice]         # k, j, i slices on the evaluation grid
    organ: Organ | None
    #: the mask as read, on its own grid (cropped to its bounding box), for sub-voxel metrics; None = use ``mask``
    source_mask: np.ndarray | None = None
    source_grid: Grid | None = None

    def full_mask(self, shape) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        m[self.box] = self.mask
        return m


@dataclass
class Analysis:
    grid: Grid
    alpha_beta: np.ndarray                    # Gy, float32
    course_eqd2: dict[str, np.ndarray]        # before recovery credit
    credit: dict[str, np.ndarray | float]     # prior course -> r map (or scalar 0)
    cumulative: np.ndarray                    # Gy EQD2, credit applied
    structures: list[StructureResult]
    constraints: list[ConstraintResult]
    unmatched: list[str]
    course_assumptions: list[dict]
    warnings: list[str] = field(default_factory=list)
    #: structure name -> "cumulative" | course name -> display DVH curve (organ's own α/β; report plots only)
    dvh_curves: dict[str, dict[str, DVHCurve]] = field(default_factory=dict)


def alpha_beta_map(shape, structures: list[StructureData], default: float) -> np.ndarray:
    ab = np.full(shape, np.inf, dtype=np.float32)
    for s in structures:
        if s.organ is None or s.organ.role == "body":
            continue
        sub = ab[s.box]
        np.minimum(sub, np.float32(s.organ.alpha_beta), out=sub, where=s.mask)
    ab[np.isinf(ab)] = np.float32(default)
    return ab


def credit_map(shape, structures: list[StructureData], protocol: Protocol, interval_months: float
               ) -> np.ndarray | float:
    """Recovery credit r per voxel for one prior course (0 where no organ credit applies)."""
    organ_structs = [s for s in structures if s.organ is not None and s.organ.role != "body"]
    credits = [protocol.recovery.credit(s.organ.key, interval_months) for s in organ_structs]
    if not any(c > 0 for c in credits):
        return 0.0
    r = np.full(shape, np.inf, dtype=np.float32)
    for s, c in zip(organ_structs, credits):
        sub = r[s.box]
        np.minimum(sub, np.float32(c), out=sub, where=s.mask)
    r[np.isinf(r)] = 0.0
    return r


def metric_names_for(organ: Organ | None, extra: list[str] = ()) -> list[str]:
    names = list(dvh.DEFAULT_METRICS) + list(extra)
    if organ is not None:
        names += [c.metric.name for c in organ.constraints]
    return list(dict.fromkeys(names))


def compute(grid: Grid, courses: list[CourseData], structures: list[StructureData], protocol: Protocol,
            progress: Callable[[str], None] | None = None) -> Analysis:
    """Run the cumulative EQD2 analysis. ``courses`` oldest first, the last one current."""
    say = progress or (lambda msg: None)
    warnings: list[str] = []
    shape = grid.shape
    voxel_cc = grid.voxel_volume_cc

    say("alpha/beta map")
    ab = alpha_beta_map(shape, structures, protocol.default_alpha_beta)

    say("recovery credit, course and cumulative EQD2 maps")
    credit: dict[str, np.ndarray | float] = {}
    weights = []
    for c in courses:
        if c.is_current:
            weights.append(1.0)
            continue
        r = credit_map(shape, structures, protocol, c.interval_months)
        credit[c.name] = r
        weights.append(1.0 - r if isinstance(r, np.ndarray) else 1.0 - r)
    # one blocked pass over memory for all maps (same maths as eqd2() and recovery_weighted_sum())
    maps, cumulative = course_and_cumulative_eqd2([c.dose for c in courses], [c.fractions for c in courses], ab,
                                                  weights)
    course_eqd2 = {c.name: m for c, m in zip(courses, maps)}

    say("structure metrics")
    struct_results: list[StructureResult] = []
    samples_by_structure: dict[str, dict[str, np.ndarray]] = {}
    dvh_curves: dict[str, dict[str, DVHCurve]] = {}
    for s in structures:
        organ = s.organ
        organ_ab = organ.alpha_beta if organ else protocol.default_alpha_beta
        names = metric_names_for(organ)
        samples = structure_samples(s, grid)
        n_vox = samples.n if samples.n and samples.outside_fraction(grid) < 1.0 else 0
        sample_cc = samples.sample_volume_cc
        res_metrics: dict[str, dict] = {}
        phys_metrics: dict[str, dict] = {}
        cum = np.zeros(n_vox, dtype=np.float64)
        cum_undiscounted = np.zeros(n_vox, dtype=np.float64)   # the plain sum of the courses' EQD2 (no credit)
        credits_used = {}
        outside = {}
        curves: dict[str, DVHCurve] = {}
        for c in courses:
            phys = samples.dose(c.dose, grid) if n_vox else np.zeros(0)
            e = eqd2(phys, c.fractions, organ_ab)
            r = 0.0 if c.is_current else protocol.recovery.credit(organ.key if organ else None, c.interval_months)
            if not c.is_current:
                credits_used[c.name] = r
            cum += (1.0 - r) * e
            cum_undiscounted += e
            if n_vox:
                sorted_phys = dvh.SortedSamples(phys, sample_cc)    # EQD2 keeps the order: one sort per course
                phys_metrics[c.name] = sorted_phys.metrics(names)
                res_metrics[c.name] = sorted_phys.mapped(
                    lambda d, n=c.fractions: eqd2(d, n, organ_ab),
                    mean=float(np.average(e, weights=np.broadcast_to(sample_cc, e.shape)))).metrics(names)
                curves[c.name] = cumulative_dvh(e, sample_cc)
                frac_out = (samples.outside_fraction(grid) if c.coverage is None
                            else 1.0 - samples.fraction_in(c.coverage, grid))
                if frac_out > 0:
                    outside[c.name] = frac_out
                if frac_out > 0 and (organ is None or organ.role != "body"):
                    warnings.append(f"{s.name}: {100 * frac_out:.1f}% of its volume lies outside the dose grid of "
                                    f"course {c.name!r}; that course's dose there is read as 0 Gy")
        cum_plain: dict[str, float | None] = {}
        if n_vox:
            res_metrics["cumulative"] = dvh.metrics(cum, sample_cc, names)
            cum_plain = (dict(res_metrics["cumulative"]) if not any(v > 0 for v in credits_used.values())
                         else dvh.metrics(cum_undiscounted, sample_cc, names))
            curves["cumulative"] = cumulative_dvh(cum, sample_cc)
            dvh_curves[s.name] = curves
        else:
            warnings.append(f"{s.name}: no voxel on the evaluation grid; not evaluated")
        samples_by_structure[s.name] = {"cumulative": cum}
        struct_results.append(StructureResult(
            name=s.name, organ=organ.key if organ else None, role=organ.role if organ else None,
            alpha_beta=organ_ab, volume_cc=samples.volume_cc, metrics=res_metrics, metrics_physical=phys_metrics,
            recovery_credit=credits_used, outside_dose_grid_fraction=outside, cumulative_undiscounted=cum_plain,
            sampling=describe_for_dose(samples, grid)))

    say("constraints")
    constraints = evaluate_constraints(protocol, structures, struct_results, courses)

    unmatched = [s.name for s in structures if s.organ is None]
    for name in unmatched:
        warnings.append(f"structure {name!r} matches no organ alias of the protocol: reported with the default "
                        f"alpha/beta {protocol.default_alpha_beta:g} Gy and no limits")

    course_assumptions = []
    for c in courses:
        rec = {}
        if not c.is_current:
            for okey in protocol.recovery.organs:
                rec[okey] = protocol.recovery.credit(okey, c.interval_months)
        dmax = float(c.dose.max()) if c.dose.size else 0.0
        course_assumptions.append({
            "name": c.name, "fractions": c.fractions, "interval_months": c.interval_months,
            "is_current": c.is_current, "registration": c.registration, "dose_file": c.dose_file,
            "max_dose_gy": dmax, "max_dose_per_fraction_gy": dmax / c.fractions, "recovery_applied": rec})

    return Analysis(grid=grid, alpha_beta=ab, course_eqd2=course_eqd2, credit=credit, cumulative=cumulative,
                    structures=struct_results, constraints=constraints, unmatched=unmatched,
                    course_assumptions=course_assumptions, warnings=warnings, dvh_curves=dvh_curves)


def structure_samples(s: StructureData, grid: Grid) -> StructureSamples:
    """Sub-voxel samples of a structure: from its own mask and grid when kept, else from its evaluation-grid crop."""
    if s.source_mask is not None and s.source_grid is not None:
        return sample_structure(s.source_mask, s.source_grid)
    if s.mask.size == 0 or not s.mask.any():
        return sample_structure(np.zeros((1, 1, 1), bool), grid)
    lo = tuple(b.start for b in s.box[::-1])
    hi = tuple(b.stop for b in s.box[::-1])
    return sample_structure(s.mask, grid.subgrid(lo, hi))


def constraint_status(value: float, limit: float, warn_tolerance_percent: float) -> tuple[str, float]:
    """Status of an upper limit and the margin ``limit - value`` (same unit; negative = exceeded).

    ``fail`` when value > limit; ``warn`` when limit * (1 - tol/100) < value <= limit (within the protocol's
    tolerance of the limit); ``pass`` otherwise (value at or below limit * (1 - tol/100)).
    """
    margin = limit - value
    if value > limit:
        return "fail", margin
    if value > limit * (1.0 - warn_tolerance_percent / 100.0):
        return "warn", margin
    return "pass", margin


def evaluate_conditions(con, result: StructureResult, courses: list[CourseData]) -> list[dict]:
    """The limit's conditions checked on this case: one entry per prior course (interval) and per course
    (per-course EQD2 ceiling of the limit's metric, the course's own EQD2 at the organ alpha/beta, no credit)."""
    cond = con.conditions
    out = []
    if cond.min_interval_months is not None:
        for c in courses:
            if c.is_current:
                continue
            actual = c.interval_months
            out.append({"condition": f"interval since course {c.name} >= {cond.min_interval_months:g} months",
                        "required": cond.min_interval_months, "actual": actual,
                        "met": actual is not None and actual >= cond.min_interval_months})
    if cond.max_course_eqd2_gy is not None:
        for c in courses:
            actual = (result.metrics.get(c.name) or {}).get(con.metric.name)
            out.append({"condition": f"course {c.name} {con.metric.name} <= {cond.max_course_eqd2_gy:g} Gy EQD2 "
                                     "(its own EQD2, no recovery credit)",
                        "required": cond.max_course_eqd2_gy, "actual": actual,
                        "met": actual is not None and actual <= cond.max_course_eqd2_gy})
    return out


def _judge(value: float | None, limit: float | None, conditions: list[dict], tol: float, note: str
           ) -> tuple[str, float | None, str]:
    """Status, margin and note of one row. An unmet condition makes a row that is not ``fail``
    ``condition_not_met`` (never ``pass``): outside its conditions a limit does not vouch for safety."""
    if value is None:
        why = "metric undefined for this structure (e.g. volume smaller than the metric's volume)"
        return "not_evaluated", None, (note + " " if note else "") + why
    if limit is None:
        return "no_limit", None, note
    status, margin = constraint_status(value, limit, tol)
    unmet = [c for c in conditions if not c["met"]]
    if unmet:
        text = "; ".join(f"{c['condition']} (actual: {_fmt_actual(c['actual'])})" for c in unmet)
        note = (note + " " if note else "") + "condition not met: " + text
        if status != "fail":
            status = "condition_not_met"
    return status, margin, note


def _fmt_actual(v) -> str:
    return "unknown" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def evaluate_constraints(protocol: Protocol, structures: list[StructureData], results: list[StructureResult],
                         courses: list[CourseData] | str) -> list[ConstraintResult]:
    """One row per constraint and matching structure (``per_course`` scope: one row per course as well).

    Cumulative rows carry both values, ``value_undiscounted`` (plain sum of the courses' EQD2) and
    ``value_credited`` (with the protocol's recovery credit), and judge the one named by the limit's ``basis``.
    ``per_course`` rows judge each course in its own EQD2 (organ alpha/beta, no credit), prior ones included.
    """
    if isinstance(courses, str):  # older callers pass the current course's name: no prior course known
        courses = [CourseData(courses, np.zeros(0, np.float32), 1, None, True)]
    current = courses[-1].name
    tol = protocol.warn_tolerance_percent
    by_organ: dict[str, list[StructureResult]] = {}
    for r in results:
        if r.organ:
            by_organ.setdefault(r.organ, []).append(r)
    out = []
    for organ in protocol.organs.values():
        for con in organ.constraints:
            matched = by_organ.get(organ.key, [])
            base = dict(organ=organ.key, metric=con.metric.name, scope=con.scope, limit=con.limit, unit=con.unit,
                        source=con.source, verified=con.verified, priority=con.priority,
                        alpha_beta=organ.alpha_beta, basis=con.basis)
            if not matched:
                out.append(ConstraintResult(structure=None, value=None, status="not_evaluated",
                                            note=(con.note + " " if con.note else "") + "structure absent", **base))
                continue
            for r in matched:
                def metric_of(metrics: dict | None):
                    v = (metrics or {}).get(con.metric.name)
                    if v is not None and con.unit == "%":
                        v = 100.0 * v / r.volume_cc if r.volume_cc > 0 else None
                    return v
                conditions = evaluate_conditions(con, r, courses) if con.conditions else []
                if con.scope == "per_course":
                    for c in courses:
                        value = metric_of(r.metrics.get(c.name))
                        status, margin, note = _judge(value, con.limit, conditions, tol, con.note)
                        out.append(ConstraintResult(structure=r.name, value=value, status=status, margin=margin,
                                                    note=note, conditions=conditions, course=c.name, **base))
                    continue
                if con.scope == "cumulative":
                    vu = metric_of(r.cumulative_undiscounted or r.metrics.get("cumulative"))
                    vc = metric_of(r.metrics.get("cumulative"))
                    value = vc if con.basis == "credited" else vu
                    extra = dict(value_undiscounted=vu, value_credited=vc, recovery_credit=r.recovery_credit)
                else:
                    value = metric_of(r.metrics.get(current))
                    extra = dict(course=current)
                status, margin, note = _judge(value, con.limit, conditions, tol, con.note)
                out.append(ConstraintResult(structure=r.name, value=value, status=status, margin=margin, note=note,
                                            conditions=conditions, **extra, **base))
    return out


def check_metric_names(names: list[str]) -> None:
    for n in names:
        parse_metric(n)
