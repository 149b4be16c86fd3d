"""``report.html``: one self-contained page a physicist can read, print and attach to the plan.

The report renders the results tree (``Results.to_dict()``, exactly what ``results.json`` holds) and never
recomputes a number: every value printed comes from that dictionary. Figures (DVH curves, slices, 3D view) are
drawn from the analysis arrays and embedded as base64 PNG; without arrays (e.g. from a ``results.json`` alone)
the report is still written, with a placeholder where a figure would be.

Sections added by other parts of the engine (registration QA, target coverage, ESTRO-EORTC type, remaining dose)
are shown when present in the results tree and left out otherwise.

``report.pdf`` is written as well when WeasyPrint (optional extra ``pdf``) is importable and works on this
machine (it needs the Pango system library); otherwise the print stylesheet makes the HTML print cleanly.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

DISCLAIMER = ("This report supports a clinical decision; it does not make one. The treating clinician decides, "
              "weighing the expected benefit of re-irradiation against its risks for the individual patient "
              "(Ng WT et al., Int J Radiat Oncol Biol Phys 2021;110:682-695). Check every input (doses, fractions, "
              "intervals, registration, structures, protocol) before relying on any number.")

SEP = " \u00b7 "
STATUS_LABEL = {"pass": "PASS", "fail": "FAIL", "warn": "WARN", "no_limit": "no limit",
                "not_evaluated": "not evaluated", "condition_not_met": "CONDITION NOT MET"}

#: optional sections: (anchor, heading, candidate keys of the results tree, in order of preference)
OPTIONAL_SECTIONS = {
    "registration": ("Registration QA", ("registration", "registration_qa", "registrations")),
    "targets": ("Target coverage", ("target_checks", "margins", "targets", "target_coverage", "coverage")),
    "reirradiation_type": ("ESTRO\u2013EORTC re-irradiation type",
                           ("reirradiation_type", "estro_eortc_type", "estro_eortc", "estro_eortc_classification")),
    "remaining": ("Remaining dose", ("remaining_dose", "remaining", "budget", "dose_budget")),
}


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def fmt(v, digits: int = 2) -> str:
    """The one number format of the report (also used by the tests to compare with results.json)."""
    if v is None:
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "\u2013"
        return f"{v:.{digits}f}"
    return str(v)


def _results_dict(results) -> dict:
    if isinstance(results, dict):
        return results
    return results.to_dict()


# ------------------------------------------------------------------------------------------ figures

def _img(png: bytes | None, alt: str, caption: str, placeholder: str, tall: bool = False) -> str:
    if not png:
        return f'<div class="placeholder">{_e(placeholder)}</div>'
    b64 = base64.b64encode(png).decode("ascii")
    cls = ' class="tall"' if tall else ""
    return (f'<figure><img{cls} alt="{_e(alt)}" src="data:image/png;base64,{b64}">'
            f'<figcaption>{caption}</figcaption></figure>')


#: the report's figures, in the order they are drawn: DVH small multiples, slices, 3D view
FIGURES = ("dvh", "slices", "view3d")
_FAILED = {"dvh": "DVH figure failed", "slices": "slice figure failed", "view3d": "3D view failed"}


#: figure_inputs' ``focus`` when the caller has not chosen it
_CHOOSE = object()


def figure_inputs(res: dict, analysis, prepared, planning=None, names: tuple[str, ...] = FIGURES,
                  focus=_CHOOSE) -> tuple[object, dict[str, tuple]]:
    """What each figure of ``names`` is drawn from, computed here (numpy and SimpleITK; no matplotlib): ``(focus,
    {figure: arguments of draw_figure})``. A figure whose inputs fail is left out (logged). The slices get the CT
    planes they show (``report_figures.ct_planes``), not the CT. ``focus``: ``report_figures.choose_focus`` of
    these results when the caller has it already (else chosen here)."""
    from . import report_figures as rf
    structures = prepared.structures
    colors = rf.structure_colors([s.name for s in structures if s.organ is not None and s.organ.role != "body"])
    jobs: dict[str, tuple] = {}
    if "dvh" in names:
        jobs["dvh"] = (res, getattr(analysis, "dvh_curves", {}) or {}, colors)
    chosen, focus = focus, None
    try:
        focus = rf.choose_focus(res, structures, analysis.cumulative, analysis.course_eqd2) \
            if chosen is _CHOOSE else chosen
        if focus is not None:
            viol = None
            for v in (getattr(planning, "violations", None) or []) if planning is not None else []:
                c = focus.constraint
                if (v.structure, v.metric, v.scope) == (focus.structure, c.get("metric"), c.get("scope")):
                    viol = v
            if "slices" in names:
                # only the map the slices show (the figure process gets these inputs pickled through a file:
                # every course's map on a CT-size grid would be 157 MB each)
                shown = {} if focus.map_name == "cumulative" else {
                    focus.map_name: analysis.course_eqd2[focus.map_name]}
                cumulative = analysis.cumulative if focus.map_name == "cumulative" else None
                jobs["slices"] = (prepared.grid, cumulative, shown, structures, focus,
                                  rf.ct_planes(prepared.grid, focus, prepared.reference_image), colors, viol)
    except Exception:  # noqa: BLE001 - a figure must not stop the report
        log.exception(_FAILED["slices"])
    if "view3d" not in names:
        return focus, jobs
    try:   # the 3D view, offscreen: matplotlib voxel-face surfaces of the organs, targets, margins and violations
        # (the Slicer part renders the same scene with VTK; the report does not depend on it, so it looks the same
        # everywhere)
        layers = rf.layers_3d(prepared.grid, structures, colors, _violations(res, analysis, prepared, planning),
                              getattr(planning, "margins", None) if planning is not None else None)
        focus3d = [lay[0] for lay in layers if lay[4] in ("#ff8c00", "#ffd700", "#00bfff")]  # targets and margins
        jobs["view3d"] = (layers, focus3d)
    except Exception:  # noqa: BLE001
        log.exception(_FAILED["view3d"])
    return focus, jobs


def draw_figure(name: str, args: tuple) -> bytes | None:
    """PNG bytes of figure ``name`` (one of FIGURES) from its :func:`figure_inputs` arguments."""
    from . import report_figures as rf
    if name == "dvh":
        return rf.dvh_figure(*args)
    if name == "slices":
        grid, cumulative, course_eqd2, structures, focus, ct, colors, viol = args
        return rf.slices_figure(grid, cumulative, course_eqd2, structures, focus, None, colors, violation=viol,
                                ct=ct)
    if name == "view3d":
        layers, focus3d = args
        return rf.view3d_figure(layers, focus=focus3d)
    raise ValueError(f"no figure {name!r}")


def make_figures(res: dict, analysis=None, prepared=None, planning=None) -> dict[str, bytes | None]:
    """PNG bytes of each figure (None when it cannot be drawn), drawn in this process one after the other.
    Failures are logged, never fatal: the numbers of the report do not depend on its pictures."""
    figs: dict[str, bytes | None] = {"dvh": None, "slices": None, "view3d": None, "focus": None}
    if analysis is None or prepared is None:
        return figs
    missing = _cannot_draw_here()
    if missing:
        log.warning(_SKIPPED, missing)
        return figs
    focus, jobs = figure_inputs(res, analysis, prepared, planning)
    figs["focus"] = focus
    for name in FIGURES:
        if name in jobs:
            try:
                figs[name] = draw_figure(name, jobs[name])
            except Exception:  # noqa: BLE001 - a figure must not stop the report
                log.exception(_FAILED[name])
    return figs


# ------------------------------------------------------------------------------------------ figures beside the run

#: longest wait (s) for the figure processes before the figures are drawn in this process instead
FIGURE_TIMEOUT_S = 300.0


def _import_for_figures() -> None:
    """What drawing the figures imports (matplotlib, its 3D toolkit, contourpy) and what unpickling their inputs
    needs: done by the figure process while the run computes."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.collections  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import matplotlib.legend  # noqa: F401
    import mpl_toolkits.mplot3d  # noqa: F401
    try:
        import contourpy  # noqa: F401
    except ImportError:
        pass
    from . import analysis, planning, report_figures  # noqa: F401


