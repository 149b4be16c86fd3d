"""The side panels of ``reirradiation-npc review``, as plain data (no trame, no Slicer): the cumulative EQD2 DVH of
one organ with its limits drawn (an SVG string), and the registration QA figures of each prior course.

DVH of the selected organ
    The curve is computed from the run's **check map** of the organ's basis, never from the display map (the display
    map mixes neighbouring organs' alpha/beta and credit at the organ's edge; docs/outputs.md): the map named by
    ``structures[].check_on_file`` — ``nrrd`` (the organ's alpha/beta, its recovery credit: the table's
    ``metrics.cumulative``) or, for a row judged on the undiscounted sum of a credited organ, ``undiscounted.nrrd``.
    It is sampled inside the organ's segment with the engine's own sub-voxel sampling (``sampling.sample_structure``,
    with the subdivision the run recorded in ``structures[].sampling``) and binned like the report's curves
    (``dvh_curves.cumulative_dvh``, 0.1 Gy). The engine computed EQD2 per sample from the interpolated physical doses;
    the check map holds EQD2 per voxel, interpolated: the curve can differ from the table by a fraction of a
    percent near steep gradients. It is for reading shapes; the numbers are the table's.

    Limits (cumulative-scope rows of the organ) are drawn on the curve: a dose limit as a vertical line at the
    limit, with its point at the metric's volume (``D0.03cc`` at 0.03 cc; Dmax at 0 cc); a volume limit (``V40Gy``
    <= 1 cc) as a point at (40 Gy, 1 cc) with a horizontal tick; the judged value as a hollow circle. Red when the
    row fails, amber when it warns, green when it passes, grey otherwise. Rows of another scope (current course,
    per course) are judged on another dose and are listed under the plot, not drawn.

The MRML/trame side is :mod:`.mrml_web_panels`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .dvh_curves import DVHCurve, cumulative_dvh
from .geometry import Grid
from .protocol import parse_metric

STATUS_COLORS = {"fail": "#d62728", "warn": "#e69500", "pass": "#2ca02c"}
OTHER_COLOR = "#7f7f7f"
CURVE_COLOR = "#1f4e9c"


# ------------------------------------------------------------------------------------------------------- DVH

@dataclass
class CurveSource:
    """Which map of the run the curve of ``structure`` is computed from, and why."""
    structure: str
    basis: str                 # "credited" | "undiscounted" | "display"
    file: Optional[str]        # file name in the results folder (None: nothing to draw on)
    alpha_beta: Optional[float]
    text: str                  # one line for the page: the basis stated


def structure_entry(results: dict, structure: str) -> Optional[dict]:
    for s in results.get("structures") or []:
        if isinstance(s, dict) and s.get("name") == structure:
            return s
    return None


def organ_rows(results: dict, structure: str) -> list:
    """(index, row) of every constraint row of ``structure``, in results.json order."""
    return [(i, c) for i, c in enumerate(results.get("constraints") or [])
            if isinstance(c, dict) and (c.get("structure") or c.get("organ")) == structure]


def curve_source(results: dict, structure: str, basis: Optional[str] = None) -> CurveSource:
    """The check map to draw ``structure``'s cumulative DVH on, for a row judged on ``basis``.

    ``basis`` "undiscounted" picks ``check_on_file.undiscounted`` when the organ has one (a credited organ), else
    ``check_on_file.nrrd`` (the same sum: no credit). Without ``check_on_file`` (older results) the display map
    ``cumulative_eqd2.nrrd`` is used and the text says it is not the table's basis."""
    s = structure_entry(results, structure) or {}
    cof = s.get("check_on_file") if isinstance(s.get("check_on_file"), dict) else None
    ab = cof.get("alpha_beta") if cof else s.get("alpha_beta")
    ab_text = f"alpha/beta {ab:g} Gy" if isinstance(ab, (int, float)) else "alpha/beta not recorded"
    if cof is None or not cof.get("nrrd"):
        return CurveSource(structure, "display", "cumulative_eqd2.nrrd", ab,
                           f"{structure}: drawn on the DISPLAY map cumulative_eqd2.nrrd (this run names no check "
                           "map for it): mixes neighbouring organs' alpha/beta at its edge; not the table's basis")
    credit = cof.get("recovery_credit") or {}
    credited = any(float(v or 0) > 0 for v in credit.values())
    undisc = cof.get("undiscounted") if isinstance(cof.get("undiscounted"), dict) else None
    if basis == "undiscounted" and credited and undisc and undisc.get("nrrd"):
        return CurveSource(structure, "undiscounted", str(undisc["nrrd"]), ab,
                           f"{structure}: cumulative EQD2, {ab_text}, undiscounted sum of the courses (no recovery "
                           f"credit; the basis of this limit), from {undisc['nrrd']}")
    if credited:
        ctext = ", ".join(f"{k} {100 * float(v):g}%" for k, v in credit.items())
        what = (f"recovery credit applied ({ctext}; the credited sum)" +
                ("" if basis != "undiscounted" else
                 " — this limit is on the UNDISCOUNTED sum but the run names no undiscounted map"))
        return CurveSource(structure, "credited", str(cof["nrrd"]), ab,
                           f"{structure}: cumulative EQD2, {ab_text}, {what}, from {cof['nrrd']}")
    return CurveSource(structure, "undiscounted", str(cof["nrrd"]), ab,
                       f"{structure}: cumulative EQD2, {ab_text}, no recovery credit (undiscounted = credited sum), "
                       f"from {cof['nrrd']}")


