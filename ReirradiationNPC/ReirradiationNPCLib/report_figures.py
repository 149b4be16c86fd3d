"""Figures of the report (matplotlib, Agg backend, PNG bytes): DVH curves, orthogonal slices, a 3D view.

Figures are drawn from the output arrays (EQD2 maps on the evaluation grid, structure crops, display DVH
curves); every number printed in the report comes from the results tree, never from here. Display choices
(colour scale, thresholds for drawing) are stated in each figure's caption by :mod:`report`.

Image orientation (identity direction cosines, LPS): axial slices are shown with the patient's left on the
viewer's right and anterior up (radiological convention); coronal and sagittal with superior up.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from .geometry import Grid, Volume, resample_linear
from .protocol import parse_metric
from .registration import target_box

log = logging.getLogger(__name__)

#: Cumulative EQD2 below this (Gy) is left uncoloured in the slice colour wash (display only).
WASH_FLOOR_GY = 5.0
_PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
            "#aec7e8", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5", "#dbdb8d", "#393b79",
            "#637939", "#8c6d31", "#843c39", "#7b4173"]


def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure on an Agg canvas: the object API, so no pyplot import (a tenth of a second), no global
    figure registry and no switch of the process's backend (Slicer has its own)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


#: zlib level of the figures' PNG (PIL's default 6 took twice the time for 1-10 % fewer bytes on the report's figures)
PNG_COMPRESS_LEVEL = 3


def _png(fig, dpi: int = 110, tight: bool = True) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None,
                pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return buf.getvalue()


@dataclass
class Focus:
    """The constraint the slices are centred on and the voxel (k, j, i) they pass through."""

    constraint: dict
    structure: str
    index: tuple[int, int, int]
    threshold_gy: float | None      # map value above which the structure's voxels are drawn as a violation
    map_name: str                   # "cumulative" or a course name
    failing: bool


def _threshold_gy(con: dict) -> float | None:
    """Dose level (Gy) that makes a voxel of the structure part of the violation region, for drawing."""
    try:
        m = parse_metric(con["metric"])
    except ValueError:
        return None
    if m.kind == "vgy":
        return m.param
    return con.get("limit")


def _map_for(con: dict, cumulative: np.ndarray, course_eqd2: dict, current: str) -> tuple[str, np.ndarray]:
    if con.get("scope") in ("current", "per_course"):
        course = con.get("course") or current
        if course in course_eqd2:
            return course, course_eqd2[course]
    return "cumulative", cumulative


def choose_focus(results: dict, structures, cumulative: np.ndarray, course_eqd2: dict) -> Focus | None:
    """The worst violation (largest excess over the limit, relative to the limit); if none fails, the
    evaluated constraint closest to its limit. Ranking only: the numbers shown come from the results."""
    by_name = {s.name: s for s in structures}
    courses = results.get("assumptions", {}).get("courses", [])
    current = courses[-1]["name"] if courses else ""
    cands = []
    for con in results.get("constraints", []):
        if con.get("value") is None or con.get("limit") is None or con.get("structure") not in by_name:
            continue
        if con.get("margin") is None:
            continue
        s = by_name[con["structure"]]
        if s.mask.size == 0 or not s.mask.any():
            continue
        rel = -con["margin"] / con["limit"] if con["limit"] else -con["margin"]
        cands.append((con.get("status") == "fail", rel, con, s))
    if not cands:
        return None
    failing, _, con, s = max(cands, key=lambda c: (c[0], c[1]))
    name, arr = _map_for(con, cumulative, course_eqd2, current)
    crop = np.where(s.mask, arr[s.box], -np.inf)
    kji = np.unravel_index(int(np.argmax(crop)), crop.shape)
    index = tuple(int(b.start + v) for b, v in zip(s.box, kji))
    return Focus(con, s.name, index, _threshold_gy(con), name, failing)


def _slab_grid(grid: Grid, axis: int, idx: int) -> Grid:
    """One-voxel-thick sub-grid of ``grid`` at numpy ``axis`` (0 k, 1 j, 2 i) position ``idx``."""
    lo = [0, 0, 0]
    hi = list(grid.size)
    ax_ijk = 2 - axis
    lo[ax_ijk], hi[ax_ijk] = idx, idx + 1
    return grid.subgrid(tuple(lo), tuple(hi))


def _ct_on(reference_image: Volume, grid: Grid) -> np.ndarray:
    """The CT linearly interpolated on ``grid`` (a slab of the evaluation grid; -1000 HU outside the CT), from the
    CT's box around that slab only (registration.target_box with 2 CT voxels of margin, so every interpolation
    neighbour is inside the box and the CT's own edges stay where they are): the whole CT converted for each slab
    took a second per figure."""
    ct_grid = reference_image.grid
    whole = tuple(slice(0, n) for n in grid.shape)
    box = target_box(grid, whole, ct_grid, None, pad_mm=2.0 * np.asarray(ct_grid.spacing))
    if box is None:           # the slab misses the CT
        return np.full(grid.shape, -1000.0, dtype=np.float32)
    lo, hi = tuple(b.start for b in box[::-1]), tuple(b.stop for b in box[::-1])
    sub = Volume(np.ascontiguousarray(reference_image.array[box]), ct_grid.subgrid(lo, hi))
    return resample_linear(sub, grid, default=-1000.0)


def _slice_of_crop(s, shape, axis: int, idx: int) -> np.ndarray | None:
    b = s.box
    if not (b[axis].start <= idx < b[axis].stop):
        return None
    out_shape = tuple(n for a, n in enumerate(shape) if a != axis)
    out = np.zeros(out_shape, dtype=bool)
    sel = [slice(None)] * 3
    sel[axis] = idx - b[axis].start
    part = s.mask[tuple(sel)]
    if not part.any():
        return None
    other = [b[a] for a in range(3) if a != axis]
    out[other[0], other[1]] = part
    return out


def _contour_lines(ax, us: np.ndarray, vs: np.ndarray, m2: np.ndarray, color: str, lw: float) -> list[np.ndarray]:
    """The 0.5 iso-lines of the bool slice ``m2`` sampled at (``us``, ``vs``), as (n, 2) arrays: contourpy's
    mpl2014 algorithm, the one ``Axes.contour`` uses by default, without building a contour set; without contourpy
    (older matplotlib) drawn by ``ax.contour`` and nothing returned."""
    try:
        from contourpy import LineType, contour_generator
    except ImportError:
        ax.contour(us, vs, m2.astype(np.float32), levels=[0.5], colors=[color], linewidths=lw)
        return []
    gen = contour_generator(us, vs, m2.astype(np.float64), name="mpl2014", line_type=LineType.SeparateCode)
    return [seg for seg in gen.lines(0.5)[0] if len(seg) > 1]     # closed lines end on their first point


#: the views of :func:`slices_figure`: (title, numpy axis across the slice)
_VIEWS = (("axial", 0), ("coronal", 1), ("sagittal", 2))


def ct_planes(grid: Grid, focus: Focus, reference_image: Volume | None) -> list[np.ndarray] | None:
    """The CT under each view of :func:`slices_figure` (axial, coronal, sagittal through ``focus.index``), as 2D
    arrays on the evaluation grid's slice; None without a CT. Separate from the drawing so that a process without
    the CT (the report's figure process, :class:`.report.FiguresInChildProcess`) can be given just these planes."""
    if reference_image is None:
        return None
    return [np.squeeze(_ct_on(reference_image, _slab_grid(grid, axis, focus.index[axis])), axis=axis)
            for _, axis in _VIEWS]


def slices_figure(grid: Grid, cumulative: np.ndarray, course_eqd2: dict, structures, focus: Focus,
                  reference_image: Volume | None, structure_colors: dict[str, str], violation=None,
                  ct: list[np.ndarray] | None = None) -> bytes:
    """Axial, coronal and sagittal slices through ``focus.index``: CT (if given), EQD2 colour wash,
    contours of every organ and target, and the violating voxels of the focus structure hatched in red
    (``violation``: an object with ``mask`` / ``box`` on ``grid``; default: the focus structure's voxels at or
    above the threshold in the displayed map). ``ct``: the CT planes of :func:`ct_planes` when already computed
    (``reference_image`` is then not read)."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    arr = cumulative if focus.map_name == "cumulative" else course_eqd2[focus.map_name]
    vmax = float(np.nanmax(arr)) if arr.size else 1.0
    sp = grid.spacing  # i, j, k
    k, j, i = focus.index
    views = [("axial", 0, k, (sp[0], sp[1]), "x (mm) \u2192 patient left", "y (mm) \u2192 posterior"),
             ("coronal", 1, j, (sp[0], sp[2]), "x (mm) \u2192 patient left", "z (mm) \u2192 superior"),
             ("sagittal", 2, i, (sp[1], sp[2]), "y (mm) \u2192 posterior", "z (mm) \u2192 superior")]
    if ct is None:
        ct = ct_planes(grid, focus, reference_image)
    fig = _figure((15, 5.6))
    axes = fig.subplots(1, 3)
    focus_s = next(s for s in structures if s.name == focus.structure)
    handles = {}
    im = None
    for n, (ax, (title, axis, idx, (su, sv), xl, yl)) in enumerate(zip(axes, views)):
        sel = [slice(None)] * 3
        sel[axis] = idx
        wash = arr[tuple(sel)].astype(np.float32)
        if axis != 0:
            wash = wash  # rows = k (inferior->superior), drawn with origin lower
        nv, nu = wash.shape
        # physical extent of the slice plane (identity direction assumed for labels)
        ou = grid.origin[0] if axis in (0, 1) else grid.origin[1]
        ov = grid.origin[1] if axis == 0 else grid.origin[2]
        extent = (ou - su / 2, ou + (nu - 0.5) * su, ov - sv / 2, ov + (nv - 0.5) * sv)
        origin = "upper" if axis == 0 else "lower"
        if axis == 0:
            extent = (extent[0], extent[1], extent[3], extent[2])
        if ct is not None:
            ax.imshow(ct[n], cmap="gray", vmin=-160, vmax=240, extent=extent, origin=origin,
                      interpolation="bilinear")
        else:
            ax.set_facecolor("black")
        masked = np.ma.masked_less(wash, WASH_FLOOR_GY)
        im = ax.imshow(masked, cmap="turbo", vmin=0, vmax=vmax, alpha=0.45, extent=extent, origin=origin,
                       interpolation="nearest")
        # contours on the same extent: contour() takes x/y coordinates of sample centres
        us = ou + np.arange(nu) * su
        vs = ov + np.arange(nv) * sv
        lines: list[tuple[np.ndarray, str, float]] = []
        for s in structures:
            if s.organ is None or s.organ.role == "body":
                continue
            m2 = _slice_of_crop(s, arr.shape, axis, idx)
            if m2 is None:
                continue
            col = structure_colors.get(s.name, "white")
            lw = 2.2 if s.name == focus.structure else 1.0
            lines.extend((seg, col, lw) for seg in _contour_lines(ax, us, vs, m2, col, lw))
            handles.setdefault(s.name, Line2D([0], [0], color=col, lw=lw))
        if lines:   # every organ's outline in one artist (a contour set per organ and view cost a fifth of the figure)
            ax.add_collection(LineCollection([seg for seg, _, _ in lines], colors=[c for _, c, _ in lines],
                                             linewidths=[w for _, _, w in lines]), autolim=False)
        if focus.threshold_gy is not None or violation is not None:
            m2 = _slice_of_crop(violation if violation is not None else focus_s, arr.shape, axis, idx)
            if m2 is not None:
                viol = m2 if violation is not None else m2 & (wash >= focus.threshold_gy)
                if viol.any():
                    red = ListedColormap(["#ff0000"])
                    ax.imshow(np.ma.masked_where(~viol, viol.astype(np.float32)), cmap=red, alpha=0.55,
                              extent=extent, origin=origin, interpolation="nearest")
                    ax.contourf(us, vs, viol.astype(np.float32), levels=[0.5, 1.5], colors="none",
                                hatches=["////"])
                    handles.setdefault("__viol__", Patch(facecolor="#ff0000", alpha=0.55, hatch="////",
                                                         label="violation"))
        cu, cv = {0: (i, j), 1: (i, k), 2: (j, k)}[axis]
        ax.axhline(ov + cv * sv, color="white", lw=0.5, ls=":")
        ax.axvline(ou + cu * su, color="white", lw=0.5, ls=":")
        ax.set_title(f"{title} (slice {idx})", fontsize=10, y=1.0)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.yaxis.set_major_locator(MaxNLocator(6))
        ax.set_aspect("equal")
    # fixed layout instead of a tight bounding box (that draws the whole figure twice); before the colour bar,
    # which takes its room from these axes
    fig.subplots_adjust(left=0.05, right=0.94, bottom=0.1 + 0.045 * ((len(handles) + 5) // 6), top=0.95,
                        wspace=0.3)
    cbar = fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01)
    cbar.set_label(("cumulative EQD2" if focus.map_name == "cumulative" else f"EQD2 of {focus.map_name}")
                   + " (Gy)", fontsize=9)
    labels = [("voxels of " + focus.structure + f" \u2265 {focus.threshold_gy:g} Gy") if n == "__viol__" else n
              for n in handles]
    fig.legend(list(handles.values()), labels, loc="lower center", ncol=min(6, max(1, len(handles))),
               fontsize=8, frameon=False, bbox_to_anchor=(0.45, 0.0))
    return _png(fig, tight=False)


def dvh_figure(results: dict, curves: dict, structure_colors: dict[str, str]) -> bytes | None:
    """Small multiples: one panel per organ structure with constraints (and targets), cumulative EQD2
    (solid, recovery credit applied) and each course's EQD2 (dashed, no credit), limits drawn.

    Drawn on one full-figure canvas whose coordinates are inches, each panel a box on it (frame, grid lines and
    tick marks of all panels as three line collections; tick labels only where needed): a matplotlib Axes per
    panel cost about 50 ms each to make and draw, most of this figure's time."""
    from matplotlib.collections import LineCollection
    from matplotlib.legend import Legend
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import Bbox, TransformedBbox

    cons_by_struct: dict[str, list[dict]] = {}
    for c in results.get("constraints", []):
        if c.get("structure"):
            cons_by_struct.setdefault(c["structure"], []).append(c)
    structs = [s for s in results.get("structures", []) if s["name"] in curves
               and (s["name"] in cons_by_struct or s.get("role") == "target")]
    if not structs:
        return None
    courses = [c["name"] for c in results.get("assumptions", {}).get("courses", [])]
    ncol = 4
    nrow = (len(structs) + ncol - 1) // ncol
    fig_w, fig_h = 4.0 * ncol, 2.9 * nrow
    fig = _figure((fig_w, fig_h))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(0, fig_h)
    ax.axis("off")
    # panel boxes (inches): the spacing of the former subplots layout (left 5 %, right 1 %, gaps 0.25 / 0.55 of a
    # panel's width / height)
    left, right, bottom, top = 0.05 * fig_w, 0.01 * fig_w, 0.5, 0.55
    pw = (fig_w - left - right) / (ncol + 0.25 * (ncol - 1))
    ph = (fig_h - bottom - top) / (nrow + 0.55 * (nrow - 1))
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    key = [Line2D([0], [0], ls=styles[n % len(styles)], color="0.45", lw=1.0) for n in range(len(courses))]
    key.append(Line2D([0], [0], color="black", lw=2.0))
    fig.legend(key, [f"{c} (EQD2, no credit)" for c in courses] + ["cumulative EQD2 (structure colour)"],
               loc="upper center", ncol=len(key), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    frames, grid, ticks = [], [], []      # panel frames, grid lines, tick marks: one line collection each
    tick_len = 3.5 / 72.0                                        # inches, matplotlib's default major tick
    vol_ticks = [0, 20, 40, 60, 80, 100]
    for n_ax, s in enumerate(structs):
        r, c = divmod(n_ax, ncol)
        x0 = left + c * 1.25 * pw
        y0 = fig_h - top - (r + 1) * ph - r * 0.55 * ph
        clip = TransformedBbox(Bbox.from_extents(x0, y0, x0 + pw, y0 + ph), ax.transData)
        cv = curves[s["name"]]
        col = structure_colors.get(s["name"], "black")
        # first the dose range (as the former autoscaled x axis: the curves' ends and dose limits x 1.05)
        xmax = 1.0
        for course in courses:
            if course in cv:
                xmax = max(xmax, float(cv[course].dose_gy[-1]))
        if "cumulative" in cv:
            xmax = max(xmax, float(cv["cumulative"].dose_gy[-1]))
        band = None
        if "robust_worst" in cv and "robust_best" in cv:
            hi, lo = cv["robust_worst"], cv["robust_best"]
            nb = max(hi.dose_gy.size, lo.dose_gy.size)
            dose = np.arange(nb) * float(hi.dose_gy[1] - hi.dose_gy[0] if hi.dose_gy.size > 1 else 0.1)
            band = (dose, np.interp(dose, lo.dose_gy, lo.volume_percent, right=0.0),
                    np.interp(dose, hi.dose_gy, hi.volume_percent, right=0.0))
            xmax = max(xmax, float(dose[-1]))
        limits = []
        for con in cons_by_struct.get(s["name"], []):
            lim = con.get("limit")
            if lim is None:
                continue
            try:
                m = parse_metric(con["metric"])
            except ValueError:
                continue
            limits.append((con, m, lim))
            if m.kind != "vgy":
                xmax = max(xmax, lim * 1.05)
        xl = xmax * 1.02

        def X(d, x0=x0, xl=xl):
            return x0 + np.asarray(d, dtype=float) / xl * pw

        def Y(v, y0=y0):
            return y0 + np.asarray(v, dtype=float) / 102.0 * ph

        def add(artist, clip=clip):
            artist.set_clip_box(clip)
            return artist

        for n, course in enumerate(courses):
            if course in cv:
                add(ax.plot(X(cv[course].dose_gy), Y(cv[course].volume_percent), ls=styles[n % len(styles)],
                            color="0.45", lw=1.0)[0])
        entries = []
        if band is not None:
            add(ax.fill_between(X(band[0]), Y(band[1]), Y(band[2]), color=col, alpha=0.2, lw=0))
            entries.append((Patch(facecolor=col, alpha=0.2, lw=0), "robustness band (best-worst)"))
        if "cumulative" in cv:
            add(ax.plot(X(cv["cumulative"].dose_gy), Y(cv["cumulative"].volume_percent), color=col, lw=2.0)[0])
        for con, m, lim in limits:
            colr = "#c00000" if con.get("status") == "fail" else "#2a7a2a"
            ls = "-" if con.get("scope") == "cumulative" else "--"
            tag = f"{con['metric']} \u2264 {lim:g} {con['unit']} ({con['scope']})"
            if m.kind == "vgy":
                vol = s.get("volume_cc") or 0
                y = lim if con["unit"] == "%" else (100.0 * lim / vol if vol else None)
                if y is not None:
                    add(ax.plot([X(m.param)], [Y(y)], marker="v", color=colr, ms=8, ls="none")[0])
                    add(ax.plot([X(m.param)] * 2, [y0, y0 + ph], color=colr, lw=0.6, ls=":")[0])
                    entries.append((Line2D([0], [0], marker="v", color=colr, ms=8, ls="none"), tag))
            else:
                add(ax.plot([X(lim)] * 2, [y0, y0 + ph], color=colr, lw=1.2, ls=ls)[0])
                entries.append((Line2D([0], [0], color=colr, lw=1.2, ls=ls), tag))
        frames.append([(x0, y0), (x0 + pw, y0), (x0 + pw, y0 + ph), (x0, y0 + ph), (x0, y0)])
        xt = [v for v in MaxNLocator(5).tick_values(0.0, xl) if -1e-9 <= v <= xl * (1 + 1e-9)]
        for v in xt:
            xv = float(X(v))
            grid.append([(xv, y0), (xv, y0 + ph)])
            ticks.append([(xv, y0), (xv, y0 - tick_len)])
            ax.text(xv, y0 - tick_len - 0.04, f"{v:g}", ha="center", va="top", fontsize=7)
        for v in vol_ticks:
            yv = float(Y(v))
            grid.append([(x0, yv), (x0 + pw, yv)])
            ticks.append([(x0, yv), (x0 - tick_len, yv)])
            if c == 0:
                ax.text(x0 - tick_len - 0.04, yv, f"{v:g}", ha="right", va="center", fontsize=7)
        ax.text(x0 + pw / 2, y0 + ph + 0.08,
                f"{s['name']} ({s.get('organ') or 'unmatched'}, \u03b1/\u03b2 {s['alpha_beta']:g} Gy)",
                ha="center", va="bottom", fontsize=9)
        ax.text(x0 + pw / 2, y0 - 0.24, "EQD2 (Gy)", ha="center", va="top", fontsize=8)
        if c == 0:
            ax.text(x0 - 0.36, y0 + ph / 2, "volume (%)", ha="right", va="center", rotation=90, fontsize=8)
        if entries:
            leg = Legend(ax, [h for h, _ in entries], [t for _, t in entries], fontsize=6, loc="upper right",
                         bbox_to_anchor=Bbox.from_extents(x0, y0, x0 + pw, y0 + ph), bbox_transform=ax.transData)
            ax.add_artist(leg)
    ax.add_collection(LineCollection(grid, colors="#b0b0b0", linewidths=0.8, alpha=0.3, zorder=0.5), autolim=False)
    ax.add_collection(LineCollection(ticks, colors="black", linewidths=0.8), autolim=False)
    ax.add_collection(LineCollection(frames, colors="black", linewidths=0.8, zorder=2.5), autolim=False)
    return _png(fig, dpi=90, tight=False)


# ------------------------------------------------------------------------------------------ 3D view

_FACE_OFFSETS = {}


def _face_corners(axis: int, sign: int) -> np.ndarray:
    """(4, 3) corner offsets in (k, j, i) voxel units of the face of a voxel on ``axis`` side ``sign``."""
    key = (axis, sign)
    if key not in _FACE_OFFSETS:
        others = [a for a in range(3) if a != axis]
        corners = []
        for du, dv in ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)):
            c = [0.0, 0.0, 0.0]
            c[axis] = 0.5 * sign
            c[others[0]], c[others[1]] = du, dv
            corners.append(c)
        _FACE_OFFSETS[key] = np.asarray(corners)
    return _FACE_OFFSETS[key]