#: the one line logged when the figures cannot be drawn (what could not be imported)
_SKIPPED = ("report figures skipped (DVH, slices, 3D view; report.html shows a placeholder for each): %s; "
            "the results and the report's numbers do not depend on them")


def _import_failed(exc: ImportError) -> str:
    """What could not be imported, in words: "matplotlib cannot be imported (No module named 'matplotlib')"."""
    return f"{getattr(exc, 'name', None) or 'a module the figures need'} cannot be imported ({exc})"


def _cannot_draw_here() -> str | None:
    """Why the figures cannot be drawn in this process (what drawing them imports is missing), else None."""
    try:
        _import_for_figures()
    except ImportError as exc:
        return _import_failed(exc)
    return None


def _draw_timed(name: str, args: tuple) -> tuple:
    t = time.perf_counter()
    try:
        png = draw_figure(name, args)
    except Exception as exc:  # noqa: BLE001 - a figure must not stop the report
        return ("error", f"{type(exc).__name__}: {exc}", time.perf_counter() - t)
    return ("ok", png, time.perf_counter() - t)


def _figure_process(inbox) -> dict | None:
    """The figure process (:class:`FiguresInChildProcess`): imports matplotlib at once, then draws the figures of
    each message it is sent (:func:`_draw_messages`)."""
    t = time.perf_counter()
    try:
        _import_for_figures()
    except ImportError as exc:  # matplotlib missing: ends at once (reads nothing); the parent logs one line
        return {"unavailable": _import_failed(exc)}
    imported = time.perf_counter() - t
    msg = inbox()
    if msg is None:          # the run ended before its report
        return None
    return {"figures": _draw_messages(inbox, msg), "import_s": imported}


def _draw_messages(inbox, msg: dict) -> dict:
    """Draw the figures of ``msg`` ({"jobs": {figure: inputs}, "more": bool}) and of the messages after it:
    {figure: ("ok", png, s) or ("error", text, s)}. While more is to come (the run still computing on the other
    core), this message's figures are drawn one after the other and a child process waits for the next message;
    the last message's figures are drawn in parallel (its first ones in child processes)."""
    from .child_process import Child, ChildError
    jobs = msg["jobs"]
    names = [n for n in FIGURES if n in jobs]
    if msg.get("more"):
        rest = Child(_next_message, inbox)
        out = {n: _draw_timed(n, jobs[n]) for n in names}
        children = {"the next figures": rest}
    else:
        children = {n: Child(_draw_timed, n, jobs[n]) for n in names[:-1]}
        out = {names[-1]: _draw_timed(names[-1], jobs[names[-1]])} if names else {}
    for n, child in children.items():
        try:
            got = child.result()
        except ChildError as exc:
            got = {} if n == "the next figures" else ("error", str(exc), 0.0)   # missing: drawn by the parent
        if n == "the next figures":
            out.update(got)
        else:
            out[n] = got
    return out


def _next_message(inbox) -> dict:
    msg = inbox()
    return {} if msg is None else _draw_messages(inbox, msg)


class FiguresInChildProcess:
    """The report's figures drawn beside the run (issue 15): created when the command starts, it forks a figure
    process (:class:`.child_process.Child`) that imports matplotlib (about 0.8 s of CPU) while the run loads and
    computes. :meth:`start_early` gives it the slices and the 3D view as soon as the targets and violation regions
    exist (they are drawn while the robustness scenarios are computed), :meth:`start` the DVH figure (it shows the
    robustness band) and whatever was not given yet; the outputs are written meanwhile. The figures' inputs are
    computed here (:func:`figure_inputs`, the same as :func:`make_figures`), and the same drawing functions run,
    so the PNGs are those of :func:`make_figures`. A figure the figure process did not return (it failed, or was not
    done within FIGURE_TIMEOUT_S) is drawn here instead (logged). Linux only (``child_process.available``); not
    inside Slicer (the Slicer module draws them in its own process). Call :meth:`close` when done."""

    def __init__(self):
        from .child_process import Child
        self._child = Child(_figure_process, inbox=True)
        self._sent: dict[str, tuple] = {}      # figure -> the inputs sent (the last ones)
        self._broken = None                    # why the figure process could not be given (all) its inputs
        self._early = None

    def _send(self, res: dict, analysis, prepared, planning, names: tuple[str, ...], last: bool, focus=_CHOOSE):
        """Compute and send the inputs of the figures ``names``; returns the focus of the slices."""
        focus, jobs = figure_inputs(res, analysis, prepared, planning, names=names, focus=focus)
        if self._broken is None:
            try:
                self._child.send({"jobs": {n: (_light(a) if n in ("slices", "view3d") else a) for n, a in jobs.items()},
                                  "more": not last}, last=last)
            except Exception as exc:  # noqa: BLE001 - it ended (e.g. matplotlib missing: it reads nothing), or no
                # room for the inputs' file: its inbox is closed now, so it ends soon; finish() collects what it
                # returns (why it could not draw, or the figures it had been given) and draws the others here
                self._broken = f"{type(exc).__name__}: {exc}"
        self._sent.update(jobs)
        return focus

    def start_early(self, results, analysis, prepared, planning=None) -> None:
        """Send the slices and the 3D view (they need the constraints, targets and violation regions only)."""
        res = _results_dict(results)
        focus = self._send(res, analysis, prepared, planning, ("slices", "view3d"), last=False)
        self._early = _what_early_figures_show(res, prepared.structures, focus)

    def start(self, results, analysis, prepared, planning=None, progress=None):
        """Send the remaining figures' inputs; returns a callable that waits and returns the figures as
        :func:`make_figures` does. ``progress``: a ``timing.StageClock`` gets the figure process's times."""
        res = _results_dict(results)
        rest = tuple(n for n in FIGURES if n not in self._sent)
        focus = _CHOOSE
        if self._sent:   # sent early: sent again if what they show has changed since (it should not)
            from . import report_figures as rf
            focus = rf.choose_focus(res, prepared.structures, analysis.cumulative, analysis.course_eqd2)
            if _what_early_figures_show(res, prepared.structures, focus) != self._early:
                log.warning("the report's slices and 3D view were given to the figure process before the results "
                            "were complete, and what they show has changed since: drawn again")
                rest = FIGURES
        focus = self._send(res, analysis, prepared, planning, rest, last=True, focus=focus)

        def finish() -> dict:
            from .child_process import ChildError
            msg = failed = None
            try:
                msg = self._child.result(timeout=FIGURE_TIMEOUT_S)
            except ChildError as exc:
                failed = str(exc)
            figs = {"dvh": None, "slices": None, "view3d": None, "focus": focus}
            if msg is not None and "unavailable" in msg:   # it could not import matplotlib: one line, no figure
                log.warning(_SKIPPED, msg["unavailable"])
                return figs
            if self._broken is not None:
                log.warning("the report's figure process could not be given its inputs (%s); drawing the figures "
                            "it was not given here", self._broken)
            elif failed is not None:
                log.warning("the report's figure process failed (%s); drawing the figures here", failed)
            add = getattr(progress, "add", None)
            if msg is not None and callable(add):
                add("importing matplotlib (report figure process, from the start of the run)", msg["import_s"])
            got = (msg or {}).get("figures", {})
            here = [n for n in FIGURES if n in self._sent and n not in got]   # not drawn there: drawn here
            missing = _cannot_draw_here() if here else None
            if missing:
                log.warning(_SKIPPED, missing)
                here = []
            for name in FIGURES:
                if name not in self._sent:
                    continue
                if name in here:
                    if msg is not None and self._broken is None:
                        log.warning("the report's figure process returned no %s; drawn here", name)
                    try:
                        figs[name] = draw_figure(name, self._sent[name])
                    except Exception:  # noqa: BLE001 - a figure must not stop the report
                        log.exception(_FAILED[name])
                    continue
                if name not in got:
                    continue
                status, value, seconds = got[name]
                if status == "ok":
                    figs[name] = value
                else:
                    log.error("%s: %s", _FAILED[name], value)
                if callable(add):
                    add(f"drawing the report figure {name!r} (figure process, beside the outputs)", seconds)
            return figs

        return finish

    def close(self) -> None:
        """End the figure process if its figures were not collected (e.g. the run failed): it may be waiting for
        inputs or for the parent to read them."""
        self._child.kill()


