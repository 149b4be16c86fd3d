"""Target margins on analytic shapes: spheres on a 1 x 1 x 2.5 mm grid, half-space crops, known separations.

Reference values are closed-form volumes (sphere 4/3 pi r^3, cap pi h^2 (3r - h) / 3) and distances between
voxel centres placed exactly on the grid. "Half a voxel shell" = the sphere's surface area x half the smallest
voxel spacing (0.5 mm here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.geometry import Grid, bounding_box
from ReirradiationNPCLib.margins import GridStructure, MarginInputs, build, distance_mm, surface_distance_mm
from ReirradiationNPCLib.protocol import MarginRecipe, parse_protocol

SPACING = (1.0, 1.0, 2.5)
GRID = Grid((72, 72, 32), (-36.0, -36.0, -40.0), SPACING)   # x, y in [-36, 35], z in [-40, 37.5]; 0 on the grid


def protocol(extra: dict | None = None):
    data = {"name": "test", "version": "1", "alpha_beta": {"default": 3}, "recovery": {"model": "none"},
            "organs": {"brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2},
                       "cord": {"aliases": ["Cord"], "alpha_beta": 2},
                       "gtv": {"role": "target", "aliases": ["GTVp"], "alpha_beta": 10},
                       "external": {"role": "body", "aliases": ["External"], "alpha_beta": 3}}}
    data.update(extra or {})
    return parse_protocol(data, "test.yaml")


PROT = protocol()


def xyz(grid=GRID):
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in grid.shape), indexing="ij")
    return (grid.origin[0] + grid.spacing[0] * i, grid.origin[1] + grid.spacing[1] * j,
            grid.origin[2] + grid.spacing[2] * k)


X, Y, Z = xyz()


def gs(name, mask):
    box = bounding_box(mask)
    return GridStructure(name, mask[box].copy(), box, PROT.match(name))


def recipe(ctv=5.0, ptv=0.0, air=None, crop=None, avoid=(), dist=0.0):
    return MarginRecipe(("GTVp",), ctv, ptv, air, crop, tuple(avoid), dist, "test", False)


def full(m, key):
    out = np.zeros(GRID.shape, dtype=bool)
    out[m.box] = getattr(m, key)
    return out


def sphere(c, r):
    return (X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2 <= r * r


def ball(r):
    return 4.0 / 3.0 * math.pi * r ** 3 / 1000.0  # cc


def cap(r, h):
    return math.pi * h * h * (3 * r - h) / 3.0 / 1000.0  # cc


@pytest.mark.parametrize("radius,centre", [(8.0, (0.3, -0.2, 0.4)), (10.3, (0.0, 0.0, 0.0)),
                                           (12.0, (0.5, 0.5, 1.25))])
def test_sphere_plus_5mm_matches_analytic_within_half_voxel_shell(radius, centre):
    inputs = MarginInputs(GRID, "test", [gs("GTVp", sphere(centre, radius))], None)
    m, warnings = build(recipe(ctv=5.0, ptv=0.0), inputs, PROT)
    assert warnings == []
    r = radius + 5.0
    shell = 4 * math.pi * r * r * 0.5 / 1000.0          # half a 1 mm voxel shell, cc
    assert abs(m.report["volumes_cc"]["CTV"] - ball(r)) <= shell
    # the PTV with 0 mm is the CTV; the GTV is inside the CTV
    assert m.report["volumes_cc"]["PTV"] == m.report["volumes_cc"]["CTV"]
    assert not (m.gtv & ~m.ctv).any()


def test_ctv_then_ptv_total_margin():
    inputs = MarginInputs(GRID, "test", [gs("GTVp", sphere((0, 0, 0), 9.0))], None)
    m, _ = build(recipe(ctv=5.0, ptv=3.0), inputs, PROT)
    r = 17.0
    assert abs(m.report["volumes_cc"]["PTV"] - ball(r)) <= 4 * math.pi * r * r * 0.5 / 1000.0
    assert not (m.ctv & ~m.ptv).any()


def test_every_voxel_within_margin_and_no_other():
    """Voxel-level rule: a centre joins the CTV iff it lies within the margin of the GTV's face centres."""
    gtv = sphere((0, 0, 0), 6.0)
    inputs = MarginInputs(GRID, "test", [gs("GTVp", gtv)], None)
    m, _ = build(recipe(ctv=4.0), inputs, PROT)
    ctv = full(m, "ctv")
    # a centre 3.9 mm (in x) beyond the outermost GTV voxel (x = 6) is 4.4 mm from it but 3.9 mm from the face
    # at x = 6.5: inside; at x = 11 it is 4.5 mm from the face: outside
    j0, k0 = 36, 16                      # y = 0, z = 0
    assert ctv[k0, j0, 36 + 10] and not ctv[k0, j0, 36 + 11]
    # along z (2.5 mm): GTV top voxel at z = 5, face at 6.25; z = 10 is 3.75 mm away (in), z = 12.5 is 6.25 (out)
    assert ctv[16 + 4, j0, 36] and not ctv[16 + 5, j0, 36]