def boundary_faces(mask: np.ndarray, box, grid: Grid, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exposed voxel faces of a cropped mask: vertices (F, 4, 3) in LPS mm and normals (F, 3) in index axes
    (k, j, i) order. ``step`` > 1 subsamples the mask (display only)."""
    m = mask[::step, ::step, ::step]
    p = np.pad(m, 1)
    verts, normals = [], []
    for axis in range(3):
        for sign in (-1, 1):
            nb = np.roll(p, -sign, axis=axis)
            exposed = (p & ~nb)[1:-1, 1:-1, 1:-1]
            idx = np.argwhere(exposed).astype(np.float64)
            if idx.size == 0:
                continue
            kji = idx[:, None, :] + _face_corners(axis, sign)[None, :, :]
            kji = kji * step + np.array([b.start for b in box], dtype=np.float64) + (step - 1) / 2.0
            ijk = kji[..., ::-1].reshape(-1, 3)
            verts.append(grid.index_to_physical(ijk).reshape(-1, 4, 3))
            n = np.zeros(3)
            n[axis] = sign
            normals.append(np.repeat(n[None], len(idx), axis=0))
    if not verts:
        return np.zeros((0, 4, 3)), np.zeros((0, 3))
    return np.concatenate(verts), np.concatenate(normals)


def view3d_figure(layers: list[tuple], max_faces: int = 60000, focus: list[str] = (), focus_pad_mm: float = 45.0
                  ) -> bytes:
    """A simple 3D view (matplotlib, offscreen). ``layers``: (label, crop mask, box, grid, colour, alpha) drawn
    as voxel-face surfaces lit by a fixed light; a label starting with "violation" is not put in the legend.
    ``focus``: labels whose extent (padded by ``focus_pad_mm``) bounds the view; faces outside are not drawn."""
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    light = np.array([0.7, -0.6, 0.35])  # (k, j, i) index-axis weights: from superior, anterior, patient left
    light /= np.linalg.norm(light)
    total = sum(int(m.sum()) for _, m, _, _, _, _ in layers)
    step = 1
    while total / step ** 2 > max_faces * 0.6 and step < 8:  # faces scale ~ with surface, i.e. 1/step^2
        step += 1
    # fixed layout (a tight bounding box draws the whole 3D scene twice): the view on the left, the key on the right
    fig = _figure((8.8, 5.6))
    ax = fig.add_axes((0.0, 0.0, 0.68, 1.0), projection="3d")
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    legend = []
    has_violation = False
    faces = [(name, *boundary_faces(m, box, grid, step=step), col, alpha) for name, m, box, grid, col, alpha in layers]
    f_lo, f_hi = np.full(3, np.inf), np.full(3, -np.inf)
    for name, v, _n, _c, _a in faces:
        if len(v) and (name in focus or name.startswith("violation")):
            f_lo = np.minimum(f_lo, v.reshape(-1, 3).min(axis=0) - focus_pad_mm)
            f_hi = np.maximum(f_hi, v.reshape(-1, 3).max(axis=0) + focus_pad_mm)
    for name, v, n, col, alpha in faces:
        if len(v) and np.all(np.isfinite(f_lo)):
            c = v.mean(axis=1)
            keep = np.all((c >= f_lo) & (c <= f_hi), axis=1)
            v, n = v[keep], n[keep]
        if len(v) == 0:
            continue
        shade = 0.55 + 0.45 * np.clip(n @ light, 0, None)
        rgba = np.tile(np.asarray(to_rgba(col, alpha)), (len(v), 1))
        rgba[:, :3] *= shade[:, None]
        ax.add_collection3d(Poly3DCollection(v, facecolors=rgba, edgecolors="none", linewidths=0))
        lo = np.minimum(lo, v.reshape(-1, 3).min(axis=0))
        hi = np.maximum(hi, v.reshape(-1, 3).max(axis=0))
        if name.startswith("violation"):
            has_violation = True
        else:
            legend.append(Patch(facecolor=col, alpha=min(1.0, alpha * 2.5), label=name))
    if has_violation:
        legend.append(Patch(facecolor="#e00000", label="violation (organ voxels above a failed limit)"))
    if np.all(np.isfinite(lo)):
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1])  # anterior (small y) towards the viewer
        ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect(tuple(np.maximum(hi - lo, 1.0)))
    ax.view_init(elev=18, azim=-62)
    ax.set_xlabel("x (mm, left)", fontsize=8)
    ax.set_ylabel("y (mm, posterior)", fontsize=8)
    ax.set_zlabel("z (mm, superior)", fontsize=8)
    ax.tick_params(labelsize=6)
    fig.legend(handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(0.69, 0.97), frameon=False,
               ncol=1 + (len(legend) - 1) // 34 if legend else 1)
    return _png(fig, dpi=100, tight=False)


def layers_3d(grid: Grid, structures, colors: dict[str, str], violations: list[tuple], margins=None) -> list[tuple]:
    """Layers of the 3D view: organs (translucent), targets, margin volumes (CTV/PTV), violations (red)."""
    layers = []
    for s in structures:
        if s.organ is None or s.organ.role == "body" or s.mask.size == 0:
            continue
        if s.organ.role == "target":
            layers.append((s.name, s.mask, s.box, grid, "#ff8c00", 0.4))
        else:
            layers.append((s.name, s.mask, s.box, grid, colors.get(s.name, "#4477aa"), 0.16))
    if margins is not None:
        for key, col, alpha in (("CTV", "#ffd700", 0.18), ("PTV", "#00bfff", 0.12)):
            arr = getattr(margins, key.lower(), None)
            if arr is not None and arr.any():
                layers.append((margins.names.get(key, key), arr, margins.box, margins.grid, col, alpha))
    for name, m, box in violations:
        layers.append((name if name.startswith("violation") else "violation " + name, m, box, grid, "#e00000", 0.95))
    return layers


def structure_colors(names: list[str]) -> dict[str, str]:
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(names)}


def violation_masks(results: dict, structures, cumulative: np.ndarray, course_eqd2: dict
                    ) -> list[tuple[str, np.ndarray, tuple]]:
    """For each failed constraint: the structure's voxels whose map value reaches the violation threshold
    (limit for dose metrics, x for V<x>Gy), as (label, crop mask, box). Drawing only."""
    by_name = {s.name: s for s in structures}
    courses = results.get("assumptions", {}).get("courses", [])
    current = courses[-1]["name"] if courses else ""
    out = []
    for con in _failed(results, by_name):
        s = by_name[con["structure"]]
        _, arr = _map_for(con, cumulative, course_eqd2, current)
        out.append((f"violation {s.name} {con['metric']}", s.mask & (arr[s.box] >= _threshold_gy(con)), s.box))
    return out


def _failed(results: dict, by_name: dict) -> list[dict]:
    return [c for c in results.get("constraints", []) if c.get("status") == "fail" and c.get("structure") in by_name
            and _threshold_gy(c) is not None and by_name[c["structure"]].mask.size]


def failed_keys(results: dict, structures) -> list[tuple]:
    """(structure, metric, scope) of each region :func:`violation_masks` returns, in the same order."""
    by_name = {s.name: s for s in structures}
    return [(c["structure"], c["metric"], c["scope"]) for c in _failed(results, by_name)]
