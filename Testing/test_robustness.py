"""Robustness scenarios (issue 13): alpha/beta ranges, recovery range, registration shifts, dose uncertainty.

Analytic cases with hand calculations:
- a cord cylinder with uniform known doses per course: the worst cumulative EQD2 over an alpha/beta range
  1.5-3 Gy is the larger of the two hand values at the ends;
- a prior dose with a linear gradient across an organ and 3 mm registration uncertainty: the worst Dmean is the
  nominal plus 3 mm x the cumulative EQD2 gradient along the worst axis;
- the monotonicity argument (hypothesis) and the place where it fails (mixed dose per fraction, quantile metric).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analytic import coords, eqd2_hand, write_image, write_yaml
from ReirradiationNPCLib import dvh, robustness
from ReirradiationNPCLib.analysis import compute
from ReirradiationNPCLib.case import load_case
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.pipeline import prepare
from ReirradiationNPCLib.protocol import Constraint, load_protocol

SIZE = (40, 40, 40)                  # i, j, k
SPACING = (1.0, 1.0, 1.0)            # mm
ORIGIN = (-19.5, -19.5, -19.5)       # voxel centres at -19.5 .. 19.5 mm
SHAPE = (SIZE[2], SIZE[1], SIZE[0])


def _protocol(ab_range, reg_mm=3.0, recovery=None, dose_pct=0.0, metrics=("Dmax", "D0.03cc", "Dmean"),
              limit=200.0, organ_ab=2.0):
    rec = {"model": "none"} if recovery is None else {
        "model": "step", "table": [{"min_months": 0, "fraction": recovery}], "organs": ["spinal_cord"],
        "source": "test credit"}
    rob = {"recovery": "range", "registration_mm": reg_mm, "registration_source": "test",
           "dose_uncertainty_percent": dose_pct}
    if dose_pct:
        rob["dose_uncertainty_source"] = "test"
    if ab_range is not None:
        rob["alpha_beta_ranges"] = [{"organs": ["spinal_cord"], "min": ab_range[0], "max": ab_range[1],
                                     "source": "test range", "verified": False}]
    return {"name": "robustness test", "version": "1", "alpha_beta": {"default": 3},
            "recovery": rec, "robustness": rob,
            "organs": {"spinal_cord": {"aliases": ["SpinalCord"], "alpha_beta": organ_ab, "constraints": [
                {"metric": m, "limit_gy": limit, "scope": "cumulative", "source": "test", "verified": False}
                for m in metrics]}}}


def _run(tmp_path, prior, current, mask, protocol, fr=(20, 30), case_extra=None):
    write_image(tmp_path / "prior.nrrd", prior.astype(np.float32), ORIGIN, SPACING, units="Gy")
    write_image(tmp_path / "current.nrrd", current.astype(np.float32), ORIGIN, SPACING, units="Gy")
    write_image(tmp_path / "masks" / "SpinalCord.nrrd", mask.astype(np.uint8), ORIGIN, SPACING)
    write_yaml(tmp_path / "protocol.yaml", protocol)
    write_yaml(tmp_path / "case.yaml", {
        "reference": {"structures": "masks"}, "protocol": "protocol.yaml",
        "courses": [{"name": "prior", "dose": "prior.nrrd", "fractions": fr[0], "interval_months": 24,
                     **(case_extra or {})},
                    {"name": "current", "dose": "current.nrrd", "fractions": fr[1]}]})
    prep = prepare(load_case(tmp_path / "case.yaml"))
    analysis = compute(prep.grid, prep.courses, prep.structures, prep.protocol)
    return prep, analysis, robustness.compute(prep, analysis)


def _cylinder(radius=5.0, half_length=12.0):
    x, y, z = coords(SIZE, ORIGIN, SPACING)
    return (x ** 2 + y ** 2 <= radius ** 2) & (np.abs(z) <= half_length)


def _row(analysis, rob, metric):
    for c, r in zip(analysis.constraints, rob.rows):
        if c.metric == metric:
            return c, r
    raise KeyError(metric)


# ------------------------------------------------------------------------------------------- judged cases

def test_cord_cylinder_alpha_beta_range_worst_is_max_at_ends(tmp_path):
    """Uniform 60 Gy / 20 fx (3 Gy/fx) prior and 36 Gy / 30 fx (1.2 Gy/fx) current: the two courses pull alpha/beta
    in opposite directions; the worst over 1.5-3 Gy is the larger end value, by hand."""
    prior = np.full(SHAPE, 60.0)
    current = np.full(SHAPE, 36.0)
    prep, analysis, rob = _run(tmp_path, prior, current, _cylinder(), _protocol((1.5, 3.0)))
    ends = [float(eqd2_hand(60.0, 20, ab) + eqd2_hand(36.0, 30, ab)) for ab in (1.5, 3.0)]
    assert ends[0] == pytest.approx(60 * 4.5 / 3.5 + 36 * 2.7 / 3.5)   # 104.914 Gy at 1.5 Gy
    assert ends[1] == pytest.approx(72.0 + 30.24)                       # 102.24 Gy at 3 Gy
    nominal = float(eqd2_hand(60.0, 20, 2.0) + eqd2_hand(36.0, 30, 2.0))
    for metric in ("Dmax", "D0.03cc", "Dmean"):
        c, r = _row(analysis, rob, metric)
        assert c.value == pytest.approx(nominal, abs=1e-4)
        assert r["worst_value"] == pytest.approx(max(ends), abs=0.05)
        assert r["best_value"] == pytest.approx(min(ends), abs=0.05)
        assert r["worst_scenario"]["alpha_beta_gy"] == pytest.approx(1.5)
        assert r["scenarios"] == 2 * 27           # 2 alpha/beta ends x (no shift + 26 shifts); no credit
        assert r["status_worst"] == "pass"
    # the uniform dose does not move under a shift: the worst-case map is the alpha/beta envelope, voxel by voxel
    inside = _cylinder()
    assert np.allclose(rob.worst_map[inside], max(ends), atol=1e-3)


def test_cord_cylinder_gradient_worst_at_range_end(tmp_path):
    """A dose gradient along the cord: every sample moves the same way with alpha/beta (all d > 2 Gy/fx), so the
    worst Dmax is the hand value of the hottest sample at alpha/beta 1.5 Gy."""
    x, y, z = coords(SIZE, ORIGIN, SPACING)
    prior = 50.0 + 0.5 * z          # 2.2 .. 3.2 Gy/fx inside the cord (20 fx)
    current = np.full(SHAPE, 45.0)  # 3 Gy/fx (15 fx)
    prep, analysis, rob = _run(tmp_path, prior, current, _cylinder(), _protocol((1.5, 3.0), reg_mm=0.0),
                               fr=(20, 15))
    c, r = _row(analysis, rob, "Dmax")
    samples = analysis.samples["SpinalCord"]
    zmax = float(samples.points_mm[:, 2].max())
    hand = {ab: float(eqd2_hand(50.0 + 0.5 * zmax, 20, ab) + eqd2_hand(45.0, 15, ab)) for ab in (1.5, 3.0)}
    assert r["worst_value"] == pytest.approx(max(hand.values()), abs=0.05)
    assert r["worst_scenario"]["alpha_beta_gy"] == 1.5
    assert r["scenarios"] == 2   # no registration uncertainty, no credit: the two alpha/beta ends
    assert not r["ab_interior"]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_linear_gradient_registration_dmean(tmp_path, axis):
    """Prior dose 30 + 0.5 Gy/mm along one axis across a box organ; 3 mm registration uncertainty: worst Dmean =
    nominal + 3 mm x the gradient of the cumulative EQD2 (along the worst axis, +axis), within 2 %."""
    xyz = coords(SIZE, ORIGIN, SPACING)
    g = 0.5
    prior = 30.0 + g * xyz[axis]
    current = np.full(SHAPE, 10.0)
    mask = (np.abs(xyz[0]) <= 6) & (np.abs(xyz[1]) <= 6) & (np.abs(xyz[2]) <= 6)
    prep, analysis, rob = _run(tmp_path, prior, current, mask, _protocol(None), fr=(15, 5))
    c, r = _row(analysis, rob, "Dmean")
    # gradient of the cumulative EQD2 (Gy/mm) at the organ centre: dE/dD * g, dE/dD = (2 D / n + ab) / (2 + ab)
    dE = (2 * 30.0 / 15 + 2.0) / (2.0 + 2.0) * g
    expected = c.value + 3.0 * dE
    assert r["worst_value"] == pytest.approx(expected, rel=0.02)
    assert r["worst_value"] - c.value == pytest.approx(3.0 * dE, rel=0.02)
    shift = r["worst_scenario"]["shift_mm"]["prior"]
    assert shift[axis] == pytest.approx(3.0) and sum(abs(v) for v in shift) == pytest.approx(3.0)
    assert r["best_value"] == pytest.approx(c.value - 3.0 * dE, rel=0.02)
    assert r["scenarios"] == 27


def test_case_registration_uncertainty_overrides_protocol(tmp_path):
    xyz = coords(SIZE, ORIGIN, SPACING)
    prior = 30.0 + 0.5 * xyz[0]
    mask = (np.abs(xyz[0]) <= 6) & (np.abs(xyz[1]) <= 6) & (np.abs(xyz[2]) <= 6)
    _, analysis, rob = _run(tmp_path, prior, np.full(SHAPE, 10.0), mask, _protocol(None),
                            fr=(15, 5), case_extra={"registration_uncertainty_mm": 1.0})
    c, r = _row(analysis, rob, "Dmean")
    assert r["worst_scenario"]["shift_mm"]["prior"][0] == pytest.approx(1.0)
    assert r["registration_mm"] == {"prior": 1.0}


def test_recovery_range_and_dose_uncertainty_corners(tmp_path):
    """Credited row: worst at no credit and dose x 1.03, best at the protocol's credit and dose x 0.97."""
    prior = np.full(SHAPE, 40.0)
    current = np.full(SHAPE, 20.0)
    proto = _protocol(None, reg_mm=0.0, recovery=0.5, dose_pct=3.0, metrics=("Dmax",))
    if "basis" in Constraint.__dataclass_fields__:    # issue 9: a limit states its recovery basis
        for c in proto["organs"]["spinal_cord"]["constraints"]:
            c["basis"] = "credited"
    _, analysis, rob = _run(tmp_path, prior, current, _cylinder(), proto, fr=(20, 10))
    c, r = _row(analysis, rob, "Dmax")
    worst = float(eqd2_hand(40 * 1.03, 20, 2.0) + eqd2_hand(20 * 1.03, 10, 2.0))
    best = float(0.5 * eqd2_hand(40 * 0.97, 20, 2.0) + eqd2_hand(20 * 0.97, 10, 2.0))
    assert r["worst_value"] == pytest.approx(worst, abs=1e-3)
    assert r["best_value"] == pytest.approx(best, abs=1e-3)
    assert r["scenarios"] == 2 * 2     # credit ends x dose ends
    assert r["worst_scenario"]["recovery"] == {"prior": 0.0}
    # the worst-case map: no credit, dose x 1.03
    assert np.allclose(rob.worst_map[_cylinder()], worst, atol=1e-3)


