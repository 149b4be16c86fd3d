"""The linear-quadratic (LQ) maths, in one place.

For a voxel receiving a total physical dose ``D`` (Gy) in ``n`` equal fractions, with the voxel's own
dose per fraction ``d = D / n`` (never the prescription's):

    BED  = D * (1 + d / ab)                       [Gy_ab]
    EQD2 = D * (d + ab) / (2 + ab) = BED / (1 + 2 / ab)   [Gy]

Inverse: the physical dose ``D`` that ``n`` new fractions may deliver so that the voxel's EQD2 rises by
``E >= 0`` Gy solves ``D**2 / n + ab * D - E * (2 + ab) = 0``:

    D = (n / 2) * (-ab + sqrt(ab**2 + 4 * E * (2 + ab) / n))
      = 2 * E * (2 + ab) / (ab + sqrt(ab**2 + 4 * E * (2 + ab) / n))   (the form used: no cancellation)

``E <= 0`` allows no dose. The model assumes full repair between fractions (no incomplete-repair
correction for twice-daily fractions) and no repopulation term. Sources: standard radiobiology; see
``docs/science.md`` and ``../shared/reference/clinical-facts.md`` section 2.

All functions are vectorised (no Python loops over voxels), accept a scalar or per-voxel ``alpha_beta``
and keep float32 inputs in float32 with at most one full-size temporary.
"""

from __future__ import annotations

import numbers
from typing import Union
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import InputError

ArrayLike = Union[np.ndarray, float]  # typing.Union: Slicer 5.8 runs Python 3.9


def _check_fractions(fractions: float) -> float:
    if isinstance(fractions, np.ndarray) and fractions.ndim > 0:
        if fractions.size and not (np.isfinite(fractions).all() and (fractions > 0).all()):
            raise InputError("number of fractions must be finite and > 0 everywhere", field="fractions")
        return fractions
    if isinstance(fractions, bool) or not isinstance(fractions, numbers.Real):
        raise InputError(f"number of fractions must be a number, got {fractions!r}", field="fractions")
    if not np.isfinite(fractions) or fractions <= 0:
        raise InputError(f"number of fractions must be > 0, got {fractions!r}", field="fractions")
    return float(fractions)


def _check_alpha_beta(alpha_beta: ArrayLike) -> ArrayLike:
    if isinstance(alpha_beta, np.ndarray):
        if alpha_beta.size and not (np.isfinite(alpha_beta).all() and (alpha_beta > 0).all()):
            raise InputError("alpha/beta must be finite and > 0 in every voxel", field="alpha_beta")
        return alpha_beta
    if isinstance(alpha_beta, bool) or not isinstance(alpha_beta, numbers.Real):
        raise InputError(f"alpha/beta must be a number, got {alpha_beta!r}", field="alpha_beta")
    if not np.isfinite(alpha_beta) or alpha_beta <= 0:
        raise InputError(f"alpha/beta must be > 0 Gy, got {alpha_beta!r}", field="alpha_beta")
    return float(alpha_beta)


def _float_out(dose: ArrayLike, out: np.ndarray | None) -> np.ndarray:
    dose_arr = np.asarray(dose)
    dtype = dose_arr.dtype if dose_arr.dtype in (np.float32, np.float64) else np.float64
    if out is None:
        return np.empty(dose_arr.shape, dtype=dtype)
    if out.shape != dose_arr.shape:
        raise ValueError("out has the wrong shape")
    return out


def _input_kept(d: np.ndarray, res: np.ndarray) -> np.ndarray:
    """``d`` itself, or a copy when ``res`` (the output) shares its memory: the formulas read ``d`` after
    the first write into ``res``, so an in-place call (``out=dose``) needs the input kept (one temporary)."""
    return d.copy() if np.may_share_memory(d, res) else d