def sampling_factors(results: dict, structure: str) -> Optional[tuple]:
    """The (i, j, k) sub-voxel subdivision the run used for ``structure`` (None: let the sampler choose)."""
    s = structure_entry(results, structure) or {}
    sub = (s.get("sampling") or {}).get("subdivision_ijk") if isinstance(s.get("sampling"), dict) else None
    if isinstance(sub, (list, tuple)) and len(sub) == 3:
        return tuple(int(x) for x in sub)
    return None


def organ_curve(mask: np.ndarray, mask_grid: Grid, dose: np.ndarray, dose_grid: Grid,
                factors: Optional[tuple] = None) -> DVHCurve:
    """Cumulative DVH (Gy, cc) of ``dose`` (indexed k, j, i on ``dose_grid``) inside the bool ``mask`` (k, j, i on
    ``mask_grid``): the engine's sub-voxel samples, trilinear dose, 0.1 Gy bins."""
    from .sampling import crop_to_structure, sample_structure
    mask = np.asarray(mask, bool)
    if not mask.any():
        return cumulative_dvh(np.zeros(0), 0.0)
    crop, grid = crop_to_structure(mask, mask_grid)
    samples = sample_structure(crop, grid, factors=factors)
    return cumulative_dvh(samples.dose(np.asarray(dose), dose_grid), samples.sample_volume_cc)


def dose_at_volume(curve: DVHCurve, volume_cc: float) -> float:
    """Highest bin edge (Gy) whose volume is still >= ``volume_cc`` (reads D<x>cc off the binned curve: at most one
    bin, 0.1 Gy, below the continuous value)."""
    ok = np.nonzero(curve.volume_cc >= volume_cc - 1e-12)[0]
    return float(curve.dose_gy[ok[-1]]) if ok.size else 0.0


def volume_at_dose(curve: DVHCurve, dose_gy: float) -> float:
    """Volume (cc) receiving at least ``dose_gy``, linear between bin edges."""
    return float(np.interp(dose_gy, curve.dose_gy, curve.volume_cc))


@dataclass
class LimitMark:
    """One constraint row drawn on the DVH: where its limit and its judged value sit (Gy, cc)."""
    index: int                 # row index in results.json constraints
    label: str                 # e.g. "D0.03cc <= 50 Gy: 62.91 Gy (fail)"
    status: str
    kind: str                  # "dose" (vertical line at the limit) | "volume" (point with a horizontal tick)
    limit_gy: Optional[float]  # x of the limit (dose limits: the limit; volume limits: the metric's dose)
    limit_cc: Optional[float]  # y of the limit point (dose limits: the metric's volume; volume limits: the limit)
    value_gy: Optional[float]  # the judged value's point
    value_cc: Optional[float]
    basis: str = ""

    @property
    def color(self) -> str:
        return STATUS_COLORS.get(self.status, OTHER_COLOR)


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def limit_marks(results: dict, structure: str) -> tuple:
    """(marks, not_drawn): the cumulative-scope rows of ``structure`` with a limit, as LimitMark; and one text line
    per row that is not drawn (other scope, no limit, unknown metric)."""
    s = structure_entry(results, structure) or {}
    total = _num(s.get("volume_cc"))
    marks, skipped = [], []
    for i, c in organ_rows(results, structure):
        metric, status = str(c.get("metric") or ""), str(c.get("status") or "?")
        limit, value, unit = _num(c.get("limit")), _num(c.get("value")), str(c.get("unit") or "")
        scope = c.get("scope") or "cumulative"
        desc = f"{metric} {scope}{' ' + str(c.get('course')) if c.get('course') else ''}"
        if scope != "cumulative":
            skipped.append(f"{desc}: {status} (judged on {'the current course' if scope == 'current' else 'each course'}"
                           "'s own EQD2, not on this curve)")
            continue
        if limit is None:
            skipped.append(f"{desc}: {status} (no limit)")
            continue
        try:
            m = parse_metric(metric)
        except ValueError:
            skipped.append(f"{desc}: {status} (metric not drawable)")
            continue
        basis = str(c.get("basis") or "")
        vtxt = "—" if value is None else f"{value:.2f} {unit}"
        sign = ">=" if m.kind == "min" else "<="
        label = f"{metric} {sign} {limit:g} {unit}: {vtxt} ({status})"

        def cc(x):  # a volume in the row's unit -> cc
            if x is None:
                return None
            if unit == "%":
                return None if total is None else x * total / 100.0
            return x
        if m.kind == "vgy":
            marks.append(LimitMark(i, label, status, "volume", m.param, cc(limit), m.param, cc(value), basis))
            continue
        if m.kind == "dcc":
            at = m.param
        elif m.kind == "dpct":
            at = None if total is None else m.param * total / 100.0
        elif m.kind == "max":
            at = 0.0
        elif m.kind == "min" and total is not None:
            at = total
        else:  # mean: not a point of the curve; a vertical line at the limit, the value on the dose axis
            at = None
        marks.append(LimitMark(i, label, status, "dose", limit, at, value, at if at is not None else 0.0, basis))
    return marks, skipped


