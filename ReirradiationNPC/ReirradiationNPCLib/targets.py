"""Target checks against the protocol's prescription, and the ESTRO-EORTC re-irradiation category.

Target checks (docs/science.md, "Target checks"). Targets: the GTV/CTV/PTV built from the protocol's margins and
every case structure whose organ has role ``target``. Each target is sampled sub-voxel exactly like an organ
(:mod:`.sampling`: the mask on its own grid, the dose interpolated trilinearly at every sample; the volume is the
mask's own volume, the same in every section of the report). Metrics: D98% (near-minimum), D95%, D50% (median),
D2% (near-maximum), Dmean, Dmin, Dmax, and V95%, read off the continuous DVH as for organs.

Bases, stated on every check (``basis``):

- ICRU 83 coverage criteria (V95%, D95%, D98%, D2%) are judged on the **physical dose of the current course**
  relative to its physical prescription (``prescription.dose_gy``); the EQD2 of the same metric at the tumour
  alpha/beta is reported beside it (``value_eqd2``). Without ``dose_gy`` the protocol gives only an EQD2 range:
  the criteria are then judged on the current course's EQD2 relative to the range minimum, and the check says so.
- D50% within the prescribed EQD2 range: on the EQD2 (tumour alpha/beta) of the prescription's scope (current
  course or cumulative; targets take no recovery credit).

Criteria the protocol leaves out are reported with status ``no_limit``; a target without samples gives
``not_evaluated`` checks (the verdict then says "incomplete").

ESTRO-EORTC category (Andratschke et al., Lancet Oncol 2022; clinical facts section 6), judged on the irradiated
volumes of the courses: a course's irradiated volume is its voxels with physical dose >= the protocol's
``threshold_gy``.

- ``Type 1``: the current course's irradiated volume overlaps a prior course's irradiated volume;
- ``Type 2``: no overlap, but a cumulative-toxicity concern by the protocol's stated ``type2_rule``
  (a voxel receiving at least ``both_courses_dose_gy`` from a prior course AND from the current course, and/or a
  cumulative limit row that fails, warns or has an unmet condition);
- ``repeat organ irradiation``: no overlap, no concern, an organ at risk inside both irradiated volumes;
- ``repeat irradiation``: no overlap, no concern, no organ irradiated by both.

Without a ``type2_rule`` the engine cannot tell Type 2 from the repeat categories: those cases are
``not_evaluated`` (never guessed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dvh
from .analysis import CourseData, course_eqd2
from .geometry import Grid
from .protocol import Prescription, ReirradiationTypeRule
from .sampling import StructureSamples, sample_structure

METRICS = ("D98%", "D95%", "D50%", "D2%", "Dmean", "Dmin", "Dmax")
CATEGORIES = ("Type 1", "Type 2", "repeat organ irradiation", "repeat irradiation")


@dataclass
class Target:
    name: str
    origin: str                          # "margins" | "structures"
    mask: np.ndarray                     # bool crop over ``box`` on the evaluation grid
    box: tuple[slice, slice, slice]
    #: the mask on its own grid (margins grid or the structure's grid), cropped, for sub-voxel metrics; None = use
    #: the evaluation-grid crop
    source_mask: np.ndarray | None = None
    source_grid: Grid | None = None

    def samples(self, grid: Grid) -> StructureSamples:
        """Sub-voxel samples (the same sampling as the organ metrics)."""
        if self.source_mask is not None and self.source_grid is not None:
            return sample_structure(self.source_mask, self.source_grid)
        if self.mask.size == 0 or not self.mask.any():
            return sample_structure(np.zeros((1, 1, 1), bool), grid)
        lo = tuple(b.start for b in self.box[::-1])
        hi = tuple(b.stop for b in self.box[::-1])
        return sample_structure(self.mask, grid.subgrid(lo, hi))


def target_eqd2(t: Target, courses: list[CourseData], alpha_beta: float, scope: str, grid: Grid | None = None,
                samples: StructureSamples | None = None) -> np.ndarray:
    """EQD2 samples (Gy, float64) of the target: current course only, or the sum over all courses (no credit).

    Sub-voxel samples of the target (``samples``, else :meth:`Target.samples` on ``grid``)."""
    if samples is None:
        samples = t.samples(grid)
    total = np.zeros(samples.n, dtype=np.float64)
    for c in courses:
        if scope == "current" and not c.is_current:
            continue
        total += course_eqd2(c, alpha_beta, lambda a: samples.dose(a, grid))
    return total


def _check(name: str, value, criterion: str, threshold, ok, basis: str, value_eqd2=None) -> dict:
    if value is None:
        status = "not_evaluated"
    elif threshold is None:
        status = "no_limit"
    else:
        status = "pass" if ok else "fail"
    out = {"check": name, "value": value, "criterion": criterion, "threshold": threshold, "status": status,
           "basis": basis}
    if value_eqd2 is not None:
        out["value_eqd2"] = value_eqd2
    return out


def _metrics(values: np.ndarray, weights, v95_level: float) -> dict:
    s = dvh.SortedSamples(values, weights)
    m = {n: s.metric(dvh.parse(n)) for n in METRICS}
    m["V95%"] = 100.0 * s.volume_at_dose(v95_level) / s.total_cc if s.total_cc > 0 else None
    return m


def check_targets(targets: list[Target], courses: list[CourseData], rx: Prescription, grid: Grid) -> list[dict]:
    """One entry per target and scope (current, cumulative) with metrics and checks (see module docstring)."""
    ref = rx.reference_eqd2_gy
    physical = rx.dose_gy is not None
    current = next(c for c in courses if c.is_current)
    out = []
    for t in targets:
        samples = t.samples(grid)
        n = samples.n if samples.n and samples.outside_fraction(grid) < 1.0 else 0
        w = samples.sample_volume_cc
        phys = samples.dose(current.dose, grid) if n else np.zeros(0)   # physical: the groups' sum (ICRU)
        eq = {"current": course_eqd2(current, rx.alpha_beta, lambda a: samples.dose(a, grid)) if n
              else np.zeros(0)}
        if n:
            eq["cumulative"] = eq["current"] + sum(
                (course_eqd2(c, rx.alpha_beta, lambda a: samples.dose(a, grid)) for c in courses
                 if not c.is_current), np.zeros(n))
        else:
            eq["cumulative"] = np.zeros(0)
        for scope in ("current", "cumulative"):
            entry = {"structure": t.name, "origin": t.origin, "scope": scope, "alpha_beta": rx.alpha_beta,
                     "volume_cc": samples.volume_cc, "reference_eqd2_gy": ref, "reference_rule": rx.reference_rule,
                     "prescription_range_gy": [rx.eqd2_min_gy, rx.eqd2_max_gy], "source": rx.source,
                     "verified": rx.verified, "metrics": {}, "checks": [],
                     "sampling": dict(samples.info, samples=samples.n)}
            if scope == "current":
                entry["prescription_dose_gy"] = rx.dose_gy
                entry["prescription_fractions"] = rx.fractions
            if n:
                entry["metrics"] = _metrics(eq[scope], w, 0.95 * ref)
                if scope == "current" and physical:
                    entry["metrics_physical"] = _metrics(phys, w, 0.95 * rx.dose_gy)
            entry["checks"] = _checks(entry, scope, rx, ref, physical, n)
            if not entry["checks"]:
                entry["note"] = f"for information: the prescription's checks apply to the {rx.scope} course"
            elif n == 0:
                entry["note"] = "no sample of the target inside the dose grid: not evaluated"
            out.append(entry)
    return out


def _checks(entry: dict, scope: str, rx: Prescription, ref: float, physical: bool, n: int) -> list[dict]:
    m = entry["metrics"]
    checks = []
    if scope == rx.scope:
        lo, hi = rx.eqd2_min_gy, rx.eqd2_max_gy
        d50 = m.get("D50%") if n else None
        checks.append(_check("D50% within prescribed range", d50, f"{lo:g} <= D50% <= {hi:g} Gy EQD2", [lo, hi],
                             d50 is not None and lo <= d50 <= hi,
                             f"EQD2 at alpha/beta {rx.alpha_beta:g} Gy, {scope} "
                             f"{'course' if scope == 'current' else 'sum of the courses (no credit)'}"))
    if scope != "current":
        return checks
    if physical:
        mp = entry.get("metrics_physical", {})
        level = rx.dose_gy
        basis = (f"ICRU 83: physical dose of the current course relative to its prescription {rx.dose_gy:g} Gy "
                 f"in {rx.fractions} fx (EQD2 at alpha/beta {rx.alpha_beta:g} Gy beside)")
        unit = "Gy (physical)"
    else:
        mp = m
        level = ref
        basis = (f"EQD2 of the current course at alpha/beta {rx.alpha_beta:g} Gy relative to {ref:.2f} Gy (the "
                 "protocol gives no physical prescription dose_gy)")
        unit = "Gy EQD2"
    pct = rx.v95_min_percent
    checks.append(_check("V95%", mp.get("V95%") if n else None,
                         f"V95% >= {pct:g} % (95% = {0.95 * level:.2f} {unit})" if pct is not None else "",
                         pct, pct is not None and n and mp.get("V95%") is not None and mp["V95%"] >= pct, basis,
                         m.get("V95%") if n and physical else None))
    for label, key, mk, is_min in (("D95%", rx.d95_min_percent, "D95%", True),
                                   ("D98% (near-minimum)", rx.d98_min_percent, "D98%", True),
                                   ("D2% (near-maximum)", rx.d2_max_percent, "D2%", False)):
        val = mp.get(mk) if n else None
        thr = None if key is None else key / 100.0 * level
        crit = "" if key is None else (f"{mk} {'>=' if is_min else '<='} {key:g}% of {level:.2f} {unit} = "
                                       f"{thr:.2f} {unit}")
        ok = thr is not None and val is not None and (val >= thr if is_min else val <= thr)
        checks.append(_check(label, val, crit, thr, ok, basis, m.get(mk) if n and physical else None))
    return checks


# ------------------------------------------------------------------------------------- ESTRO-EORTC category

def reirradiation_type(courses: list[CourseData], rule: ReirradiationTypeRule, grid: Grid, structures=(),
                       constraints=(), ptv: Target | None = None) -> dict:
    """ESTRO-EORTC category from the courses' irradiated volumes (physical dose >= ``rule.threshold_gy``).

    ``structures``: StructureData (organs at risk irradiated by both courses); ``constraints``: constraint rows for
    the Type 2 rule; ``ptv``: reported for information (overlap of the current PTV with prior irradiated volumes).
    """
    vcc = grid.voxel_volume_cc
    base = {"threshold_gy": rule.threshold_gy, "rule": rule.describe(),
            "dose": "physical dose of each course on the evaluation grid",
            "source": rule.source, "verified": rule.verified}
    priors = [c for c in courses if not c.is_current]
    current = next((c for c in courses if c.is_current), None)
    if not priors or current is None:
        return base | {"type": None, "category": None, "status": "not_evaluated", "reason": "no prior course"}
    cur_irr = current.dose >= rule.threshold_gy
    per, notes = [], []
    ptv_samples = ptv.samples(grid) if ptv is not None and ptv.mask.any() else None
    overlap_any = np.zeros(cur_irr.shape, bool)
    prior_irr_any = np.zeros(cur_irr.shape, bool)
    for c in priors:
        irr = c.dose >= rule.threshold_gy
        ov = irr & cur_irr
        overlap_any |= ov
        prior_irr_any |= irr
        entry = {"course": c.name, "irradiated_cc": float(irr.sum()) * vcc,
                 "overlap_with_current_cc": float(ov.sum()) * vcc}
        if ptv_samples is not None and ptv_samples.n:
            # sub-voxel, as the target metrics: the PTV's volume here is the one of every other section
            hit = ptv_samples.dose(c.dose, grid) >= rule.threshold_gy
            w = np.broadcast_to(np.asarray(ptv_samples.sample_volume_cc, dtype=np.float64), hit.shape)
            entry["overlap_with_ptv_cc"] = float(w[hit].sum())
        per.append(entry)
        if c.coverage is not None and not c.coverage[cur_irr].all():
            notes.append(f"part of the current irradiated volume lies outside the dose grid of {c.name} (read as "
                         "0 Gy there): the overlap may be underestimated")
    overlap_cc = float(overlap_any.sum()) * vcc
    organs_both = []
    for s in structures:
        if s.organ is None or s.organ.role != "oar" or s.mask.size == 0 or not s.mask.any():
            continue
        if (prior_irr_any[s.box] & s.mask).any() and (cur_irr[s.box] & s.mask).any():
            organs_both.append(s.name)
    concern, reasons = _concern(rule, priors, current, constraints)
    if overlap_cc > 0:
        cat = "Type 1"
        desc = ("the current course's irradiated volume overlaps a previously irradiated volume "
                f"({overlap_cc:.2f} cc)")
    elif concern is None:
        return base | {"type": None, "category": None, "status": "not_evaluated",
                       "reason": "no overlap of the irradiated volumes, and the protocol states no rule for a "
                                 "cumulative-toxicity concern (reirradiation_type.type2_rule): Type 2 and the "
                                 "repeat categories cannot be told apart",
                       "current_irradiated_cc": float(cur_irr.sum()) * vcc, "overlap_cc": 0.0, "courses": per,
                       "organs_irradiated_by_both": organs_both, "notes": notes}
    elif concern:
        cat = "Type 2"
        desc = "no overlap of the irradiated volumes, but a cumulative-toxicity concern: " + "; ".join(reasons)
    elif organs_both:
        cat = "repeat organ irradiation"
        desc = ("no overlap, no cumulative-toxicity concern by the protocol's rule; the same organ(s) irradiated "
                f"again: {', '.join(organs_both)}")
    else:
        cat = "repeat irradiation"
        desc = "no overlap, no cumulative-toxicity concern by the protocol's rule, no organ irradiated by both"
    out = base | {"type": {"Type 1": 1, "Type 2": 2}.get(cat), "category": cat, "status": "evaluated",
                  "description": f"{cat}: {desc}", "current_irradiated_cc": float(cur_irr.sum()) * vcc,
                  "overlap_cc": overlap_cc, "courses": per, "organs_irradiated_by_both": organs_both,
                  "concern": bool(concern), "concern_reasons": reasons, "notes": notes}
    if ptv_samples is not None:
        out["ptv"] = ptv.name
        out["ptv_volume_cc"] = ptv_samples.volume_cc
    return out


def _concern(rule: ReirradiationTypeRule, priors, current, constraints) -> tuple[bool | None, list[str]]:
    """(concern?, reasons) by the protocol's Type 2 rule; (None, []) when the protocol states no rule."""
    if rule.both_courses_dose_gy is None and not rule.cumulative_limit_rows:
        return None, []
    reasons = []
    if rule.both_courses_dose_gy is not None:
        x = rule.both_courses_dose_gy
        cur = current.dose >= x
        for c in priors:
            n = int((cur & (c.dose >= x)).sum())
            if n:
                reasons.append(f"{n} voxel(s) receive >= {x:g} Gy from {c.name} and from {current.name}")
    if rule.cumulative_limit_rows:
        for c in constraints:
            st = getattr(c, "status", None) if not isinstance(c, dict) else c.get("status")
            scope = getattr(c, "scope", None) if not isinstance(c, dict) else c.get("scope")
            if scope == "cumulative" and st in ("fail", "warn", "condition_not_met"):
                organ = getattr(c, "organ", None) if not isinstance(c, dict) else c.get("organ")
                metric = getattr(c, "metric", None) if not isinstance(c, dict) else c.get("metric")
                reasons.append(f"cumulative limit {organ} {metric}: {st}")
    return bool(reasons), reasons


def reirradiation_rule_missing() -> dict:
    return {"type": None, "category": None, "status": "not_evaluated",
            "reason": "the protocol has no reirradiation_type block (threshold_gy)"}
