"""Target checks against the prescription and the ESTRO-EORTC re-irradiation type, on analytic cases.

Hand numbers:
- 65 Gy / 54 fx at ab 10: EQD2 = 65 (65/54 + 10) / 12 = 60.6867 Gy (clinical facts: 60.69).
- 40 Gy / 54 fx at ab 10: EQD2 = 40 (40/54 + 10) / 12 = 35.8025 Gy.
- Overlap of a ball (r 10 mm, centre x = 5) with the half-space x < 0: cap of height 5 mm,
  pi h^2 (3r - h) / 3 = pi 25 (30 - 5) / 3 = 654.50 mm^3 = 0.6545 cc.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ReirradiationNPCLib.analysis import CourseData
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.geometry import Grid, bounding_box
from ReirradiationNPCLib.protocol import Prescription, ReirradiationTypeRule, parse_protocol
from ReirradiationNPCLib.targets import Target, check_targets, reirradiation_type

GRID = Grid((40, 40, 40), (-20.0, -20.0, -20.0), (1.0, 1.0, 1.0))


def xyz():
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in GRID.shape), indexing="ij")
    return -20.0 + i, -20.0 + j, -20.0 + k


X, Y, Z = xyz()


def target(name, mask, origin="margins"):
    box = bounding_box(mask)
    return Target(name, origin, mask[box].copy(), box)


def course(name, dose, n, current):
    return CourseData(name, np.asarray(dose, dtype=np.float32), n, None if current else 24.0, current)


RX = Prescription(scope="current", alpha_beta=10.0, eqd2_min_gy=60.0, eqd2_max_gy=66.0, dose_gy=65.0, fractions=54,
                  v95_min_percent=95.0, d95_min_percent=None, d98_min_percent=95.0, d2_max_percent=107.0,
                  source="test", verified=False)


def checks(entry):
    return {c["check"]: c for c in entry["checks"]}


def test_uniform_prescription_dose_passes():
    box = (np.abs(X) <= 5) & (np.abs(Y) <= 5) & (np.abs(Z) <= 5)
    courses = [course("c1", np.full(GRID.shape, 30.0), 15, False), course("c2", np.where(box, 65.0, 0.0), 54, True)]
    out = check_targets([target("PTV", box)], courses, RX, GRID)
    assert [(e["structure"], e["scope"]) for e in out] == [("PTV", "current"), ("PTV", "cumulative")]
    cur, cum = out
    assert cur["reference_eqd2_gy"] == pytest.approx(60.6867, abs=1e-4)
    assert cur["volume_cc"] == pytest.approx(1.331)
    for m in ("D98%", "D95%", "D50%", "D2%", "Dmean"):
        assert cur["metrics"][m] == pytest.approx(60.6867, abs=1e-3)
    assert cur["metrics"]["V95%"] == 100.0
    c = checks(cur)
    assert c["D50% within prescribed range"]["status"] == "pass"
    assert c["V95%"]["status"] == "pass"
    assert c["D95%"]["status"] == "no_limit"                   # the protocol gives no D95% criterion
    assert c["D98% (near-minimum)"]["threshold"] == pytest.approx(0.95 * 60.6867, abs=1e-3)
    assert c["D2% (near-maximum)"]["status"] == "pass"
    # cumulative at ab 10, no credit for targets: 30 Gy / 15 fx = 30 (2 + 10) / 12 = 30 Gy, + 60.6867
    assert cum["metrics"]["Dmean"] == pytest.approx(90.6867, abs=1e-3)
    assert cum["checks"] == [] and "current" in cum["note"]


def test_half_underdosed_target_fails_coverage():
    box = (np.abs(X) <= 5) & (np.abs(Y) <= 5) & (Z >= -5) & (Z <= 4)   # 10 slices: 5 at 65 Gy, 5 at 40 Gy
    dose = np.where(box & (Z >= 0), 65.0, np.where(box, 40.0, 0.0))
    courses = [course("c1", np.zeros(GRID.shape), 15, False), course("c2", dose, 54, True)]
    cur = check_targets([target("PTV", box)], courses, RX, GRID)[0]
    assert cur["metrics"]["V95%"] == pytest.approx(50.0)
    assert cur["metrics"]["D98%"] == pytest.approx(35.8025, abs=1e-3)     # near-minimum in the cold half
    assert cur["metrics"]["D2%"] == pytest.approx(60.6867, abs=1e-3)
    c = checks(cur)
    assert c["V95%"]["status"] == "fail" and c["D98% (near-minimum)"]["status"] == "fail"
    assert c["D2% (near-maximum)"]["status"] == "pass"


def test_overdose_fails_near_maximum_and_range():
    box = (np.abs(X) <= 3) & (np.abs(Y) <= 3) & (np.abs(Z) <= 3)
    courses = [course("c1", np.zeros(GRID.shape), 15, False), course("c2", np.where(box, 75.0, 0.0), 54, True)]
    cur = check_targets([target("GTV", box)], courses, RX, GRID)[0]
    # 75 Gy / 54 fx: 75 (75/54 + 10) / 12 = 71.1806 Gy > 66 and > 1.07 x 60.6867 = 64.93
    assert cur["metrics"]["D50%"] == pytest.approx(71.1806, abs=1e-3)
    c = checks(cur)
    assert c["D50% within prescribed range"]["status"] == "fail"
    assert c["D2% (near-maximum)"]["status"] == "fail"


def test_reirradiation_type_1_with_analytic_overlap():
    ptv = (X - 5.0) ** 2 + Y ** 2 + Z ** 2 <= 100.0
    prior = np.where(X < 0, 60.0, 0.0)                      # voxels x <= -1 stand for x < -0.5
    courses = [course("c1", prior, 30, False), course("c2", np.zeros(GRID.shape), 54, True)]
    rule = ReirradiationTypeRule(20.0, "test", False)
    res = reirradiation_type(target("PTV", ptv), courses, rule, GRID)
    assert res["type"] == 1
    # the voxel boundary sits at x = -0.5: cap of height 4.5 mm of the r 10 ball centred at x = 5
    analytic = math.pi * 4.5 ** 2 * (30 - 4.5) / 3 / 1000.0
    assert res["overlap_cc"] == pytest.approx(analytic, rel=0.03)
    assert res["courses"][0]["overlap_cc"] == res["overlap_cc"]
    assert res["overlap_cc"] == pytest.approx(float((ptv & (X < 0)).sum()) / 1000.0)


def test_reirradiation_type_2_below_threshold_or_far():
    ptv = (X - 5.0) ** 2 + Y ** 2 + Z ** 2 <= 100.0
    rule = ReirradiationTypeRule(20.0, "test", False)
    low = [course("c1", np.where(X < 0, 19.9, 0.0), 30, False), course("c2", np.zeros(GRID.shape), 54, True)]
    res = reirradiation_type(target("PTV", ptv), low, rule, GRID)
    assert res["type"] == 2 and res["overlap_cc"] == 0.0
    # a dose gradient: prior = 25 - x Gy >= 20 where x <= 5: overlap = half the ball + the 0.5 mm slab
    grad = [course("c1", np.clip(25.0 - X, 0, None), 30, False), course("c2", np.zeros(GRID.shape), 54, True)]
    res = reirradiation_type(target("PTV", ptv), grad, rule, GRID)
    half = 4.0 / 3.0 * math.pi * 1000.0 / 2 + math.pi * 100.0 * 0.5
    assert res["type"] == 1 and res["overlap_cc"] == pytest.approx(half / 1000.0, rel=0.01)
    none = reirradiation_type(None, grad, rule, GRID)
    assert none["type"] is None and none["status"] == "not_evaluated"


def _prot(rx: dict):
    return parse_protocol({"name": "t", "version": "1", "alpha_beta": {"default": 3}, "recovery": {"model": "none"},
                           "organs": {"gtv": {"role": "target", "aliases": ["GTVp"], "alpha_beta": 10}},
                           "prescription": rx, "reirradiation_type": {"threshold_gy": 20, "source": "s",
                                                                      "verified": False}}, "t.yaml")


def test_prescription_block_validation():
    ok = {"scope": "current", "alpha_beta": 10, "eqd2_gy": {"min": 60, "max": 66}, "dose_gy": 65, "fractions": 54,
          "coverage": {"v95_min_percent": 95}, "source": "s", "verified": False}
    p = _prot(ok)
    assert p.prescription.reference_eqd2_gy == pytest.approx(60.6867, abs=1e-4)
    assert p.reirradiation_type.threshold_gy == 20.0
    with pytest.raises(InputError) as e:                        # 60 Gy / 27 fx = 61.11 Gy: outside 62-66
        _prot({**ok, "eqd2_gy": {"min": 62, "max": 66}, "dose_gy": 60, "fractions": 27})
    assert e.value.field == "prescription.dose_gy" and "61.11" in str(e.value)
    with pytest.raises(InputError) as e:
        _prot({**ok, "fractions": None})
    assert e.value.field == "prescription.fractions"
    with pytest.raises(InputError) as e:
        _prot({**ok, "eqd2_gy": {"min": 66, "max": 60}})
    assert e.value.field == "prescription.eqd2_gy"
    with pytest.raises(InputError) as e:
        _prot({**ok, "scope": "both"})
    assert e.value.field == "prescription.scope"
    no_dose = {k: v for k, v in ok.items() if k not in ("dose_gy", "fractions")}
    assert _prot(no_dose).prescription.reference_eqd2_gy == 60.0   # range minimum


def test_protocol_show_lists_margins_prescription_and_type():
    from click.testing import CliRunner
    from ReirradiationNPCLib.cli import main
    res = CliRunner().invoke(main, ["protocol", "show", "npc-reirradiation"])
    assert res.exit_code == 0, res.output
    lines = {ln.split(":")[0]: ln for ln in res.output.splitlines() if ":" in ln}
    assert "+ 5 mm" in lines["margins"] and "verified: NO" in lines["margins"]
    assert "60.69 Gy EQD2" in lines["prescription"] and "verified: NO" in lines["prescription"]
    assert ">= 20 Gy" in lines["re-irradiation type"]


def test_d95_criterion_when_the_protocol_gives_one():
    from dataclasses import replace
    rx = replace(RX, d95_min_percent=100.0)
    box = (np.abs(X) <= 5) & (np.abs(Y) <= 5) & (Z >= -5) & (Z <= 4)
    uniform = [course("c1", np.zeros(GRID.shape), 15, False), course("c2", np.where(box, 65.0, 0.0), 54, True)]
    c = checks(check_targets([target("PTV", box)], uniform, rx, GRID)[0])
    assert c["D95%"]["status"] == "pass" and c["D95%"]["threshold"] == pytest.approx(60.6867, abs=1e-4)
    cold = np.where(box & (Z >= 0), 65.0, np.where(box, 40.0, 0.0))
    half = [course("c1", np.zeros(GRID.shape), 15, False), course("c2", cold, 54, True)]
    c = checks(check_targets([target("PTV", box)], half, rx, GRID)[0])
    assert c["D95%"]["status"] == "fail" and c["D95%"]["value"] == pytest.approx(35.8025, abs=1e-3)