def test_cumulative_row_without_basis_counts_the_prior_course_in_full(tmp_path):
    """One rule (protocol.judged_with_credit): a cumulative row that states no basis is judged undiscounted by
    the verdict, the maps, the budget and the robustness scenarios alike. Here its best case must not take the
    protocol's 50 % credit: best = EQD2(40 x 0.97 / 20) + EQD2(20 x 0.97 / 10), by hand at alpha/beta 2."""
    import dataclasses

    from ReirradiationNPCLib.protocol import judged_with_credit
    prior = np.full(SHAPE, 40.0)
    current = np.full(SHAPE, 20.0)
    proto = _protocol(None, reg_mm=0.0, recovery=0.5, dose_pct=3.0, metrics=("Dmax",))
    for c in proto["organs"]["spinal_cord"]["constraints"]:
        c["basis"] = "credited"
    prep, analysis, _ = _run(tmp_path, prior, current, _cylinder(), proto, fr=(20, 10))
    assert [judged_with_credit(c) for c in analysis.constraints] == [True]
    analysis.constraints = [dataclasses.replace(c, basis=None) for c in analysis.constraints]
    assert [judged_with_credit(c) for c in analysis.constraints] == [False]
    c, r = _row(analysis, robustness.compute(prep, analysis), "Dmax")
    best = float(eqd2_hand(40 * 0.97, 20, 2.0) + eqd2_hand(20 * 0.97, 10, 2.0))
    assert r["best_value"] == pytest.approx(best, abs=1e-3)
    assert r["best_value"] > float(0.5 * eqd2_hand(40 * 0.97, 20, 2.0) + eqd2_hand(20 * 0.97, 10, 2.0)) + 15  # the credit: 19.1 Gy


