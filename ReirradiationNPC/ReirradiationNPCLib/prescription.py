"""Prescription and fractionation checks of the current course, and the LQ full-repair flag.

A course of the case file may state its ``schedule`` (docs/case-file.md)::

    schedule: {fractions_per_day: 2, min_hours_between_fractions: 6, prescribed_dose_gy: 65}

and the protocol's prescription may state ``fractionation`` requirements (docs/protocol-format.md): a minimum gap
between fractions given on the same day (6 h in You R et al., Lancet 2023;401:917-927) and a dose-per-fraction range.
The current course is checked against them (``results.json`` ``prescription_checks``: one row per check, with
``status`` pass | fail | not_evaluated | not_applicable | no_limit). Nothing is defaulted: a check whose input is not
stated is ``not_evaluated`` and says what is missing.

The LQ model of :mod:`.eqd2` assumes full repair between fractions. When a course (any course: prior doses enter the
cumulative EQD2 too) gives two or more fractions a day closer than the protocol's minimum gap, or without a stated
gap, the assumption is flagged in the warnings and in ``assumptions.fractionation``: incomplete repair between
fractions is not modelled, so the EQD2 of that course is underestimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .eqd2 import eqd2
from .errors import InputError

SCHEDULE_KEYS = ("fractions_per_day", "min_hours_between_fractions", "prescribed_dose_gy", "note")


@dataclass(frozen=True)
class Schedule:
    """A course's schedule as stated in the case file; ``None`` = not stated (never defaulted)."""

    fractions_per_day: int | None = None
    min_hours_between_fractions: float | None = None   # hours between fractions given on the same day
    prescribed_dose_gy: float | None = None            # total physical prescription of the course (Gy)
    note: str = ""


def _fail(src: str, key: str, msg: str):
    raise InputError(msg, source=src, field=key)


