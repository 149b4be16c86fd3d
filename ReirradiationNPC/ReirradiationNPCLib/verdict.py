"""The verdict: one code and one line that say what was judged, what failed and what could not be judged.

``summary.verdict_code`` is the first of these that applies (docs/outputs.md, "Verdict"):

1. ``limits_exceeded``    a limit row is ``fail`` (its judged value is above the limit);
2. ``conditions_not_met`` a limit's condition does not hold (minimum interval, per-course ceiling): the limit does not
                          vouch for safety, whatever the dose;
3. ``warnings``           a row within the protocol's tolerance of its limit (``warn``), or a target coverage
                          criterion not met;
4. ``incomplete``         something the protocol asks about could not be judged (``incomplete_because`` lists it);
5. ``all_limits_met``     only when nothing of the above applies and ``incomplete_because`` is empty.

The same module gives the one-line text that the CLI, the report and the Slicer module show
(:func:`verdict_line`), so that they cannot disagree. Pure Python; reads the results tree and the protocol.
"""

from __future__ import annotations

VERDICT_CODES = ("limits_exceeded", "conditions_not_met", "warnings", "incomplete", "all_limits_met")

HEADLINES = {
    "limits_exceeded": "LIMITS EXCEEDED",
    "conditions_not_met": "CONDITIONS OF A LIMIT NOT MET",
    "warnings": "WARNINGS (no limit exceeded)",
    "incomplete": "INCOMPLETE (not everything could be judged)",
    "all_limits_met": "ALL LIMITS MET",
}

#: a credited and an undiscounted value closer than this (Gy, cc or %) count as equal (results are rounded to 1e-6)
_SAME = 1e-6


def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def row_label(c) -> str:
    """``organ metric scope[ course] (structure)`` of a constraint row (a ConstraintResult or its dict)."""
    scope = _get(c, "scope")
    if scope == "per_course" and _get(c, "course"):
        scope = f"per course {_get(c, 'course')}"
    elif scope == "cumulative" and _get(c, "basis"):
        scope = f"cumulative {_get(c, 'basis')}"
    return f"{_get(c, 'organ')} {_get(c, 'metric')} {scope} ({_get(c, 'structure') or 'absent'})"


def credit_changed_value(c) -> bool:
    """True when the row is judged on the credited sum and the credit changed that value."""
    if _get(c, "basis") != "credited":
        return False
    vu, vc = _get(c, "value_undiscounted"), _get(c, "value_credited")
    return vu is not None and vc is not None and abs(vu - vc) > _SAME


def summarize(constraints, target_checks, protocol, structures=(), targets_present: bool = False,
              prescription_checks=()) -> dict:
    """The ``summary`` block of results.json.

    ``constraints``: ConstraintResult rows (or dicts); ``target_checks``: the target-check entries (dicts);
    ``protocol``: the :class:`protocol.Protocol`; ``structures``: StructureResult rows (or dicts), to tell which
    protocol organs are present; ``targets_present``: a target was built or matched (for a missing prescription).
    """
    statuses = [_get(c, "status") for c in constraints]
    counts = {s: statuses.count(s) for s in ("pass", "warn", "fail", "condition_not_met", "no_limit",
                                             "not_evaluated")}
    judged = [c for c in constraints if _get(c, "status") in ("pass", "warn", "fail", "condition_not_met")]
    unverified = sum(1 for c in judged if not _get(c, "verified"))
    rec_verified = bool(getattr(getattr(protocol, "recovery", None), "verified", False))
    unverified_credit = 0 if rec_verified else sum(1 for c in judged if credit_changed_value(c))

    exceeded = [f"{row_label(c)}: {_num(_get(c, 'value'))} > {_num(_get(c, 'limit'))} {_get(c, 'unit')}"
                for c in constraints if _get(c, "status") == "fail"]
    unmet = []
    for c in constraints:
        for cond in _get(c, "conditions") or []:
            if not cond.get("met") and _get(c, "status") in ("pass", "warn", "fail", "condition_not_met"):
                unmet.append(f"{row_label(c)}: {cond.get('condition')} (actual: {_num(cond.get('actual'))})")
    near = [f"{row_label(c)}: {_num(_get(c, 'value'))} within {protocol.warn_tolerance_percent:g}% of "
            f"{_num(_get(c, 'limit'))} {_get(c, 'unit')}" for c in constraints if _get(c, "status") == "warn"]

    tcounts: dict[str, int] = {}
    target_not_met, target_not_eval = [], []
    for t in target_checks or []:
        for chk in t.get("checks", []):
            st = chk.get("status")
            tcounts[st] = tcounts.get(st, 0) + 1
            label = f"target {t.get('structure')} {chk.get('check')} ({t.get('scope')})"
            if st == "fail":
                target_not_met.append(f"{label}: {_num(chk.get('value'))}, criterion {chk.get('criterion')}")
            elif st == "not_evaluated":
                target_not_eval.append(f"{label}: not evaluated")
        rx = getattr(protocol, "prescription", None)
        if not t.get("checks") and rx is not None and t.get("scope") == rx.scope:
            target_not_eval.append(f"target {t.get('structure')} ({t.get('scope')}): not evaluated "
                                   f"({t.get('note') or 'no checks'})")

    # issue 16: a failed prescription/fractionation check (e.g. same-day fractions closer than the protocol's gap:
    # the LQ full-repair assumption behind every EQD2 does not hold) is never an all-clear
    rx_failed = [f"prescription check {_get(c, 'check')} ({_get(c, 'course')}): {_get(c, 'message')}"
                 for c in prescription_checks or () if _get(c, "status") == "fail"]
    incomplete = _incomplete(constraints, protocol, structures)
    incomplete += target_not_eval
    if targets_present and getattr(protocol, "prescription", None) is None:
        incomplete.append("the protocol has no prescription: target coverage not judged")

    if exceeded:
        code = "limits_exceeded"
    elif unmet:
        code = "conditions_not_met"
    elif near or target_not_met or rx_failed:
        code = "warnings"
    elif incomplete:
        code = "incomplete"
    else:
        code = "all_limits_met"
    summary = {
        "verdict_code": code,
        "counts": counts,
        "unverified_limits_used": unverified,
        "unverified_recovery_credit_used": unverified_credit,
        # judged rows resting on an unverified claim: an unverified limit, or an unverified credit that changed it
        "unverified_assumptions_used": sum(1 for c in judged if not _get(c, "verified")
                                           or (not rec_verified and credit_changed_value(c))),
        "recovery_verified": rec_verified,
        "limits_exceeded": exceeded,
        "conditions_not_met": unmet,
        "near_limit": near,
        "target_checks": tcounts,
        "target_criteria_not_met": target_not_met,
        "prescription_checks_failed": rx_failed,
        "incomplete_because": incomplete,
        "synthetic": bool(getattr(protocol, "synthetic", False)),
    }
    summary["verdict"] = verdict_line(summary)
    return summary