def test_judged_with_credit_only_for_credited_cumulative_rows():
    from types import SimpleNamespace as NS

    from ReirradiationNPCLib.protocol import judged_with_credit
    assert judged_with_credit(NS(scope="cumulative", basis="credited"))
    assert not judged_with_credit(NS(scope="cumulative", basis="undiscounted"))
    assert not judged_with_credit(NS(scope="cumulative", basis=None))
    assert not judged_with_credit(NS(scope="cumulative"))
    assert not judged_with_credit(NS(scope="current", basis="credited"))
    assert not judged_with_credit(NS(scope="per_course", basis=None))


def test_worst_status_and_summary(tmp_path):
    """A row that passes nominally and fails in its worst scenario makes the robust status robust_fail."""
    prior = np.full(SHAPE, 60.0)
    current = np.full(SHAPE, 36.0)
    nominal = float(eqd2_hand(60.0, 20, 2.0) + eqd2_hand(36.0, 30, 2.0))   # 104.0
    proto = _protocol((1.5, 3.0), metrics=("Dmax",), limit=104.5)
    _, analysis, rob = _run(tmp_path, prior, current, _cylinder(), proto)
    c, r = _row(analysis, rob, "Dmax")
    assert c.value == pytest.approx(nominal, abs=1e-4) and c.status in ("pass", "warn")
    assert r["status_worst"] == "fail"
    assert rob.summary["status"] == "robust_fail"
    assert rob.summary["rows_failing_worst_only"]
    assert [v.structure for v in rob.violations] == ["SpinalCord"]
    proto = _protocol((1.5, 3.0), metrics=("Dmax",), limit=150)
    _, analysis, rob = _run(tmp_path, prior, current, _cylinder(), proto)
    assert rob.summary["status"] == "robust_pass"


