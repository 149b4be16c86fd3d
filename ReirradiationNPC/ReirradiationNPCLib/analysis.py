"""Cumulative EQD2 analysis on one evaluation grid: α/β map, recovery, course and cumulative maps, metrics,
constraints. Pure arrays in, arrays and a results tree out (no file access here).

Rules (see docs/science.md):
- Each course is converted to EQD2 voxel by voxel with its own fraction count and the voxel's dose per fraction;
  a course of several fraction groups is the sum of one EQD2 term per group, each with its own fractions
  (:func:`course_dose`, the one place that turns a course into EQD2 inputs).
- Display map (``cumulative``, ``cumulative_eqd2.nrrd/.dcm``; rule text: :data:`MAP_RULE`): per voxel, the LARGEST
  cumulative EQD2 over the organs whose dose-grid mask covers it, each with its own α/β and recovery credit
  (Σ (1 − r_organ) · EQD2(D, n, α/β_organ)); the protocol default α/β and no credit where no organ covers the voxel.
  Conservative in every regime (a smaller α/β is larger only above 2 Gy per fraction). Body structures (role
  ``body``) and unmatched structures do not take part. The course maps take the largest EQD2 of that course alone
  over the covering organs; the α/β and credit maps hold the α/β and credit that gave the cumulative value.
- Per-structure metrics use the organ's own α/β and own credit on all its voxels (sub-voxel samples): at organ
  edges a dose-grid voxel's display value may come from a neighbouring organ (see docs/outputs.md); the per-α/β
  check maps (:func:`check_maps`) reproduce the table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import dvh
from .dvh_curves import DVHCurve, cumulative_dvh
from .eqd2 import course_and_cumulative_eqd2, effective_fractions, eqd2
from .geometry import Grid
from .sampling import StructureSamples, describe_for_dose, sample_structure
from .protocol import Organ, Protocol, judged_with_credit, parse_metric
from .results import ConstraintResult, StructureResult

log = logging.getLogger(__name__)

#: the rule of the displayed cumulative map, as stated in results.json, DICOM and captions
MAP_RULE = ("per voxel the largest cumulative EQD2 over the organs covering it (each organ's own alpha/beta and "
            "recovery credit); protocol default alpha/beta, no credit, where no organ covers the voxel")
MAP_RULE_SHORT = "max over covering organs' a/b and credit"

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
    "Displayed map: per voxel the largest cumulative EQD2 over the organs covering it (each organ's own alpha/beta "
    "and credit), conservative above and below 2 Gy per fraction; it is for viewing. Organ table values are to be "
    "checked on the per-alpha/beta maps named in structures[].check_on_file.",
    "Dose metrics use sub-voxel samples of each structure on its own mask grid (small organs supersampled, "
    "every mask voxel split into equal sub-voxels, volume = the mask's volume) with the dose interpolated "
    "trilinearly from the evaluation grid; D<x>cc and V<x>Gy are read off the continuous (mid-point) DVH curve. "
    "The sampling used is recorded per structure.",
    "The product supports a decision; the treating clinician decides.",
]


@dataclass
class DoseTerm:
    """One EQD2 term of a course: one fraction group's total dose (physical Gy, or RBE-weighted as stated; float32
    on the evaluation grid) delivered in that group's own ``fractions``."""
    dose: np.ndarray
    fractions: int
    label: str = ""                # e.g. "group 2 (rtdose_boost.dcm)"


@dataclass
class CourseData:
    name: str
    dose: np.ndarray              # physical Gy on the evaluation grid, float32 (several groups: their sum)
    fractions: int                # several groups: the sum of their fractions (shown; never used for EQD2)
    interval_months: float | None
    is_current: bool
    registration: str = "identity"
    dose_file: str = ""
    coverage: np.ndarray | None = None  # bool map: voxels covered by this course's own dose grid (None = all)
    #: a plan with several fraction groups: one :class:`DoseTerm` per group (``dose`` is their sum). Empty: the
    #: course is one term (``dose`` in ``fractions``). Turn a course into EQD2 only through :func:`course_dose`.
    groups: list[DoseTerm] = field(default_factory=list)

    @property
    def terms(self) -> list[DoseTerm]:
        """The course's EQD2 terms: its fraction groups, or the course dose itself as one term."""
        return list(self.groups) if len(self.groups) > 1 else [DoseTerm(self.dose, self.fractions)]

    @property
    def fractions_text(self) -> str:
        """``54`` or ``23+10`` (one number per fraction group)."""
        return "+".join(str(t.fractions) for t in self.terms)


