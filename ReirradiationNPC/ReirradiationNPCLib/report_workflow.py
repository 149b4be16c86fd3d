"""Report sections of the guideline's workflow around the dose: patient selection and prescription checks.

Rendered from the results tree only (``patient_selection``, ``patient_selection_summary``, ``prescription_checks``,
``assumptions.fractionation``); nothing is recomputed. Called by :func:`.report.render_html`.
"""

from __future__ import annotations

import html

from .selection import format_value

_STATUS = {"pass": "PASS", "fail": "FAIL", "not_evaluated": "not evaluated", "not_applicable": "not applicable",
           "no_limit": "no limit"}


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _table(headers: list[str], rows: list[str]) -> str:
    return ("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def patient_selection_section(res: dict) -> str | None:
    """The "Patient selection" section, or None when the results have no selection factors."""
    rows = res.get("patient_selection") or []
    if not rows:
        return None
    summ = res.get("patient_selection_summary") or {}
    body = []
    for r in rows:
        adv = r.get("adverse")
        # information, not a verdict: no pass/fail colours; an adverse factor is set in bold
        label = "not recorded" if adv is None else ("<b>ADVERSE</b>" if adv else "no")
        body.append(f'<tr><td>{_e(r.get("label", r.get("factor")))}</td>'
                    f'<td class="num">{_e(format_value(r))}</td><td>{label}</td>'
                    f'<td>{_e(r.get("threshold"))}</td><td class="src">{_e(r.get("source"))}</td>'
                    f'<td class="src">{_e(r.get("note"))}</td></tr>')
    head = (f'<p><b>{_e(summ.get("adverse_count", sum(1 for r in rows if r.get("adverse") is True)))} adverse '
            f'factor(s)</b> of {len(rows)}; {_e(summ.get("not_recorded_count", 0))} not recorded. '
            f'{_e(summ.get("statement", ""))}</p>')
    return ('<section id="patient_selection"><h2>Patient selection</h2>' + head
            + _table(["factor", "value", "adverse", "threshold", "source", "note"], body) + "</section>")


def prescription_section(res: dict) -> str | None:
    """The "Prescription and fractionation" section, or None when there is nothing to show."""
    rows = res.get("prescription_checks") or []
    frac = (res.get("assumptions") or {}).get("fractionation") or {}
    if not rows and not frac:
        return None
    body = []
    for r in rows:
        st = r.get("status", "")
        act = r.get("actual")
        act_txt = "not stated" if act is None else (f"{act:.4g} {r.get('unit', '')}" if isinstance(act, (int, float))
                                                    else str(act))
        ver = r.get("verified")
        ver_txt = "" if ver is None else ("yes" if ver else '<span class="unver">NO</span>')
        body.append(f'<tr class="st-{_e(st)}"><td>{_e(r.get("label", r.get("check")))}</td><td>{_e(r.get("course"))}'
                    f'</td><td>{_e(r.get("criterion"))}</td><td class="num">{_e(act_txt)}</td>'
                    f'<td class="status">{_e(_STATUS.get(st, st))}</td><td>{ver_txt}</td>'
                    f'<td class="src">{_e(r.get("source"))}</td><td class="src">{_e(r.get("message"))}</td></tr>')
    out = '<section id="prescription_checks"><h2>Prescription and fractionation</h2>'
    if body:
        out += _table(["check", "course", "criterion", "actual", "status", "verified", "source", "detail"], body)
    else:
        out += "<p>No prescription check (the protocol has no prescription block).</p>"
    sched = [s for s in frac.get("schedules", []) if s.get("stated")]
    if sched:
        out += ("<p>Stated schedules: " + _e("; ".join(
            f"{s['course']}: {s['fractions']} fractions"
            + (f", {s['fractions_per_day']} a day" if s.get("fractions_per_day") else "")
            + (f", {s['min_hours_between_fractions']:g} h apart" if s.get("min_hours_between_fractions") else "")
            + (f", prescribed {s['prescribed_dose_gy']:g} Gy" if s.get("prescribed_dose_gy") else "")
            for s in sched)) + "</p>")
    flags = frac.get("full_repair_flags") or []
    if flags:
        out += '<ul class="warnings">' + "".join(f"<li><b>{_e(f['statement'])}</b></li>" for f in flags) + "</ul>"
    elif frac.get("full_repair"):
        out += f'<p class="note">{_e(frac["full_repair"])}</p>'
    return out + "</section>"


def cli_lines(results) -> list[str]:
    """Summary lines for the command line: the prescription checks and the patient selection count."""
    res = results if isinstance(results, dict) else {
        "prescription_checks": getattr(results, "prescription_checks", None),
        "patient_selection": getattr(results, "patient_selection", None)}
    out = []
    checks = res.get("prescription_checks") or []
    if checks:
        out.append("prescription checks (" + checks[0].get("course", "") + "): " + "; ".join(
            f"{c.get('label', c.get('check'))} {_STATUS.get(c.get('status'), c.get('status'))}"
            + (f" ({c['message'].split(': ', 1)[-1]})" if c.get("status") == "fail" else "") for c in checks))
    rows = res.get("patient_selection") or []
    if rows:
        adverse = [r.get("factor") for r in rows if r.get("adverse") is True]
        n_none = sum(1 for r in rows if r.get("adverse") is None)
        out.append(f"patient selection (information only, not part of the verdict): {len(adverse)} adverse factor(s) "
                   f"of {len(rows)}" + (f" ({', '.join(adverse)})" if adverse else "")
                   + (f"; {n_none} not recorded" if n_none else ""))
    return out
