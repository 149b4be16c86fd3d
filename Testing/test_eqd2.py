"""LQ maths (ReirradiationNPCLib.eqd2) against hand calculations (clinical facts section 2) and properties.

Hand formulas used here, for a total physical dose D (Gy) in n fractions, d = D / n:
    BED = D (1 + d / ab),  EQD2 = D (d + ab) / (2 + ab),
    inverse: D = (n / 2) (-ab + sqrt(ab^2 + 4 E (2 + ab) / n)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ReirradiationNPCLib.eqd2 import bed, eqd2, eqd2_from_bed, physical_dose_for_eqd2, recovery_weighted_sum
from ReirradiationNPCLib.errors import InputError

# (total dose Gy, fractions, alpha/beta Gy, EQD2 Gy rounded to 0.01) - clinical facts section 2
WORKED = [
    (65.0, 54, 10.0, 60.69), (65.0, 54, 3.0, 54.65), (65.0, 54, 2.0, 52.06),
    (60.0, 27, 10.0, 61.11), (60.0, 27, 3.0, 62.67), (60.0, 27, 2.0, 63.33),
    (70.0, 33, 10.0, 70.71), (70.0, 33, 3.0, 71.70), (70.0, 33, 2.0, 72.12),
]


@pytest.mark.parametrize("dose, n, ab, expected", WORKED)
def test_worked_values_scalar(dose, n, ab, expected):
    assert float(eqd2(dose, n, ab)) == pytest.approx(expected, abs=0.005)
    # and the exact hand formula
    assert float(eqd2(dose, n, ab)) == pytest.approx(dose * (dose / n + ab) / (2 + ab), rel=1e-12)


def test_worked_values_exact_fractions():
    # 65/54 = 1.2037 Gy per fraction, never rounded: EQD2(ab 2) = 65 * (65/54 + 2) / 4 = 52.0602 Gy
    assert float(eqd2(65.0, 54, 2.0)) == pytest.approx(52.060185185, abs=1e-8)
    # 60/27 at ab 3: 60 * (2.2222 + 3) / 5 = 62.6667
    assert float(eqd2(60.0, 27, 3.0)) == pytest.approx(62.666666667, abs=1e-8)


def test_per_voxel_alpha_beta_array():
    dose = np.array([65.0, 65.0, 65.0, 60.0, 60.0, 60.0, 70.0, 70.0, 70.0])
    ab = np.array([10.0, 3.0, 2.0] * 3)
    # one fractionation per call: the 65/54 block
    got = eqd2(dose[:3], 54, ab[:3])
    np.testing.assert_allclose(got, [60.69, 54.65, 52.06], atol=0.005)
    got = eqd2(dose[3:6], 27, ab[3:6])
    np.testing.assert_allclose(got, [61.11, 62.67, 63.33], atol=0.005)
    got = eqd2(dose[6:], 33, ab[6:])
    np.testing.assert_allclose(got, [70.71, 71.70, 72.12], atol=0.005)


def test_each_voxel_uses_its_own_dose_per_fraction():
    # 10 Gy in 54 fractions in a low-dose voxel: d = 0.185 Gy, EQD2(ab 2) = 10 * (0.18519 + 2) / 4 = 5.4630 Gy
    # (using the prescription's 1.2037 Gy/fx would give 8.009 Gy)
    got = eqd2(np.array([10.0, 65.0]), 54, 2.0)
    np.testing.assert_allclose(got, [10 * (10 / 54 + 2) / 4, 65 * (65 / 54 + 2) / 4], rtol=1e-12)
    assert got[0] == pytest.approx(5.46296, abs=1e-5)


def test_per_voxel_alpha_beta_3d_broadcast():
    dose = np.full((2, 3, 4), 70.0)
    ab = np.empty_like(dose)
    ab[0], ab[1] = 2.0, 10.0
    got = eqd2(dose, 33, ab)
    np.testing.assert_allclose(got[0], 72.12, atol=0.005)
    np.testing.assert_allclose(got[1], 70.71, atol=0.005)


def test_bed_hand_values():
    # BED(70 Gy / 33 fx, ab 2) = 70 (1 + 2.1212 / 2) = 144.242 Gy2 ; EQD2 = BED / (1 + 2/2) = 72.121
    assert float(bed(70.0, 33, 2.0)) == pytest.approx(70 * (1 + 70 / 33 / 2), rel=1e-12)
    assert float(bed(70.0, 33, 2.0)) == pytest.approx(144.2424, abs=1e-4)
    assert float(eqd2_from_bed(144.2424242424, 2.0)) == pytest.approx(72.1212, abs=1e-4)
    # Nieder 2006: BED 135.5 Gy2 = 67.75 Gy EQD2 at ab 2; 98 Gy2 = 49 Gy
    assert float(eqd2_from_bed(135.5, 2.0)) == pytest.approx(67.75, abs=1e-12)
    assert float(eqd2_from_bed(98.0, 2.0)) == pytest.approx(49.0, abs=1e-12)


def test_inverse_worked_value():
    # E = 20 Gy, n = 30, ab = 2: D = 15 (-2 + sqrt(4 + 4*20*4/30)) = 27.4456 Gy
    d = float(physical_dose_for_eqd2(20.0, 30, 2.0))
    assert d == pytest.approx(27.45, abs=0.005)
    assert d == pytest.approx(15 * (-2 + math.sqrt(4 + 320 / 30)), rel=1e-12)


def test_inverse_no_budget_means_no_dose_and_nan_stays_nan():
    got = physical_dose_for_eqd2(np.array([0.0, -5.0, np.nan, 20.0]), 30, 2.0)
    assert got[0] == 0.0 and got[1] == 0.0
    assert np.isnan(got[2])
    assert got[3] == pytest.approx(27.4456, abs=1e-4)


def test_inverse_per_voxel_alpha_beta():
    e = np.array([20.0, 20.0])
    ab = np.array([2.0, 10.0])
    got = physical_dose_for_eqd2(e, 30, ab)
    exp = [(30 / 2) * (-a + math.sqrt(a * a + 4 * 20 * (2 + a) / 30)) for a in (2.0, 10.0)]
    np.testing.assert_allclose(got, exp, rtol=1e-12)


@pytest.mark.parametrize("fn", [eqd2, bed, physical_dose_for_eqd2])
def test_float32_stays_float32(fn):
    x = np.linspace(0, 80, 24, dtype=np.float32).reshape(2, 3, 4)
    assert fn(x, 33, 3.0).dtype == np.float32
    assert fn(x, 33, np.full(x.shape, 2.0, dtype=np.float32)).dtype == np.float32
    assert fn(x.astype(np.float64), 33, 3.0).dtype == np.float64


def test_float32_accuracy_within_1e3_gy():
    x = np.linspace(0, 150, 1001, dtype=np.float32)
    got = eqd2(x, 54, 2.0)
    exp = x.astype(np.float64) * (x.astype(np.float64) / 54 + 2) / 4
    assert np.max(np.abs(got - exp)) < 1e-4


@pytest.mark.parametrize("fn, exp", [
    (eqd2, lambda D, n, ab: D * (D / n + ab) / (2 + ab)),
    (bed, lambda D, n, ab: D * (1 + D / n / ab)),
])
def test_in_place_out_is_dose(fn, exp):
    d = np.array([[65.0, 70.0], [10.0, 0.0]], dtype=np.float32)
    ref = exp(d.astype(np.float64), 54, 2.0)
    res = fn(d, 54, 2.0, out=d)
    assert res is d
    np.testing.assert_allclose(d, ref, rtol=1e-6)
    # per-voxel alpha/beta, in place
    d = np.array([65.0, 65.0, 65.0], dtype=np.float32)
    ab = np.array([10.0, 3.0, 2.0], dtype=np.float32)
    fn(d, 54, ab, out=d)
    np.testing.assert_allclose(d, exp(65.0, 54, np.array([10.0, 3.0, 2.0])), rtol=1e-6)


def test_out_separate_array():
    d = np.array([65.0, 70.0])
    out = np.empty(2)
    res = eqd2(d, 54, 10.0, out=out)
    assert res is out
    np.testing.assert_allclose(out, [65 * (65 / 54 + 10) / 12, 70 * (70 / 54 + 10) / 12], atol=1e-4)
    np.testing.assert_array_equal(d, [65.0, 70.0])  # input untouched


def test_inverse_in_place():
    e = np.array([20.0, 0.0, -1.0])
    res = physical_dose_for_eqd2(e, 30, 2.0, out=e)
    assert res is e
    np.testing.assert_allclose(e, [27.44562647, 0.0, 0.0], atol=1e-8)


def test_recovery_weighted_sum_hand():
    e1 = np.array([60.0, 40.0], dtype=np.float32)
    e2 = np.array([10.0, 20.0], dtype=np.float32)
    # prior course credit 50 % in voxel 0, 0 % in voxel 1; current course weight 1
    got = recovery_weighted_sum([e1, e2], [np.array([0.5, 1.0], dtype=np.float32), 1.0])
    np.testing.assert_allclose(got, [40.0, 60.0])
    got = recovery_weighted_sum([e1, e2], [0.75, 1.0])
    np.testing.assert_allclose(got, [55.0, 50.0])
    assert got.dtype == np.float32


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("ab", [0.0, -3.0, float("nan"), float("inf"), -0.0])
@pytest.mark.parametrize("fn", [eqd2, bed, physical_dose_for_eqd2])
def test_bad_scalar_alpha_beta_raises(fn, ab):
    with pytest.raises(InputError, match="alpha/beta"):
        fn(np.array([60.0]), 30, ab)


@pytest.mark.parametrize("bad", [0.0, -2.0, np.nan])
@pytest.mark.parametrize("fn", [eqd2, bed, physical_dose_for_eqd2])
def test_bad_alpha_beta_in_one_voxel_raises(fn, bad):
    ab = np.array([3.0, bad, 2.0])
    with pytest.raises(InputError, match="alpha/beta"):
        fn(np.array([60.0, 60.0, 60.0]), 30, ab)


@pytest.mark.parametrize("n", [0, -5, float("nan"), float("inf"), True, "30", None])
@pytest.mark.parametrize("fn", [eqd2, bed, physical_dose_for_eqd2])
def test_bad_fractions_raise(fn, n):
    with pytest.raises(InputError, match="fractions"):
        fn(np.array([60.0]), n, 3.0)


def test_eqd2_from_bed_rejects_bad_alpha_beta():
    with pytest.raises(InputError):
        eqd2_from_bed(100.0, 0.0)


# ------------------------------------------------------------------------------------------ properties

ABS = st.floats(min_value=0.5, max_value=30.0, allow_nan=False)
NS = st.integers(min_value=1, max_value=60)
DOSES = st.floats(min_value=0.0, max_value=150.0, allow_nan=False, allow_subnormal=False)


@settings(max_examples=150, deadline=None)
@given(n=NS, ab=ABS)
def test_property_2gy_per_fraction_equals_physical_dose(n, ab):
    d = 2.0 * n
    assert float(eqd2(d, n, ab)) == pytest.approx(d, rel=1e-12)
    arr = np.full(5, d, dtype=np.float32)
    np.testing.assert_allclose(eqd2(arr, n, np.full(5, ab)), d, rtol=1e-6)


@settings(max_examples=150, deadline=None)
@given(e=st.floats(min_value=0.0, max_value=200.0, allow_nan=False), n=NS, ab=ABS)
def test_property_inverse_round_trips(e, n, ab):
    d = float(physical_dose_for_eqd2(e, n, ab))
    assert d >= 0
    assert float(eqd2(d, n, ab)) == pytest.approx(e, rel=1e-9, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(dose=DOSES, n=NS, ab=ABS)
def test_property_forward_then_inverse_gives_the_dose(dose, n, ab):
    e = float(eqd2(dose, n, ab))
    assert float(physical_dose_for_eqd2(e, n, ab)) == pytest.approx(dose, rel=1e-9, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(d1=DOSES, d2=DOSES, n=NS, ab=ABS)
def test_property_monotonic_in_dose(d1, d2, n, ab):
    lo, hi = sorted((d1, d2))
    e_lo, e_hi = float(eqd2(lo, n, ab)), float(eqd2(hi, n, ab))
    if hi > lo + 1e-9:
        assert e_hi > e_lo
    else:
        assert e_hi >= e_lo
    # vectorised: a sorted dose array gives a non-decreasing EQD2 array
    arr = np.sort(np.array([d1, d2, (d1 + d2) / 2, 0.0]))
    assert np.all(np.diff(eqd2(arr, n, ab)) >= 0)


@settings(max_examples=150, deadline=None)
@given(dose=DOSES, n=NS, ab=ABS)
def test_property_bed_eqd2_relation(dose, n, ab):
    b = float(bed(dose, n, ab))
    assert b == pytest.approx(dose * (1 + dose / n / ab), rel=1e-12, abs=1e-12)
    assert float(eqd2(dose, n, ab)) == pytest.approx(b / (1 + 2 / ab), rel=1e-12, abs=1e-12)
    assert float(eqd2_from_bed(b, ab)) == pytest.approx(float(eqd2(dose, n, ab)), rel=1e-12, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(dose=DOSES, n=NS, ab=ABS)
def test_property_above_2gy_per_fraction_lower_ab_gives_higher_eqd2(dose, n, ab):
    # d > 2 Gy: EQD2 > D and decreasing in ab; d < 2 Gy: EQD2 < D
    d = dose / n
    e = float(eqd2(dose, n, ab))
    if d > 2 + 1e-9:
        assert e > dose
        assert float(eqd2(dose, n, ab + 1.0)) < e
    elif d < 2 - 1e-9 and dose > 1e-6:
        assert e < dose