def course_dose(c: CourseData, take: Callable[[np.ndarray], np.ndarray] | None = None):
    """(physical dose, fractions) of course ``c`` from which ``eqd2(dose, fractions, ab)`` is the course's EQD2,
    read where ``take`` reads a full-grid array (a crop, sub-voxel samples, shifted samples; None = the whole grid).

    One term: ``(take(c.dose), c.fractions)``. Several fraction groups: each group is read with ``take`` and the
    pair is (sum of the groups, per-value effective fractions ``eqd2.effective_fractions``), so that the EQD2 is
    the sum of the groups' own EQD2 terms at every point, for every alpha/beta and dose scaling."""
    take = take or (lambda a: a)
    if len(c.groups) <= 1:
        return take(c.dose), c.fractions
    parts = [take(t.dose) for t in c.groups]
    p, n_eff = effective_fractions(parts, [t.fractions for t in c.groups], c.fractions)
    dtype = np.asarray(parts[0]).dtype
    return (p.astype(dtype) if dtype in (np.float32, np.float64) else p), n_eff


def course_eqd2(c: CourseData, alpha_beta, take: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """EQD2 (Gy) of course ``c`` (every fraction group its own term; no recovery credit); see :func:`course_dose`."""
    d, n = course_dose(c, take)
    return eqd2(d, n, alpha_beta)


def _flat_terms(courses: list[CourseData], weights: list[float]):
    """Every EQD2 term of every course with its course's weight: (doses, fractions, weights, owners)."""
    doses, fx, ws, owner = [], [], [], []
    for c, w in zip(courses, weights):
        for t in c.terms:
            doses.append(t.dose)
            fx.append(t.fractions)
            ws.append(w)
            owner.append(c.name)
    return doses, fx, ws, owner


@dataclass
class StructureData:
    name: str
    mask: np.ndarray                        # bool, cropped to ``box``
    box: tuple[slice, slice, slice]         # k, j, i slices on the evaluation grid
    organ: Organ | None
    #: the mask as read, on its own grid (cropped to its bounding box), for sub-voxel metrics; None = use ``mask``
    source_mask: np.ndarray | None = None
    source_grid: Grid | None = None
    #: when ``source_mask`` is a crop of a mask file (io.Structure.parent): that file's grid and the exact (k, j, i)
    #: box of ``source_mask`` in it; None otherwise (an RTSTRUCT's rasterised box, a Slicer segment)
    source_parent: tuple[Grid, tuple[slice, slice, slice]] | None = None

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
    #: the check maps (one α/β over the whole grid each; :func:`check_maps`), set by the pipeline's results step
    check_maps: list | None = None

    #: structure name -> its sub-voxel samples (reused by robustness.py: no second sampling)
    samples: dict[str, StructureSamples] = field(default_factory=dict, repr=False)
    #: structure name -> course name -> physical dose (Gy) at each sample (as used for the metrics)
    sample_doses: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    #: structure name -> course name -> the fractions paired with ``sample_doses`` (a number, or per-sample
    #: effective fractions for a course of several fraction groups; :func:`course_dose`)
    sample_fractions: dict[str, dict[str, object]] = field(default_factory=dict, repr=False)


def _map_structures(structures: list[StructureData]) -> list[StructureData]:
    """The structures that take part in the maps: matched organs (any role but ``body``) with a voxel."""
    return [s for s in structures if s.organ is not None and s.organ.role != "body" and s.mask.size
            and s.mask.any()]


def alpha_beta_map(shape, structures: list[StructureData], default: float) -> np.ndarray:
    """Every organ's α/β on its voxels, the smallest where organs overlap (a geometry view, not the display rule:
    :func:`display_maps` gives the α/β that produced each voxel's displayed value)."""
    ab = np.full(shape, np.inf, dtype=np.float32)
    for s in _map_structures(structures):
        sub = ab[s.box]
        np.minimum(sub, np.float32(s.organ.alpha_beta), out=sub, where=s.mask)
    ab[np.isinf(ab)] = np.float32(default)
    return ab


def credit_map(shape, structures: list[StructureData], protocol: Protocol, interval_months: float
               ) -> np.ndarray | float:
    """Recovery credit r per voxel for one prior course (0 where no organ credit applies; the smallest where organs
    overlap)."""
    organ_structs = _map_structures(structures)
    credits = [protocol.recovery.credit(s.organ.key, interval_months) for s in organ_structs]
    if not any(c > 0 for c in credits):
        return 0.0
    r = np.full(shape, np.inf, dtype=np.float32)
    for s, c in zip(organ_structs, credits):
        sub = r[s.box]
        np.minimum(sub, np.float32(c), out=sub, where=s.mask)
    r[np.isinf(r)] = 0.0
    return r


def display_maps(courses: list[CourseData], structures: list[StructureData], protocol: Protocol
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, np.ndarray | float]]:
    """The displayed maps (module docstring): course EQD2 maps, the cumulative map, the α/β map and, per prior
    course, the credit map (or 0.0 when no organ has credit), all float32 on the evaluation grid.

    One blocked pass over the grid with the default α/β, then, inside each organ's bounding box, the organ's own
    α/β and credit: a voxel covered by organs takes the largest of their values (the default does not compete there).
    """
    default = protocol.default_alpha_beta
    doses, fx, ws, owner = _flat_terms(courses, [1.0] * len(courses))
    maps, cumulative = course_and_cumulative_eqd2(doses, fx, float(default), ws)
    course_maps: dict[str, np.ndarray] = {}
    for name, m in zip(owner, maps):   # a course of several fraction groups: the sum of its groups' EQD2
        if name in course_maps:
            course_maps[name] += m
        else:
            course_maps[name] = m
    ab = np.full(cumulative.shape, np.inf, dtype=np.float32)   # inf = no organ yet (then: default)
    organs = _map_structures(structures)
    credits = {c.name: [protocol.recovery.credit(s.organ.key, c.interval_months) for s in organs]
               for c in courses if not c.is_current}
    credit: dict[str, np.ndarray | float] = {}
    for name, cr in credits.items():
        credit[name] = np.zeros(cumulative.shape, dtype=np.float32) if any(v > 0 for v in cr) else 0.0
    for idx, s in enumerate(organs):
        oab = float(s.organ.alpha_beta)
        box, m = s.box, s.mask
        sub_ab = ab[box]
        first = m & np.isinf(sub_ab)          # no organ has set these voxels yet
        cum_o = np.zeros(m.shape, dtype=np.float32)
        for c in courses:
            e = course_eqd2(c, oab, lambda a: a[box])
            sub_c = course_maps[c.name][box]
            upd_c = first | (m & (e > sub_c))
            sub_c[upd_c] = e[upd_c]
            r = 0.0 if c.is_current else credits[c.name][idx]
            if r:
                e *= np.float32(1.0 - r)
            cum_o += e
        sub_cum = cumulative[box]
        upd = first | (m & (cum_o > sub_cum))
        sub_cum[upd] = cum_o[upd]
        sub_ab[upd] = np.float32(oab)
        for c in courses:
            if not c.is_current and isinstance(credit[c.name], np.ndarray):
                credit[c.name][box][upd] = np.float32(credits[c.name][idx])
    ab[np.isinf(ab)] = np.float32(default)
    return course_maps, cumulative, ab, credit