def _incomplete(constraints, protocol, structures) -> list[str]:
    present = {_get(s, "organ") for s in structures if _get(s, "organ")}
    out = []
    for organ in protocol.organs.values():
        if organ.role != "oar":
            continue
        limited = [c for c in organ.constraints if c.limit is not None]
        where = "present" if organ.key in present else "absent from the structure set"
        if not limited:
            out.append(f"{organ.key}: no limit in the protocol ({where})")
        elif organ.key not in present:
            out.append(f"{organ.key}: has a limit but is absent from the structure set")
    for c in constraints:
        if _get(c, "status") == "not_evaluated" and _get(c, "structure") is not None:
            out.append(f"{row_label(c)}: not evaluated ({_get(c, 'note') or 'no value'})")
    return out


def _num(v) -> str:
    if v is None:
        return "unknown"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return f"{v:.2f}"
    return str(v)


def verdict_line(summary: dict) -> str:
    """The one-line verdict for a ``summary`` dict (results.json): headline, then what else applies.

    Works on summaries written before ``verdict_code`` existed (returns their ``verdict`` text)."""
    code = summary.get("verdict_code")
    if code not in HEADLINES:
        return str(summary.get("verdict", "no verdict"))
    n = {k: len(summary.get(k) or []) for k in ("limits_exceeded", "conditions_not_met", "near_limit",
                                                 "target_criteria_not_met", "incomplete_because",
                                                 "prescription_checks_failed")}
    parts = []
    if n["limits_exceeded"]:
        parts.append(f"{n['limits_exceeded']} limit(s) exceeded")
    if n["conditions_not_met"]:
        parts.append(f"{n['conditions_not_met']} condition(s) of a limit not met (that limit does not vouch for "
                     "safety)")
    if n["near_limit"]:
        parts.append(f"{n['near_limit']} within tolerance of the limit (WARN)")
    if n["target_criteria_not_met"]:
        parts.append(f"{n['target_criteria_not_met']} target coverage criterion/criteria not met")
    if n["prescription_checks_failed"]:
        parts.append(f"{n['prescription_checks_failed']} prescription/fractionation check(s) failed")
    if n["incomplete_because"]:
        parts.append(f"{n['incomplete_because']} item(s) not judged (incomplete: see incomplete_because)")
    if not parts:
        parts.append("every protocol organ evaluated with a limit, every condition holds")
    parts.append(f"{summary.get('unverified_limits_used', 0)} unverified limit(s) used")
    if summary.get("unverified_recovery_credit_used"):
        parts.append(f"unverified recovery credit changed {summary['unverified_recovery_credit_used']} judged "
                     "value(s)")
    if summary.get("synthetic"):
        parts.append("SYNTHETIC demo protocol, not for clinical use")
    return f"{HEADLINES[code]}: " + "; ".join(parts)


def update_results(results, protocol) -> None:
    """(Re)compute ``results.summary`` from its constraint rows and target checks (idempotent)."""
    targets_present = bool(results.target_checks) or any(
        _get(s, "role") == "target" for s in results.structures) or bool(results.margins)
    results.summary = summarize(results.constraints, results.target_checks, protocol, results.structures,
                                targets_present=targets_present,
                                prescription_checks=getattr(results, "prescription_checks", None) or ())
