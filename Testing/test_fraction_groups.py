"""A plan with several fraction groups: each group is one EQD2 term with its own fractions (issue 10 item 1).

Hand values (EQD2 = D (D/n + ab) / (2 + ab)):
- 46 Gy / 23 fx (2 Gy/fx) + 20 Gy / 10 fx (2 Gy/fx): 46 + 20 = 66.0 Gy at every alpha/beta.
- 46 Gy / 23 fx + 20 Gy / 5 fx (4 Gy/fx): ab 2: 46 + 20 (4 + 2)/4 = 76.0; ab 3: 46 + 20 (4 + 3)/5 = 74.0;
  ab 10: 46 + 20 (4 + 10)/12 = 69.3333. The summed dose in the summed fractions (66 Gy / 28 fx) would give at
  ab 2 66 (66/28 + 2)/4 = 71.8929, 4.1 Gy less: the test below fails on that shortcut.
- prior 70 Gy / 35 fx (2 Gy/fx) = 70.0 at every alpha/beta.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from click.testing import CliRunner

from ReirradiationNPCLib import analysis, budget
from ReirradiationNPCLib import dicom_rt as dr
from ReirradiationNPCLib.analysis import CourseData, DoseTerm, StructureData
from ReirradiationNPCLib.cli import main
from ReirradiationNPCLib.eqd2 import effective_fractions, eqd2
from ReirradiationNPCLib.geometry import Grid, Volume, bounding_box
from ReirradiationNPCLib.protocol import parse_protocol

from test_dicom_rt import known_pixels, make_rtdose
from test_dose_summation import make_plan, plan_ref


def hand(d, n, ab):
    return d * (d / n + ab) / (2.0 + ab)


SHAPE = (8, 8, 16)


def two_group_course(d1=46.0, n1=23, d2=20.0, n2=5, shape=SHAPE, name="cur"):
    a = np.full(shape, d1, np.float32)
    b = np.full(shape, d2, np.float32)
    return CourseData(name, a + b, n1 + n2, None, True, groups=[DoseTerm(a, n1, "group 1"), DoseTerm(b, n2, "g2")])


def protocol(constraints_a=(), constraints_b=()):
    return parse_protocol({"name": "t", "version": "1", "alpha_beta": {"default": 10}, "recovery": {"model": "none"},
                           "warn_tolerance_percent": 0,
                           "organs": {"a": {"aliases": ["A"], "alpha_beta": 2, "constraints": list(constraints_a)},
                                      "b": {"aliases": ["B"], "alpha_beta": 3, "constraints": list(constraints_b)}}},
                          "t.yaml")


def organs(p):
    """A (ab 2) on i 2-8, B (ab 3) on i 6-11 (overlap i 6-8), inside the grid (uniform doses sample exactly)."""
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    a[2:6, 2:6, 2:9] = True
    b[2:6, 2:6, 6:12] = True
    out = []
    for name, m in (("A", a), ("B", b)):
        box = bounding_box(m)
        out.append(StructureData(name, m[box].copy(), box, p.match(name)))
    return out


@pytest.mark.parametrize("ab,two_gy,four_gy", [(2.0, 66.0, 76.0), (3.0, 66.0, 74.0), (10.0, 66.0, 69.333333)])
def test_two_groups_are_two_eqd2_terms(ab, two_gy, four_gy):
    assert float(analysis.course_eqd2(two_group_course(n2=10), ab)[0, 0, 0]) == pytest.approx(two_gy, abs=1e-4)
    got = analysis.course_eqd2(two_group_course(), ab)
    np.testing.assert_allclose(got, four_gy, atol=1e-4)
    assert abs(hand(66.0, 28, ab) - four_gy) > 1.0      # the shortcut (summed dose, summed fractions) is wrong
    d, n = analysis.course_dose(two_group_course())     # one term: the sum and its effective fractions
    np.testing.assert_allclose(d, 66.0)
    np.testing.assert_allclose(n, 66.0 ** 2 / (46.0 ** 2 / 23 + 20.0 ** 2 / 5), rtol=1e-12)


def test_one_group_equals_the_single_course_path():
    rng = np.random.default_rng(7)
    dose = rng.uniform(0, 80, SHAPE).astype(np.float32)
    single = CourseData("c", dose, 33, None, True)
    listed = CourseData("c", dose, 33, None, True, groups=[DoseTerm(dose, 33)])
    for ab in (2.0, 3.0, 10.0):
        assert np.array_equal(analysis.course_eqd2(single, ab), analysis.course_eqd2(listed, ab))
        assert np.array_equal(analysis.course_eqd2(single, ab), eqd2(dose, 33, ab))


def test_effective_fractions_scale_free_and_bounded():
    """n_eff = P^2 / sum D_g^2/n_g: unchanged when every dose is scaled (dose uncertainty), between the smallest n_g
    and the sum of the n_g; where no group gives dose it is the course's fractions."""
    d1 = np.array([46.0, 0.0, 10.0, 0.0])
    d2 = np.array([20.0, 5.0, 0.0, 0.0])
    p, n = effective_fractions([d1, d2], [23, 5], 28)
    p2, n2 = effective_fractions([1.05 * d1, 1.05 * d2], [23, 5], 28)
    np.testing.assert_allclose(n2, n, rtol=1e-12)
    np.testing.assert_allclose(p, [66.0, 5.0, 10.0, 0.0])
    np.testing.assert_allclose(n, [66.0 ** 2 / 172.0, 5.0, 23.0, 28.0], rtol=1e-12)   # 46^2/23 + 20^2/5 = 172
    # scaled by 1.05: ab 2 -> 48.3 (2.1 + 2)/4 + 21 (4.2 + 2)/4 = 49.5075 + 32.55
    assert float(eqd2(p2[:1], n2[:1], 2.0)[0]) == pytest.approx(49.5075 + 32.55, abs=1e-9)