@dataclass
class CheckMap:
    """A cumulative EQD2 map with ONE α/β (and one set of recovery credits) over the whole grid (issue 17): the
    map on which a planning system's DVH of the listed structures reproduces our table.

    ``credits``: prior course -> r applied everywhere (empty: undiscounted). ``structures``: the structures whose
    table values are to be read on this map."""
    stem: str                                  # file name without extension, e.g. cumulative_eqd2_ab2
    alpha_beta: float
    credits: dict[str, float]
    structures: list[str]
    organs: list[str]

    @property
    def credited(self) -> bool:
        return any(r > 0 for r in self.credits.values())

    def description(self) -> str:
        what = (f"Cumulative EQD2 (Gy), a/b {self.alpha_beta:g} Gy everywhere, "
                + ("recovery credit " + ", ".join(f"{c} {100 * r:g}%" for c, r in self.credits.items())
                   + " applied everywhere" if self.credited else "undiscounted (no recovery credit)"))
        return f"{what}; read on it: {', '.join(self.structures) or '-'}"

    def series_description(self) -> str:
        cr = (" credit " + "/".join(f"{100 * r:g}%" for r in self.credits.values())) if self.credited else " no credit"
        return f"CHECK EQD2 a/b {self.alpha_beta:g}{cr}: " + ",".join(self.structures)

    def dose_comment(self) -> str:
        cr = ("credit " + "/".join(f"{100 * r:g}%" for r in self.credits.values())) if self.credited \
            else "undiscounted"
        return f"EQD2 a/b {self.alpha_beta:g} whole grid, {cr}; DVH of: " + ",".join(self.structures)

    def compute(self, courses: list[CourseData]) -> np.ndarray:
        """The map (float32): one blocked pass, no per-course maps kept."""
        weights = [1.0 if c.is_current else 1.0 - self.credits.get(c.name, 0.0) for c in courses]
        doses, fx, ws, _ = _flat_terms(courses, weights)
        _, cum = course_and_cumulative_eqd2(doses, fx, float(self.alpha_beta), ws, keep_courses=False)
        return cum


