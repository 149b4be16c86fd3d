"""Target checks against the protocol's prescription, and the ESTRO-EORTC re-irradiation type.

Target checks (docs/science.md, "Target checks"): for every target structure (the GTV/CTV/PTV built from the
protocol's margins and every case structure whose organ has role ``target``), the current course's EQD2 and the
cumulative EQD2, both at the prescription's alpha/beta (targets take no recovery credit):
D98% (near-minimum), D95%, D50% (median), D2% (near-maximum), Dmean, V95% (percent of the target volume receiving
at least 95% of the reference EQD2). On the prescription's scope these are checked:

- D50% within the prescribed EQD2 range [min, max];
- V95% >= ``coverage.v95_min_percent``; D95% >= ``coverage.d95_min_percent`` % of the reference;
  D98% >= ``coverage.d98_min_percent`` % of the reference; D2% <= ``coverage.d2_max_percent`` % of the reference.

The reference EQD2 is the nominal EQD2 of the prescription's dose and fractions when given, else the range minimum.
Criteria the protocol leaves out are reported with status ``no_limit``.

Re-irradiation type (Andratschke et al., Lancet Oncol 2022): Type 1 when the current PTV overlaps a prior course's
irradiated volume, taken as the voxels where that course's physical dose >= the protocol's ``threshold_gy``;
otherwise Type 2. The overlap volume (cc) is reported per prior course.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dvh
from .analysis import CourseData
from .eqd2 import eqd2
from .geometry import Grid
from .protocol import Prescription, ReirradiationTypeRule

METRICS = ("D98%", "D95%", "D50%", "D2%", "Dmean", "Dmin", "Dmax")


@dataclass
class Target:
    name: str
    origin: str                          # "margins" | "structures"
    mask: np.ndarray                     # bool crop over ``box`` on the evaluation grid
    box: tuple[slice, slice, slice]


def target_eqd2(t: Target, courses: list[CourseData], alpha_beta: float, scope: str) -> np.ndarray:
    """EQD2 samples (Gy, float64) of the target's voxels: current course only, or the sum over all courses."""
    total = np.zeros(int(t.mask.sum()), dtype=np.float64)
    for c in courses:
        if scope == "current" and not c.is_current:
            continue
        total += eqd2(c.dose[t.box][t.mask].astype(np.float64), c.fractions, alpha_beta)
    return total


def _check(name: str, value, criterion: str, threshold, ok) -> dict:
    if value is None:
        status = "not_evaluated"
    elif threshold is None:
        status = "no_limit"
    else:
        status = "pass" if ok else "fail"
    return {"check": name, "value": value, "criterion": criterion, "threshold": threshold, "status": status}


def check_targets(targets: list[Target], courses: list[CourseData], rx: Prescription, grid: Grid) -> list[dict]:
    """One entry per target and scope (current, cumulative) with metrics and checks (see module docstring)."""
    ref = rx.reference_eqd2_gy
    vcc = grid.voxel_volume_cc
    out = []
    for t in targets:
        n = int(t.mask.sum())
        for scope in ("current", "cumulative"):
            entry = {"structure": t.name, "origin": t.origin, "scope": scope, "alpha_beta": rx.alpha_beta,
                     "volume_cc": n * vcc, "reference_eqd2_gy": ref, "reference_rule": rx.reference_rule,
                     "prescription_range_gy": [rx.eqd2_min_gy, rx.eqd2_max_gy], "source": rx.source,
                     "verified": rx.verified, "metrics": {}, "checks": []}
            if n == 0:
                entry["note"] = "no voxel on the evaluation grid"
                out.append(entry)
                continue
            samples = target_eqd2(t, courses, rx.alpha_beta, scope)
            m = dvh.metrics(samples, vcc, list(METRICS))
            m["V95%"] = 100.0 * float((samples >= 0.95 * ref).sum()) / n  # voxels of equal volume
            entry["metrics"] = m
            if scope == rx.scope:
                lo, hi = rx.eqd2_min_gy, rx.eqd2_max_gy
                d50 = m["D50%"]
                checks = [_check("D50% within prescribed range", d50, f"{lo:g} <= D50% <= {hi:g} Gy", [lo, hi],
                                 d50 is not None and lo <= d50 <= hi)]
                pct = rx.v95_min_percent
                checks.append(_check("V95%", m["V95%"], f"V95% >= {pct:g} %" if pct is not None else "",
                                     pct, pct is not None and m["V95%"] >= pct))
                for label, key, val, is_min in (("D95%", rx.d95_min_percent, m["D95%"], True),
                                                ("D98% (near-minimum)", rx.d98_min_percent, m["D98%"], True),
                                                ("D2% (near-maximum)", rx.d2_max_percent, m["D2%"], False)):
                    thr = None if key is None else key / 100.0 * ref
                    crit = "" if key is None else (f"{label.split()[0]} {'>=' if is_min else '<='} {key:g}% of "
                                                   f"{ref:.2f} Gy = {thr:.2f} Gy")
                    ok = thr is not None and val is not None and (val >= thr if is_min else val <= thr)
                    checks.append(_check(label, val, crit, thr, ok))
                entry["checks"] = checks
            else:
                entry["note"] = f"for information: the prescription applies to the {rx.scope} EQD2"
            out.append(entry)
    return out


def reirradiation_type(ptv: Target | None, courses: list[CourseData], rule: ReirradiationTypeRule,
                       grid: Grid) -> dict:
    """ESTRO-EORTC type from the overlap of the PTV with each prior course's dose >= ``rule.threshold_gy``."""
    base = {"threshold_gy": rule.threshold_gy, "dose": "physical dose of each prior course on the evaluation grid",
            "source": rule.source, "verified": rule.verified}
    priors = [c for c in courses if not c.is_current]
    if ptv is None or not ptv.mask.any():
        return base | {"type": None, "status": "not_evaluated", "reason": "no PTV (margins or a PTV structure)"}
    if not priors:
        return base | {"type": None, "status": "not_evaluated", "reason": "no prior course"}
    vcc = grid.voxel_volume_cc
    per = []
    notes = []
    for c in priors:
        irradiated = c.dose[ptv.box] >= rule.threshold_gy
        overlap = float((irradiated & ptv.mask).sum()) * vcc
        per.append({"course": c.name, "overlap_cc": overlap,
                    "overlap_percent_of_ptv": 100.0 * overlap / (float(ptv.mask.sum()) * vcc)})
        if c.coverage is not None and not c.coverage[ptv.box][ptv.mask].all():
            notes.append(f"part of the PTV lies outside the dose grid of {c.name} (read as 0 Gy there): the overlap "
                         "may be underestimated")
    overlap_cc = max(p["overlap_cc"] for p in per)
    kind = 1 if overlap_cc > 0 else 2
    desc = ("Type 1: the PTV overlaps a previously irradiated volume" if kind == 1 else
            "Type 2: no overlap of the PTV with a previously irradiated volume (cumulative toxicity may still "
            "matter)")
    return base | {"type": kind, "status": "evaluated", "description": desc, "ptv": ptv.name,
                   "ptv_volume_cc": float(ptv.mask.sum()) * vcc, "overlap_cc": overlap_cc, "courses": per,
                   "notes": notes}


def reirradiation_rule_missing() -> dict:
    return {"type": None, "status": "not_evaluated",
            "reason": "the protocol has no reirradiation_type block (threshold_gy)"}
