"""Robust verdict: every constraint row under the plausible range of its assumptions.

The ranges are protocol data (:mod:`.robustness_spec`): per organ an alpha/beta range, recovery credit from none to
the protocol's credit, a registration uncertainty (mm) per prior course (case key ``registration_uncertainty_mm``,
default from the protocol) and an optional dose-calculation uncertainty (+-%). See docs/science.md, "Robustness".

Scenarios (per constraint row, on the structure's own sub-voxel samples; nothing is recomputed on the full grid):

- alpha/beta at the two ends of the organ's range (for every course at once);
- recovery credit r at its two ends (0 and the protocol's credit; credited rows only - an undiscounted row has none);
- every course's dose scaled by (1 - p) and (1 + p) (p = dose-calculation uncertainty);
- each prior course's dose displaced by its registration uncertainty s along 26 directions (the 6 axes, the 12
  face diagonals and the 8 body diagonals, each a unit vector times s: every shift has length s) or the 6 axes
  only (protocol ``registration_directions: 6``), plus no shift. With several prior courses: each shifted alone
  and all shifted together in the same direction (not every product of directions).

Exactness (proofs in docs/science.md): every metric used (Dmax, Dmean, Dmin, D<x>cc, D<x>%, V<x>Gy) is a
non-decreasing function of the sample doses; each sample's EQD2 sum increases with the dose scale and decreases with
r, so the worst over (r, scale) is always at (r_min, 1 + p) and the best at (r_max, 1 - p): those corners are taken
directly. In alpha/beta each sample's cumulative EQD2 is ``a + b / (2 + ab)`` with ``b = sum w D (d - 2)``: monotone
in ab for every sample, so for Dmax (convex) and Dmean (linear) the ends bound the metric. When the samples of an
organ disagree in direction (some with d above 2 Gy per fraction, some below) a quantile metric (D<x>cc, V<x>Gy) can
peak inside the range: there interior alpha/beta values are evaluated too and the row says so (``ab_interior``).
Shifts are evaluated by trilinear interpolation of the prior course's physical dose (on the evaluation grid) at
each sample point + the shift vector, the same interpolation as the nominal metric.

The voxelwise worst-case map (``cumulative_eqd2_worst.nrrd``): per voxel, no recovery credit (when the range
allows it), dose scale 1 + p, each prior course's physical dose replaced by its maximum over the shift set
(trilinear shifts, a max filter over the shift set) and the worse of the two alpha/beta ends (exact per voxel: the
sum is monotone in alpha/beta). Where organ structures overlap the union of their alpha/beta ranges applies. This
envelope is an upper bound of every scenario at once (a single rigid shift cannot realise it everywhere).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import dvh
from .analysis import Analysis, constraint_status, course_dose
from .dvh_curves import DVHCurve, cumulative_dvh
from .eqd2 import effective_fractions, eqd2
from .geometry import Grid, bounding_box
from .protocol import Metric, judged_with_credit

log = logging.getLogger(__name__)

#: statuses whose row is judged against a limit (robustness re-judges them in the worst scenario)
JUDGED = ("pass", "warn", "fail", "condition_not_met")
#: interior alpha/beta points evaluated (besides the ends) for organs whose samples disagree in direction
N_INTERIOR = 5
#: tests only: evaluate every sample (no pruning of the samples that cannot reach the near-maximum)
NOPRUNE = False
#: voxels per slab of the worst-case map (memory bound on clinical grids)
SLAB_VOXELS = 4_000_000


def shift_directions(n: int = 26) -> np.ndarray:
    """(n, 3) unit vectors (x, y, z): n = 6 (the axes) or 26 (axes, 12 face diagonals, 8 body diagonals)."""
    if n not in (6, 26):
        raise ValueError("registration directions: 6 or 26")
    dirs = [v for v in itertools.product((-1, 0, 1), repeat=3) if any(v)]
    if n == 6:
        dirs = [v for v in dirs if sum(map(abs, v)) == 1]
    a = np.asarray(dirs, dtype=np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    order = np.lexsort((a[:, 2], a[:, 1], a[:, 0], (np.abs(a) > 0).sum(axis=1)))  # axes first, then diagonals
    return a[order]


@dataclass
class Robustness:
    available: bool
    reason: str = ""                                   # why not available
    rows: list = field(default_factory=list)           # aligned with analysis.constraints: dict or None
    summary: dict = field(default_factory=dict)
    assumptions: dict = field(default_factory=dict)
    worst_map: np.ndarray | None = None
    violations: list = field(default_factory=list)     # budget.Violation (worst case)
    dvh_band: dict = field(default_factory=dict)       # structure -> (worst DVHCurve, best DVHCurve)
    warnings: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ settings

def registration_mm(prep) -> dict[str, float]:
    """Registration uncertainty (mm) per prior course: the case's value, else the protocol's default."""
    spec = prep.protocol.robustness
    default = spec.registration_mm if spec is not None else 0.0
    by_name = {c.name: c for c in prep.case.courses}
    out = {}
    for c in prep.courses:
        if c.is_current:
            continue
        own = getattr(by_name.get(c.name), "registration_uncertainty_mm", None)
        out[c.name] = float(own) if own is not None else float(default)
    return out


def _ab_range(spec, organ, nominal: float) -> tuple[float, float, bool]:
    r = spec.alpha_beta.get(organ.key) if organ is not None else None
    if r is None:
        return nominal, nominal, False
    return r.low, r.high, True


# ------------------------------------------------------------------------------------------ interpolation

def interp_points(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``arr`` (k, j, i) at continuous indices ``idx`` (N, 3: i, j, k), float64.

    Same rule as the nominal sampling (SimpleITK linear): beyond half a voxel past the outermost voxel centres the
    value is 0 (dose outside the grid read as 0); within that half voxel the edge value is extended."""
    size = np.asarray(arr.shape[::-1], dtype=np.int64)
    outside = np.any((idx < -0.5) | (idx > size - 0.5), axis=1)
    c = np.clip(idx, 0.0, (size - 1).astype(np.float64))
    i0 = np.minimum(np.floor(c).astype(np.int64), np.maximum(size - 2, 0))
    t = c - i0
    i1 = np.minimum(i0 + 1, size - 1)
    flat = arr.ravel()
    sj, sk = int(arr.shape[2]), int(arr.shape[1] * arr.shape[2])
    out = np.zeros(idx.shape[0], dtype=np.float64)
    for ck, wk in ((i0[:, 2], 1.0 - t[:, 2]), (i1[:, 2], t[:, 2])):
        for cj, wj in ((i0[:, 1], 1.0 - t[:, 1]), (i1[:, 1], t[:, 1])):
            base = ck * sk + cj * sj
            wkj = wk * wj
            out += wkj * ((1.0 - t[:, 0]) * flat[base + i0[:, 0]] + t[:, 0] * flat[base + i1[:, 0]])
    out[outside] = 0.0
    return out


