"""Masks on the dose grid (issue 10 item 4) and the conservative display map (item 3), against hand calculation.

Hand values (EQD2 = D (D/n + ab) / (2 + ab)):
- 60 Gy / 50 fx (1.2 Gy/fx): ab 2 -> 60 * 3.2 / 4 = 48.0;  ab 3 -> 60 * 4.2 / 5 = 50.4;  ab 10 -> 60 * 11.2 / 12 = 56.0
- 70 Gy / 33 fx: ab 2 -> 70 (70/33 + 2) / 4 = 72.1212; ab 3 -> 70 (70/33 + 3) / 5 = 71.6970
- 65 Gy / 54 fx: ab 2 -> 65 (65/54 + 2) / 4 = 52.0602; ab 3 -> 65 (65/54 + 3) / 5 = 54.6481
  so 70/33 + 65/54: ab 2 124.1814 < ab 3 126.3451 (the smallest alpha/beta is NOT conservative below 2 Gy/fx)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ReirradiationNPCLib import analysis, masks
from ReirradiationNPCLib.analysis import CourseData, StructureData
from ReirradiationNPCLib.geometry import Grid, bounding_box
from ReirradiationNPCLib.io import Structure
from ReirradiationNPCLib.protocol import parse_protocol


def sphere_on_fine_grid(radius_mm, centre=(0.3, -0.7, 0.2), n=None):
    n = n or int(2 * radius_mm + 8)
    half = (n - 1) / 2.0
    grid = Grid((n, n, n), (-half, -half, -half), (1.0, 1.0, 1.0))
    ax = np.arange(n) - half
    k, j, i = np.meshgrid(ax, ax, ax, indexing="ij")
    mask = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2 <= radius_mm ** 2
    return mask, grid


DOSE_GRID = Grid((40, 40, 40), (-48.7, -49.1, -50.0), (2.5, 2.5, 2.5))   # 2.5 mm, not aligned with the 1 mm grid


def protocol(ab_a=2.0, ab_b=3.0, credit_a=False):
    rec = ({"model": "step", "table": [{"min_months": 0, "fraction": 0.0}, {"min_months": 12, "fraction": 0.5}],
            "organs": ["a"], "source": "test"} if credit_a else {"model": "none"})
    return parse_protocol({"name": "t", "version": "1", "alpha_beta": {"default": 10}, "recovery": rec,
                           "organs": {"a": {"aliases": ["A"], "alpha_beta": ab_a},
                                      "b": {"aliases": ["B"], "alpha_beta": ab_b}}}, "t.yaml")


@pytest.mark.parametrize("radius", [6.0, 10.0, 15.0])
def test_sphere_on_coarser_dose_grid_keeps_its_volume(radius):
    """Issue 10 item 4: a sphere on a 1 mm grid moved onto a 2.5 mm grid: its voxels on the alpha/beta map add up
    to the sphere's volume (4/3 pi r^3) within 4 %."""
    mask, fine = sphere_on_fine_grid(radius)
    p = protocol()
    on = masks.structure_on_grid(Structure("A", mask, fine, "t"), DOSE_GRID)
    s = StructureData("A", on[0], on[1], p.match("A"))
    dose = np.full(DOSE_GRID.shape, 60.0, np.float32)
    _, _, ab, _ = analysis.display_maps([CourseData("c", dose, 50, None, True)], [s], p)
    vol_cc = float((ab == 2.0).sum()) * DOSE_GRID.voxel_volume_cc
    exact = 4.0 / 3.0 * math.pi * radius ** 3 / 1000.0
    assert vol_cc == pytest.approx(exact, rel=0.04)
    # the plain half-covered rule is also within 4 % from 10 mm on (it loses volume on small convex organs)
    if radius >= 10:
        half = masks.structure_on_grid(Structure("A", mask, fine, "t"), DOSE_GRID, rule="half")
        assert half[0].sum() * DOSE_GRID.voxel_volume_cc == pytest.approx(exact, rel=0.04)