def _what_early_figures_show(res: dict, structures, focus) -> tuple:
    """What decides the slices and the 3D view in the results tree: the focus (structure, voxel, threshold, map,
    and the constraint's fields the figure and its caption use) and the failed constraints (violation regions)."""
    from . import report_figures as rf
    f = None if focus is None else (
        focus.structure, focus.index, focus.threshold_gy, focus.map_name, focus.failing,
        tuple(focus.constraint.get(k) for k in ("organ", "metric", "scope", "course", "value", "limit", "unit",
                                                "status", "margin")))
    return f, tuple(rf.failed_keys(res, structures))


def _light(args: tuple) -> tuple:
    """A figure's arguments without what it never reads, for pickling: structures without their masks as read
    (``source_mask``: on the CT grid, up to tens of MB each)."""
    import dataclasses
    out = []
    for a in args:
        if isinstance(a, list) and a and all(dataclasses.is_dataclass(x) and hasattr(x, "source_mask") for x in a):
            a = [dataclasses.replace(x, source_mask=None, source_grid=None) for x in a]
        out.append(a)
    return tuple(out)


def _violations(res: dict, analysis, prepared, planning) -> list[tuple[str, object, tuple]]:
    """Violation regions on the evaluation grid: the planning step's (organ's own α/β EQD2) when present,
    otherwise the structure's voxels at or above the failed limit in the displayed map."""
    from . import report_figures as rf
    viol = getattr(planning, "violations", None) if planning is not None else None
    out = [("violation " + v.name, v.mask, v.box) for v in viol or [] if getattr(v, "status", "fail") == "fail"]
    done = {(v.structure, v.metric, v.scope) for v in viol or []}
    own = rf.violation_masks(res, prepared.structures, analysis.cumulative, analysis.course_eqd2)
    return out + [o for o, key in zip(own, rf.failed_keys(res, prepared.structures)) if key not in done]


# ------------------------------------------------------------------------------------------ sections

def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _generic(obj, depth: int = 0) -> str:
    """Any JSON value as nested definition tables (for result sections this report has no layout for)."""
    if isinstance(obj, dict):
        if not obj:
            return "<em>none</em>"
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_generic(v, depth + 1)}</td></tr>" for k, v in obj.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(obj, list):
        if not obj:
            return "<em>none</em>"
        if all(isinstance(x, dict) for x in obj):
            keys = list(dict.fromkeys(k for x in obj for k in x))
            rows = [[_generic(x.get(k), depth + 1) for k in keys] for x in obj]
            return _table([_e(k) for k in keys], rows, "generic")
        return "<ul>" + "".join(f"<li>{_generic(x, depth + 1)}</li>" for x in obj) + "</ul>"
    if isinstance(obj, float):
        return _e(fmt(obj))
    return _e(fmt(obj))