def shift_index_vectors(grid: Grid, dirs_mm: np.ndarray) -> np.ndarray:
    """Shift vectors (N, 3: x, y, z mm) in continuous index units (i, j, k) of ``grid`` (any direction)."""
    m = grid.direction_matrix * np.asarray(grid.spacing, dtype=np.float64)[None, :]
    return np.linalg.solve(m, np.asarray(dirs_mm, dtype=np.float64).T).T


def _shift1d(a: np.ndarray, axis: int, t: float) -> np.ndarray:
    """``out[x] = a(x + t)`` along ``axis`` (linear interpolation, edge values extended)."""
    n = a.shape[axis]
    n0 = int(math.floor(t))
    f = t - n0
    base = np.arange(n) + n0
    lo = np.take(a, np.clip(base, 0, n - 1), axis=axis)
    if f < 1e-9:
        return lo
    hi = np.take(a, np.clip(base + 1, 0, n - 1), axis=axis)
    lo *= np.float32(1.0 - f)
    hi *= np.float32(f)
    lo += hi
    return lo


def shifted_max(a: np.ndarray, deltas_ijk: np.ndarray) -> np.ndarray:
    """Voxelwise maximum of ``a`` (k, j, i; float32) and its trilinear shifts ``a(x + delta)`` for every delta
    (continuous index units i, j, k): a max filter over the shift set. Edge values extended."""
    out = a.astype(np.float32, copy=True)
    for d in deltas_ijk:
        s = a
        for axis, t in ((2, d[0]), (1, d[1]), (0, d[2])):
            if abs(t) > 1e-9:
                s = _shift1d(s, axis, float(t))
        np.maximum(out, s, out=out)
    return out


# ----------------------------------------------------------------------------------------- fast metrics

def metric_value(doses: np.ndarray, vol, total_cc: float, m) -> float | None:
    """The metric ``m`` (:func:`dvh.parse`) of samples ``doses`` (Gy) with volume ``vol`` (cc, scalar or per sample),
    identical to :class:`dvh.SortedSamples` but reading only the samples the metric depends on."""
    n = doses.size
    if n == 0:
        return None
    uniform = np.ndim(vol) == 0
    if m.kind == "max":
        return float(doses.max())
    if m.kind == "min":
        return float(doses.min())
    if m.kind == "mean":
        return float(doses.mean()) if uniform else dvh.weighted_mean(doses, vol, total_cc)
    if m.kind in ("dcc", "dpct"):
        x = m.param if m.kind == "dcc" else total_cc * m.param / 100.0
        if total_cc <= 0 or x < 0 or x > total_cc * (1 + 1e-9):
            return None
        return dvh.SortedSamples(doses, vol).dose_at_volume(x)   # read on the hot or cold tail of the samples
    if m.kind in ("vgy", "vpct"):
        x = float(m.param)
        dmax, dmin = float(doses.max()), float(doses.min())
        if x > dmax:
            v = 0.0
        elif x <= dmin:
            v = total_cc
        else:
            below = doses[doses < x]
            lower = float(below.max())
            sel = doses >= lower
            ss = dvh.SortedSamples(doses[sel], vol if uniform else np.asarray(vol)[sel])
            v = float(np.interp(x, ss.levels[::-1], ss.level_cum[::-1]))
            if x == ss.levels[0]:
                v = float(ss.level_above[0])
        return v if m.kind == "vgy" else (100.0 * v / total_cc if total_cc > 0 else None)
    raise ValueError(m.kind)


# ------------------------------------------------------------------------------------------------ compute

def compute(prep, analysis: Analysis, progress: Callable[[str], None] | None = None) -> Robustness:
    """Robustness of every constraint row of ``analysis`` and the worst-case map (``prep``: pipeline.Prepared)."""
    say = progress or (lambda m: None)
    spec = prep.protocol.robustness
    if spec is None:
        rob = Robustness(False, reason="the protocol has no robustness block (no ranges of alpha/beta, recovery, "
                                       "registration): robustness not evaluated")
        rob.rows = [None] * len(analysis.constraints)
        rob.summary = {"status": "not_evaluated", "reason": rob.reason}
        return rob
    say("robustness scenarios")
    grid, courses, protocol = prep.grid, prep.courses, prep.protocol
    reg = registration_mm(prep)
    dirs = shift_directions(spec.registration_directions)
    p = spec.dose_uncertainty_percent / 100.0
    rob = Robustness(True)
    rob.assumptions = _assumptions(spec, reg, courses, dirs)
    by_struct: dict[str, list[int]] = {}
    for i, c in enumerate(analysis.constraints):
        if c.structure is not None and c.value is not None:
            by_struct.setdefault(c.structure, []).append(i)
    rob.rows = [None] * len(analysis.constraints)
    structs = {s.name: s for s in prep.structures}
    for sname, idxs in by_struct.items():
        samples = analysis.samples.get(sname)
        s = structs.get(sname)
        if samples is None or samples.n == 0 or s is None:
            continue
        organ = s.organ
        ev = _StructureScenarios(samples, grid, courses, reg, dirs, analysis.sample_doses.get(sname),
                                 getattr(analysis, "sample_fractions", {}).get(sname))
        band_hi = band_lo = None
        for i in idxs:
            row = analysis.constraints[i]
            want_band = row.scope == "cumulative" and band_hi is None
            res, hi, lo = ev.row(row, organ, spec, protocol, p, band=want_band)
            rob.rows[i] = res
            if want_band and hi is not None:
                band_hi, band_lo = hi, lo
        if band_hi is not None:
            vol = samples.sample_volume_cc
            rob.dvh_band[sname] = (cumulative_dvh(band_hi, vol), cumulative_dvh(band_lo, vol))
            if sname in analysis.dvh_curves:  # drawn by the report's DVH figure as a band
                analysis.dvh_curves[sname]["robust_worst"], analysis.dvh_curves[sname]["robust_best"] = \
                    rob.dvh_band[sname]
    rob.summary = _summary(analysis.constraints, rob.rows)
    say("worst-case cumulative EQD2 map")
    kept: dict = {}
    rob.worst_map = worst_case_map(prep, analysis, spec, reg, dirs, keep=kept)
    rob.violations = worst_violations(prep, analysis, rob, reg, dirs, shifted=kept)
    return rob