def test_no_robustness_block_says_not_evaluated(tmp_path):
    proto = _protocol(None)
    del proto["robustness"]
    _, analysis, rob = _run(tmp_path, np.full(SHAPE, 40.0), np.full(SHAPE, 20.0), _cylinder(), proto)
    assert not rob.available and rob.summary["status"] == "not_evaluated"
    assert all(r is None for r in rob.rows)


# ----------------------------------------------------------------------------- monotonicity (hypothesis)

doses = st.floats(0.0, 90.0)
fracs = st.integers(1, 40)


@settings(max_examples=300, deadline=None)
@given(d1=doses, n1=fracs, d2=doses, n2=fracs, lo=st.floats(0.5, 10.0), width=st.floats(0.0, 10.0),
       t=st.floats(0.0, 1.0), r=st.floats(0.0, 0.9), s=st.floats(0.0, 1.0))
def test_cumulative_eqd2_is_bounded_by_its_range_ends(d1, n1, d2, n2, lo, width, t, r, s):
    """Per voxel, the cumulative EQD2 sum_c w_c D_c (d_c + ab) / (2 + ab) = a + b / (2 + ab) is monotone in ab on
    any range (b = sum w D (d - 2) does not depend on ab), monotone decreasing in the credit r and increasing in the
    dose: the ends of each range bound every interior value."""
    hi = lo + width
    ab = lo + t * width

    def cum(a, rr=r, scale=1.0):
        return (1 - rr) * float(eqd2_hand(scale * d1, n1, a)) + float(eqd2_hand(scale * d2, n2, a))

    ends = (cum(lo), cum(hi))
    tol = 1e-9 * max(1.0, *map(abs, ends))
    assert min(ends) - tol <= cum(ab) <= max(ends) + tol
    assert cum(ab, rr=0.0) >= cum(ab, rr=r) - tol
    assert cum(ab, scale=1.0 + s / 10) >= cum(ab) - tol