def test_maps_metrics_rows_and_budget_use_the_group_terms():
    """Prior 70 Gy / 35 fx + current 46/23 + 20/5. Display map: A only 146, overlap max(146, 144) = 146, B only 144,
    no organ (ab 10) 139.3333; course map of the current course 76 / 76 / 74 / 69.3333; check maps ab 2: 146, ab 3:
    144 everywhere. Table: A current Dmean 76, cumulative 146; B 74, 144. A per-course limit of 75 Gy fails on the
    current course of A (76) and passes on B (74); its max_course_eqd2_gy 75 condition likewise."""
    lim = {"metric": "Dmax", "limit_gy": 75, "scope": "per_course", "source": "test", "verified": False,
           "conditions": {"max_course_eqd2_gy": 75}}
    p = protocol([lim], [lim])
    grid = Grid((SHAPE[2], SHAPE[1], SHAPE[0]), (0.0, 0.0, 0.0), (2.5, 2.5, 2.5))
    prior = CourseData("prior", np.full(SHAPE, 70.0, np.float32), 35, 24.0, False)
    courses = [prior, two_group_course()]
    structs = organs(p)
    course, cum, ab, _ = analysis.display_maps(courses, structs, p)
    np.testing.assert_allclose(cum[2:6, 2:6, 2:6], 146.0, atol=1e-3)
    np.testing.assert_allclose(cum[2:6, 2:6, 6:9], 146.0, atol=1e-3)
    np.testing.assert_allclose(cum[2:6, 2:6, 9:12], 144.0, atol=1e-3)
    np.testing.assert_allclose(cum[:, :, 13:], 139.333333, atol=1e-3)
    np.testing.assert_allclose(course["cur"][2:6, 2:6, 2:9], 76.0, atol=1e-3)
    np.testing.assert_allclose(course["cur"][2:6, 2:6, 9:12], 74.0, atol=1e-3)
    np.testing.assert_allclose(course["cur"][:, :, 13:], 69.333333, atol=1e-3)
    np.testing.assert_allclose(course["prior"], 70.0, atol=1e-3)
    maps, _ = analysis.check_maps(courses, structs, p)
    assert [m.alpha_beta for m in maps] == [2.0, 3.0]
    np.testing.assert_allclose(maps[0].compute(courses), 146.0, atol=1e-3)
    np.testing.assert_allclose(maps[1].compute(courses), 144.0, atol=1e-3)

    res = analysis.compute(grid, courses, structs, p)
    by = {s.name: s for s in res.structures}
    assert by["A"].metrics["cur"]["Dmean"] == pytest.approx(76.0, abs=1e-3)
    assert by["A"].metrics["cur"]["Dmax"] == pytest.approx(76.0, abs=1e-3)
    assert by["A"].metrics["cumulative"]["Dmean"] == pytest.approx(146.0, abs=1e-3)
    assert by["B"].metrics["cur"]["D0.03cc"] == pytest.approx(74.0, abs=1e-3)
    assert by["B"].metrics["cumulative"]["Dmean"] == pytest.approx(144.0, abs=1e-3)
    assert by["A"].metrics_physical["cur"]["Dmean"] == pytest.approx(66.0, abs=1e-4)   # physical: the sum
    rows = {(c.structure, c.course): c for c in res.constraints}
    assert rows[("A", "cur")].status == "fail" and rows[("A", "cur")].value == pytest.approx(76.0, abs=1e-3)
    assert rows[("B", "cur")].status == "pass" and rows[("B", "cur")].value == pytest.approx(74.0, abs=1e-3)
    assert rows[("A", "prior")].status == "condition_not_met"     # 70 <= 75, but course cur of A has 76 > 75
    cond = rows[("B", "prior")].conditions
    assert [c["actual"] for c in cond] == pytest.approx([70.0, 74.0], abs=1e-3) and all(c["met"] for c in cond)
    a = next(x for x in res.course_assumptions if x["name"] == "cur")
    assert a["fractions"] == 28 and [g["fractions"] for g in a["fraction_groups"]] == [23, 5]
    assert a["max_dose_per_fraction_gy"] == pytest.approx(4.0)       # group 2: 20 Gy / 5
    e = budget.organ_eqd2(structs[0], courses, p, "per_course", course="cur")
    np.testing.assert_allclose(e, 76.0, atol=1e-9)
    e = budget.organ_eqd2(structs[1], courses, p, "cumulative")
    np.testing.assert_allclose(e, 144.0, atol=1e-9)