def _assumptions(spec, reg, courses, dirs) -> dict:
    return {**spec.summary(),
            "registration_mm": reg,
            "shift_set": (f"{len(dirs)} directions ({'6 axes' if len(dirs) == 6 else '6 axes, 12 face diagonals, 8 body diagonals'}"
                          ") at the stated distance (every shift vector has that length), plus no shift; "
                          "several prior courses: each shifted alone and all together in the same direction"),
            "exactness": "worst over recovery and dose scale taken at its corner (exact: metrics are monotone in "
                         "both); alpha/beta ends exact for Dmax and Dmean, and for every metric when all samples "
                         "of the organ move the same way (interior alpha/beta values evaluated otherwise)",
            "worst_map": "per voxel: no recovery credit (range) / protocol credit (fixed), dose x (1 + p), prior "
                         "doses max over the shift set, worse alpha/beta end; union of ranges where organs overlap"}


def _axis_weights(pos: np.ndarray, n: int):
    """Lower/upper voxel and weights of linear interpolation at positions ``pos`` (continuous index on an axis of
    ``n`` voxels), with the border rule of :func:`interp_points`: weight 0 beyond half a voxel (a point outside
    on any axis reads 0), edge value extended within it."""
    inside = (pos >= -0.5) & (pos <= n - 0.5)
    c = np.clip(pos, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(c).astype(np.int64), max(n - 2, 0))
    t = c - i0
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = np.where(inside, t, 0.0)
    w0 = np.where(inside, 1.0 - t, 0.0)
    return i0, i1, w0, w1