def test_quantile_metric_of_a_mixed_organ_can_peak_inside_the_range():
    """Where the monotonicity argument fails: two samples, one above 2 Gy/fx (EQD2 falls with ab), one below (EQD2
    rises with ab). Their minimum (D100%, a quantile) is largest where the two cross, inside the range."""
    # two voxels of one organ, each dominated by a different course: 60 Gy in 20 fx (3 Gy/fx) and 72 Gy in 60 fx
    # (1.2 Gy/fx). They cross at ab = 7.8 Gy (66.12 Gy); at the ends min is 55.54 (1.5 Gy) and 65.0 (10 Gy).
    D2 = np.array([60.0, 72.0])
    nn = np.array([20, 60])

    def dmin2(ab):
        return float(np.min(eqd2_hand(D2, nn, ab)))

    ends2 = max(dmin2(1.5), dmin2(10.0))
    interior2 = max(dmin2(a) for a in np.linspace(1.5, 10.0, 400))
    assert interior2 > ends2 + 0.5       # the ends do NOT bound a quantile metric of a mixed organ
    assert interior2 == pytest.approx(60 * 10.8 / 9.8, abs=0.05)
    # Dmax (convex in 1/(2+ab)) and Dmean (linear) stay bounded by the ends
    dmax = [float(np.max(eqd2_hand(D2, nn, a))) for a in np.linspace(1.5, 10.0, 400)]
    assert max(dmax) <= max(dmax[0], dmax[-1]) + 1e-9


def test_mixed_organ_row_evaluates_interior_alpha_beta(tmp_path):
    """A cord half at 3 Gy/fx, half at 1.2 Gy/fx (the same fractions): D95% gets interior alpha/beta values and
    the worst is at least the worst of the ends."""
    x, y, z = coords(SIZE, ORIGIN, SPACING)
    prior = np.where(z > 0, 60.0, 24.0)           # 20 fx: 3 and 1.2 Gy/fx
    current = np.zeros(SHAPE)
    proto = _protocol((1.5, 3.0), reg_mm=0.0, metrics=("D95%", "Dmax"))
    _, analysis, rob = _run(tmp_path, prior, current, _cylinder(), proto, fr=(20, 10))
    c, r = _row(analysis, rob, "D95%")
    assert r["ab_interior"] and r["scenarios"] == 2
    samples = analysis.samples["SpinalCord"]
    d = samples.dose(prior.astype(np.float32), analysis.grid)
    ends = [robustness.metric_value(eqd2_hand(d, 20, ab), samples.sample_volume_cc, samples.volume_cc,
                                    dvh.parse("D95%")) for ab in (1.5, 3.0)]
    assert r["worst_value"] >= max(ends) - 1e-4     # (scenario doses are float32)
    _, rmax = _row(analysis, rob, "Dmax")
    assert not rmax["ab_interior"]        # Dmax: the ends are exact, no interior values needed


# ------------------------------------------------------------------------------------------ building blocks

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), seed=st.integers(0, 10_000), uniform=st.booleans(),
       name=st.sampled_from(["Dmax", "Dmin", "Dmean", "D0.03cc", "D0.5cc", "D2cc", "D50%", "D95%", "V20Gy",
                             "V35Gy", "V5Gy", "V20Gy%"]))
def test_fast_metric_equals_sorted_samples(n, seed, uniform, name):
    rng = np.random.default_rng(seed)
    d = np.round(rng.uniform(0, 40, n), 1)      # ties on purpose
    vol = 0.01 if uniform else rng.uniform(0.001, 0.02, n)
    ss = dvh.SortedSamples(d, vol)
    total = float(0.01 * n) if uniform else ss.total_cc
    ref = ss.metric(dvh.parse(name))
    got = robustness.metric_value(d, vol, total, dvh.parse(name))
    if ref is None:
        assert got is None
    else:
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)
    if name == "Dmean" and not uniform:
        assert got == ref    # one formula (dvh.weighted_mean): the same bits, not only close


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_dmean_is_the_same_bits_in_the_scenarios_and_the_table(seed):
    """Thousands of unequal samples (merged sub-voxel samples): the robustness scenarios' Dmean and the table's are
    one formula (dvh.weighted_mean), so equal to the last bit; a BLAS dot product sums in another order and
    differs in the last bits for most such arrays. The mean itself by hand: sum(d * v) / sum(v) within 1e-12."""
    rng = np.random.default_rng(seed)
    n = 5000 + 1000 * seed
    d = np.round(rng.uniform(0, 40, n), 1)
    v = rng.uniform(0.001, 0.02, n)
    ss = dvh.SortedSamples(d, v)
    got = robustness.metric_value(d, v, ss.total_cc, dvh.parse("Dmean"))
    assert got == ss.metric(dvh.parse("Dmean"))
    assert got == pytest.approx(math.fsum(d * v) / math.fsum(v), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(["D0.03cc", "D0.1cc", "D1%", "D2cc"]),
       rounding=st.sampled_from([None, 1, 0]))
