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

import numpy as np

from .errors import InputError

ArrayLike = np.ndarray | float


def _check_fractions(fractions: float) -> float:
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

    ``alpha_beta`` (Gy) is a scalar or an array broadcastable to ``dose``. ``out`` may be ``dose`` itself
    for an in-place conversion.
    """
    n = _check_fractions(fractions)
    ab = _check_alpha_beta(alpha_beta)
    d = np.asarray(dose)
    res = _float_out(d, out)
    d = _input_kept(d, res)
    np.multiply(d, 1.0 / n, out=res)  # dose per fraction, voxel by voxel
    res += ab
    res *= d
    if isinstance(ab, float):
        res *= 1.0 / (2.0 + ab)
    else:
        res /= ab + 2.0
    return res


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