def test_covered_fraction_is_exact_for_a_box():
    """Mask voxels i 3..7 of a 1 mm grid at origin 0 span x = 2.5 .. 7.5 mm; j, k 0..9 span -0.5 .. 9.5 mm. Dose
    voxels of 2.5 mm with origin 0.25 span [-1 + 2.5 t, 1.5 + 2.5 t]: t = 1 -> [1.5, 4.0] (1.5 mm covered: 0.6),
    t = 2 -> [4.0, 6.5] (1.0), t = 3 -> [6.5, 9.0] (1.0 mm: 0.4), t = 0 and 4 -> 0; along y and z dose voxels 1..3
    lie inside -0.5 .. 9.5 (1.0), voxel 0 spans [-1, 1.5] (2.0 mm of 2.5 covered: 0.8), voxel 4 spans [9.0, 11.5]
    (0.5 mm: 0.2). No value is clamped at the faces."""
    src = Grid((12, 12, 12), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    m = np.zeros(src.shape, bool)
    m[0:10, 0:10, 3:8] = True
    tgt = Grid((6, 6, 6), (0.25, 0.25, 0.25), (2.5, 2.5, 2.5))
    frac, box = masks.coverage_fraction(m, src, tgt)
    full = np.zeros(tgt.shape, np.float32)
    full[box] = frac
    x = np.array([0.0, 0.6, 1.0, 0.4, 0.0, 0.0])
    yz = np.array([0.8, 1.0, 1.0, 1.0, 0.2, 0.0])
    np.testing.assert_allclose(full, yz[:, None, None] * yz[None, :, None] * x[None, None, :], atol=1e-6)
    assert full.sum() * tgt.voxel_volume_cc == pytest.approx(m.sum() * src.voxel_volume_cc, rel=1e-6)


def test_oblique_grids_use_the_supersampled_fraction():
    """A dose grid rotated by 30 degrees about z: the supersampled fraction still integrates to the mask volume."""
    mask, fine = sphere_on_fine_grid(10.0)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    tgt = Grid((40, 40, 40), (-48.7, -49.1, -50.0), (2.5, 2.5, 2.5), (c, -s, 0, s, c, 0, 0, 0, 1))
    frac, _ = masks.coverage_fraction(mask, fine, tgt)
    assert float(frac.sum()) * tgt.voxel_volume_cc == pytest.approx(mask.sum() / 1000.0, rel=0.01)
    on = masks.structure_on_grid(Structure("A", mask, fine, "t"), tgt)
    assert on[0].sum() * tgt.voxel_volume_cc == pytest.approx(4 / 3 * math.pi, rel=0.04)


def _two_organs(p, shape=(6, 6, 12)):
    """A over i 0..7, B over i 4..11 (overlap i 4..7), both over all k, j."""
    a = np.zeros(shape, bool)
    a[:, :, 0:8] = True
    b = np.zeros(shape, bool)
    b[:, :, 4:12] = True
    b[:, :, 10:] = False           # i 10, 11: no organ
    out = []
    for name, m in (("A", a), ("B", b)):
        box = bounding_box(m)
        out.append(StructureData(name, m[box].copy(), box, p.match(name)))
    return out


def test_overlap_takes_the_larger_value_below_2_gy_per_fraction():
    """Issue 10 item 3: alpha/beta 2 and 3 overlapping under 60 Gy / 50 fx (1.2 Gy/fx): the map in the overlap is
    50.4 Gy (alpha/beta 3), not 48.0 Gy (the smallest alpha/beta); 48.0 on A only, 50.4 on B only, 56.0 (default 10)
    where no organ is."""
    p = protocol()
    shape = (6, 6, 12)
    dose = np.full(shape, 60.0, np.float32)
    course, cum, ab, credit = analysis.display_maps([CourseData("c", dose, 50, None, True)], _two_organs(p), p)
    np.testing.assert_allclose(cum[:, :, 0:4], 48.0, atol=1e-3)
    np.testing.assert_allclose(cum[:, :, 4:8], 50.4, atol=1e-3)
    np.testing.assert_allclose(cum[:, :, 8:10], 50.4, atol=1e-3)
    np.testing.assert_allclose(cum[:, :, 10:], 56.0, atol=1e-3)
    assert np.all(ab[:, :, 4:8] == 3.0) and np.all(ab[:, :, 0:4] == 2.0) and np.all(ab[:, :, 10:] == 10.0)
    np.testing.assert_allclose(course["c"], cum, atol=1e-6)
    assert credit == {}


def test_overlap_two_courses_with_credit():
    """70 Gy / 33 fx then 65 Gy / 54 fx, interval 14 months, 50 % credit on organ A (alpha/beta 2): A gives
    0.5 * 72.1212 + 52.0602 = 88.1208, B (alpha/beta 3, no credit) 126.3451: the overlap shows B's value. Without
    the credit A gives 124.1814 and the overlap still shows B's 126.3451 (the smallest alpha/beta would show 2.2 Gy
    less). The course maps take each course's larger EQD2: 72.1212 (ab 2) for the prior, 54.6481 (ab 3) for the
    current course."""
    shape = (6, 6, 12)
    d1 = np.full(shape, 70.0, np.float32)
    d2 = np.full(shape, 65.0, np.float32)
    for credit_a, a_val in ((True, 0.5 * 72.121212 + 52.060185), (False, 72.121212 + 52.060185)):
        p = protocol(credit_a=credit_a)
        courses = [CourseData("prior", d1, 33, 14.0, False), CourseData("cur", d2, 54, None, True)]
        course, cum, ab, credit = analysis.display_maps(courses, _two_organs(p), p)
        np.testing.assert_allclose(cum[:, :, 0:4], a_val, atol=1e-3)
        np.testing.assert_allclose(cum[:, :, 4:8], 71.696970 + 54.648148, atol=1e-3)
        assert np.all(ab[:, :, 4:8] == 3.0)
        np.testing.assert_allclose(course["prior"][:, :, 4:8], 72.121212, atol=1e-3)
        np.testing.assert_allclose(course["cur"][:, :, 4:8], 54.648148, atol=1e-3)
        if credit_a:
            assert np.all(credit["prior"][:, :, 0:4] == 0.5) and np.all(credit["prior"][:, :, 4:] == 0.0)


def test_check_maps_one_alpha_beta_over_the_whole_grid():
    """Issue 17: one undiscounted map per alpha/beta of the structures, one credited map per credit group; each
    map is that alpha/beta (and credit) everywhere, whatever organ covers a voxel. Prior 70 Gy / 33 fx (14 months,
    organ A 50 % credit), current 65 Gy / 54 fx: ab 2 -> 124.1814; ab 2 with 50 % -> 88.1208; ab 3 -> 126.3451."""
    shape = (6, 6, 12)
    p = protocol(credit_a=True)
    courses = [CourseData("prior", np.full(shape, 70.0, np.float32), 33, 14.0, False),
               CourseData("cur", np.full(shape, 65.0, np.float32), 54, None, True)]
    maps, which = analysis.check_maps(courses, _two_organs(p), p)
    assert [m.stem for m in maps] == ["cumulative_eqd2_ab2", "cumulative_eqd2_ab2_credit50", "cumulative_eqd2_ab3"]
    assert which == {"A": {"map": "cumulative_eqd2_ab2_credit50", "undiscounted_map": "cumulative_eqd2_ab2"},
                     "B": {"map": "cumulative_eqd2_ab3", "undiscounted_map": None}}
    expected = [124.181397, 0.5 * 72.121212 + 52.060185, 126.345118]
    for m, val in zip(maps, expected):
        arr = m.compute(courses)
        assert arr.dtype == np.float32 and arr.shape == shape
        np.testing.assert_allclose(arr, val, atol=1e-3)
    assert maps[1].structures == ["A"] and maps[0].structures == ["A (undiscounted)"]
    assert "a/b 2" in maps[1].dose_comment() and "credit 50%" in maps[1].dose_comment()


def test_prior_dose_is_resampled_once_through_its_transform(tmp_path):
    """Issue 10 item 7: the prior dose goes from its own grid through its registration straight onto the evaluation
    grid (one linear interpolation). A curved dose (Gaussian) on a 3 mm grid, rotated 3 degrees and shifted, read
    onto a 2.5 mm current dose grid: equal to one direct resampling; interpolating twice (onto the 1.5 mm reference
    CT first) differs by more than 0.05 Gy somewhere, so the test can tell them apart."""
    import SimpleITK as sitk
    from analytic import coords, write_image, write_yaml
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.geometry import Volume, resample_linear
    from ReirradiationNPCLib.pipeline import prepare

    ct_size, ct_origin, ct_sp = (40, 40, 20), (-30.0, -30.0, -15.0), (1.5, 1.5, 1.5)
    write_image(tmp_path / "ct.nrrd", np.zeros(ct_size[::-1], np.int16), ct_origin, ct_sp)
    write_image(tmp_path / "m" / "Cord.nrrd", np.ones(ct_size[::-1], np.uint8), ct_origin, ct_sp)
    p_size, p_origin, p_sp = (25, 25, 14), (-36.0, -36.0, -20.0), (3.0, 3.0, 3.0)
    x, y, z = coords(p_size, p_origin, p_sp)
    prior = (60.0 * np.exp(-((x - 3) ** 2 + (y + 2) ** 2 + z ** 2) / (2 * 8.0 ** 2))).astype(np.float32)
    write_image(tmp_path / "prior.nrrd", prior, p_origin, p_sp, units="Gy")
    c_size, c_origin, c_sp = (20, 20, 10), (-24.0, -24.0, -12.0), (2.5, 2.5, 2.5)
    write_image(tmp_path / "cur.nrrd", np.full(c_size[::-1], 20.0, np.float32), c_origin, c_sp, units="Gy")
    t = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, math.radians(3.0), (1.7, -1.1, 0.6))
    sitk.WriteTransform(t, str(tmp_path / "t.tfm"))
    write_yaml(tmp_path / "p.yaml", {"name": "p", "version": "1", "alpha_beta": {"default": 3},
                                     "recovery": {"model": "none"},
                                     "organs": {"cord": {"aliases": ["Cord"], "alpha_beta": 2}}})
    write_yaml(tmp_path / "case.yaml", {
        "reference": {"image": "ct.nrrd", "structures": "m"}, "protocol": "p.yaml",
        "courses": [{"name": "prior", "dose": "prior.nrrd", "fractions": 30, "interval_months": 24,
                     "registration": {"method": "file", "transform": "t.tfm"}},
                    {"name": "cur", "dose": "cur.nrrd", "fractions": 10}]})
    prep = prepare(load_case(tmp_path / "case.yaml"))
    got = prep.courses[0].dose
    src = sitk.ReadImage(str(tmp_path / "prior.nrrd"))
    once = sitk.GetArrayFromImage(sitk.Resample(src, prep.grid.reference_image(), t, sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat32))
    np.testing.assert_allclose(got, once, atol=1e-5)
    ct_grid = Grid(ct_size, ct_origin, ct_sp)
    on_ct = resample_linear(Volume(sitk.GetArrayFromImage(src), Grid(p_size, p_origin, p_sp)), ct_grid,
                            prep.registrations["prior"].transform)
    twice = resample_linear(Volume(on_ct, ct_grid), prep.grid)
    inside = np.zeros(prep.grid.shape, bool)
    inside[2:-2, 2:-2, 2:-2] = True
    assert np.abs(twice - once)[inside].max() > 0.05