def check_maps(courses: list[CourseData], structures: list[StructureData], protocol: Protocol
               ) -> tuple[list[CheckMap], dict[str, dict]]:
    """The check maps and, per structure name, the map(s) its table values are to be checked on.

    One undiscounted map per α/β used by the case's structures (their organ's α/β; the protocol default for
    unmatched ones), and one map per distinct (α/β, credits) of organs with a recovery credit. Returns
    (maps, {structure: {"map": stem, "undiscounted_map": stem or None}})."""
    priors = [c for c in courses if not c.is_current]
    maps: dict[tuple, CheckMap] = {}
    which: dict[str, dict] = {}

    def get(ab: float, credits: dict[str, float]) -> CheckMap:
        key = (float(ab), tuple(sorted(credits.items())))
        if key not in maps:
            stem = f"cumulative_eqd2_ab{ab:g}".replace(".", "p")
            if any(r > 0 for r in credits.values()):
                stem += "_credit" + "-".join(f"{100 * r:g}".replace(".", "p") for r in credits.values())
            maps[key] = CheckMap(stem, float(ab), dict(credits), [], [])
        return maps[key]

    for s in structures:
        ab = s.organ.alpha_beta if s.organ is not None else protocol.default_alpha_beta
        key = s.organ.key if s.organ is not None else None
        credits = {c.name: protocol.recovery.credit(key, c.interval_months) for c in priors}
        plain = get(ab, {})
        entry = {"map": plain.stem, "undiscounted_map": None}
        if any(r > 0 for r in credits.values()):
            cm = get(ab, credits)
            entry = {"map": cm.stem, "undiscounted_map": plain.stem}
            plain.structures.append(s.name + " (undiscounted)")
            target = cm
        else:
            target = plain
        target.structures.append(s.name)
        if key and key not in target.organs:
            target.organs.append(key)
        which[s.name] = entry
    ordered = sorted(maps.values(), key=lambda m: (m.alpha_beta, m.credited, m.stem))
    return ordered, which


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

    say("course, cumulative, alpha/beta and credit maps")
    course_eqd2, cumulative, ab, credit = display_maps(courses, structures, protocol)

    say("structure metrics")
    struct_results: list[StructureResult] = []
    samples_by_structure: dict[str, dict[str, np.ndarray]] = {}
    dvh_curves: dict[str, dict[str, DVHCurve]] = {}
    kept_samples: dict[str, StructureSamples] = {}
    kept_doses: dict[str, dict[str, np.ndarray]] = {}
    kept_fx: dict[str, dict[str, object]] = {}
    for s in structures:
        organ = s.organ
        organ_ab = organ.alpha_beta if organ else protocol.default_alpha_beta
        names = metric_names_for(organ)
        samples = structure_samples(s, grid)
        kept_samples[s.name] = samples
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
            phys, fx = (course_dose(c, lambda a: samples.dose(a, grid)) if n_vox
                        else (np.zeros(0), c.fractions))
            kept_doses.setdefault(s.name, {})[c.name] = phys
            kept_fx.setdefault(s.name, {})[c.name] = fx
            e = eqd2(phys, fx, organ_ab)
            r = 0.0 if c.is_current else protocol.recovery.credit(organ.key if organ else None, c.interval_months)
            if not c.is_current:
                credits_used[c.name] = r
            cum += (1.0 - r) * e
            cum_undiscounted += e
            if n_vox:
                sorted_phys = dvh.SortedSamples(phys, sample_cc)    # EQD2 keeps the order: one sort per course
                phys_metrics[c.name] = sorted_phys.metrics(names)
                if np.ndim(fx) == 0:
                    res_metrics[c.name] = sorted_phys.mapped(
                        lambda d, n=fx: eqd2(d, n, organ_ab),
                        mean=float(np.average(e, weights=np.broadcast_to(sample_cc, e.shape)))).metrics(names)
                else:  # several fraction groups: EQD2 is not a function of the summed dose alone
                    res_metrics[c.name] = dvh.metrics(e, sample_cc, names)
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
        groups = [{"label": t.label, "fractions": t.fractions,
                   "max_dose_gy": float(t.dose.max()) if t.dose.size else 0.0} for t in c.groups]
        per_fx = max((g["max_dose_gy"] / g["fractions"] for g in groups), default=None) if groups else \
            dmax / c.fractions
        entry = {
            "name": c.name, "fractions": c.fractions, "interval_months": c.interval_months,
            "is_current": c.is_current, "registration": c.registration, "dose_file": c.dose_file,
            "max_dose_gy": dmax, "max_dose_per_fraction_gy": per_fx, "recovery_applied": rec}
        if groups:
            entry["fraction_groups"] = groups
            entry["eqd2_rule"] = ("one EQD2 term per fraction group, each with its own fractions: EQD2 = sum_g D_g "
                                  "(D_g/n_g + a/b)/(2 + a/b); 'fractions' is their sum; 'max_dose_gy' the maximum "
                                  "of the summed physical dose")
        course_assumptions.append(entry)

    return Analysis(grid=grid, alpha_beta=ab, course_eqd2=course_eqd2, credit=credit, cumulative=cumulative,
                    structures=struct_results, constraints=constraints, unmatched=unmatched,
                    course_assumptions=course_assumptions, warnings=warnings, dvh_curves=dvh_curves,
                    samples=kept_samples, sample_doses=kept_doses, sample_fractions=kept_fx)


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
    text = unmet_conditions_text(conditions)
    if text:
        note = (note + " " if note else "") + "condition not met: " + text
        if status != "fail":
            status = "condition_not_met"
    return status, margin, note


def _fmt_actual(v) -> str:
    return "unknown" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def isodose_levels(constraints) -> list[float]:
    """The isodose levels of a run (Gy, lowest first): the distinct positive limits of its cumulative constraints in
    Gy. ``constraints``: constraint rows as objects (``scope``, ``unit``, ``limit`` attributes) or as results.json
    dicts. One rule for the Slicer scene's isodose lines and the browser review's."""
    levels = set()
    for c in constraints or []:
        if isinstance(c, dict):
            scope, unit, limit = c.get("scope"), c.get("unit"), c.get("limit")
        else:
            scope, unit, limit = (getattr(c, k, None) for k in ("scope", "unit", "limit"))
        if scope == "cumulative" and unit == "Gy" and isinstance(limit, (int, float)) \
                and not isinstance(limit, bool) and limit > 0:
            levels.add(round(float(limit), 3))
    return sorted(levels)


def unmet_conditions_text(conditions) -> str:
    """A row's conditions that do not hold, as one line ``condition (actual: x); ...``; "" when all hold."""
    return "; ".join(f"{c.get('condition', '')} (actual: {_fmt_actual(c.get('actual'))})"
                     for c in (conditions or []) if not c.get("met"))


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
                    value = vc if judged_with_credit(con) else vu
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