def test_crop_to_external_half_space():
    """External = x <= 0: the CTV keeps the half ball of radius 15 on the body side plus the GTV's other half."""
    gtv = sphere((0, 0, 0), 10.0)
    body = X <= 0.0
    inputs = MarginInputs(GRID, "test", [gs("GTVp", gtv), gs("External", body)], None)
    m, warnings = build(recipe(ctv=5.0, ptv=3.0, crop="External"), inputs, PROT)
    ctv, ptv = full(m, "ctv"), full(m, "ptv")
    assert not (ctv & ~body & ~gtv).any()
    assert not (ptv & ~body & ~ctv).any()
    # voxels x <= 0 stand for x < 0.5 mm: half ball (r 15) + 0.5 mm slab of the disc, + half the GTV (r 10)
    expected = ball(15.0) / 2 + math.pi * 15.0 ** 2 * 0.5 / 1000.0 + ball(10.0) / 2 - math.pi * 100 * 0.5 / 1000.0
    shell = 4 * math.pi * 15.0 ** 2 * 0.5 / 1000.0 / 2
    assert abs(m.report["volumes_cc"]["CTV"] - expected) <= shell
    assert m.report["ctv_removed_cc"]["outside_body"] > 0
    assert any("GTV lies outside the body" in w for w in warnings)


def test_crop_out_of_air_needs_the_ct():
    gtv = sphere((0, 0, 0), 10.0)
    ct = np.where(Z > 1.0, -1000.0, 40.0).astype(np.float32)    # air above z = 1 (voxels z >= 2.5)
    inputs = MarginInputs(GRID, "test", [gs("GTVp", gtv)], ct)
    m, _ = build(recipe(ctv=5.0, air=-300.0), inputs, PROT)
    ctv = full(m, "ctv")
    assert not (ctv & (Z > 1.0) & ~gtv).any()
    # body voxels z <= 0 stand for z < 1.25 mm: half ball + 1.25 mm slab of the disc; + GTV part above
    gtv_above = float((gtv & (Z > 1.0)).sum()) * GRID.voxel_volume_cc
    expected = ball(15.0) / 2 + math.pi * 225 * 1.25 / 1000.0 + gtv_above
    assert abs(m.report["volumes_cc"]["CTV"] - expected) <= 4 * math.pi * 225 * 0.5 / 1000.0 / 2
    assert m.report["cropped_out_of_air"] is True
    # without a CT the air crop is skipped, and said so
    m2, w2 = build(recipe(ctv=5.0, air=-300.0), MarginInputs(GRID, "test", [gs("GTVp", gtv)], None), PROT)
    assert m2.report["cropped_out_of_air"] is False
    assert any("NOT cropped out of air" in w for w in w2)
    assert m2.report["volumes_cc"]["CTV"] > m.report["volumes_cc"]["CTV"] + 1.0