def eqd2(dose: ArrayLike, fractions: float, alpha_beta: ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """EQD2 (Gy) of a physical dose ``dose`` (Gy) given in ``fractions`` equal fractions.

    ``alpha_beta`` (Gy) is a scalar or an array broadcastable to ``dose``. ``fractions`` is a number, or an array
    of the dose's shape: a course of several fraction groups as one term (:func:`effective_fractions`). ``out`` may
    be ``dose`` itself for an in-place conversion.
    """
    n = _check_fractions(fractions)
    ab = _check_alpha_beta(alpha_beta)
    d = np.asarray(dose)
    res = _float_out(d, out)
    d = _input_kept(d, res)
    if isinstance(n, np.ndarray):
        np.divide(d, n, out=res, casting="same_kind")
    else:
        np.multiply(d, 1.0 / n, out=res)  # dose per fraction, voxel by voxel
    res += ab
    res *= d
    if isinstance(ab, float):
        res *= 1.0 / (2.0 + ab)
    else:
        res /= ab + 2.0
    return res


def effective_fractions(group_doses: list[np.ndarray], group_fractions: list[float], total_fractions: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A course of several fraction groups (each group ``g`` its own total dose ``D_g`` in ``n_g`` fractions) as
    ONE term: (total physical dose P = sum_g D_g, effective fractions n_eff = P**2 / sum_g (D_g**2 / n_g)).

    With these, ``eqd2(P, n_eff, ab)`` = P (P / n_eff + ab) / (2 + ab) = (sum_g D_g**2 / n_g + ab P) / (2 + ab)
    = sum_g EQD2(D_g, n_g, ab) for every alpha/beta (never EQD2(P, sum_g n_g), which understates it when the
    groups' doses per fraction differ), and scaling all doses by s leaves n_eff unchanged. n_eff lies between the
    smallest n_g and sum_g n_g; where no group gives dose it is ``total_fractions``. Float64 arrays of the doses'
    shape."""
    p = np.zeros(np.shape(group_doses[0]), dtype=np.float64)
    q = np.zeros_like(p)
    for d, n in zip(group_doses, group_fractions):
        d64 = np.asarray(d, dtype=np.float64)
        p += d64
        q += np.square(d64) * (1.0 / _check_fractions(n))
    n_eff = np.full(p.shape, float(total_fractions))
    pos = q > 0
    n_eff[pos] = np.square(p[pos]) / q[pos]
    return p, n_eff


def bed(dose: ArrayLike, fractions: float, alpha_beta: ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """Biologically effective dose (Gy_ab) of ``dose`` (Gy) in ``fractions`` fractions."""
    n = _check_fractions(fractions)
    ab = _check_alpha_beta(alpha_beta)
    d = np.asarray(dose)
    res = _float_out(d, out)
    d = _input_kept(d, res)
    np.multiply(d, 1.0 / n, out=res)
    if isinstance(ab, float):
        res *= 1.0 / ab
    else:
        res /= ab
    res += 1.0
    res *= d
    return res


def eqd2_from_bed(bed_gy: ArrayLike, alpha_beta: ArrayLike) -> np.ndarray:
    """EQD2 (Gy) from BED (Gy_ab): EQD2 = BED / (1 + 2 / ab)."""
    ab = _check_alpha_beta(alpha_beta)
    return np.asarray(bed_gy) / (1.0 + 2.0 / np.asarray(ab))


def physical_dose_for_eqd2(eqd2_budget: ArrayLike, fractions: float, alpha_beta: ArrayLike,
                           out: np.ndarray | None = None) -> np.ndarray:
    """Physical dose (Gy) that ``fractions`` new fractions may deliver so that EQD2 rises by ``eqd2_budget`` Gy.

    Where the budget is <= 0 the result is 0 (no dose allowed). NaN budgets stay NaN (used to mark
    voxels with no limit). Inverse of :func:`eqd2` for budgets >= 0.
    """
    n = _check_fractions(fractions)
    ab = _check_alpha_beta(alpha_beta)
    e = np.asarray(eqd2_budget)
    res = _float_out(e, out)
    # k = E * (2 + ab), clipped at zero
    np.maximum(e, 0.0, out=res)  # np.maximum propagates NaN
    res *= np.asarray(ab) + 2.0
    # D = 2k / (ab + sqrt(ab^2 + 4k/n))
    denom = np.sqrt(np.asarray(ab) ** 2 + res * (4.0 / n))
    denom += ab
    res *= 2.0
    res /= denom
    return res


def recovery_weighted_sum(course_eqd2: list[np.ndarray], weights: list[ArrayLike],
                          out: np.ndarray | None = None) -> np.ndarray:
    """Cumulative EQD2 = sum over courses of ``weight_c * EQD2_c``, with ``weight_c = 1 - r_c``.

    ``r_c`` is the recovery credit of course ``c`` (0 for the current course). Convention (A) of the
    clinical facts: the prior course is discounted, the tolerance is not raised.
    """
    if not course_eqd2:
        raise ValueError("at least one course is needed")
    res = out if out is not None else np.zeros_like(course_eqd2[0])
    if out is not None:
        res[...] = 0
    for dose, w in zip(course_eqd2, weights):
        if isinstance(w, np.ndarray):
            res += dose * w
        elif w == 1.0:
            res += dose
        elif w != 0.0:
            res += dose * np.float32(w) if dose.dtype == np.float32 else dose * w
    return res


#: Elements per block of :func:`course_and_cumulative_eqd2` (float32: 512 KiB per array, cache-resident).
BLOCK = 1 << 17


def course_and_cumulative_eqd2(doses: list[np.ndarray], fractions: list[float], alpha_beta: ArrayLike,
                               weights: list[ArrayLike], course_out: list[np.ndarray] | None = None,
                               out: np.ndarray | None = None, threads: int | None = None,
                               keep_courses: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
    """Every course's EQD2 map and the cumulative map Σ weight_c · EQD2_c, in one pass over memory.

    The same arithmetic as :func:`eqd2` and :func:`recovery_weighted_sum` (``weight_c = 1 - r_c``), evaluated in
    blocks of :data:`BLOCK` voxels that stay in the CPU cache, on ``threads`` threads (numpy releases the GIL):
    each dose, the α/β map and the weights are read once and each output written once, instead of one full-size
    pass per arithmetic step. ``doses`` (Gy, same shape), ``alpha_beta`` (Gy, scalar or array of that shape),
    ``weights`` (scalar or array) per course. Returns (course EQD2 maps, cumulative map), dtype of the first dose
    (float32 or float64). Differences to :func:`eqd2` are float rounding only (the division by 2 + α/β is done as
    a multiplication by its reciprocal). ``keep_courses=False``: only the cumulative map is produced (the course
    maps live in per-block buffers; the returned list is empty).
    """
    if not doses or len(doses) != len(fractions) or len(doses) != len(weights):
        raise ValueError("one dose, fraction count and weight per course are needed")
    inv_n = [1.0 / _check_fractions(n) for n in fractions]
    d0 = np.asarray(doses[0])
    shape = d0.shape
    dtype = d0.dtype if d0.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    if any(np.shape(d) != shape for d in doses):
        raise ValueError("all doses must have the same shape")
    ab_is_array = isinstance(alpha_beta, np.ndarray) and alpha_beta.ndim > 0
    if ab_is_array:
        if alpha_beta.shape != shape:
            raise ValueError("alpha_beta map must have the dose's shape")
    else:
        alpha_beta = _check_alpha_beta(float(np.asarray(alpha_beta)))
    if keep_courses:
        course_out = course_out if course_out is not None else [np.empty(shape, dtype) for _ in doses]
    else:
        course_out = []
    out = out if out is not None else np.empty(shape, dtype)
    arrays = list(doses) + list(course_out) + [out] + ([alpha_beta] if ab_is_array else []) \
        + [w for w in weights if isinstance(w, np.ndarray) and w.ndim > 0]
    if any(a.shape != shape for a in arrays) or not all(a.flags.c_contiguous for a in arrays):
        # unusual layout: the plain full-array path
        maps = course_out if keep_courses else [np.empty(shape, dtype) for _ in doses]
        for i, (d, n) in enumerate(zip(doses, fractions)):
            eqd2(d, n, alpha_beta, out=maps[i])
        recovery_weighted_sum(maps, weights, out=out)
        return course_out, out

    def flat(a):
        return a.reshape(-1) if isinstance(a, np.ndarray) and a.ndim > 0 else a

    D = [flat(np.asarray(d)) for d in doses]
    E = [flat(e) for e in course_out] if keep_courses else [None] * len(D)
    O = flat(out)
    AB = flat(alpha_beta)
    W = [flat(w) if isinstance(w, np.ndarray) else float(w) for w in weights]
    size = O.size
    bad: list[str] = []

    def work(lo: int, hi: int) -> None:
        inv = np.empty(BLOCK, dtype)
        tmp = np.empty(BLOCK, dtype)
        own = np.empty(BLOCK, dtype)  # the course's EQD2 when it is not kept
        for a in range(lo, hi, BLOCK):
            b = min(a + BLOCK, hi)
            m = b - a
            uniform = False
            if ab_is_array:
                abc = AB[a:b]
                lo_ab, hi_ab = abc.min(), abc.max()
                if not (lo_ab > 0 and np.isfinite(hi_ab)):  # NaN fails both
                    bad.append("alpha/beta must be finite and > 0 in every voxel")
                    return
                uniform = lo_ab == hi_ab  # one alpha/beta in the whole block (most blocks): scalar arithmetic
            if ab_is_array and not uniform:
                iv = inv[:m]
                np.add(abc, 2.0, out=iv)
                if keep_courses:
                    np.divide(1.0, iv, out=iv)  # 1 / (2 + ab)   (else 2 + ab: one division of the sum below)
            else:
                abc = float(lo_ab) if ab_is_array else alpha_beta
                iv = 1.0 / (abc + 2.0) if keep_courses else abc + 2.0
            acc = O[a:b]
            for i, (d, e, w) in enumerate(zip(D, E, W)):
                dc, ec = d[a:b], (e[a:b] if e is not None else own[:m])
                np.multiply(dc, inv_n[i], out=ec)  # each voxel's own dose per fraction
                ec += abc
                ec *= dc                           # D (d + ab); the course's EQD2 once divided by 2 + ab
                if keep_courses:
                    ec *= iv
                if isinstance(w, np.ndarray):
                    if i == 0:
                        np.multiply(ec, w[a:b], out=acc)
                    else:
                        t = tmp[:m]
                        np.multiply(ec, w[a:b], out=t)
                        acc += t
                elif i == 0:
                    np.multiply(ec, w, out=acc) if w != 1.0 else np.copyto(acc, ec)
                elif w == 1.0:
                    acc += ec
                elif w != 0.0:
                    t = tmp[:m]
                    np.multiply(ec, w, out=t)
                    acc += t
            if not keep_courses:  # sum_c w_c D_c (d_c + ab) / (2 + ab): the same ab divides every course
                if ab_is_array and not uniform:
                    acc /= iv
                else:
                    acc *= 1.0 / iv

    n_threads = max(1, min(threads or os.cpu_count() or 1, 4, -(-size // BLOCK)))
    if n_threads == 1:
        work(0, size)
    else:
        cuts = [0] + [(size * t // n_threads) // BLOCK * BLOCK for t in range(1, n_threads)] + [size]
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(lambda t: work(cuts[t], cuts[t + 1]), range(n_threads)))
    if bad:
        raise InputError(bad[0], field="alpha_beta")
    return course_out, out