def test_scenario_rows_metric_equals_per_row_metric(seed, name, rounding):
    """The vectorised near-maximum path (all scenarios at once) gives the per-row value, ties included."""
    rng = np.random.default_rng(seed)
    cum = rng.uniform(20, 60, (5, 3000)).astype(np.float32)
    if rounding is not None:
        cum = np.round(cum, rounding)
    m = dvh.parse(name)
    ev = object.__new__(robustness._StructureScenarios)
    for vol in (0.001, rng.uniform(0.0002, 0.002, 3000)):     # equal volumes, and one volume per sample
        ev.vol, ev.total = vol, float(np.sum(np.broadcast_to(vol, (3000,))))
        got = ev._metric_rows(cum, m)
        ref = [dvh.SortedSamples(cum[r].astype(np.float64), vol).metric(m) for r in range(5)]
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)


#: the scenarios' Dmean rows of unequal samples (K scenarios x N samples): printed as hex, to the last bit
_DMEAN_ROWS = """
import numpy as np
from ReirradiationNPCLib import dvh, robustness
rng = np.random.default_rng(7)
for k, n in ((1, 200000), (9, 60000)):
    cum = rng.uniform(20, 60, (k, n)).astype(np.float32)
    ev = object.__new__(robustness._StructureScenarios)
    ev.vol = rng.uniform(0.0002, 0.002, n)
    ev.total = float(ev.vol.sum())
    print(k, n, [v.hex() for v in ev._metric_rows(cum, dvh.parse("Dmean"))])
"""


def test_scenario_dmean_rows_are_numpys_sum_whatever_the_blas_threads():
    """The scenarios' Dmean of unequal samples (robustness DVH band rows) is the table's formula
    (dvh.weighted_mean) to the last bit, equals sum(d v) / V by math.fsum within 1e-12, and is bit-identical with
    OPENBLAS_NUM_THREADS=1 and 2 (a BLAS matrix-vector product split its sums by thread: 1 x 200000 and 9 x 60000
    samples differed in the last bit)."""
    rng = np.random.default_rng(3)
    cum = rng.uniform(20, 60, (4, 30000)).astype(np.float32)
    ev = object.__new__(robustness._StructureScenarios)
    ev.vol = rng.uniform(0.0002, 0.002, 30000)
    ev.total = float(np.sum(ev.vol))
    got = ev._metric_rows(cum, dvh.parse("Dmean"))
    for r in range(4):
        d = cum[r].astype(np.float64)
        assert got[r] == dvh.weighted_mean(d, ev.vol, ev.total)
        assert got[r] == pytest.approx(math.fsum(d * ev.vol) / math.fsum(ev.vol), rel=1e-12, abs=0)
    import subprocess
    import sys

    from analytic import cli_env
    outs = []
    for threads in ("1", "2"):
        env = dict(cli_env(), OPENBLAS_NUM_THREADS=threads)
        res = subprocess.run([sys.executable, "-c", _DMEAN_ROWS], capture_output=True, text=True, env=env,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0].count("0x") == 10 and outs[0] == outs[1], outs


def test_interp_points_matches_nominal_sampling(tmp_path):
    x, y, z = coords(SIZE, ORIGIN, SPACING)
    prior = 30.0 + 0.3 * x + 0.2 * y * y / 19.5 - 0.1 * z
    _, analysis, rob = _run(tmp_path, prior, np.full(SHAPE, 5.0), _cylinder(), _protocol(None))
    prep_grid = analysis.grid
    s = analysis.samples["SpinalCord"]
    idx = prep_grid.physical_to_index(s.points_mm)
    arr = prior.astype(np.float32)
    assert np.allclose(robustness.interp_points(arr, idx), s.dose(arr, prep_grid), atol=1e-4)
    # the separable path used for the shifts gives the same values as the point-by-point one, also where a
    # shift reaches past the grid's edge (cylinder ends at z = +-12 mm, grid at +-19.5 mm)
    sep = robustness._SeparableSampler(s, prep_grid)
    assert sep.ok
    for d in ([0.0, 0.0, 0.0], [2.1, -2.1, 0.0], [0.0, 0.0, 8.3], [-1.7, 1.7, -1.7]):
        d = np.asarray(d)
        assert np.allclose(sep.values(arr, d), robustness.interp_points(arr, idx + d[None, :]), atol=1e-4)