def test_avoidance_distance_from_critical_organ():
    """Brainstem = x >= 12 (face at 11.5). Avoid 1 mm: centres with x > 10.5 leave the CTV (x = 11 goes)."""
    gtv = sphere((0, 0, 0), 10.0)
    stem = X >= 12.0
    inputs = MarginInputs(GRID, "test", [gs("GTVp", gtv), gs("Brainstem", stem)], None)
    m, _ = build(recipe(ctv=5.0, avoid=("brainstem",), dist=1.0), inputs, PROT)
    ctv = full(m, "ctv")
    assert not (ctv & (X > 10.5)).any()
    assert (ctv & (X == 10.0)).any()
    # ball r 15 minus the cap beyond the plane x = 10.5 (voxels x <= 10 stand for x < 10.5)
    expected = ball(15.0) - cap(15.0, 15.0 - 10.5)
    assert abs(m.report["volumes_cc"]["CTV"] - expected) <= 4 * math.pi * 225 * 0.5 / 1000.0
    assert m.report["avoided_structures"] == ["Brainstem"]
    # distance 0: only the organ's own voxels are removed (here none: the CTV ends at x = 15 > 12)
    m0, _ = build(recipe(ctv=5.0, avoid=("brainstem",), dist=0.0), inputs, PROT)
    assert not (full(m0, "ctv") & stem).any()
    assert (full(m0, "ctv") & (X == 11.0)).any()


def test_ptv_oar_overlap_and_min_distances():
    """GTV ball r 6 at 0; Cord ball r 5 at x = 20 (surface gap 9 mm along x, both surface points on voxel centres);
    Brainstem ball r 5 at z = 25 (gap 15 mm along z, 2.5 mm slices)."""
    gtv = sphere((0, 0, 0), 6.0)
    cord = sphere((20.0, 0, 0), 5.0)
    stem = sphere((0, 0, 25.0), 5.0)
    inputs = MarginInputs(GRID, "test", [gs("GTVp", gtv), gs("Cord", cord), gs("Brainstem", stem)], None)
    m, _ = build(recipe(ctv=5.0, ptv=3.0), inputs, PROT)
    d = m.report["gtv_min_distance_mm"]
    assert d["Cord"] == pytest.approx(9.0, abs=1e-4)
    assert d["Brainstem"] == pytest.approx(15.0, abs=1e-4)
    # PTV ~ ball r 14 (+ <= 0.5 mm): reaches the cord (x from 15) -> overlap = lens of the two balls
    ov = m.report["ptv_oar_overlap_cc"]
    assert ov["Brainstem"] == 0.0
    ptv = full(m, "ptv")
    assert ov["Cord"] == pytest.approx(float((ptv & cord).sum()) * GRID.voxel_volume_cc)
    # analytic lens of balls r1 = 14, r2 = 5 at distance 20: caps of heights h1 = (r2^2 - (d-r1)^2)/(2d)... use
    # the plane x0 = (d^2 + r1^2 - r2^2) / (2 d) = 14.275: cap of ball 1 (h = 14 - 14.275 < 0) is empty ->
    # the overlap comes only from the margin's +0..0.5 mm bias: small
    assert ov["Cord"] < 0.15


def test_distance_helpers():
    a = np.zeros((5, 7, 7), dtype=bool)
    a[2, 3, 3] = True
    d = distance_mm(a, SPACING)
    assert d[2, 3, 5] == pytest.approx(2.0)
    assert d[3, 4, 4] == pytest.approx(math.sqrt(1 + 1 + 2.5 ** 2), rel=1e-6)
    s = surface_distance_mm(a, SPACING)
    assert s[2, 3, 5] == pytest.approx(1.5)       # face at x = 0.5 from the voxel, point at x = 2
    assert s[4, 3, 3] == pytest.approx(3.75)      # face at z = 1.25, point at z = 5
    assert np.isinf(distance_mm(np.zeros((3, 3, 3), bool), SPACING)).all()