class _SeparableSampler:
    """Trilinear values of an evaluation-grid array at a structure's samples shifted by any vector, when the
    sampling grid and the evaluation grid share their axes: the interpolation is then separable, done axis by
    axis on the dose crop (2 reads per output cell per axis; the cost is that of the sampling box, not of 8
    gathers per sample). Same values as :func:`interp_points`."""

    def __init__(self, samples, grid: Grid):
        sg = samples.grid
        self.ok = sg is not None and np.allclose(sg.direction_matrix, grid.direction_matrix, atol=1e-6)
        if not self.ok:
            return
        self.flat = samples.flat
        self.size_s = np.asarray(sg.size)                          # i, j, k
        self.size_e = np.asarray(grid.size)
        first = grid.physical_to_index(np.asarray(sg.origin, dtype=np.float64)[None, :])[0]
        ratio = np.asarray(sg.spacing, dtype=np.float64) / np.asarray(grid.spacing, dtype=np.float64)
        self.pos = [first[a] + ratio[a] * np.arange(self.size_s[a]) for a in range(3)]

    def values(self, arr: np.ndarray, delta_ijk: np.ndarray) -> np.ndarray:
        return self.values_many(arr, np.asarray(delta_ijk, dtype=np.float64)[None, :])[0]

    def values_many(self, arr: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        """(len(deltas), N) values for every shift; the axis-by-axis stages are shared between shifts with the same
        x (then x and y) components (the 26 directions have 7 distinct x and 17 distinct (x, y) components)."""
        wts = {}
        bounds = [[None, None] for _ in range(3)]
        for d in deltas:
            for a in range(3):
                key = (a, round(float(d[a]), 9))
                if key not in wts:
                    wts[key] = _axis_weights(self.pos[a] + d[a], int(self.size_e[a]))
                i0, i1 = wts[key][0], wts[key][1]
                lo_, hi_ = int(i0.min()), int(i1.max()) + 1
                bounds[a][0] = lo_ if bounds[a][0] is None else min(bounds[a][0], lo_)
                bounds[a][1] = hi_ if bounds[a][1] is None else max(bounds[a][1], hi_)
        lo = [b[0] for b in bounds]
        crop = np.asarray(arr[lo[2]:bounds[2][1], lo[1]:bounds[1][1], lo[0]:bounds[0][1]], dtype=np.float32)

        def stage(t, axis, a, comp):
            i0, i1, w0, w1 = wts[(a, comp)]
            shape = [1, 1, 1]
            shape[axis] = -1
            return (np.take(t, i0 - lo[a], axis=axis) * w0.astype(np.float32).reshape(shape)
                    + np.take(t, i1 - lo[a], axis=axis) * w1.astype(np.float32).reshape(shape))

        s1: dict = {}
        s2: dict = {}
        out = np.empty((len(deltas), self.flat.size), dtype=np.float32)
        for n, d in enumerate(deltas):
            kx, ky, kz = (round(float(d[0]), 9), round(float(d[1]), 9), round(float(d[2]), 9))
            if kx not in s1:
                s1[kx] = stage(crop, 2, 0, kx)
            if (kx, ky) not in s2:
                s2[(kx, ky)] = stage(s1[kx], 1, 1, ky)
            out[n] = stage(s2[(kx, ky)], 0, 2, kz).ravel()[self.flat]
        return out


class _StructureScenarios:
    """Sample doses of one structure: nominal per course, and each prior course's at every shift."""

    def __init__(self, samples, grid: Grid, courses, reg: dict[str, float], dirs: np.ndarray, doses=None,
                 fractions=None):
        self.samples, self.grid, self.courses, self.reg, self.dirs = samples, grid, courses, reg, dirs
        self.vol = samples.sample_volume_cc
        self.total = samples.volume_cc
        doses = doses or {}
        fractions = fractions or {}
        self.nominal, self.nominal_fx = {}, {}   # physical dose and its fractions (analysis.course_dose)
        for c in courses:
            kept = doses.get(c.name)
            if kept is not None and kept.size == samples.n and (len(c.groups) <= 1 or c.name in fractions):
                self.nominal[c.name], self.nominal_fx[c.name] = kept, fractions.get(c.name, c.fractions)
            else:
                self.nominal[c.name], self.nominal_fx[c.name] = course_dose(c, lambda a: samples.dose(a, grid))
        self._fx: dict[str, object] = {}   # course -> fractions: a number, or (rows, N) per stack row and sample
        self._stacks: dict[str, np.ndarray] = {}
        self._idx = None
        self._sep = None
        self._cache: dict = {}

    def stack(self, c) -> np.ndarray:
        """(1 + n_dirs, N) physical doses of course ``c`` (float32): no shift first, then each shift (only the first
        row for a course with no registration uncertainty)."""
        if c.name in self._stacks:
            return self._stacks[c.name]
        nom = self.nominal[c.name].astype(np.float32)[None, :]
        fx0 = self.nominal_fx[c.name]
        mm = 0.0 if c.is_current else self.reg.get(c.name, 0.0)
        if mm <= 0:
            st = nom
            fx = fx0 if np.ndim(fx0) == 0 else np.asarray(fx0, dtype=np.float64)[None, :]
        else:
            deltas = shift_index_vectors(self.grid, self.dirs * mm)
            st = np.empty((1 + len(deltas), nom.shape[1]), dtype=np.float32)
            st[0] = nom[0]
            if len(c.groups) <= 1:
                st[1:] = self._shifted_rows(c.dose, deltas)
                fx = fx0
            else:  # several fraction groups: each group shifted, then (sum, effective fractions) per sample
                parts = [self._shifted_rows(t.dose, deltas) for t in c.groups]
                p, n_eff = effective_fractions(parts, [t.fractions for t in c.groups], c.fractions)
                st[1:] = p
                fx = np.empty(st.shape, dtype=np.float64)
                fx[0], fx[1:] = fx0, n_eff
        self._stacks[c.name] = st
        self._fx[c.name] = fx
        return st

    def fractions_of(self, c):
        """The fractions paired with :meth:`stack` (a number, or an array of the stack's shape)."""
        self.stack(c)
        return self._fx[c.name]

    def _shifted_rows(self, arr: np.ndarray, deltas) -> np.ndarray:
        """(len(deltas), N) values (float32) of the full-grid array ``arr`` at the samples shifted by each delta."""
        out = np.empty((len(deltas), self.samples.n), dtype=np.float32)
        if self._sep is None:
            self._sep = _SeparableSampler(self.samples, self.grid)
        if self._sep.ok:
            out[:] = self._sep.values_many(arr, deltas)
            return out
        if self._idx is None:
            self._idx = self.grid.physical_to_index(self.samples.points_mm)
        for k, d in enumerate(deltas):
            out[k] = interp_points(arr, self._idx + d[None, :])
        return out

    def row(self, row, organ, spec, protocol, p: float, band: bool = False):
        """(robustness dict, samplewise worst cumulative, samplewise best cumulative) of one constraint row; the
        samplewise envelopes (upper/lower bounds of every scenario, for the DVH band) only when ``band``."""
        m = dvh.parse(row.metric)
        nominal_ab = row.alpha_beta if row.alpha_beta is not None else organ.alpha_beta
        ab_lo, ab_hi, has_range = _ab_range(spec, organ, nominal_ab)
        okey = organ.key if organ is not None else None
        scope = row.scope
        if scope == "current":
            used = [c for c in self.courses if c.is_current]
        elif scope == "per_course":
            name = getattr(row, "course", None)
            used = [c for c in self.courses if c.name == name]
        else:
            used = list(self.courses)
        if not used:
            return None, None, None
        credited = judged_with_credit(row)
        credit = {c.name: (protocol.recovery.credit(okey, c.interval_months) if credited and not c.is_current
                           else 0.0) for c in used}
        r_worst = {k: (0.0 if spec.recovery == "range" else v) for k, v in credit.items()}
        stacks = {c.name: self.stack(c) for c in used}
        shifted = [c for c in used if stacks[c.name].shape[0] > 1]
        nd = len(self.dirs)
        # scenarios: per course, the row of its stack (0 = no shift); None = the course's single row, broadcast
        labels = [{}]
        sel: dict[str, object] = {c.name: None for c in used}
        if len(shifted) == 1:
            sel[shifted[0].name] = slice(None)
            labels += [{shifted[0].name: d} for d in range(nd)]
        elif len(shifted) > 1:
            idx = {c.name: [0] for c in shifted}
            for c in shifted:
                for d in range(nd):
                    for cc in shifted:
                        idx[cc.name].append(1 + d if cc is c else 0)
                    labels.append({c.name: d})
            for d in range(nd):
                for cc in shifted:
                    idx[cc.name].append(1 + d)
                labels.append({cc.name: d for cc in shifted})
            for c in shifted:
                sel[c.name] = np.asarray(idx[c.name])
        ab_ends = [ab_lo, ab_hi] if has_range and ab_hi > ab_lo else [nominal_ab]
        scale_ends = (1.0 + p, 1.0 - p) if p > 0 else (1.0, 1.0)
        n_r = 2 if any(credit[k] != r_worst[k] for k in credit) else 1
        n_scen = len(ab_ends) * n_r * (2 if p > 0 else 1) * len(labels)
        pct = row.unit == "%" and m.kind == "vgy"
        vol_all = self.vol
        out = {}
        interior_used = False
        bands = []

        same_sides = all(r_worst[k] == credit[k] for k in credit) and scale_ends[0] == scale_ends[1]
        evaluated = None      # (abs_eval, [vals per ab]) of the worst side, reused by the best side when identical
        for side, (rr, scale) in (("worst", (r_worst, scale_ends[0])), ("best", (credit, scale_ends[1]))):
            weights = {c.name: 1.0 - rr[c.name] for c in used}
            if side == "best" and same_sides and evaluated is not None:
                # the same scenarios as the worst side (no credit range, no dose uncertainty): only the extreme differs
                bands.append(L if band else None)
                best_val, best_key = None, None
                for ab, vals in evaluated:
                    for k_, v in enumerate(vals):
                        if v is not None and (best_val is None or v < best_val):
                            best_val, best_key = v, (float(ab), k_)
                out[side] = (best_val, best_key, rr, scale)
                continue
            # samplewise envelopes over every scenario of this side: upper U, lower L (EQD2 increases with the
            # dose; per sample the sum is monotone in alpha/beta, so the ends bound interior values too)
            U = L = None
            for ab in ab_ends:
                u_ab = l_ab = None
                for c in used:
                    hi_d, lo_d = self._envelope(c, stacks[c.name])
                    fx_hi, fx_lo = self._fx_envelope(c)   # EQD2 rises with the dose, falls with the fractions
                    eu = eqd2(hi_d * np.float32(scale), fx_hi, float(ab)) * np.float32(weights[c.name])
                    el = eqd2(lo_d * np.float32(scale), fx_lo, float(ab)) * np.float32(weights[c.name])
                    u_ab = eu if u_ab is None else u_ab + eu
                    l_ab = el if l_ab is None else l_ab + el
                U = u_ab if U is None else np.maximum(U, u_ab)
                L = l_ab if L is None else np.minimum(L, l_ab)
            bands.append((U if side == "worst" else L) if band else None)
            # near-maximum metrics depend only on the hottest samples: keep those that can be among them in some
            # scenario (U >= the level of L holding x + 2 sample volumes: every scenario's is at least that)
            keep = None
            if m.kind in ("max", "dcc", "dpct"):
                vmax = float(np.max(vol_all)) if np.ndim(vol_all) else float(vol_all)
                x = 0.0 if m.kind == "max" else (m.param if m.kind == "dcc" else self.total * m.param / 100.0)
                xp = x + 2.0 * vmax
                if xp < self.total:
                    tau = metric_value(L.astype(np.float64), vol_all, self.total, Metric("D_x'cc", "dcc", xp))
                    if tau is not None:
                        k = np.flatnonzero(U >= np.float32(tau))
                        if 0 < k.size < U.size // 2 and not NOPRUNE:
                            keep = k
            vol = vol_all if keep is None or np.ndim(vol_all) == 0 else np.asarray(vol_all)[keep]

            def rows_of(arr, c):
                s_ = sel[c.name]
                a_ = arr[0] if s_ is None else arr[s_]
                # the pruned few samples in float64 (no float32 ties in the DVH curve); all samples in float32
                return a_ if keep is None else a_[..., keep].astype(np.float64)

            phys = {c.name: rows_of(stacks[c.name], c) * scale if scale != 1.0
                    else rows_of(stacks[c.name], c) for c in used}
            fxs = {c.name: (self._fx[c.name] if np.ndim(self._fx[c.name]) == 0 else rows_of(self._fx[c.name], c))
                   for c in used}
            abs_eval = list(ab_ends)
            if len(ab_ends) == 2 and m.kind not in ("max", "mean"):
                # b = sum_c w_c D_c (d_c - 2) per sample and scenario: both signs = a mixed organ (docs/science.md)
                b = None
                for c in used:
                    x_ = phys[c.name]
                    fx_ = fxs[c.name]
                    t = x_ * (1.0 / fx_) if np.ndim(fx_) == 0 else x_ / fx_
                    t -= 2.0
                    t *= x_
                    if weights[c.name] != 1.0:
                        t *= weights[c.name]
                    b = t if b is None else b + t
                lo_b, hi_b = float(b.min()), float(b.max())
                tol = 1e-6 * max(1.0, abs(lo_b), abs(hi_b))
                if lo_b < -tol and hi_b > tol:
                    u_lo, u_hi = 1.0 / (2.0 + ab_hi), 1.0 / (2.0 + ab_lo)
                    abs_eval += [1.0 / u - 2.0 for u in np.linspace(u_lo, u_hi, N_INTERIOR + 2)[1:-1]]
                    interior_used = True
            best_val, best_key = None, None
            evaluated = []
            for ab in abs_eval:
                cum = None
                for c in used:
                    e = eqd2(phys[c.name], fxs[c.name], float(ab))
                    if weights[c.name] != 1.0:
                        e *= weights[c.name]
                    cum = e if cum is None else (cum + e if cum.ndim < e.ndim else np.add(cum, e, out=cum))
                if cum.ndim == 1:
                    cum = cum[None, :]
                vals = self._metric_rows(cum, m, vol)
                if pct:
                    vals = [None if v is None or self.total <= 0 else 100.0 * v / self.total for v in vals]
                evaluated.append((ab, vals))
                for k_, v in enumerate(vals):
                    if v is None:
                        continue
                    if best_val is None or (v > best_val if side == "worst" else v < best_val):
                        best_val, best_key = v, (float(ab), k_)
            out[side] = (best_val, best_key, rr, scale)
        wv, wk, wr, ws = out["worst"]
        bv, bk, br, bs = out["best"]
        if wv is None:
            return None, None, None
        res = {"worst_value": wv, "best_value": bv,
               "worst_scenario": self._label(wk, wr, ws, labels, used),
               "best_scenario": self._label(bk, br, bs, labels, used),
               "status_worst": _status_worst(row, wv, protocol),
               "scenarios": int(n_scen),
               "nominal_value": row.value,
               "alpha_beta_range": [ab_lo, ab_hi] if has_range else None,
               "ab_interior": interior_used,
               "recovery_range": ({k: [r_worst[k], credit[k]] for k in credit if not self._is_current(k)}
                                  if credited else None),
               "registration_mm": {c.name: self.reg.get(c.name, 0.0) for c in used if not c.is_current},
               "dose_uncertainty_percent": 100.0 * p}
        return res, bands[0], bands[1]

    def _fx_envelope(self, c):
        """(smallest, largest) fractions of course ``c`` per sample over its shifts: numbers for one term."""
        fx = self._fx[c.name]
        if np.ndim(fx) == 0:
            return fx, fx
        key = ("fxenv", c.name)
        if key not in self._cache:
            self._cache[key] = (fx.min(axis=0), fx.max(axis=0))
        return self._cache[key]

    def _envelope(self, c, st: np.ndarray):
        """Samplewise (max, min) physical dose of course ``c`` over its shifts (cached)."""
        key = ("env", c.name)
        if key not in self._cache:
            self._cache[key] = (st.max(axis=0), st.min(axis=0)) if st.shape[0] > 1 else (st[0], st[0])
        return self._cache[key]

    def _metric_rows(self, cum: np.ndarray, m, vol=None) -> list:
        """The metric of every scenario row of ``cum`` (K, N); ``vol``: the samples' volumes (default: all)."""
        vol = self.vol if vol is None else vol
        if cum.shape[1] == 0:
            return [None] * cum.shape[0]
        if m.kind == "max":
            return [float(v) for v in cum.max(axis=1)]
        if m.kind == "min":
            return [float(v) for v in cum.min(axis=1)]
        if m.kind == "mean":
            if np.ndim(vol) == 0:
                return [float(v) for v in cum.mean(axis=1, dtype=np.float64)]
            # one formula with the table's Dmean (dvh.weighted_mean, numpy's own sum): a BLAS product here woke
            # OpenBLAS's threads (they spin on after it) and its last bits depended on their number
            vol = np.asarray(vol, dtype=np.float64)
            return [dvh.weighted_mean(row.astype(np.float64), vol, self.total) for row in cum]
        if m.kind in ("dcc", "dpct") and np.ndim(vol) == 0 and vol > 0:
            x = m.param if m.kind == "dcc" else self.total * m.param / 100.0
            n = cum.shape[1]
            k = int(math.ceil(x / vol)) + 2 if 0 <= x <= self.total * (1 + 1e-9) else n
            if k < n // 4:
                # the hottest k samples of every scenario in one call, sorted descending; with distinct values the
                # mid-point DVH curve through them is (i + 1/2) vol -> value i (dvh.SortedSamples), read at x here;
                # rows with ties at the cut fall back to the general path
                top = np.partition(cum, n - k, axis=1)[:, n - k:]
                top = np.sort(top, axis=1)[:, ::-1].astype(np.float64)
                thr = top[:, -1]
                cut_tie = (cum >= thr[:, None].astype(cum.dtype)).sum(axis=1) > k
                ties = (np.diff(top, axis=1) == 0).any(axis=1)
                pos = x / vol - 0.5
                i = int(math.floor(pos)) if pos > 0 else 0
                f = pos - i if pos > 0 else 0.0
                val = top[:, i] * (1.0 - f) + top[:, min(i + 1, k - 1)] * f
                out = []
                for r in range(cum.shape[0]):
                    if cut_tie[r] or i + 1 >= k:
                        out.append(metric_value(cum[r].astype(np.float64), vol, self.total, m))
                    elif ties[r]:   # equal values inside the top: their levels merge (exact on the top alone)
                        ss = dvh.SortedSamples(top[r], vol)
                        out.append(float(np.interp(x, ss.level_cum, ss.levels)) if ss.level_cum[-1] >= x
                                   else metric_value(cum[r].astype(np.float64), vol, self.total, m))
                    else:
                        out.append(float(val[r]))
                return out
        if m.kind in ("dcc", "dpct") and np.ndim(vol) == 1 and self.total > 0:
            # per-sample volumes (merged or block samples): the hottest k samples, k enough for x cc even if every
            # one had the smallest volume; rows with ties at the cut fall back to the general path
            vol = np.asarray(vol, dtype=np.float64)
            x = m.param if m.kind == "dcc" else self.total * m.param / 100.0
            n = cum.shape[1]
            vmin = float(vol.min())
            k = int(math.ceil(x / vmin)) + 2 if vmin > 0 and 0 <= x <= self.total * (1 + 1e-9) else n
            if k < n // 4:
                idx = np.argpartition(cum, n - k, axis=1)[:, n - k:]
                top = np.take_along_axis(cum, idx, axis=1)
                thr = top.min(axis=1)
                cut_tie = (cum >= thr[:, None]).sum(axis=1) > k
                out = []
                for r in range(cum.shape[0]):
                    ss = None if cut_tie[r] else dvh.SortedSamples(top[r].astype(np.float64), vol[idx[r]])
                    if ss is not None and ss.level_cum.size and ss.level_cum[-1] >= x:
                        out.append(float(np.interp(x, ss.level_cum, ss.levels)))
                    else:
                        out.append(metric_value(cum[r].astype(np.float64), vol, self.total, m))
                return out
        return [metric_value(cum[k].astype(np.float64), vol, self.total, m) for k in range(cum.shape[0])]

    def _is_current(self, name: str) -> bool:
        return any(c.is_current and c.name == name for c in self.courses)

    def _label(self, key, rr, scale, labels, used) -> dict | None:
        if key is None:
            return None
        ab, k = key
        shifts = {}
        for cname, d in labels[k].items():
            v = self.dirs[d] * self.reg.get(cname, 0.0)
            shifts[cname] = [round(float(x), 3) for x in v]
        rec = {c.name: rr[c.name] for c in used if not c.is_current}
        parts = [f"alpha/beta {ab:.3g} Gy"]
        if rec:
            parts.append("recovery " + ", ".join(f"{k} {100 * v:g}%" for k, v in rec.items()))
        if scale != 1.0:
            parts.append(f"dose x {scale:.3g}")
        parts.append("; ".join(f"{k} shifted ({', '.join(f'{x:+.2f}' for x in v)}) mm" for k, v in shifts.items())
                     if shifts else "no shift")
        return {"alpha_beta_gy": ab, "recovery": rec, "dose_scale": scale, "shift_mm": shifts,
                "label": ", ".join(parts)}


def _status_worst(row, worst: float, protocol) -> str:
    if row.status not in JUDGED or row.limit is None:
        return row.status
    status, _ = constraint_status(worst, row.limit, protocol.warn_tolerance_percent)
    if row.status == "condition_not_met" and status != "fail":
        return "condition_not_met"
    return status


def _summary(constraints, rows) -> dict:
    judged = [(c, r) for c, r in zip(constraints, rows) if c.status in JUDGED]
    def name(c):
        return f"{c.structure or c.organ} {c.metric} ({c.scope}{', ' + c.course if getattr(c, 'course', None) else ''})"
    fail = [name(c) for c, r in judged if r is not None and r["status_worst"] == "fail"]
    fragile = [name(c) for c, r in judged if r is not None and r["status_worst"] == "fail" and c.status != "fail"]
    cond = [name(c) for c, r in judged if r is not None and r["status_worst"] == "condition_not_met"]
    warn = [name(c) for c, r in judged if r is not None and r["status_worst"] == "warn"]
    missing = [name(c) for c, r in judged if r is None]
    missing += [name(c) for c in constraints if c.status == "not_evaluated"]
    if fail:
        code = "robust_fail"
        text = f"{len(fail)} limit(s) exceeded in their worst scenario ({len(fragile)} of them pass nominally)"
    elif cond:
        code = "robust_conditions_not_met"
        text = f"{len(cond)} limit(s) whose conditions do not hold"
    elif missing:
        code = "robust_incomplete"
        text = f"{len(missing)} row(s) without a worst case (not evaluated)"
    elif warn:
        code = "robust_warn"
        text = f"no limit exceeded in any scenario; {len(warn)} within the warning tolerance in their worst scenario"
    elif judged:
        code = "robust_pass"
        text = "every evaluated limit passes in its worst scenario"
    else:
        code = "robust_incomplete"
        text = "no limit was evaluated"
    return {"status": code, "text": text, "rows_failing_worst": fail, "rows_failing_worst_only": fragile,
            "rows_condition_not_met": cond, "rows_warn_worst": warn, "rows_without_worst_case": missing,
            "note": "robust_pass speaks only for the rows evaluated; see summary.verdict_code and "
                    "incomplete_because for organs without a limit or absent from the structure set"}


# ------------------------------------------------------------------------------------- worst-case map

def _halo(grid: Grid, deltas: np.ndarray) -> tuple[int, int, int]:
    """Voxels (k, j, i) a shift can reach, plus one for the interpolation."""
    if len(deltas) == 0:
        return (0, 0, 0)
    m = np.abs(deltas).max(axis=0)  # i, j, k
    return tuple(int(math.ceil(v)) + 1 for v in (m[2], m[1], m[0]))


def _shifted_max_box(arr: np.ndarray, box, deltas: np.ndarray, halo) -> np.ndarray:
    """max over the shift set of ``arr`` on ``box`` (slices k, j, i), reading a halo around it."""
    ext = tuple(slice(max(b.start - h, 0), min(b.stop + h, n)) for b, h, n in zip(box, halo, arr.shape))
    crop = np.asarray(arr[ext], dtype=np.float32)
    m = shifted_max(crop, deltas)
    inner = tuple(slice(b.start - e.start, b.stop - e.start) for b, e in zip(box, ext))
    return m[inner]


#: the prior doses' shift maxima are kept for the violation regions when the grid has at most this many voxels
KEEP_SHIFTED_MAX_VOXELS = 20_000_000


def worst_case_map(prep, analysis: Analysis, spec, reg: dict[str, float], dirs: np.ndarray,
                   keep: dict | None = None) -> np.ndarray:
    """Voxelwise worst-case cumulative EQD2 (Gy, float32) over the scenarios; computed in slabs along k.
    ``keep``: filled with course name -> full-grid maximum of its physical dose over the shifts (small grids)."""
    grid, courses, protocol = prep.grid, prep.courses, prep.protocol
    shape = grid.shape
    scale = 1.0 + spec.dose_uncertainty_percent / 100.0
    out = np.zeros(shape, dtype=np.float32)
    deltas = {c.name: shift_index_vectors(grid, dirs * reg.get(c.name, 0.0)) for c in courses
              if not c.is_current and reg.get(c.name, 0.0) > 0}
    halos = {k: _halo(grid, d) for k, d in deltas.items()}
    bboxes = {c.name: bounding_box(c.dose > 0) for c in courses}
    ranged = []
    for s in prep.structures:
        if s.organ is None or s.organ.role == "body" or s.mask.size == 0:
            continue
        lo, hi, _ = _ab_range(spec, s.organ, s.organ.alpha_beta)
        ranged.append((s, lo, hi))
    default_ab = protocol.default_alpha_beta
    plane = shape[1] * shape[2]
    step = max(1, SLAB_VOXELS // max(plane, 1))
    for k0 in range(0, shape[0], step):
        k1 = min(k0 + step, shape[0])
        sl = (slice(k0, k1), slice(0, shape[1]), slice(0, shape[2]))
        ab_lo = np.full((k1 - k0,) + shape[1:], np.inf, dtype=np.float32)
        ab_hi = np.full((k1 - k0,) + shape[1:], -np.inf, dtype=np.float32)
        for s, lo, hi in ranged:
            kb = s.box[0]
            a, b = max(kb.start, k0), min(kb.stop, k1)
            if a >= b:
                continue
            m = s.mask[a - kb.start:b - kb.start]
            sub_lo = ab_lo[a - k0:b - k0, s.box[1], s.box[2]]
            sub_hi = ab_hi[a - k0:b - k0, s.box[1], s.box[2]]
            np.minimum(sub_lo, np.float32(lo), out=sub_lo, where=m)
            np.maximum(sub_hi, np.float32(hi), out=sub_hi, where=m)
        ab_lo[np.isinf(ab_lo)] = np.float32(default_ab)
        ab_hi[np.isinf(ab_hi)] = np.float32(default_ab)
        phys = []
        for c in courses:
            bb = bboxes[c.name]

            def slab(arr, c=c, bb=bb):
                """The slab of ``arr`` (a dose of course c), as the maximum over c's shifts when it has any."""
                d = np.zeros((k1 - k0,) + shape[1:], dtype=np.float32)
                if bb is not None:
                    halo = halos.get(c.name, (0, 0, 0))
                    # the course's nonzero region, grown by the halo, intersected with this slab
                    reg_box = tuple(slice(max(b.start - h, 0), min(b.stop + h, n))
                                    for b, h, n in zip(bb, halo, shape))
                    a, b = max(reg_box[0].start, k0), min(reg_box[0].stop, k1)
                    if a < b:
                        box = (slice(a, b), reg_box[1], reg_box[2])
                        if c.name in deltas:
                            d[a - k0:b - k0, box[1], box[2]] = _shifted_max_box(arr, box, deltas[c.name], halo)
                        else:
                            d[a - k0:b - k0, box[1], box[2]] = arr[box]
                return d

            # several fraction groups: each group's own shift maximum, then (sum, effective fractions): an upper
            # bound of every scenario, as the one-term map is
            d, fx = course_dose(c, slab)
            d = np.asarray(d, dtype=np.float32)
            if c.name in deltas and len(c.groups) <= 1 and keep is not None and out.size <= KEEP_SHIFTED_MAX_VOXELS:
                if c.name not in keep:
                    keep[c.name] = np.zeros(shape, dtype=np.float32)
                keep[c.name][k0:k1] = d
            if scale != 1.0:
                d *= np.float32(scale)
            w = None
            if not c.is_current and spec.recovery != "range":
                r = analysis.credit.get(c.name, 0.0)
                w = (1.0 - r[sl]) if isinstance(r, np.ndarray) else (1.0 - r if r else None)
            phys.append((c, d, w, fx))
        best = None
        for ab in (ab_lo, ab_hi):
            tot = np.zeros(ab.shape, dtype=np.float32)
            for c, d, w, fx in phys:
                e = eqd2(d, fx, ab)
                if w is not None:
                    e *= w
                tot += e
            best = tot if best is None else np.maximum(best, tot, out=best)
        out[sl] = best
    return out


def worst_violations(prep, analysis: Analysis, rob: Robustness, reg, dirs, shifted: dict | None = None) -> list:
    """One worst-case violation region per row whose worst scenario fails or warns: the organ's voxels whose
    voxelwise worst-case EQD2 (organ's own alpha/beta range, the row's courses) exceeds the limit (fail) or the
    warning threshold (warn); V<x>Gy rows: the voxels receiving at least x Gy in the worst case."""
    from .budget import AMBER, RED, Violation, courses_in_scope, region_structure, warn_threshold
    from .protocol import parse_metric
    spec, grid, protocol = prep.protocol.robustness, prep.grid, prep.protocol
    structs = {s.name: s for s in prep.structures}
    scale = 1.0 + spec.dose_uncertainty_percent / 100.0
    out = []
    for c, r in zip(analysis.constraints, rob.rows):
        s = region_structure(c, structs) if r is not None and r["status_worst"] in ("fail", "warn") else None
        if s is None:
            continue
        metric = parse_metric(c.metric)
        used = courses_in_scope(prep.courses, c.scope, getattr(c, "course", None))
        lo, hi, _ = _ab_range(spec, s.organ, c.alpha_beta or s.organ.alpha_beta)
        credited = judged_with_credit(c)
        okey = s.organ.key if s.organ is not None else None
        phys = []
        for x in used:
            mm = 0.0 if x.is_current else reg.get(x.name, 0.0)
            if mm > 0 and shifted and x.name in shifted and len(x.groups) <= 1:
                d, fx = shifted[x.name][s.box].astype(np.float64), x.fractions
            elif mm > 0:
                deltas = shift_index_vectors(grid, dirs * mm)
                d, fx = course_dose(x, lambda a, deltas=deltas: _shifted_max_box(a, s.box, deltas, _halo(
                    grid, deltas)).astype(np.float64))
            else:
                d, fx = course_dose(x, lambda a: a[s.box].astype(np.float64))
            rr = (protocol.recovery.credit(okey, x.interval_months) if credited and not x.is_current
                  and spec.recovery != "range" else 0.0)
            phys.append((x, d * scale, 1.0 - rr, fx))
        dose = None
        for ab in (lo, hi):
            tot = sum(w * eqd2(d, fx, ab) for x, d, w, fx in phys)
            dose = tot if dose is None else np.maximum(dose, tot)
        status = r["status_worst"]
        if metric.is_volume:
            thr = float(metric.param)
            mask = s.mask & (dose >= thr)
            name = f"{s.name} {c.metric} > {c.limit:g} {c.unit} (worst case)"
        else:
            thr = float(c.limit) if status == "fail" else warn_threshold(float(c.limit), c, protocol)
            mask = s.mask & (dose > thr)
            name = (f"{s.name} {c.metric} > {thr:.4g} Gy (worst case)" if status == "fail" else
                    f"{s.name} {c.metric} > {thr:.4g} Gy (worst case, warn: within tolerance of {c.limit:g} Gy)")
        if c.scope != "cumulative":
            name += f" ({c.scope}{' ' + c.course if getattr(c, 'course', None) else ''})"
        out.append(Violation(name, s.name, c.organ, c.metric, c.scope, status, float(c.limit), thr,
                             RED if status == "fail" else AMBER, mask, s.box,
                             float(mask.sum()) * grid.voxel_volume_cc, unit=c.unit))
    return out


# ------------------------------------------------------------------------------------------------ outputs

def add_to_results(results, rob: Robustness) -> None:
    """``robustness`` on every constraint row, ``summary.robustness`` / ``summary.robust_status``,
    ``assumptions.robustness`` and ``robustness_violations``."""
    for c, r in zip(results.constraints, rob.rows):
        try:
            c.robustness = r
        except AttributeError:  # pragma: no cover - frozen result types
            pass
    results.summary["robustness"] = rob.summary
    results.summary["robust_status"] = rob.summary.get("status")
    results.assumptions["robustness"] = rob.assumptions if rob.available else {"status": "not_evaluated",
                                                                                "reason": rob.reason}
    setattr(results, "robustness_violations", [v.summary() for v in rob.violations])
    results.warnings.extend(w for w in rob.warnings if w not in results.warnings)


def write(rob: Robustness, grid: Grid, stage: Path, files: dict[str, str]) -> None:
    """``cumulative_eqd2_worst.nrrd`` and ``violations_worst.seg.nrrd`` into ``stage``."""
    if not rob.available or rob.worst_map is None:
        return
    from .geometry import Volume
    from .io import write_segmentation, write_volume
    desc = ("Voxelwise worst-case cumulative EQD2 (Gy) over the robustness scenarios: no recovery credit (range), "
            "dose x (1 + dose uncertainty), each prior dose at its maximum over the registration shifts, worse "
            "alpha/beta end of the organ's range (union where organs overlap)")
    write_volume(Volume(rob.worst_map.astype(np.float32, copy=False), grid, "cumulative_eqd2_worst.nrrd"),
                 stage / "cumulative_eqd2_worst.nrrd", description=desc, units="Gy")
    files["cumulative_eqd2_worst.nrrd"] = desc
    if rob.violations:
        from .margins import paste, union_box
        box = union_box([v.box for v in rob.violations])
        sub = grid.subgrid(tuple(b.start for b in box[::-1]), tuple(b.stop for b in box[::-1]))
        segs = [(v.name, paste(v.mask, v.box, box), v.color) for v in rob.violations]
        write_segmentation(segs, sub, stage / "violations_worst.seg.nrrd")
        files["violations_worst.seg.nrrd"] = ("One segment per constraint that fails (red) / warns (amber) in its "
                                              "worst scenario: the organ's voxels above the limit in the voxelwise "
                                              "worst case")