def test_shifted_max_is_max_over_trilinear_shifts():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 10, (6, 7, 8)).astype(np.float32)
    deltas = np.array([[0.5, 0.0, 0.0], [0.0, -1.25, 0.3]])
    got = robustness.shifted_max(a, deltas)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in a.shape), indexing="ij")
    pts = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    ref = a.ravel().astype(np.float64)
    for d in deltas:
        p = np.clip(pts + d, 0, np.array(a.shape[::-1]) - 1)   # edge values extended
        ref = np.maximum(ref, robustness.interp_points(a, p))
    assert np.allclose(got.ravel(), ref, atol=1e-5)


def test_shift_directions():
    d26 = robustness.shift_directions(26)
    assert d26.shape == (26, 3) and np.allclose(np.linalg.norm(d26, axis=1), 1.0)
    assert len({tuple(np.round(v, 6)) for v in d26}) == 26
    assert np.allclose(np.abs(d26[:6]).sum(axis=1), 1.0)          # the 6 axes first
    assert robustness.shift_directions(6).shape == (6, 3)


# ----------------------------------------------------------------------------------------------- inputs

def test_protocol_range_must_contain_the_nominal_alpha_beta(tmp_path):
    proto = _protocol((2.5, 3.0))      # organ alpha/beta 2 Gy is outside
    write_yaml(tmp_path / "p.yaml", proto)
    with pytest.raises(InputError) as exc:
        load_protocol(str(tmp_path / "p.yaml"))
    assert "robustness.alpha_beta_ranges[0]" in str(exc.value)


def test_case_registration_uncertainty_is_validated(tmp_path):
    write_image(tmp_path / "d.nrrd", np.zeros(SHAPE, np.float32), ORIGIN, SPACING, units="Gy")
    write_yaml(tmp_path / "case.yaml", {
        "reference": {"structures": "masks"}, "protocol": "synthetic-demo",
        "courses": [{"name": "p", "dose": "d.nrrd", "fractions": 30, "interval_months": 12,
                     "registration_uncertainty_mm": -1},
                    {"name": "c", "dose": "d.nrrd", "fractions": 30}]})
    with pytest.raises(InputError) as exc:
        load_case(tmp_path / "case.yaml")
    assert "registration_uncertainty_mm" in str(exc.value)


# ------------------------------------------------------------------------------------------ risk models

def test_risk_models_by_hand():
    from ReirradiationNPCLib import risk_estimates as rk
    assert rk.logistic_td5_td50(65.26, 65.26, 125.25) == pytest.approx(0.05)
    assert rk.logistic_td5_td50(125.25, 65.26, 125.25) == pytest.approx(0.5)
    k = (125.25 - 65.26) / math.log(19)
    assert rk.logistic_td5_td50(100.0, 65.26, 125.25) == pytest.approx(1 / (1 + math.exp(-(100 - 125.25) / k)))
    assert rk.lkb(107.84, 107.84, 0.16) == pytest.approx(0.5)
    # one standard deviation above TD50: D = TD50 (1 + m) -> Phi(1) = 0.8413
    assert rk.lkb(107.84 * 1.16, 107.84, 0.16) == pytest.approx(0.841345, abs=1e-6)
    models = {m["id"]: m for m in rk.load_models()}
    p, lo, hi = rk.estimate(models["guan2024_logistic"], 80.0)
    assert lo <= p <= hi and p == pytest.approx(rk.logistic_td5_td50(80.0, 65.26, 125.25))
    assert not models["lkb_reirradiation_d01cc"]["verified"]