def test_missing_gtv_gives_warning_not_margins():
    inputs = MarginInputs(GRID, "test", [gs("Brainstem", sphere((0, 0, 0), 5.0))], None)
    m, w = build(recipe(), inputs, PROT)
    assert m is None and any("no GTV" in x for x in w)


def test_protocol_margins_block_validation():
    ok = {"gtv": ["GTVp"], "ctv_mm": 5, "ptv_mm": 3, "air_hu": -300, "crop_to": "External",
          "avoid": {"organs": ["brainstem"], "distance_mm": 1}, "source": "s", "verified": False}
    p = protocol({"margins": ok})
    assert p.margins.ctv_mm == 5.0 and p.margins.avoid_organs == ("brainstem",)
    with pytest.raises(InputError) as e:
        protocol({"margins": {**ok, "avoid": {"organs": ["liver"], "distance_mm": 1}}})
    assert e.value.field == "margins.avoid.organs"
    with pytest.raises(InputError) as e:
        protocol({"margins": {**ok, "ctv_mm": -1}})
    assert e.value.field == "margins.ctv_mm"
    with pytest.raises(InputError) as e:
        protocol({"margins": {k: v for k, v in ok.items() if k != "verified"}})
    assert e.value.field == "margins.verified"


def test_margins_written_as_segmentation_and_dicom_rtstruct(tmp_path):
    """margins.seg.nrrd and, on a DICOM reference CT, margins_rtstruct.dcm: both read back voxel for voxel."""
    from ReirradiationNPCLib import dicom_rt, planning
    from ReirradiationNPCLib.geometry import Volume
    from ReirradiationNPCLib.io import read_segmentation

    grid = Grid((40, 40, 16), (-20.0, -20.0, -20.0), SPACING)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in grid.shape), indexing="ij")
    x, y, z = -20.0 + i, -20.0 + j, -20.0 + 2.5 * k
    gtv = x ** 2 + y ** 2 + z ** 2 <= 36.0
    ident = {"PatientName": "Test^Margins", "PatientID": "T-002", "StudyInstanceUID": "1.2.3.4.5",
             "FrameOfReferenceUID": "1.2.3.4.6", "SeriesInstanceUID": "1.2.3.4.7",
             "SOPInstanceUIDs": [f"1.2.3.4.8.{n}" for n in range(grid.size[2])]}
    ct = Volume(np.zeros(grid.shape, np.int16), grid, "ct", {"dicom": ident})
    box = bounding_box(gtv)
    inputs = MarginInputs(grid, "reference image", [GridStructure("GTVp", gtv[box].copy(), box, PROT.match("GTVp"))],
                          ct.array)
    m, _ = build(recipe(ctv=4.0, ptv=3.0), inputs, PROT)
    files: dict[str, str] = {}
    planning.write(planning.Planning(margins=m, reference_image=ct), grid, tmp_path, files)
    assert set(files) == {"margins.seg.nrrd", "margins_rtstruct.dcm"}
    segs = {s.name: s for s in read_segmentation(tmp_path / "margins.seg.nrrd")}
    back = {s.name: s for s in dicom_rt.read_rtstruct(tmp_path / "margins_rtstruct.dcm", grid,
                                                       expected_frame_uid="1.2.3.4.6")}
    for key in ("GTV", "CTV", "PTV"):
        want = np.zeros(grid.shape, bool)
        want[m.box] = getattr(m, key.lower())
        for s in (segs[m.names[key]], back[m.names[key]]):
            got = np.zeros(grid.shape, bool)
            lo = np.rint(grid.physical_to_index(np.array([s.grid.origin]))[0]).astype(int)
            got[lo[2]:lo[2] + s.mask.shape[0], lo[1]:lo[1] + s.mask.shape[1], lo[0]:lo[0] + s.mask.shape[2]] = s.mask
            np.testing.assert_array_equal(got, want)