def _number(value, src: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(src, key, f"must be a number, got {value!r}")
    return float(value)


def parse_schedule(raw, src: str, key: str) -> Schedule | None:
    """Validate a course's optional ``schedule`` block; ``None`` when absent. Errors name the file and the field."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        _fail(src, key, f"must be a mapping (e.g. {{fractions_per_day: 2, min_hours_between_fractions: 6}}), "
                        f"got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(SCHEDULE_KEYS))
    if unknown:
        _fail(src, f"{key}.{unknown[0]}", f"unknown key (allowed: {', '.join(SCHEDULE_KEYS)})")
    fpd = raw.get("fractions_per_day")
    if fpd is not None:
        fpd = _number(fpd, src, f"{key}.fractions_per_day")
        if fpd != int(fpd) or not 1 <= fpd <= 4:
            _fail(src, f"{key}.fractions_per_day", f"must be a whole number 1-4, got {raw['fractions_per_day']!r}")
        fpd = int(fpd)
    gap = raw.get("min_hours_between_fractions")
    if gap is not None:
        gap = _number(gap, src, f"{key}.min_hours_between_fractions")
        if not 0 < gap < 24:
            _fail(src, f"{key}.min_hours_between_fractions", f"must be > 0 and < 24 hours, got {gap:g}")
        if fpd == 1:
            _fail(src, f"{key}.min_hours_between_fractions", "given with fractions_per_day: 1 (one fraction a day "
                                                             "has no same-day gap); remove one of them")
    dose = raw.get("prescribed_dose_gy")
    if dose is not None:
        dose = _number(dose, src, f"{key}.prescribed_dose_gy")
        if not 0 < dose <= 200:
            _fail(src, f"{key}.prescribed_dose_gy", f"must be > 0 and <= 200 Gy, got {dose:g}")
    return Schedule(fpd, gap, dose, str(raw.get("note") or ""))


# ------------------------------------------------------------------------------------------------- checks

def _row(check: str, label: str, course: str, criterion: str, required, actual, unit: str, met: bool | None,
         status: str, source: str, verified: bool | None, message: str) -> dict:
    return {"check": check, "label": label, "course": course, "criterion": criterion, "required": required,
            "actual": actual, "unit": unit, "met": met, "status": status, "source": source, "verified": verified,
            "message": message}


def check_course(course, prescription) -> list[dict]:
    """Prescription checks of one course (``name``, ``fractions``, ``schedule``) against the protocol's prescription.

    Rows: ``min_hours_between_fractions`` (gap between fractions given on the same day), ``dose_per_fraction``
    (prescribed dose / fractions within the protocol's range) and ``prescribed_eqd2`` (nominal EQD2 of the stated
    prescription at the prescription's alpha/beta within its EQD2 range, current-course scope only).
    """
    name = course.name
    sched = getattr(course, "schedule", None) or Schedule()
    # a course of several fraction groups (one dose per group): its groups' doses per fraction differ and the
    # schedule states one prescribed dose for the whole course, so neither the dose per fraction nor the nominal EQD2
    # can be judged from it (the mean per fraction would hide a group outside the range, and EQD2 of the total at
    # the mean dose per fraction is not the sum of the groups' EQD2)
    n_groups = len(getattr(course, "doses", None) or ())
    groups = (f"course {name}: {n_groups} fraction groups ({course.fractions} fractions in all) and one prescribed "
              f"dose for the course; the prescribed dose of each group is not stated") if n_groups > 1 else None
    frac = getattr(prescription, "fractionation", None) if prescription is not None else None
    rows = []

    # --- gap between fractions given on the same day
    req = frac.min_hours_between_fractions if frac is not None else None
    src = frac.min_hours_source if req is not None else ""
    ver = frac.min_hours_verified if req is not None else None
    crit = f">= {req:g} h between fractions on the same day" if req is not None else "no minimum gap in the protocol"
    label = "gap between same-day fractions"
    fpd, gap = sched.fractions_per_day, sched.min_hours_between_fractions
    if fpd is None:
        rows.append(_row("min_hours_between_fractions", label, name, crit, req, None, "h", None, "not_evaluated",
                         src, ver, f"course {name}: fractions per day not stated (schedule.fractions_per_day); the "
                               "gap between fractions cannot be checked"))
    elif fpd == 1:
        rows.append(_row("min_hours_between_fractions", label, name, crit, req, None, "h", None, "not_applicable",
                         src, ver, f"course {name}: one fraction a day"))
    elif gap is None:
        rows.append(_row("min_hours_between_fractions", label, name, crit, req, None, "h", None, "not_evaluated",
                         src, ver, f"course {name}: {fpd} fractions a day but the gap between them is not stated "
                               "(schedule.min_hours_between_fractions)"))
    elif req is None:
        rows.append(_row("min_hours_between_fractions", label, name, crit, None, gap, "h", None, "no_limit", "",
                         None, f"course {name}: {fpd} fractions a day, {gap:g} h apart; the protocol states no "
                               "minimum gap"))
    else:
        ok = gap >= req - 1e-9
        msg = (f"course {name}: {fpd} fractions a day {gap:g} h apart, "
               + (f"at least the protocol's minimum gap of {req:g} h" if ok else
                  f"below the protocol's minimum gap of {req:g} h between fractions (the LQ model's full repair "
                  "between fractions is not assured)"))
        rows.append(_row("min_hours_between_fractions", label, name, crit, req, gap, "h", ok,
                         "pass" if ok else "fail", src, ver, msg))

    # --- dose per fraction of the stated prescription
    rng = frac.dose_per_fraction_gy if frac is not None else None
    if rng is not None:
        crit = f"{rng[0]:g}-{rng[1]:g} Gy per fraction"
        if sched.prescribed_dose_gy is None:
            rows.append(_row("dose_per_fraction", "dose per fraction", name, crit, list(rng), None, "Gy", None,
                             "not_evaluated", frac.dose_per_fraction_source, frac.dose_per_fraction_verified,
                             f"course {name}: prescribed dose not stated (schedule.prescribed_dose_gy)"))
        elif groups:
            rows.append(_row("dose_per_fraction", "dose per fraction", name, crit, list(rng), None, "Gy", None,
                             "not_evaluated", frac.dose_per_fraction_source, frac.dose_per_fraction_verified,
                             f"{groups}: the mean over the course ({sched.prescribed_dose_gy / course.fractions:.4f} "
                             f"Gy per fraction) would hide a group outside {crit}"))
        else:
            d = sched.prescribed_dose_gy / course.fractions
            ok = rng[0] - 1e-9 <= d <= rng[1] + 1e-9
            rows.append(_row("dose_per_fraction", "dose per fraction", name, crit, list(rng), d, "Gy", ok,
                             "pass" if ok else "fail", frac.dose_per_fraction_source, frac.dose_per_fraction_verified,
                             f"course {name}: {sched.prescribed_dose_gy:g} Gy in {course.fractions} fractions = "
                             f"{d:.4f} Gy per fraction, {'within' if ok else 'outside'} {crit}"))

    # --- nominal EQD2 of the stated prescription within the prescribed range
    if prescription is not None and prescription.scope == "current" and sched.prescribed_dose_gy is not None \
            and groups:
        lo, hi = prescription.eqd2_min_gy, prescription.eqd2_max_gy
        rows.append(_row("prescribed_eqd2", "nominal EQD2 of the prescription", name,
                         f"{lo:g}-{hi:g} Gy EQD2 at alpha/beta {prescription.alpha_beta:g} Gy", [lo, hi], None, "Gy",
                         None, "not_evaluated", prescription.source, prescription.verified,
                         f"{groups}: the course's EQD2 is the sum of its groups' EQD2, each at its own dose per "
                         "fraction"))
    elif prescription is not None and prescription.scope == "current" and sched.prescribed_dose_gy is not None:
        e = float(eqd2(sched.prescribed_dose_gy, course.fractions, prescription.alpha_beta))
        lo, hi = prescription.eqd2_min_gy, prescription.eqd2_max_gy
        ok = lo - 1e-9 <= e <= hi + 1e-9
        rows.append(_row("prescribed_eqd2", "nominal EQD2 of the prescription", name,
                         f"{lo:g}-{hi:g} Gy EQD2 at alpha/beta {prescription.alpha_beta:g} Gy", [lo, hi], e, "Gy", ok,
                         "pass" if ok else "fail", prescription.source, prescription.verified,
                         f"course {name}: {sched.prescribed_dose_gy:g} Gy in {course.fractions} fractions = "
                         f"{e:.2f} Gy EQD2 (alpha/beta {prescription.alpha_beta:g} Gy), "
                         f"{'within' if ok else 'outside'} the prescribed range"))
    return rows


def repair_flags(courses, prescription) -> list[dict]:
    """Courses whose same-day fractions make the LQ full-repair assumption doubtful (every course, prior ones too).

    Returns ``{course, fractions_per_day, min_hours_between_fractions, required_hours, statement}`` for each course
    with two or more fractions a day that are closer than the protocol's minimum gap or whose gap is not stated.
    """
    frac = getattr(prescription, "fractionation", None) if prescription is not None else None
    req = frac.min_hours_between_fractions if frac is not None else None
    out = []
    for c in courses:
        s = getattr(c, "schedule", None)
        if s is None or s.fractions_per_day is None or s.fractions_per_day < 2:
            continue
        gap = s.min_hours_between_fractions
        if gap is not None and (req is None or gap >= req - 1e-9):
            continue
        if gap is None:
            why = f"{s.fractions_per_day} fractions a day with no stated gap"
        else:
            why = f"{s.fractions_per_day} fractions a day {gap:g} h apart, closer than the protocol's {req:g} h"
        out.append({"course": c.name, "fractions_per_day": s.fractions_per_day, "min_hours_between_fractions": gap,
                    "required_hours": req,
                    "statement": (f"LQ full-repair assumption doubtful for course {c.name}: {why}; incomplete repair "
                                  "between fractions is not modelled, so its EQD2 (and the cumulative EQD2) is "
                                  "underestimated")})
    return out


def schedules(courses) -> list[dict]:
    """Every course's stated schedule (for ``assumptions.fractionation``); ``None`` fields = not stated."""
    out = []
    for c in courses:
        s = getattr(c, "schedule", None)
        out.append({"course": c.name, "fractions": c.fractions, "stated": s is not None,
                    "fractions_per_day": s.fractions_per_day if s else None,
                    "min_hours_between_fractions": s.min_hours_between_fractions if s else None,
                    "prescribed_dose_gy": s.prescribed_dose_gy if s else None})
    return out


def add_to_results(results, case, protocol) -> None:
    """Fill ``results.prescription_checks``; flag the full-repair assumption in warnings and assumptions."""
    courses = list(getattr(case, "courses", []) or [])
    if not courses:
        return
    rx = protocol.prescription
    results.prescription_checks = check_course(courses[-1], rx)
    flags = repair_flags(courses, rx)
    frac = getattr(rx, "fractionation", None) if rx is not None else None
    results.assumptions["fractionation"] = {
        "schedules": schedules(courses),
        "min_hours_between_fractions_required": frac.min_hours_between_fractions if frac is not None else None,
        "full_repair": ("The LQ model assumes full repair between fractions; same-day fractions need a gap long "
                        "enough for repair (>= 6 h: You R et al. Lancet 2023)."),
        "full_repair_flags": flags,
    }
    for f in flags:
        if f["statement"] not in results.warnings:
            results.warnings.append(f["statement"])
    for r in results.prescription_checks:
        if r["status"] == "fail" and r["check"] != "min_hours_between_fractions":
            msg = f"prescription check failed: {r['message']}"
            if msg not in results.warnings:
                results.warnings.append(msg)


def panel_rows(results) -> list[dict]:
    """Display rows for the Slicer module (plain text): Check, Course, Criterion, Actual, Status, Source."""
    rows = results.get("prescription_checks") if isinstance(results, dict) else getattr(
        results, "prescription_checks", None)
    out = []
    for r in rows or []:
        act = r.get("actual")
        act_txt = "not stated" if act is None else (f"{act:.4g} {r.get('unit', '')}".strip()
                                                      if isinstance(act, (int, float)) else str(act))
        out.append({"Check": r.get("label", r.get("check")), "Course": r.get("course", ""),
                    "Criterion": r.get("criterion", ""), "Actual": act_txt,
                    "Status": {"pass": "PASS", "fail": "FAIL"}.get(r.get("status"), str(r.get("status"))),
                    "Source": r.get("source", ""), "Message": r.get("message", "")})
    return out