def test_report_and_cli_show_the_worst_case(tmp_path):
    """The report has a band cell per row, the robustness and risk sections; the CLI table a worst-case column."""
    from ReirradiationNPCLib.cli import format_constraints, _robust_line
    from ReirradiationNPCLib.pipeline import build_results
    from ReirradiationNPCLib.report import render_html
    prior = np.full(SHAPE, 60.0)
    current = np.full(SHAPE, 36.0)
    prep, analysis, rob = _run(tmp_path, prior, current, _cylinder(), _protocol((1.5, 3.0), metrics=("Dmax",),
                                                                                  limit=104.5))
    results = build_results(prep, analysis)
    robustness.add_to_results(results, rob)
    results.risk_estimates = [{"model": "m", "name": "test model", "structure": "Lobe_Temporal_L",
                               "status": "estimated", "metric": "D1.5cc", "dose": "summed", "alpha_beta_gy": 3.0,
                               "alpha_beta_verified": True, "value_gy": 50.0, "estimate_percent": 2.5,
                               "range_percent": [0.1, 6.0], "derived": "estimate", "verified": True,
                               "source": "test source"}]
    d = results.to_dict()
    row = d["constraints"][0]
    assert row["robustness"]["status_worst"] == "fail" and row["robustness"]["scenarios"] == 54
    assert d["summary"]["robust_status"] == "robust_fail"
    html = render_html(d)
    assert 'id="robustness"' in html and "ROBUST FAIL" in html and 'id="risk"' in html
    assert "information only" in html
    worst = f"{row['robustness']['worst_value']:.2f}"
    assert worst in html
    table = format_constraints(results)
    assert "worst case" in table.splitlines()[0] and f"{worst} Gy (FAIL)" in table
    assert _robust_line(results).startswith("robustness: robust_fail")


def test_rows_equal_brute_force_over_every_scenario(tmp_path):
    """Every row's worst/best equals a brute-force evaluation of every scenario (point-by-point interpolation of
    the shifted prior dose, full sort of every scenario, float64): the sample pruning and the vectorised paths are
    exact up to float32 rounding of the scenario doses; also with pruning switched off."""
    x, y, z = coords(SIZE, ORIGIN, SPACING)
    prior = 40.0 + 8.0 * np.sin(x / 4.0) * np.cos(y / 5.0) + 0.4 * z      # 2 Gy/fx around 40 Gy in 20 fx
    current = 20.0 + 3.0 * np.cos(z / 3.0)                                 # 1-1.15 Gy/fx in 20 fx
    metrics = ("Dmax", "D0.03cc", "D1cc", "Dmean", "D50%", "V40Gy")
    proto = _protocol((1.5, 3.0), metrics=metrics)
    for c in proto["organs"]["spinal_cord"]["constraints"]:
        if c["metric"].startswith("V"):
            c.pop("limit_gy")
            c["limit_cc"] = 1.0
    prep, analysis, rob = _run(tmp_path, prior, current, _cylinder(), proto, fr=(20, 20))
    robustness.NOPRUNE = True
    try:
        rob_all = robustness.compute(prep, analysis)
    finally:
        robustness.NOPRUNE = False
    for a, b in zip(rob.rows, rob_all.rows):
        assert a["worst_value"] == pytest.approx(b["worst_value"], abs=1e-4)
        assert a["best_value"] == pytest.approx(b["best_value"], abs=1e-4)
    s = analysis.samples["SpinalCord"]
    idx = analysis.grid.physical_to_index(s.points_mm)
    prior_c = next(c for c in prep.courses if c.name == "prior")
    cur = s.dose(next(c for c in prep.courses if c.name == "current").dose, analysis.grid)
    deltas = [np.zeros(3)] + list(robustness.shift_index_vectors(analysis.grid, robustness.shift_directions() * 3.0))
    shifted = [robustness.interp_points(prior_c.dose, idx + d[None, :]) for d in deltas]
    for metric in metrics:
        c, r = _row(analysis, rob, metric)
        m = dvh.parse(metric)
        vals = []
        for ab in (1.5, 3.0) + ((tuple(1.0 / u - 2.0 for u in np.linspace(1 / 5.0, 1 / 3.5, 7)[1:-1]))
                                if r["ab_interior"] else ()):
            for d in shifted:
                cum = eqd2_hand(d, 20, ab) + eqd2_hand(cur, 20, ab)
                vals.append(dvh.SortedSamples(cum, s.sample_volume_cc).metric(m))
        # scenario doses are float32 (about 1e-5 Gy): near-equal samples may then merge into one DVH level, which
        # moves a D<x>cc read off the mid-point curve by a few mGy (7 mGy here); 0.01 Gy bounds it
        assert r["worst_value"] == pytest.approx(max(vals), abs=0.01), metric
        assert r["best_value"] == pytest.approx(min(vals), abs=0.01), metric