def _nice_step(span: float, n: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    for f in (1, 2, 2.5, 5, 10):
        if raw <= f * mag:
            return f * mag
    return 10 * mag


def dvh_svg(curve: Optional[DVHCurve], marks: list, title: str, note: str = "", width: int = 460,
            height: int = 250) -> str:
    """The DVH (x: cumulative EQD2 Gy, y: volume cc) with the limit marks, as an inline SVG string.

    Elements carry classes for reading back: ``dvh-curve``, ``dvh-limit status-<status>``, ``dvh-value``."""
    L, R, T, B = 52, 12, 24, 36
    pw, ph = width - L - R, height - T - B
    esc = html.escape
    xs_max = [m.limit_gy for m in marks if m.limit_gy is not None] + \
             [m.value_gy for m in marks if m.value_gy is not None]
    has = curve is not None and curve.total_cc > 0
    if has:
        nz = np.nonzero(curve.volume_cc > 0)[0]
        xs_max.append(float(curve.dose_gy[nz[-1] + 1]) if nz.size and nz[-1] + 1 < curve.dose_gy.size else
                      float(curve.dose_gy[-1]))
    xmax = max(xs_max + [1.0]) * 1.05
    ys = [m.limit_cc for m in marks if m.limit_cc is not None] + [m.value_cc for m in marks if m.value_cc is not None]
    ymax = max(([curve.total_cc] if has else []) + ys + [0.01]) * 1.05
    xstep, ystep = _nice_step(xmax), _nice_step(ymax, 4)

    def X(x):
        return L + pw * min(max(x, 0.0), xmax) / xmax

    def Y(y):
        return T + ph * (1.0 - min(max(y, 0.0), ymax) / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
           f'<text x="{L}" y="14" font-size="11" font-weight="bold">{esc(title)}</text>']
    # axes and grid
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    x = 0.0
    while x <= xmax + 1e-9:
        out.append(f'<line x1="{X(x):.1f}" y1="{T}" x2="{X(x):.1f}" y2="{T + ph}" stroke="#e4e4e4"/>'
                   f'<text x="{X(x):.1f}" y="{T + ph + 12}" text-anchor="middle">{x:g}</text>')
        x += xstep
    y = 0.0
    while y <= ymax + 1e-9:
        out.append(f'<line x1="{L}" y1="{Y(y):.1f}" x2="{L + pw}" y2="{Y(y):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{L - 4}" y="{Y(y) + 3:.1f}" text-anchor="end">{y:g}</text>')
        y += ystep
    out.append(f'<text x="{L + pw / 2:.0f}" y="{height - 4}" text-anchor="middle">cumulative EQD2 (Gy)</text>'
               f'<text x="12" y="{T + ph / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {T + ph / 2:.0f})">volume (cc)</text>')
    if has:
        pts = " ".join(f"{X(d):.1f},{Y(v):.1f}" for d, v in zip(curve.dose_gy, curve.volume_cc))
        out.append(f'<polyline class="dvh-curve" points="{pts}" fill="none" stroke="{CURVE_COLOR}" '
                   'stroke-width="1.8"/>')
    else:
        out.append(f'<text x="{L + 8}" y="{T + 16}">no curve: {esc(note or "no dose samples")}</text>')
    for n, m in enumerate(marks):
        cls = f"dvh-limit status-{esc(m.status)}"
        tip = f"<title>{esc(m.label)}</title>"
        if m.limit_gy is not None:  # the limit's text beside it, staggered when an organ has several
            lx = X(m.limit_gy)
            anchor = "end" if lx > L + pw * 0.6 else "start"
            out.append(f'<text class="dvh-limit-label" x="{lx + (-4 if anchor == "end" else 4):.1f}" '
                       f'y="{T + 11 + 12 * n}" text-anchor="{anchor}" fill="{m.color}">{esc(m.label)}</text>')
        if m.kind == "dose" and m.limit_gy is not None:
            out.append(f'<g class="{cls}">{tip}<line x1="{X(m.limit_gy):.1f}" y1="{T}" x2="{X(m.limit_gy):.1f}" '
                       f'y2="{T + ph}" stroke="{m.color}" stroke-width="2" stroke-dasharray="5,3"/>')
            if m.limit_cc is not None:
                out.append(f'<circle cx="{X(m.limit_gy):.1f}" cy="{Y(m.limit_cc):.1f}" r="4" fill="{m.color}"/>')
            out.append("</g>")
        elif m.kind == "volume" and m.limit_gy is not None and m.limit_cc is not None:
            out.append(f'<g class="{cls}">{tip}<line x1="{X(m.limit_gy) - 14:.1f}" y1="{Y(m.limit_cc):.1f}" '
                       f'x2="{X(m.limit_gy) + 14:.1f}" y2="{Y(m.limit_cc):.1f}" stroke="{m.color}" '
                       f'stroke-width="2.5"/><circle cx="{X(m.limit_gy):.1f}" cy="{Y(m.limit_cc):.1f}" r="4" '
                       f'fill="{m.color}"/></g>')
        if m.value_gy is not None and m.value_cc is not None:
            out.append(f'<circle class="dvh-value" cx="{X(m.value_gy):.1f}" cy="{Y(m.value_cc):.1f}" r="5" '
                       f'fill="none" stroke="{m.color}" stroke-width="2"><title>judged value: {esc(m.label)}'
                       '</title></circle>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------- registration

@dataclass
class CourseRegistration:
    """A prior course's registration as the review shows it."""
    course: str
    method: str
    registered_ct: Optional[str]        # file in the results folder: the prior CT on the reference CT grid
    figures: list = field(default_factory=list)   # (label, text)


def _f(x, fmt="{:.3f}", unit=""):
    v = _num(x)
    return "—" if v is None else fmt.format(v) + unit


def registration_summary(results: dict) -> list:
    """One CourseRegistration per prior course of results.json ``registration`` (in file order), with its QA
    figures as display text: method, Mattes MI before/after, rotation, translation, Jacobian determinant, Dice,
    notes. Absent figures are shown as "—"; an identity registration has no prior CT to blend."""
    out = []
    reg = results.get("registration") or {}
    if not isinstance(reg, dict):
        return out
    for name, r in reg.items():
        if not isinstance(r, dict):
            continue
        figs = [("method", str(r.get("method") or "—"))]
        before, after = _num(r.get("mattes_mi_before")), _num(r.get("mattes_mi_after"))
        mi = f"{_f(before)} -> {_f(after)} nats"
        if before is not None and after is not None:
            mi += " (higher = better aligned)" if after >= before else " (LOWER after registration: check it)"
        figs.append(("Mattes MI before -> after", mi))
        if _num(r.get("rotation_deg")) is not None:
            figs.append(("rotation", _f(r.get("rotation_deg"), "{:.2f}", " deg")))
        t = r.get("translation_mm")
        if isinstance(t, (list, tuple)) and len(t) == 3 and all(_num(v) is not None for v in t):
            figs.append(("translation (LPS)", "(" + ", ".join(f"{float(v):.1f}" for v in t) + ") mm, |t| "
                         f"{math.sqrt(sum(float(v) ** 2 for v in t)):.1f} mm"))
        if _num(r.get("max_bspline_displacement_mm")) is not None:
            figs.append(("max B-spline displacement", _f(r.get("max_bspline_displacement_mm"), "{:.1f}", " mm")))
        jac = r.get("jacobian_determinant")
        if isinstance(jac, dict):
            parts = [f"{k} {_f(v, '{:.3g}')}" for k, v in jac.items() if _num(v) is not None]
            figs.append(("Jacobian determinant", ", ".join(parts) or "—"))
        dice = r.get("dice")
        if isinstance(dice, dict) and dice:
            parts = []
            for k, v in dice.items():
                d = v.get("dice") if isinstance(v, dict) else v
                other = v.get("current") if isinstance(v, dict) else None
                parts.append(f"{k}{' vs ' + str(other) if other and other != k else ''} {_f(d, '{:.2f}')}")
            figs.append(("Dice (prior structures mapped)", "; ".join(parts)))
        if _num(r.get("time_s")) is not None:
            figs.append(("time", _f(r.get("time_s"), "{:.1f}", " s")))
        for n in r.get("notes") or []:
            figs.append(("note", str(n)))
        ct = r.get("registered_prior_ct")
        out.append(CourseRegistration(str(name), str(r.get("method") or "—"), str(ct) if ct else None, figs))
    return out