def _verdict(res: dict) -> str:
    """The verdict box: the engine's verdict code and line (verdict.py), then the lists behind it."""
    from .verdict import HEADLINES, verdict_line
    summ = res.get("summary", {})
    counts = dict(summ.get("counts", {}))
    cons = res.get("constraints", [])
    for st in ("fail", "warn", "condition_not_met", "not_evaluated", "no_limit", "pass"):
        if st not in counts:  # counting rows of the results, not recomputing a dose
            counts[st] = sum(1 for c in cons if c.get("status") == st)
    unver = summ.get("unverified_limits_used")
    if unver is None:
        unver = sum(1 for c in cons if c.get("status") in ("pass", "fail", "warn") and not c.get("verified"))
    n_fail, n_warn = counts["fail"], counts["warn"]
    code = summ.get("verdict_code")
    if code in HEADLINES:
        head = HEADLINES[code]
        cls = {"limits_exceeded": "v-fail", "conditions_not_met": "v-fail", "warnings": "v-warn",
               "incomplete": "v-incomplete", "all_limits_met": "v-pass"}[code]
    elif n_fail:  # a results.json written before verdict codes existed
        head, cls = f"{n_fail} FAILURE{'S' if n_fail != 1 else ''}", "v-fail"
    elif n_warn:
        head, cls = f"{n_warn} WARNING{'S' if n_warn != 1 else ''} (no failure)", "v-warn"
    else:
        head, cls = "NOT JUDGED BY VERDICT CODE (older results)", "v-warn"
    parts = [f"{n_fail} failure(s)", f"{counts['condition_not_met']} condition(s) not met",
             f"{n_warn} warning(s)", f"{unver} unverified limit(s) used", f"{counts['pass']} passed",
             f"{counts['not_evaluated']} not evaluated", f"{counts['no_limit']} without limit"]
    if summ.get("unverified_recovery_credit_used"):
        parts.append(f"unverified recovery credit changed {summ['unverified_recovery_credit_used']} judged value(s)")
    line = (f'<div id="verdict" class="verdict {cls}" data-verdict-code="{_e(code)}">'
            f'<span class="vhead">{_e(head)}</span> '
            f'<span class="vparts">{_e(SEP.join(parts))}</span>')
    if code:
        line += f'<div class="vtext">Verdict ({_e(code)}): {_e(verdict_line(summ))}</div>'
    elif summ.get("verdict"):
        line += f'<div class="vtext">Engine verdict: {_e(summ["verdict"])}</div>'
    if res.get("protocol", {}).get("synthetic"):
        line += '<div class="vtext synthetic">SYNTHETIC protocol: not for clinical use.</div>'
    line += "</div>"
    for key, title in (("limits_exceeded", "Limits exceeded"),
                       ("conditions_not_met", "Conditions of a limit not met (the limit does not vouch for safety)"),
                       ("near_limit", "Within tolerance of the limit (WARN)"),
                       ("target_criteria_not_met", "Target coverage criteria not met"),
                       ("incomplete_because", "Incomplete: not judged")):
        items = summ.get(key) or []
        if items:
            line += (f'<div class="vlist" id="verdict-{key.replace("_", "-")}"><b>{_e(title)} ({len(items)}):</b>'
                     '<ul>' + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul></div>")
    return line


def _identification(res: dict) -> str:
    case = res.get("case", {})
    pat = case.get("patient") or {}
    rows = []
    for k, v in pat.items():
        rows.append([f"patient {_e(k)}", _e(v)])
    if not pat:
        rows.append(["patient", "<em>not given in the case file</em>"])
    rows += [["case file", _e(case.get("file"))], ["report date", _e(case.get("date"))],
             ["evaluation grid", _e(_grid_text(res.get("evaluation_grid", {}), case.get("grid")))],
             ["software", _e(f"{res.get('software', {}).get('name', '')} {res.get('software', {}).get('version', '')}")]]
    return '<table class="kv ident">' + "".join(f"<tr><th>{a}</th><td>{b}</td></tr>" for a, b in rows) + "</table>"


def _grid_text(g: dict, which) -> str:
    if not g:
        return ""
    size = "\u00d7".join(str(s) for s in g.get("size", []))
    sp = "\u00d7".join(fmt(s) for s in g.get("spacing_mm", []))
    return f"{which or ''} grid, {size} voxels of {sp} mm"


def _dose_kind(c: dict) -> str:
    """How the course's dose file became a course dose: DICOM summation type, fraction group, RBE (issue 10)."""
    k = c.get("dose") or {}
    if not k:
        return _e(f"physical dose; {c.get('rbe_text') or 'RBE 1'}")
    if k.get("fraction_groups"):   # a plan of several fraction groups: one EQD2 term per group
        groups = "; ".join(
            f"group {fmt(g.get('fraction_group'))}: {g.get('dose_summation_type', '')}, {fmt(g.get('fractions'))} fx"
            + (f" (one session \u00d7 {fmt(g.get('session_factor'))}, sessions assumed identical)"
               if g.get("sessions_assumed_identical") else "") for g in k["fraction_groups"])
        rbe = (f"RBE {fmt(k['rbe'])}: {k.get('rbe_rule')}" if k.get("rbe") is not None
               else c.get("rbe_text") or "RBE 1")
        return _e(f"{len(k['fraction_groups'])} fraction groups, each its own EQD2 term ({groups}); {rbe}")
    parts = [str(k.get("dose_summation_type", ""))]
    if k.get("fraction_group") is not None:
        parts.append(f"fraction group {k['fraction_group']}")
    if k.get("sessions_assumed_identical"):
        parts.append(f"one session \u00d7 {fmt(k.get('session_factor'))} fractions (sessions assumed identical)")
    parts.append(f"RBE {fmt(k['rbe'])}: {k.get('rbe_rule')}" if k.get("rbe") is not None
                 else c.get("rbe_text") or "RBE 1")
    return _e("; ".join(p for p in parts if p))


def _courses(res: dict) -> str:
    a = res.get("assumptions", {})
    rows = []
    for c in a.get("courses", []):
        rec = ", ".join(f"{_e(k)}: {fmt(100 * v, 0)}%" for k, v in (c.get("recovery_applied") or {}).items())
        if c.get("is_current"):
            rec, interval = "\u2013 (current course: never credited)", "current"
        else:
            rec = rec or "none"
            interval = f"{fmt(c.get('interval_months'), 1)} months"
        fx = fmt(c.get("fractions"))
        if c.get("fraction_groups"):
            fx = "+".join(fmt(g.get("fractions")) for g in c["fraction_groups"]) + f" = {fx}"
        rows.append([_e(c.get("name")), _e(fx), interval, rec, _e(c.get("registration")),
                     _e(fmt(c.get("max_dose_gy"))), _e(fmt(c.get("max_dose_per_fraction_gy"), 3)),
                     _dose_kind(c), f'<span class="path">{_e(c.get("dose_file"))}</span>'])
    out = _table(["course", "fractions", "interval to current course", "recovery credit applied", "registration",
                  "max dose (Gy)", "max dose per fraction (Gy)", "dose as read (summation, RBE)", "dose file"], rows)
    rec = a.get("recovery", {})
    rver = "" if rec.get("verified") is None else (
        ' <b>Verified:</b> <span class="ok">yes</span>.' if rec.get("verified")
        else ' <b>Verified:</b> <span class="unver">NO</span> (an unverified credit is an assumption like an '
             'unverified limit).')
    out += (f'<p><b>Recovery model:</b> {_e(rec.get("description"))}. <b>Convention:</b> {_e(rec.get("convention"))}.'
            + (f' <b>Source:</b> {_e(rec.get("source"))}.' if rec.get("source") else "") + rver
            + (f' <b>Basis of the limits:</b> {_e(rec.get("basis_rule"))}.' if rec.get("basis_rule") else "")
            + "</p>")
    ab = a.get("alpha_beta", {})

    def _ver(v):
        if v is None:
            return "\u2013"
        return '<span class="ok">yes</span>' if v else '<span class="unver">NO</span>'
    rows = [[_e(k), _e(fmt(v.get("alpha_beta_gy"), 1)), _ver(v.get("verified")), _e(v.get("source"))]
            for k, v in (ab.get("per_organ") or {}).items()]
    rows.append(["<em>default (elsewhere)</em>", _e(fmt(ab.get("default_gy"), 1)), _ver(ab.get("default_verified")),
                 _e(ab.get("default_source"))])
    out += "<h3>\u03b1/\u03b2 per organ</h3>" + _table(["organ", "\u03b1/\u03b2 (Gy)", "verified", "source"], rows,
                                                          "narrow")
    if ab.get("map_rule"):
        out += (f'<p class="note">Displayed cumulative map (for viewing): {_e(ab["map_rule"])}. Organ values '
                f'are checked on one-\u03b1/\u03b2 maps (results.json structures[].check_on_file).</p>')
    return out


def _protocol(res: dict) -> str:
    p = res.get("protocol", {})
    rows = [["name", _e(p.get("name"))], ["version", _e(p.get("version"))], ["file", _e(p.get("file"))],
            ["synthetic", "YES \u2013 not for clinical use" if p.get("synthetic") else "no"],
            ["default \u03b1/\u03b2 (Gy)", _e(fmt(p.get("default_alpha_beta"), 1))],
            ["recovery", _e(p.get("recovery"))]]
    if p.get("description"):
        rows.append(["description", _e(p.get("description"))])
    srcs = sorted({c.get("source") for c in res.get("constraints", []) if c.get("source")})
    if srcs:
        rows.append(["sources of the limits", "<ul>" + "".join(f"<li>{_e(s)}</li>" for s in srcs) + "</ul>"])
    return '<table class="kv">' + "".join(f"<tr><th>{a}</th><td>{b}</td></tr>" for a, b in rows) + "</table>"


def _conditions_cell(c: dict) -> str:
    conds = c.get("conditions") or []
    if not conds:
        return "\u2013"
    items = []
    for x in conds:
        ok = x.get("met")
        act = x.get("actual")
        act = fmt(act) if isinstance(act, float) else _e(act)
        items.append(f'<li class="{"ok" if ok else "unver"}">{"met" if ok else "NOT MET"}: {_e(x.get("condition"))} '
                     f'(actual {act})</li>')
    return '<ul class="conds">' + "".join(items) + "</ul>"


def _constraints(res: dict) -> str:
    rows = []
    for n, c in enumerate(res.get("constraints", [])):
        st = c.get("status", "")
        unit = c.get("unit", "")
        cum = c.get("scope") == "cumulative"

        def val(v):
            return "\u2013" if v is None else f"{fmt(v)} {unit}"
        lim = "no limit" if c.get("limit") is None else f"{fmt(c['limit'])} {unit}"
        mar = "\u2013" if c.get("margin") is None else f"{fmt(c['margin'])} {unit}"
        cred = ", ".join(f"{k} {fmt(100 * v, 0)}%" for k, v in (c.get("recovery_credit") or {}).items() if v)
        ver = '<span class="ok">yes</span>' if c.get("verified") else '<span class="unver">NO</span>'
        scope = c.get("scope") or ""
        course = f" ({c['course']})" if scope == "per_course" and c.get("course") else ""
        basis = c.get("basis") or "\u2013"
        band = _band_cell(c)
        rows.append(
            f'<tr class="st-{_e(st)}" data-row="{n}" data-structure="{_e(c.get("structure"))}" '
            f'data-metric="{_e(c.get("metric"))}" data-scope="{_e(scope)}" data-course="{_e(c.get("course"))}" '
            f'data-basis="{_e(c.get("basis"))}" data-value="{_e(json.dumps(c.get("value")))}">'
            f'<td class="status">{_e(STATUS_LABEL.get(st, st))}</td><td>{_e(c.get("organ"))}</td>'
            f'<td>{_e(c.get("structure") or "absent")}</td><td>{_e(c.get("metric"))}</td>'
            f'<td>{_e(scope)}{_e(course)}</td><td>{_e(basis)}</td>'
            f'<td class="num value">{_e(val(c.get("value")))}</td>'
            f'<td class="num">{_e(val(c.get("value_undiscounted")) if cum else chr(0x2013))}</td>'
            f'<td class="num">{_e(val(c.get("value_credited")) if cum else chr(0x2013))}</td>'
            f'<td class="num">{_e(lim)}</td><td class="num">{_e(mar)}</td><td>{_conditions_cell(c)}</td>'
            f'<td class="num">{_e(fmt(c.get("alpha_beta"), 1))}</td><td>{_e(cred or "none")}</td>'
            f'<td>{ver}</td><td class="src">{_e(c.get("source"))}'
            + (f'<div class="note">{_e(c.get("note"))}</div>' if c.get("note") else "") + "</td>" + band + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ["status", "organ", "structure", "metric", "scope", "basis judged",
                                              "judged value", "cumulative undiscounted", "cumulative credited",
                                              "limit", "margin (limit \u2212 judged)", "conditions",
                                              "\u03b1/\u03b2 (Gy)", "recovery credit", "verified", "source",
                                              "robustness: best \u2013 worst (status in worst)"])
    legend = ('<p class="note">Doses are EQD2 in Gy. Cumulative rows show both sums of the courses: '
              '<b>undiscounted</b> (plain sum) and <b>credited</b> (prior courses discounted by the recovery credit); '
              'the limit is judged on the one named in <i>basis judged</i> (a limit derived on the plain sum, such as '
              'Nieder\u2019s spinal-cord limit, is never compared with a credited sum). current: the current course '
              'alone; per_course: each course, prior ones included, in its own EQD2 without credit. Volumes in cc or '
              '%. A negative margin means the limit is exceeded. <b>CONDITION NOT MET</b>: a condition of the limit '
              '(e.g. minimum interval, per-course ceiling) does not hold, so the limit does not vouch for safety '
              'whatever the dose. <b>verified NO</b>: the limit has not been checked against its source; treat it as '
              'provisional.</p>')
    return (f'<table class="constraints"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            + legend)


def _band_cell(c: dict) -> str:
    """Constraint-table cell: the row's value range over the robustness scenarios and its status in the worst."""
    rb = c.get("robustness")
    if not rb or rb.get("worst_value") is None:
        return '<td class="num band">\u2013</td>'
    st = rb.get("status_worst", "")
    label = (rb.get("worst_scenario") or {}).get("label", "")
    return (f'<td class="num band st-{_e(st)}" title="worst scenario: {_e(label)}">'
            f'{_e(fmt(rb.get("best_value")))} \u2013 {_e(fmt(rb.get("worst_value")))} {_e(c.get("unit", ""))} '
            f'<span class="status">({_e(STATUS_LABEL.get(st, st))})</span></td>')


def _robustness(res: dict) -> str:
    """The robust verdict: status, ranges used, per-row worst scenario, worst-case violation regions."""
    summ = (res.get("summary") or {}).get("robustness") or {}
    ass = (res.get("assumptions") or {}).get("robustness") or {}
    if not summ or summ.get("status") == "not_evaluated":
        return f'<p>Robustness not evaluated: {_e(summ.get("reason") or ass.get("reason") or "no robustness data")}.</p>'
    code = summ.get("status", "")
    cls = {"robust_pass": "v-pass", "robust_fail": "v-fail"}.get(code, "v-warn")
    out = [f'<div class="verdict {cls}" id="robust-verdict"><span class="vhead">{_e(code.upper().replace("_", " "))}'
           f'</span> <span class="vparts">{_e(summ.get("text"))}</span>'
           f'<div class="vtext">{_e(summ.get("note"))}</div></div>']
    items = []
    groups: dict = {}
    for organ, r in (ass.get("alpha_beta_ranges") or {}).items():
        groups.setdefault((r["min_gy"], r["max_gy"], r["source"], r["verified"]), []).append(organ)
    for (lo, hi, src, ver), organs in groups.items():
        items.append(f"\u03b1/\u03b2 of {', '.join(organs)}: {fmt(lo, 2)}\u2013{fmt(hi, 2)} Gy "
                     f"({src}; verified: {'yes' if ver else 'NO'})")
    items.append("organs not listed keep their protocol \u03b1/\u03b2 in every scenario")
    items.append(f"recovery credit: {ass.get('recovery')}")
    reg = ass.get("registration_mm") or {}
    items.append("registration uncertainty: " + (", ".join(f"{k} {fmt(v, 1)} mm" for k, v in reg.items()) or "none")
                 + f" ({ass.get('registration_source') or 'no source'}); {ass.get('shift_set')}")
    items.append(f"dose-calculation uncertainty: \u00b1{fmt(ass.get('dose_uncertainty_percent'), 1)} %"
                 + (f" ({ass.get('dose_uncertainty_source')})" if ass.get("dose_uncertainty_source") else ""))
    items.append(f"exactness: {ass.get('exactness')}")
    out.append("<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>")
    rows = []
    for c in res.get("constraints", []):
        rb = c.get("robustness")
        if not rb:
            continue
        unit = c.get("unit", "")
        rows.append([_e(c.get("structure")), _e(c.get("metric")), _e(c.get("scope")),
                     _e(f"{fmt(c.get('value'))} {unit}"), _e(f"{fmt(rb.get('best_value'))} {unit}"),
                     _e(f"{fmt(rb.get('worst_value'))} {unit}"), _e(STATUS_LABEL.get(c.get("status"), c.get("status"))),
                     _e(STATUS_LABEL.get(rb.get("status_worst"), rb.get("status_worst"))),
                     _e((rb.get("worst_scenario") or {}).get("label", "")),
                     _e(str(rb.get("scenarios"))) + (" (+ interior \u03b1/\u03b2)" if rb.get("ab_interior") else "")])
    out.append(_table(["structure", "metric", "scope", "nominal", "best", "worst", "status", "status in worst",
                       "worst scenario", "scenarios"], rows, "constraints"))
    viol = res.get("robustness_violations") or []
    if viol:
        out.append('<h3>Worst-case violation regions (violations_worst.seg.nrrd)</h3>' + _table(
            ["status", "segment", "volume (cc)"],
            [[_e(STATUS_LABEL.get(v.get("status"), v.get("status"))), _e(v.get("segment")),
              _e(fmt(v.get("volume_cc"), 3))] for v in viol], "constraints"))
    out.append('<p class="note">Worst-case map: cumulative_eqd2_worst.nrrd (voxelwise worst over the scenarios; an '
               'upper bound of every scenario at once). A band is the value range over the scenarios; the verdict '
               'above is judged on the nominal values.</p>')
    return "".join(out)


def _risk(res: dict) -> str:
    """Published temporal-lobe injury estimates: information only."""
    rows = []
    for e in res.get("risk_estimates") or []:
        if e.get("status") != "estimated":
            rows.append([_e(e.get("structure") or e.get("organ")), _e(e.get("name")), _e(e.get("metric")), "\u2013",
                         "\u2013", "\u2013", _e(e.get("reason")), _e("yes" if e.get("verified") else "NO")])
            continue
        lo, hi = e.get("range_percent") or (None, None)
        rows.append([_e(e.get("structure")), _e(e.get("name")),
                     _e(f"{e.get('metric')} ({e.get('dose')}, \u03b1/\u03b2 {fmt(e.get('alpha_beta_gy'), 1)} Gy"
                        + ("" if e.get("alpha_beta_verified") else ", \u03b1/\u03b2 unverified") + ")"),
                     _e(fmt(e.get("value_gy"))), _e(fmt(e.get("estimate_percent"), 1)),
                     _e(f"{fmt(lo, 1)}\u2013{fmt(hi, 1)}"), _e(e.get("derived")),
                     _e("yes" if e.get("verified") else "NO")])
    if not rows:
        return "<p>No estimate (no model data).</p>"
    srcs = sorted({e.get("source") for e in res.get("risk_estimates") or [] if e.get("source")})
    return (_table(["structure", "model", "metric", "value (Gy EQD2)", "estimate (%)",
                    "range at the parameters' CI ends (%)", "how derived", "verified"], rows, "constraints")
            + '<p class="note"><b>ESTIMATES, information only: never a limit, not part of the verdict.</b> '
              'The range is the estimate at the ends of the published parameter confidence intervals, not a '
              'confidence interval of the risk. Sources: ' + _e("; ".join(srcs)) + "</p>")


def _structures(res: dict) -> str:
    courses = [c["name"] for c in res.get("assumptions", {}).get("courses", [])]
    rows = []
    for s in res.get("structures", []):
        m = s.get("metrics", {})
        cum = m.get("cumulative", {})
        plain = s.get("cumulative_undiscounted") or {}
        cells = [_e(s.get("name")), _e(s.get("organ") or "unmatched"), _e(fmt(s.get("alpha_beta"), 1)),
                 _e(fmt(s.get("volume_cc"))), _e(fmt(cum.get("Dmax"))), _e(fmt(cum.get("D0.03cc"))),
                 _e(fmt(cum.get("Dmean"))), _e(fmt(plain.get("D0.03cc"))), _e(fmt(plain.get("Dmean")))]
        for c in courses:
            cm = m.get(c, {})
            cells += [_e(fmt(cm.get("D0.03cc"))), _e(fmt(cm.get("Dmean")))]
        rows.append(cells)
    heads = ["structure", "organ", "\u03b1/\u03b2 (Gy)", "volume (cc)", "cum. Dmax", "cum. D0.03cc", "cum. Dmean",
             "cum. undiscounted D0.03cc", "cum. undiscounted Dmean"]
    for c in courses:
        heads += [f"{_e(c)} D0.03cc", f"{_e(c)} Dmean"]
    return (_table(heads, rows, "structs") +
            '<p class="note">EQD2 in Gy with each structure\u2019s own \u03b1/\u03b2; course columns without '
            'recovery credit; cumulative columns with it (credited), and the undiscounted sum beside (the plain sum '
            'of the courses). All values as in results.json.</p>')


def _optional(res: dict, key: str) -> str | None:
    heading, cands = OPTIONAL_SECTIONS[key]
    for k in cands:
        if res.get(k) not in (None, {}, []):
            body = None
            try:
                body = _SPECIFIC.get(k, lambda r: None)(res)
            except (KeyError, TypeError, ValueError, AttributeError):  # a layout change: show the raw tree
                log.debug("section %s shown generically", k, exc_info=True)
            if body is None:
                body = _generic(res[k])
            return f'<section id="{key}"><h2>{_e(heading)}</h2>{body}</section>'
    return None


def _status_cell(st: str) -> str:
    return f'<td class="status">{_e(STATUS_LABEL.get(st, st))}</td>'


def _target_checks(res: dict) -> str:
    out = ""
    m = res.get("margins")
    if m:
        r = m.get("recipe", {})
        vols = m.get("volumes_cc", {})
        names = m.get("segment_names", {})
        rows = [[_e(names.get(k, k)), _e(fmt(v))] for k, v in vols.items()]
        ver = '<span class="ok">yes</span>' if r.get("verified") else '<span class="unver">NO</span>'
        out += (f"<h3>Target volumes from the protocol's margins</h3><p>GTV = {_e(', '.join(r.get('gtv', [])))}; "
                f"CTV = GTV + {_e(fmt(r.get('ctv_mm'), 1))} mm; PTV = CTV + {_e(fmt(r.get('ptv_mm'), 1))} mm"
                + (f"; cropped to {_e(r.get('crop_to'))}" if r.get("crop_to") else "")
                + (f"; air below {_e(fmt(r.get('air_hu'), 0))} HU removed" if r.get("air_hu") is not None else "")
                + f". Verified: {ver}. Source: {_e(r.get('source'))}</p>"
                + _table(["volume", "cc"], rows, "narrow"))
        ov = {k: v for k, v in (m.get("ptv_oar_overlap_cc") or {}).items() if v}
        if ov:
            out += ("<p>PTV overlap with organs at risk: "
                    + _e(", ".join(f"{k} {fmt(v)} cc" for k, v in ov.items())) + "</p>")
    checks = res.get("target_checks") or []
    if checks:
        vols = {}
        for t in checks:
            vols.setdefault(t.get("structure"), t.get("volume_cc"))
        rows = []
        for t in checks:
            for c in t.get("checks", []):
                st = c.get("status", "")
                beside = c.get("value_eqd2")
                rows.append(f'<tr class="st-{_e(st)}">{_status_cell(st)}<td>{_e(t.get("structure"))}</td>'
                            f'<td class="num">{_e(fmt(t.get("volume_cc")))}</td>'
                            f'<td>{_e(t.get("scope"))}</td><td>{_e(c.get("check"))}</td>'
                            f'<td class="num">{_e(fmt(c.get("value")))}</td>'
                            f'<td class="num">{_e(fmt(beside) if beside is not None else chr(0x2013))}</td>'
                            f'<td>{_e(c.get("criterion"))}</td><td class="note">{_e(c.get("basis"))}</td></tr>')
        first = checks[0]
        ver = '<span class="ok">yes</span>' if first.get("verified") else '<span class="unver">NO</span>'
        rx_dose = next((t.get("prescription_dose_gy") for t in checks if t.get("prescription_dose_gy")), None)
        out += ("<h3>Coverage of the targets</h3>"
                '<table class="constraints"><thead><tr><th>status</th><th>target</th><th>volume (cc)</th>'
                '<th>scope</th><th>check</th><th>judged value (Gy or %)</th><th>EQD2 beside (Gy or %)</th>'
                f'<th>criterion</th><th>basis</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
                '<p class="note">Target metrics are sampled sub-voxel from each target\u2019s own mask, like the organ '
                'metrics; the volume of a target is the same in every section. '
                + ("ICRU 83 criteria (V95%, D95%, D98%, D2%) are judged on the physical dose of the current course "
                   f"relative to its prescription ({_e(fmt(rx_dose))} Gy); the EQD2 of the same metric at the tumour "
                   "\u03b1/\u03b2 is given beside it. " if rx_dose else
                   "The protocol gives no physical prescription: the criteria are judged on the current course\u2019s "
                   "EQD2. ")
                + f'D50% is judged on the EQD2 of the prescription\u2019s scope. Reference EQD2: '
                f'{_e(first.get("reference_rule"))} = {_e(fmt(first.get("reference_eqd2_gy")))} Gy; prescribed range '
                f'{_e(" - ".join(fmt(x) for x in first.get("prescription_range_gy") or []))} Gy. Verified: {ver}. '
                f'Source: {_e(first.get("source"))}</p>')
        mrows = []
        for t in checks:
            for label, mm in (("EQD2 " + str(t.get("scope")), t.get("metrics") or {}),
                              ("physical, current course", t.get("metrics_physical"))):
                if not mm:
                    continue
                mrows.append([_e(t.get("structure")), _e(fmt(t.get("volume_cc"))), _e(label)]
                             + [_e(fmt(mm.get(k))) for k in ("D98%", "D95%", "D50%", "D2%", "Dmean", "V95%")])
        if mrows:
            out += ("<h4>Target metrics</h4>" + _table(["target", "volume (cc)", "dose", "D98% (Gy)", "D95% (Gy)",
                                                        "D50% (Gy)", "D2% (Gy)", "Dmean (Gy)", "V95% (%)"], mrows))
    return out or None


def _reirradiation_type(res: dict) -> str:
    t = res["reirradiation_type"]
    ver = '<span class="ok">yes</span>' if t.get("verified") else '<span class="unver">NO</span>'
    label = t.get("category") or (f"Type {t['type']}" if t.get("type") is not None else
                                  str(t.get("status", "not evaluated")).replace("_", " "))
    desc = str(t.get("description") or t.get("reason") or "")
    if desc.startswith(label):
        desc = desc[len(label):].lstrip(" :\u2013-")
    rows = [[_e(c.get("course")), _e(fmt(c.get("irradiated_cc"))), _e(fmt(c.get("overlap_with_current_cc"))),
             _e(fmt(c.get("overlap_with_ptv_cc")))] for c in t.get("courses", [])]
    out = (f'<p class="big"><b>{_e(label)}</b> \u2013 {_e(desc)}</p>'
           f'<p><b>Rule (protocol):</b> {_e(t.get("rule"))}. Current course irradiated volume: '
           f'{_e(fmt(t.get("current_irradiated_cc")))} cc. Threshold verified: {ver}. Source: {_e(t.get("source"))}</p>')
    if t.get("ptv"):
        out += (f'<p>{_e(t.get("ptv"))}: {_e(fmt(t.get("ptv_volume_cc")))} cc (its overlap with each prior irradiated '
                'volume is given for information; the category is judged on the irradiated volumes).</p>')
    if t.get("organs_irradiated_by_both"):
        out += f'<p>Organs at risk in both irradiated volumes: {_e(", ".join(t["organs_irradiated_by_both"]))}</p>'
    if rows:
        out += _table(["prior course", "irradiated volume (cc)", "overlap with the current irradiated volume (cc)",
                       f"overlap with {_e(t.get('ptv') or 'the PTV')} (cc)"], rows, "narrow")
    for n in t.get("notes") or []:
        out += f'<p class="note">{_e(n)}</p>'
    return out


def _remaining(res: dict) -> str:
    rd = res["remaining_dose"]
    rows = []
    for s in rd.get("structures", []):
        lims = ", ".join(f"{x.get('metric')} {x.get('scope')} \u2264 {fmt(x.get('limit_gy'))} Gy"
                         + ("" if x.get("verified") else " (unverified)") for x in s.get("limits", []))
        rows.append([_e(s.get("structure")), _e(fmt(s.get("alpha_beta"), 1)), _e(lims),
                     _e(fmt(s.get("min_remaining_gy"))), _e(fmt(s.get("max_remaining_gy"))),
                     _e(fmt(s.get("voxels_already_over_limit_from_prior_courses")))])
    out = (f"<p>Remaining physical dose (Gy) per voxel: what the current course's {_e(fmt(rd.get('fractions')))} "
           f"fractions may still deliver there before the organ's tightest dose limit is reached (map: "
           f"remaining_dose.nrrd, not a plan dose); lowest and highest over each organ's voxels. Lowest over all constrained voxels: "
           f"<b>{_e(fmt(rd.get('min_gy')))} Gy</b>.</p>")
    out += _table(["organ structure", "\u03b1/\u03b2 (Gy)", "limits used", "min remaining (Gy)",
                   "max remaining (Gy)", "voxels already over the limit from prior courses"], rows)
    nrep = rd.get("not_represented") or []
    if nrep:
        items = "; ".join(
            f"{_e(x.get('structure'))}: " + ", ".join(f"{_e(l.get('metric'))} \u2264 {_e(fmt(l.get('limit')))} "
                                                     f"{_e(l.get('unit'))}" for l in x.get("limits", []))
            + (" (marked \u22122 on the map: not free dose)" if x.get("marked_on_map") else
               " (map shows the point-type budget only)") for x in nrep)
        out += (f'<p class="note">Not a plan dose. Limits a voxel map cannot represent (judge them on the plan\'s '
                f"DVH): {items}.</p>")
    viol = res.get("violations") or []
    if viol:
        rows = [f'<tr class="st-{_e(v.get("status"))}">{_status_cell(v.get("status", ""))}<td>{_e(v.get("segment"))}</td>'
                f'<td class="num">{_e(fmt(v.get("threshold_gy")))}</td><td class="num">{_e(fmt(v.get("volume_cc"), 3))}</td></tr>'
                for v in viol]
        out += ('<h3>Violation regions (violations.seg.nrrd)</h3><table class="constraints"><thead><tr><th>status</th>'
                '<th>region</th><th>EQD2 threshold (Gy)</th><th>volume (cc)</th></tr></thead><tbody>'
                + "".join(rows) + "</tbody></table>")
    return out


def _registration(res: dict) -> str | None:
    """Registration QA per prior course (the registration module's qa_dict), AAPM TG-132 style figures."""
    reg = next(res[k] for k in OPTIONAL_SECTIONS["registration"][1] if res.get(k))
    if isinstance(reg, dict) and reg and all(isinstance(v, dict) for v in reg.values()):
        items = list(reg.items())
    elif isinstance(reg, list) and all(isinstance(v, dict) for v in reg):
        items = [(v.get("course", f"course {i + 1}"), v) for i, v in enumerate(reg)]
    else:
        return None
    out = ""
    for course, q in items:
        rows = [["method", _e(q.get("method"))]]
        if q.get("mattes_mi_before") is not None or q.get("mattes_mi_after") is not None:
            rows.append(["Mattes MI before \u2192 after", f"{_e(fmt(q.get('mattes_mi_before'), 3))} \u2192 "
                                                          f"{_e(fmt(q.get('mattes_mi_after'), 3))} (higher = better)"])
        if q.get("rotation_deg") is not None:
            rows.append(["rotation (deg)", _e(fmt(q.get("rotation_deg")))])
        if q.get("translation_mm") is not None:
            rows.append(["translation (mm)", _e(", ".join(fmt(v) for v in q["translation_mm"]))])
        if q.get("max_bspline_displacement_mm") is not None:
            rows.append(["max B-spline displacement (mm)", _e(fmt(q["max_bspline_displacement_mm"]))])
        if q.get("jacobian_determinant") is not None:
            rows.append(["Jacobian determinant", _generic(q["jacobian_determinant"])])
        if q.get("dice"):
            rows.append(["Dice of mapped prior structures", _generic(q["dice"])])
        if q.get("time_s") is not None:
            rows.append(["time (s)", _e(fmt(q["time_s"], 1))])
        if q.get("source_file"):
            rows.append(["transform file", _e(q["source_file"])])
        for n in q.get("notes") or []:
            rows.append(["note", _e(n)])
        shown = {"method", "mattes_mi_before", "mattes_mi_after", "rotation_deg", "translation_mm", "notes",
                 "max_bspline_displacement_mm", "jacobian_determinant", "dice", "time_s", "source_file", "course",
                 "direction", "parameters", "similarity_metric", "matrix", "matrix_4x4", "linear_part"}
        for k, v in q.items():
            if k not in shown:
                rows.append([_e(k), _generic(v)])
        out += (f"<h3>{_e(course)}</h3>" + '<table class="kv">'
                + "".join(f"<tr><th>{a}</th><td>{b}</td></tr>" for a, b in rows) + "</table>")
    return out + ('<p class="note">Review the registration visually as well: the cumulative dose is only as good as '
                  'the mapping of prior doses onto today\u2019s anatomy (AAPM TG-132).</p>')


_SPECIFIC = {"registration": _registration, "registration_qa": _registration, "registrations": _registration,
             "target_checks": _target_checks, "margins": _target_checks, "reirradiation_type": _reirradiation_type,
             "remaining_dose": _remaining}


def _assumptions(res: dict) -> str:
    items = res.get("assumptions", {}).get("model", [])
    return '<ul class="assumptions">' + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul>"


def _warnings(res: dict) -> str:
    out = ""
    if res.get("unmatched_structures"):
        out += ("<p><b>Structures matching no organ of the protocol</b> (reported, never guessed): "
                + _e(", ".join(res["unmatched_structures"])) + "</p>")
    if res.get("warnings"):
        out += '<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in res["warnings"]) + "</ul>"
    return out or "<p>None.</p>"


CSS = """
body{font-family:"DejaVu Sans",Arial,Helvetica,sans-serif;font-size:10.5pt;color:#111;margin:18px auto;max-width:1250px;
 line-height:1.35}
h1{font-size:17pt;margin:0 0 4px 0} h2{font-size:13pt;border-bottom:2px solid #333;margin:22px 0 8px 0;padding-bottom:2px}
h3{font-size:11pt;margin:12px 0 4px 0}
table{border-collapse:collapse;margin:4px 0 8px 0;font-size:9pt} th,td{border:1px solid #bbb;padding:3px 6px;vertical-align:top}
thead th{background:#e8e8e8;text-align:left} table.kv th{background:#f3f3f3;text-align:left;white-space:nowrap;width:1%}
td.num{text-align:right;white-space:nowrap} td.src{font-size:8pt;max-width:320px} .path{font-size:8pt;word-break:break-all}
tr.st-pass td.status{background:#cdeccd;color:#0b5d0b;font-weight:bold}
tr.st-fail td{background:#fde0e0} tr.st-fail td.status{background:#d62728;color:#fff;font-weight:bold}
tr.st-warn td{background:#fff4d6} tr.st-warn td.status{background:#f0a500;color:#000;font-weight:bold}
tr.st-no_limit td.status{background:#e4e4e4;color:#444}
tr.st-condition_not_met td{background:#f7e3f0} tr.st-condition_not_met td.status{background:#8e1b6b;color:#fff;font-weight:bold}
ul.conds{margin:0;padding-left:14px} .vlist{font-size:9.5pt;margin-top:4px} .vlist ul{margin:2px 0 0 0}
.v-incomplete{border-color:#6b4ea0;background:#efe8f8} tr.st-not_evaluated td.status{background:#e9e1f5;color:#4b2a7b}
.unver{color:#b00000;font-weight:bold} .ok{color:#0b5d0b}
.verdict{border:3px solid #333;padding:8px 12px;margin:10px 0;font-size:12pt}
.v-fail{border-color:#d62728;background:#fde0e0} .v-warn{border-color:#f0a500;background:#fff4d6}
.v-pass{border-color:#2a7a2a;background:#dff2df} .vhead{font-weight:bold;font-size:14pt;margin-right:10px}
.vtext{font-size:9.5pt;margin-top:3px} .synthetic{color:#b00000;font-weight:bold}
.note{font-size:8.5pt;color:#444} figure{margin:6px 0} figure img{max-width:100%;height:auto;border:1px solid #ccc}
figcaption{font-size:8.5pt;color:#333;margin-top:2px}
.placeholder{border:2px dashed #999;padding:24px;color:#555;text-align:center;background:#fafafa}
.disclaimer{border:2px solid #333;padding:8px 12px;background:#f6f6f6;font-weight:bold;margin-top:16px}
.banner{background:#b00000;color:#fff;padding:4px 10px;font-weight:bold;margin-bottom:6px}
header .sub{color:#444;font-size:9.5pt}
@page{size:A4 landscape;margin:12mm}
@media print{
 body{max-width:none;margin:0;font-size:9pt}
 *{-webkit-print-color-adjust:exact;print-color-adjust:exact}
 h2{break-after:avoid;page-break-after:avoid}
 tr,figure,.verdict,.disclaimer{break-inside:avoid;page-break-inside:avoid}
 thead{display:table-header-group}
 section.figure{break-before:page;page-break-before:always}
 figure img.tall{height:148mm;width:auto;max-width:100%}
 a{color:inherit;text-decoration:none}
}
"""


def render_html(results, figures: dict | None = None) -> str:
    """The report page for a results tree (a ``Results`` or the ``results.json`` dictionary)."""
    res = _results_dict(results)
    figs = figures or {}
    sw = res.get("software", {})
    prot = res.get("protocol", {})
    pat = res.get("case", {}).get("patient") or {}
    who = pat.get("id") or pat.get("name") or Path(str(res.get("case", {}).get("file", "case"))).parent.name
    title = f"Re-irradiation cumulative dose report \u2013 {who}"
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
             f'<meta name="generator" content="{_e(sw.get("name"))} {_e(sw.get("version"))}">'
             f"<style>{CSS}</style></head><body>"]
    if prot.get("synthetic"):
        parts.append('<div class="banner">SYNTHETIC DEMONSTRATION \u2013 not a patient, not for clinical use</div>')
    parts.append(f'<header><h1>{_e(title)}</h1><div class="sub">{_e(sw.get("name"))} {_e(sw.get("version"))} \u00b7 '
                 f'generated {_e(res.get("case", {}).get("date"))} \u00b7 a decision aid: the treating clinician '
                 f'decides</div></header>')
    parts.append(f'<section id="identification"><h2>Patient and case</h2>{_identification(res)}</section>')
    parts.append(f'<section id="summary"><h2>Verdict</h2>{_verdict(res)}</section>')
    parts.append(f'<section id="courses"><h2>Courses, recovery and \u03b1/\u03b2</h2>{_courses(res)}</section>')
    parts.append(f'<section id="protocol"><h2>Protocol</h2>{_protocol(res)}</section>')
    opt = _optional(res, "registration")
    if opt:
        parts.append(opt)
    parts.append(f'<section id="constraints"><h2>Constraints</h2>{_constraints(res)}</section>')
    parts.append(f'<section id="robustness"><h2>Robustness: every limit over the range of its assumptions</h2>'
                 f'{_robustness(res)}</section>')
    if res.get("risk_estimates"):
        parts.append(f'<section id="risk"><h2>Temporal-lobe injury: published estimates (information only)</h2>'
                     f'{_risk(res)}</section>')
    for key in ("targets", "reirradiation_type", "remaining"):
        opt = _optional(res, key)
        if opt:
            parts.append(opt)
    from .report_workflow import patient_selection_section, prescription_section  # issue 16 sections
    parts.extend(s for s in (prescription_section(res), patient_selection_section(res)) if s)
    parts.append(f'<section id="structures"><h2>Structure metrics</h2>{_structures(res)}</section>')
    parts.append(f'<section id="warnings"><h2>Warnings</h2>{_warnings(res)}</section>')

    parts.append('<section id="dvh" class="figure"><h2>Dose-volume histograms (EQD2)</h2>' + _img(
        figs.get("dvh"), "DVH per organ",
        "Cumulative DVH of each organ structure with limits: solid coloured line = cumulative EQD2 (recovery credit "
        "applied, the structure's own \u03b1/\u03b2); grey dashed/dotted = each course's EQD2 without credit. "
        "Vertical lines: dose limits (solid = cumulative scope, dashed = current course; red = failed, green = "
        "met); triangles: volume limits. Shaded band: the cumulative DVH's range over the robustness scenarios "
        "(samplewise best and worst over \u03b1/\u03b2, recovery, registration shifts and dose scale: an envelope "
        "of every scenario's DVH). Curves are for reading shapes; the numbers are in the tables above.",
        "DVH plots not available (no dose arrays were passed to the report, or matplotlib is not installed).",
        tall=True)
        + "</section>")
    focus = figs.get("focus")
    if focus is not None:
        c = focus.constraint
        k, j, i = focus.index
        what = "worst violation" if focus.failing else "no limit failed; the constraint closest to its limit"
        cap = (f"Orthogonal slices through voxel (k, j, i) = ({k}, {j}, {i}) of the evaluation grid, the hottest voxel "
               f"of {_e(focus.structure)} in the {'cumulative EQD2' if focus.map_name == 'cumulative' else 'EQD2 of ' + _e(focus.map_name)} map "
               f"({what}: {_e(c.get('organ'))} {_e(c.get('metric'))} {_e(c.get('scope'))} = "
               f"{_e(fmt(c.get('value')))} {_e(c.get('unit'))}, limit {_e(fmt(c.get('limit')))} {_e(c.get('unit'))}). "
               f"Colour wash: EQD2 display map (per voxel the largest EQD2 over the \u03b1/\u03b2 and credit of the "
               f"organs covering it; default \u03b1/\u03b2 elsewhere), "
               f"not drawn below 5 Gy. Red hatched: the violation region of {_e(focus.structure)} (its voxels at or above "
               f"{_e(fmt(focus.threshold_gy))} Gy EQD2).")
    else:
        cap = ""
    parts.append('<section id="slices" class="figure"><h2>Slices through the worst violation</h2>' + _img(
        figs.get("slices"), "Orthogonal slices", cap,
        "Slices not available (no evaluated limit with a structure on the grid, or no arrays / matplotlib).")
        + "</section>")
    parts.append('<section id="view3d" class="figure"><h2>3D view</h2>' + _img(
        figs.get("view3d"), "3D view of organs, targets and violations",
        "Organs at risk (translucent), targets and margins (orange/yellow) and the voxels above a failed limit "
        "(red), seen from anterior-left; surfaces are voxel faces of the evaluation grid. Offscreen rendering.",
        "3D view not available (no arrays passed to the report, or no renderer).", tall=True) + "</section>")
    parts.append(f'<section id="assumptions"><h2>Model assumptions</h2>{_assumptions(res)}</section>')
    parts.append(f'<section id="disclaimer"><div class="disclaimer">{_e(DISCLAIMER)}</div></section>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_pdf(html_text: str, path: Path) -> bool:
    """``report.pdf`` via WeasyPrint if it is installed and its system libraries load; False otherwise."""
    try:
        import weasyprint  # noqa: PLC0415 - optional
    except Exception as exc:  # noqa: BLE001 - ImportError or OSError (missing Pango)
        log.info("report.pdf not written: WeasyPrint unavailable (%s); print report.html instead", exc)
        return False
    try:
        weasyprint.HTML(string=html_text).write_pdf(str(path))
        return True
    except Exception:  # noqa: BLE001
        log.warning("report.pdf could not be written; print report.html instead", exc_info=True)
        return False


def write_report(results, out_dir: Path, analysis=None, prepared=None, planning=None, pdf: bool = True,
                 figures=None) -> dict[str, str]:
    """Write ``report.html`` (and ``report.pdf`` when possible) into ``out_dir``; return {file: description}.

    ``results``: the ``Results`` tree (or the ``results.json`` dictionary). ``analysis`` / ``prepared``: the
    :class:`analysis.Analysis` and :class:`pipeline.Prepared` whose arrays the figures are drawn from (optional);
    ``planning``: the :class:`planning.Planning` (margins, violation regions) when computed. ``figures``: the
    callable :meth:`FiguresInChildProcess.start` returned (figures drawn beside the run), else they are drawn here.
    """
    out_dir = Path(out_dir)
    res = _results_dict(results)
    figs = figures() if figures is not None else make_figures(res, analysis, prepared, planning)
    text = render_html(res, figs)
    (out_dir / "report.html").write_text(text, encoding="utf-8")
    files = {"report.html": "Self-contained report (HTML, images embedded; prints cleanly)"}
    if pdf and write_pdf(text, out_dir / "report.pdf"):
        files["report.pdf"] = "The same report as PDF"
    return files
