"""DICOM RT in and out: RTDOSE scaling/summation/offsets, RTPLAN fractions, RTSTRUCT rasterisation (analytic
polygons with holes and islands), CT series, writers re-read by pydicom and SimpleITK, the DICOM synthetic case
through the pipeline, identity checks, corrupt files (exit 2) and ``scan``.

Expected numbers come from the construction (known pixels x known scaling, analytic areas), not from earlier
outputs of this code.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ReirradiationNPCLib import dicom_export as dx
from ReirradiationNPCLib import dicom_rt as dr
from ReirradiationNPCLib.cli import main
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.geometry import Grid, Volume

IDENT = {"PatientName": "Test^Patient", "PatientID": "T-001", "StudyInstanceUID": "1.2.3.4.5",
         "FrameOfReferenceUID": "1.2.3.4.6", "StudyDate": "20250101"}


# ------------------------------------------------------------------------------------------- helpers

def make_rtdose(path: Path, pixels: np.ndarray, scaling: str, *, gfov=None, ipp=(-10.0, -20.0, -30.0),
                spacing=(2.0, 2.5), **attrs) -> Path:
    """A hand-built RTDOSE: uint16 ``pixels`` (frames, rows, cols), the given DoseGridScaling text."""
    pixels = np.asarray(pixels, dtype="<u2")
    nk, nj, ni = pixels.shape
    ds = dx._dataset(dr.RT_DOSE_STORAGE, "RTDOSE", IDENT, series_description="test dose")
    ds.FrameOfReferenceUID = IDENT["FrameOfReferenceUID"]
    ds.ImagePositionPatient = [str(v) for v in ipp]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [str(spacing[1]), str(spacing[0])]  # row spacing (j), column spacing (i)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = nj, ni, nk
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [str(v) for v in (gfov if gfov is not None else [3.0 * k for k in range(nk)])]
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.DoseGridScaling = scaling
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.add_new(0x7FE00010, "OW", pixels.tobytes())
    dx.save(ds, path)
    return path


def known_pixels() -> np.ndarray:
    k, j, i = np.meshgrid(np.arange(4), np.arange(5), np.arange(6), indexing="ij")
    return (1000 * k + 100 * j + 7 * i + 3).astype(np.uint16)


def make_rtstruct(path: Path, rois: dict[str, list[np.ndarray]], frame_uid: str = IDENT["FrameOfReferenceUID"],
                  kinds: dict[str, str] | None = None) -> Path:
    """A hand-built RTSTRUCT: ``rois`` name -> list of (N, 3) contours (LPS mm)."""
    ds = dx._dataset(dr.RT_STRUCT_STORAGE, "RTSTRUCT", IDENT, series_description="test structures")
    ds.StructureSetLabel = "TEST"
    rf = Dataset()
    rf.FrameOfReferenceUID = frame_uid
    ds.ReferencedFrameOfReferenceSequence = Sequence([rf])
    roi_items, cont_items = [], []
    for n, (name, contours) in enumerate(rois.items(), start=1):
        r = Dataset()
        r.ROINumber, r.ROIName, r.ReferencedFrameOfReferenceUID = n, name, frame_uid
        roi_items.append(r)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = [255, 0, 0]
        cs = []
        for c in contours:
            it = Dataset()
            it.ContourGeometricType = (kinds or {}).get(name, "CLOSED_PLANAR")
            it.NumberOfContourPoints = len(c)
            it.ContourData = [f"{v:.6f}" for v in np.asarray(c).ravel()]
            cs.append(it)
        rc.ContourSequence = Sequence(cs)
        cont_items.append(rc)
    ds.StructureSetROISequence = Sequence(roi_items)
    ds.ROIContourSequence = Sequence(cont_items)
    dx.save(ds, path)
    return path


def square(cx, cy, half, z):
    return np.array([[cx - half, cy - half, z], [cx + half, cy - half, z], [cx + half, cy + half, z],
                     [cx - half, cy + half, z]], dtype=float)


def circle(cx, cy, r, z, n=256):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(a), cy + r * np.sin(a), np.full(n, z)])


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ RTDOSE

def test_dose_is_pixel_times_scaling(tmp_path):
    px = known_pixels()
    f = make_rtdose(tmp_path / "d.dcm", px, "0.0015")
    vol = dr.read_rtdose(f)
    assert vol.array.shape == px.shape
    np.testing.assert_allclose(vol.array, px.astype(np.float64) * 0.0015, rtol=1e-6)
    assert vol.array[2, 3, 4] == pytest.approx((2000 + 300 + 28 + 3) * 0.0015, rel=1e-6)  # 3.4965 Gy
    assert vol.grid.origin == (-10.0, -20.0, -30.0)
    assert vol.grid.spacing == (2.0, 2.5, 3.0)          # i from PixelSpacing[1], j from PixelSpacing[0]


@pytest.mark.parametrize("attrs, field", [({"DoseUnits": "RELATIVE"}, "DoseUnits"),
                                          ({"DoseSummationType": "BEAM"}, "DoseSummationType"),
                                          ({"DoseType": "ERROR"}, "DoseType"),
                                          ({"DoseType": "EFFECTIVE"}, "DoseType")])
def test_refused_dose_kinds(tmp_path, attrs, field):
    f = make_rtdose(tmp_path / "d.dcm", known_pixels(), "0.001", **attrs)
    with pytest.raises(InputError) as exc:
        dr.read_rtdose(f)
    assert exc.value.field == field and str(f) in str(exc.value)


def test_uneven_frames_refused(tmp_path):
    f = make_rtdose(tmp_path / "d.dcm", known_pixels(), "0.001", gfov=[0, 3, 6, 12])
    with pytest.raises(InputError, match="unevenly spaced"):
        dr.read_rtdose(f)


def test_absolute_and_relative_offsets_give_the_same_grid(tmp_path):
    px = known_pixels()
    rel = dr.read_rtdose(make_rtdose(tmp_path / "r.dcm", px, "0.001", gfov=[0, 3, 6, 9]))
    ab = dr.read_rtdose(make_rtdose(tmp_path / "a.dcm", px, "0.001", gfov=[-30, -27, -24, -21]))
    assert rel.grid.same_as(ab.grid) and ab.grid.origin[2] == -30.0 and ab.grid.spacing[2] == 3.0
    np.testing.assert_array_equal(rel.array, ab.array)
    with pytest.raises(InputError, match="neither 0"):  # absolute, but not starting at ImagePositionPatient z
        dr.read_rtdose(make_rtdose(tmp_path / "bad.dcm", px, "0.001", gfov=[-20, -17, -14, -11]))


def test_decreasing_offsets_are_flipped_to_increasing_z(tmp_path):
    px = known_pixels()
    vol = dr.read_rtdose(make_rtdose(tmp_path / "d.dcm", px, "0.001", gfov=[0, -3, -6, -9]))
    # frame 0 lies at z = -30, frame 3 at z = -39: after flipping, k = 0 is z = -39 (the old frame 3)
    assert vol.grid.origin[2] == pytest.approx(-39.0) and vol.grid.spacing[2] == pytest.approx(3.0)
    np.testing.assert_allclose(vol.array[0], px[3] * 0.001, rtol=1e-6)
    np.testing.assert_allclose(vol.array[3], px[0] * 0.001, rtol=1e-6)


def test_rtdose_round_trip_pydicom_and_simpleitk(tmp_path):
    grid = Grid((30, 24, 20), (-40.0, -30.0, -25.0), (2.5, 2.5, 3.0))
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    dose = (72.3 * np.exp(-((i - 15) ** 2 + (j - 12) ** 2 + (k - 10) ** 2) / 60.0)).astype(np.float32)
    path = tmp_path / "eqd2.dcm"
    dx.write_rtdose(Volume(dose, grid), IDENT, path, series_description="EQD2 test", dose_type="EFFECTIVE",
                    summation="PLAN")
    back = dr.read_rtdose(path, accept_effective=True)
    assert back.grid.same_as(grid)
    assert np.abs(back.array - dose).max() <= 0.005 * dose.max()
    assert np.abs(back.array - dose).max() < 1e-6                 # uint32 with a fine scaling: far better
    ds = pydicom.dcmread(path)
    assert ds.GridFrameOffsetVector[0] == 0 and ds.DoseUnits == "GY" and ds.BitsAllocated == 32
    assert len(str(ds.DoseGridScaling)) <= 16
    img = sitk.ReadImage(str(path))        # SimpleITK (GDCM) gives the stored integers; scaling from its metadata
    arr = sitk.GetArrayFromImage(img).astype(np.float64) * float(img.GetMetaData("3004|000e"))
    assert np.allclose(img.GetOrigin(), grid.origin) and np.allclose(img.GetSpacing(), grid.spacing)
    assert np.abs(arr - dose).max() <= 0.005 * dose.max()


def test_rtdose_round_trip_on_a_rotated_left_handed_grid(tmp_path):
    """Direction columns: i rotated 10 degrees about z, j likewise, k pointing against the slice normal."""
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    d = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])      # columns are the i, j, k axes
    grid = Grid((12, 10, 8), (5.0, -3.0, 20.0), (2.0, 2.5, 3.0), tuple(d.ravel()))
    dose = np.arange(np.prod(grid.shape), dtype=np.float32).reshape(grid.shape) * np.float32(0.07)
    path = tmp_path / "rot.dcm"
    dx.write_rtdose(Volume(dose, grid), IDENT, path, series_description="rotated")
    back = dr.read_rtdose(path)
    # the reader orders frames along the normal (k reversed here): compare at the same physical points
    pts = grid.index_to_physical(np.array([[0, 0, 0], [11, 9, 7], [3, 4, 5]], float))
    for p_, ijk in zip(pts, ([0, 0, 0], [11, 9, 7], [3, 4, 5])):
        i, j, k = np.rint(back.grid.physical_to_index(p_[None])[0]).astype(int)
        assert back.array[k, j, i] == pytest.approx(dose[ijk[2], ijk[1], ijk[0]], abs=1e-6)
    assert back.grid.spacing == pytest.approx((2.0, 2.5, 3.0))


def test_plan_fractions_and_plan_dose_link(tmp_path):
    plan = dr.read_rtplan(Path(dx.write_rtplan(tmp_path / "p.dcm", IDENT, fractions=33, label="P1",
                                              prescription_gy=70, series_description="plan") and tmp_path / "p.dcm"))
    assert plan.fractions == 33
    assert dr.fractions_from_plan(plan, None, "case.yaml", "courses[0].fractions") == 33
    with pytest.raises(InputError, match="disagrees"):
        dr.fractions_from_plan(plan, 30, "case.yaml", "courses[0].fractions")
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = dr.RT_PLAN_STORAGE, plan.sop_instance_uid
    # 0.02 Gy per unit: maximum 3438 x 0.02 = 68.76 Gy over 33 fractions (2.08 Gy/fx: a plausible course)
    good = make_rtdose(tmp_path / "good.dcm", known_pixels(), "0.02", ReferencedRTPlanSequence=Sequence([ref]))
    assert dr.read_rtdose(good, plan=plan).array.max() > 0
    other = Dataset()
    other.ReferencedSOPClassUID, other.ReferencedSOPInstanceUID = dr.RT_PLAN_STORAGE, "1.2.3.999"
    bad = make_rtdose(tmp_path / "bad.dcm", known_pixels(), "0.02", ReferencedRTPlanSequence=Sequence([other]))
    with pytest.raises(InputError) as exc:
        dr.read_rtdose(bad, plan=plan)
    assert exc.value.field == "ReferencedRTPlanSequence"


# ---------------------------------------------------------------------------------------------- RTSTRUCT

def _ring_with_island(nplanes, dz):
    """Outer 60 x 60 mm square, a hole of radius 15 mm, an island 8 x 8 mm inside the hole, on each plane."""
    contours = []
    for p in range(nplanes):
        z = p * dz
        contours += [square(0, 0, 30, z), circle(0, 0, 15, z)[::-1], square(0, 0, 4, z)]
    area = 3600 - math.pi * 225 + 64                           # mm^2 by the even-odd rule
    return contours, area


@pytest.mark.parametrize("spacing, origin", [((1.0, 1.0, 3.0), (-40.3, -39.6, 0.0)),      # planes on the lattice
                                             ((2.5, 2.5, 2.5), (-41.3, -40.7, -1.3))])    # coarser, offset planes
def test_rtstruct_hole_and_island_volume(tmp_path, spacing, origin):
    nplanes, dz = 10, 3.0
    contours, area = _ring_with_island(nplanes, dz)
    f = make_rtstruct(tmp_path / "s.dcm", {"Ring": contours})
    lattice = Grid((40, 40, 14), origin, spacing)
    [s] = dr.read_rtstruct(f, lattice)
    expected_cc = area * dz * nplanes / 1000.0                 # each contour plane stands for a 3 mm slab
    got_cc = float(s.mask.sum()) * s.grid.voxel_volume_cc
    assert got_cc == pytest.approx(expected_cc, rel=0.03)
    # the hole is empty, the island and the ring are filled (mid-plane, physical points -> voxel indices)
    def at(x, y, z):
        i, j, k = np.rint(s.grid.physical_to_index(np.array([[x, y, z]]))[0]).astype(int)
        inside = all(0 <= a < n for a, n in zip((k, j, i), s.mask.shape))
        return bool(s.mask[k, j, i]) if inside else False
    z = 4 * dz
    assert at(0, 0, z) and at(25, 0, z) and not at(9.5, 0, z) and not at(0, -10, z) and not at(35, 0, z)


@pytest.mark.parametrize("spacing, origin", [((0.977, 0.977, 3.0), (-50.2, -49.7, -45.0)),   # a CT lattice
                                             ((2.5, 2.5, 2.5), (-50.9, -50.3, -46.1))])     # a dose lattice
def test_rtstruct_volume_matches_contour_based_volume(tmp_path, spacing, origin):
    """A 17 cc sphere contoured every 3 mm: rasterised volume vs sum of polygon areas x plane spacing."""
    r, dz = 16.0, 3.0
    zs = [z for z in np.arange(-45.0, 45.0, dz) if abs(z - 1.0) < r]
    contours = [circle(2.0, -3.0, math.sqrt(r * r - (z - 1.0) ** 2), z, n=72) for z in zs]
    def shoelace(c):
        x, y = c[:, 0], c[:, 1]
        return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    contour_cc = sum(shoelace(c) for c in contours) * dz / 1000.0      # independent, contour-based (~16.7 cc)
    f = make_rtstruct(tmp_path / "s.dcm", {"Sphere": contours})
    [s] = dr.load_structures_any(f, lattice=Grid((100, 100, 40), origin, spacing))   # the pipeline's way in
    assert max(s.grid.spacing[:2]) <= 1.0                       # coarse lattices are subdivided first
    got_cc = float(s.mask.sum()) * s.grid.voxel_volume_cc
    assert got_cc == pytest.approx(contour_cc, rel=0.01)


def test_dicom_without_preamble_is_read(tmp_path):
    dx.write_rtplan(tmp_path / "p.dcm", IDENT, fractions=30, label="P", prescription_gy=60, series_description="p")
    ds = pydicom.dcmread(tmp_path / "p.dcm")
    del ds.file_meta
    ds.preamble = None
    raw = tmp_path / "raw.dcm"
    ds.save_as(raw, implicit_vr=True, little_endian=True) if int(pydicom.__version__.split(".")[0]) >= 3 else \
        pydicom.dcmwrite(raw, ds, write_like_original=True)
    assert raw.read_bytes()[:2] == b"\x08\x00" and dr.is_dicom_file(raw)
    assert dr.read_rtplan(raw).fractions == 30


def test_rtstruct_hole_with_rounded_z_stays_a_hole(tmp_path):
    """A hole contour whose z differs by 0.03 mm (export rounding) belongs to the same plane (even-odd)."""
    contours = []
    for z in (0.0, 3.0, 6.0):
        contours += [square(0, 0, 10, z), square(0, 0, 5, z + 0.03)]
    f = make_rtstruct(tmp_path / "s.dcm", {"Frame": contours})
    [s] = dr.read_rtstruct(f, Grid((30, 30, 4), (-14.5, -14.5, 0.0), (1.0, 1.0, 3.0)))
    assert int(s.mask.sum()) == (400 - 100) * 3                 # 20 x 20 mm minus 10 x 10 mm, three planes


def test_rtstruct_point_and_open_contours_skipped_with_warning(tmp_path):
    rois = {"Box": [square(0, 0, 10, z) for z in (0.0, 3.0)], "Marker": [np.array([[1.0, 2.0, 3.0]])],
            "Line": [square(0, 0, 5, 0.0)]}
    f = make_rtstruct(tmp_path / "s.dcm", rois, kinds={"Marker": "POINT", "Line": "OPEN_PLANAR"})
    warnings = []
    # voxel edges on the contour (centres at -14.5 + n): 20 x 20 voxels per plane
    out = dr.read_rtstruct(f, Grid((30, 30, 4), (-14.5, -14.5, 0.0), (1.0, 1.0, 3.0)), warnings=warnings)
    assert [s.name for s in out] == ["Box"]
    assert out[0].mask.sum() == 20 * 20 * 2                    # 20 x 20 mm on two 3 mm planes, 1 mm voxels
    assert any("Marker" in w and "POINT" in w for w in warnings)
    assert any("Line" in w and "OPEN_PLANAR" in w for w in warnings)


def test_rtstruct_other_frame_refused(tmp_path):
    f = make_rtstruct(tmp_path / "s.dcm", {"Box": [square(0, 0, 10, 0.0)]}, frame_uid="9.9.9")
    with pytest.raises(InputError, match="frame of reference"):
        dr.read_rtstruct(f, Grid((30, 30, 4), (-15.0, -15.0, 0.0), (1.0, 1.0, 3.0)),
                         expected_frame_uid=IDENT["FrameOfReferenceUID"])


def test_write_rtstruct_round_trip_is_voxel_exact(tmp_path):
    grid = Grid((40, 36, 12), (-20.0, -18.0, -15.0), (1.0, 1.0, 2.5))
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    ring = ((i - 20) ** 2 + (j - 18) ** 2 < 150) & ((i - 20) ** 2 + (j - 18) ** 2 >= 30) & (k > 2) & (k < 9)
    checker = ((i + j) % 2 == 0) & (i > 3) & (i < 9) & (j > 3) & (j < 9) & (k == 5)   # diagonal neighbours
    ct = Volume(np.zeros(grid.shape, np.int16), grid,
                meta={"dicom": dict(IDENT, SeriesInstanceUID="1.2.3.4.7",
                                    SOPInstanceUIDs=[f"1.2.3.4.8.{n}" for n in range(grid.size[2])])})
    path = tmp_path / "rs.dcm"
    dx.write_rtstruct([ring, checker], ["Ring", "Checker"], [(1, 0, 0), (0, 1, 0)], ct, path)
    back = {s.name: s for s in dr.read_rtstruct(path, grid, expected_frame_uid=IDENT["FrameOfReferenceUID"])}
    for name, m in (("Ring", ring), ("Checker", checker)):
        s = back[name]
        full = np.zeros(grid.shape, bool)
        lo = np.rint(grid.physical_to_index(np.array([s.grid.origin]))[0]).astype(int)
        full[lo[2]:lo[2] + s.mask.shape[0], lo[1]:lo[1] + s.mask.shape[1], lo[0]:lo[0] + s.mask.shape[2]] = s.mask
        np.testing.assert_array_equal(full, m)
    ds = pydicom.dcmread(path)
    c = ds.ROIContourSequence[0].ContourSequence[0]
    assert c.ContourImageSequence[0].ReferencedSOPInstanceUID.startswith("1.2.3.4.8.")
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == IDENT["FrameOfReferenceUID"]


# ------------------------------------------------------------------------------- synthetic case in DICOM

@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory) -> Path:
    from ReirradiationNPCLib.synthetic_dicom import generate_dicom
    return generate_dicom(tmp_path_factory.mktemp("dicom") / "case")


def test_ct_series_reads_hu_and_geometry(dicom_case):
    from ReirradiationNPCLib import synthetic as syn
    ct = dr.read_ct_series(dicom_case.parent / "ct_current")
    assert ct.grid.same_as(syn.CT_GRID)
    np.testing.assert_array_equal(ct.array, syn.phantom_ct(syn.CT_GRID).astype(np.int16))  # stored + (-1024)
    assert len(ct.meta["dicom"]["SOPInstanceUIDs"]) == syn.CT_GRID.size[2]


def test_ct_series_with_missing_slice_or_two_series_refused(dicom_case, tmp_path):
    folder = tmp_path / "ct"
    shutil.copytree(dicom_case.parent / "ct_current", folder)
    (folder / "CT_0050.dcm").unlink()
    with pytest.raises(InputError, match="unevenly spaced"):
        dr.read_ct_series(folder)
    both = tmp_path / "both"
    shutil.copytree(dicom_case.parent / "ct_current", both / "a")
    shutil.copytree(dicom_case.parent / "ct_prior", both / "b")
    with pytest.raises(InputError, match="2 CT series"):
        dr.read_ct_series(both)


def test_synthetic_dicom_matches_the_nrrd_case(dicom_case, synthetic_case):
    """Independent paths: analytic masks -> contours -> rasterised again must give the same voxels; RTDOSE
    pixels x scaling must give the NRRD dose."""
    from ReirradiationNPCLib.io import read_dose, read_structures
    d = dicom_case.parent
    n = synthetic_case.parent
    ct = dr.read_ct_series(d / "ct_current")
    rs = {s.name: s for s in dr.read_rtstruct(d / "rtstruct_current.dcm", ct.grid,
                                              expected_frame_uid=ct.meta["dicom"]["FrameOfReferenceUID"])}
    masks = {s.name: s for s in read_structures(n / "structures")}
    assert set(rs) == set(masks)
    for name, m in masks.items():
        s = rs[name]
        lo = np.rint(ct.grid.physical_to_index(np.array([s.grid.origin]))[0]).astype(int)
        sub = m.mask[lo[2]:lo[2] + s.mask.shape[0], lo[1]:lo[1] + s.mask.shape[1], lo[0]:lo[0] + s.mask.shape[2]]
        assert int(s.mask.sum()) == int(m.mask.sum()) and np.array_equal(sub, s.mask), name
    plan2 = dr.read_rtplan(d / "rtplan_course2.dcm")
    d2 = dr.read_rtdose(d / "rtdose_course2.dcm", plan=plan2)
    ref = read_dose(n / "dose_course2.nrrd")
    assert d2.grid.same_as(ref.grid) and np.abs(d2.array - ref.array).max() < 1e-5
    d1 = dr.read_rtdose(d / "rtdose_course1.dcm", plan=dr.read_rtplan(d / "rtplan_course1.dcm"))
    ref1 = read_dose(n / "dose_course1_prior_frame.nrrd")
    assert np.abs(d1.array - ref1.array).max() < 1e-5


def test_reg_object_holds_the_known_offset(dicom_case):
    from ReirradiationNPCLib import synthetic as syn
    ds = pydicom.dcmread(dicom_case.parent / "reg_prior_to_current.dcm")
    cur = dr.read_ct_series(dicom_case.parent / "ct_current").meta["dicom"]["FrameOfReferenceUID"]
    assert ds.FrameOfReferenceUID == cur
    item = ds.RegistrationSequence[1]
    m = np.array([float(v) for v in
                  item.MatrixRegistrationSequence[0].MatrixSequence[0].FrameOfReferenceTransformationMatrix]).reshape(4, 4)
    # a current-frame point p sits at q = R p + t in the prior frame; the matrix must bring q back to p
    p = np.array([10.0, -20.0, 30.0])
    q = np.array(syn.prior_to_current_sitk_transform().TransformPoint(tuple(p)))
    np.testing.assert_allclose((m @ np.append(q, 1.0))[:3], p, atol=1e-4)


def test_case_file_fractions_from_plan_and_disagreement(dicom_case, tmp_path):
    from ReirradiationNPCLib.case import load_case
    case = load_case(dicom_case.parent / "case_identity.yaml")
    assert [c.fractions for c in case.courses] == [33, 54]
    data = yaml.safe_load((dicom_case.parent / "case_identity.yaml").read_text())
    data["courses"][1]["fractions"] = 30
    bad = dicom_case.parent / "case_bad_fx.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as exc:
        load_case(bad)
    assert exc.value.field == "courses[1].fractions" and "54" in str(exc.value)


def test_pipeline_writes_cumulative_rtdose(dicom_case, tmp_path):
    from ReirradiationNPCLib.pipeline import run_case
    out = tmp_path / "out"
    run_case(dicom_case.parent / "case_identity.yaml", out, dicom_courses=True)
    ct = dr.read_ct_series(dicom_case.parent / "ct_current").meta["dicom"]
    path = out / "cumulative_eqd2.dcm"
    ds = pydicom.dcmread(path)
    assert ds.DoseType == "EFFECTIVE" and ds.DoseUnits == "GY" and ds.DoseSummationType == "MULTI_PLAN"
    assert ds.FrameOfReferenceUID == ct["FrameOfReferenceUID"] and ds.StudyInstanceUID == ct["StudyInstanceUID"]
    assert ds.PatientID == ct["PatientID"] and ds.SeriesInstanceUID != ct["SeriesInstanceUID"]
    assert "EQD2" in ds.SeriesDescription and "a/b" in ds.SeriesDescription
    assert float(ds.GridFrameOffsetVector[0]) == 0.0 and len(ds.ReferencedRTPlanSequence) == 2
    nrrd = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cumulative_eqd2.nrrd")))
    back = dr.read_rtdose(path, accept_effective=True)
    assert np.abs(back.array - nrrd).max() <= 0.005 * nrrd.max()
    img = sitk.ReadImage(str(path))
    via_sitk = sitk.GetArrayFromImage(img) * float(img.GetMetaData("3004|000e"))
    assert np.allclose(img.GetOrigin(), back.grid.origin) and np.allclose(img.GetSpacing(), back.grid.spacing)
    assert np.abs(via_sitk - nrrd).max() <= 0.005 * nrrd.max()
    for course in ("course1", "course2"):                     # run --dicom-courses
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"eqd2_{course}.nrrd")))
        got = dr.read_rtdose(out / f"eqd2_{course}.dcm", accept_effective=True)
        assert np.abs(got.array - ref).max() <= 0.005 * ref.max()
        assert pydicom.dcmread(out / f"eqd2_{course}.dcm").DoseSummationType == "PLAN"


def test_dicom_courses_needs_a_dicom_reference(synthetic_case, tmp_path):
    r = run_cli(["run", synthetic_case, "-o", tmp_path / "o", "--dicom-courses"])
    assert r.exit_code == 2 and "--dicom-courses" in r.output


def test_different_patient_refused_unless_allowed(dicom_case, tmp_path):
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import prepare
    d = tmp_path / "c"
    shutil.copytree(dicom_case.parent, d, ignore=shutil.ignore_patterns("ct_prior", "rtstruct_prior.dcm"))
    ds = pydicom.dcmread(d / "rtdose_course1_registered.dcm")
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(d / "rtdose_course1_registered.dcm")
    data = yaml.safe_load((d / "case_identity.yaml").read_text())
    data["courses"][0].pop("image")
    (d / "case.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as exc:
        prepare(load_case(d / "case.yaml"))
    assert exc.value.field == "PatientID"
    data["allow_different_patients"] = True
    data.pop("patient")
    (d / "case.yaml").write_text(yaml.safe_dump(data))
    prep = prepare(load_case(d / "case.yaml"))
    assert any("allow_different_patients" in w for w in prep.warnings)


def test_truncated_or_garbage_dicom_exit_2(dicom_case, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(dicom_case.parent, d, ignore=shutil.ignore_patterns("ct_prior", "rtstruct_prior.dcm"))
    data = yaml.safe_load((d / "case_identity.yaml").read_text())
    data["courses"][0].pop("image")
    (d / "case.yaml").write_text(yaml.safe_dump(data))
    raw = (d / "rtdose_course2.dcm").read_bytes()
    (d / "rtdose_course2.dcm").write_bytes(raw[: len(raw) // 2])
    r = run_cli(["run", d / "case.yaml", "-o", tmp_path / "o1"])
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error:") and "rtdose_course2.dcm" in line and "Traceback" not in r.output
    (d / "rtdose_course2.dcm").write_bytes(raw[:300])          # header cut inside an element
    r = run_cli(["run", d / "case.yaml", "-o", tmp_path / "o2"])
    assert r.exit_code == 2 and "rtdose_course2.dcm" in r.output
    (d / "rtplan_course2.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01\x02garbage")
    r = run_cli(["run", d / "case.yaml", "-o", tmp_path / "o3"])
    assert r.exit_code == 2 and "rtplan_course2.dcm" in r.output


def test_scan_lists_and_writes_a_skeleton(dicom_case, tmp_path):
    r = run_cli(["scan", dicom_case.parent])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "patient SYNTHETIC-NPC-001" in out and out.count("  study ") == 2
    assert out.count("100 slices") == 2 and "33 fractions" in out and "54 fractions" in out
    assert out.count("    dose ") == 3 and out.count("    structures ") == 2 and "registration" in out
    target = tmp_path / "skeleton.yaml"
    r = run_cli(["scan", dicom_case.parent, "--write-case", target])
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(target.read_text())
    assert data["protocol"] is None and data["courses"][0]["interval_months"] is None   # for the physicist
    assert data["courses"][1]["plan"].endswith("rtplan_course2.dcm")
    assert data["courses"][0]["registration"]["method"] == "file"                      # the REG links the frames
    before = target.read_text()
    r = run_cli(["scan", dicom_case.parent, "--write-case", target])
    assert r.exit_code == 2 and target.read_text() == before                           # never overwritten


def test_folder_with_two_ct_series_and_image_series(dicom_case, tmp_path):
    """A flat export (both CTs and the RT objects in one folder): the SeriesInstanceUID picks the CT."""
    flat = tmp_path / "flat"
    flat.mkdir()
    src = dicom_case.parent
    for sub in ("ct_current", "ct_prior"):
        for f in (src / sub).iterdir():
            shutil.copy(f, flat / f"{sub}_{f.name}")
    for f in ("rtplan_course1.dcm", "rtplan_course2.dcm", "rtdose_course1.dcm", "rtdose_course2.dcm",
              "rtstruct_current.dcm", "reg_prior_to_current.dcm"):
        shutil.copy(src / f, flat / f)
    with pytest.raises(InputError, match="2 CT series"):
        dr.load_image_any(flat)
    skeleton = tmp_path / "case.yaml"
    r = run_cli(["scan", flat, "--write-case", skeleton])
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(skeleton.read_text())
    cur = dr.read_ct_series(src / "ct_current").meta["dicom"]["SeriesInstanceUID"]
    pri = dr.read_ct_series(src / "ct_prior").meta["dicom"]["SeriesInstanceUID"]
    assert data["reference"]["image_series"] == cur and data["courses"][0]["image_series"] == pri
    ct = dr.load_image_any(flat, series_uid=cur)
    assert ct.meta["dicom"]["SeriesInstanceUID"] == cur and ct.array.shape == (100, 160, 160)
    from ReirradiationNPCLib.case import parse_case
    data["protocol"] = "synthetic-demo"
    data["courses"][0].update(interval_months=30, registration={"method": "identity"})
    case = parse_case(data, skeleton)
    assert case.reference_image_series == cur and case.courses[0].image_series == pri
    assert [c.fractions for c in case.courses] == [33, 54]


def test_ct_rescale_integer_and_float():
    a = [np.array([[0, 1000], [2000, 65535]], np.uint16), np.array([[5, 6], [7, 8]], np.uint16)]
    small = [x.clip(0, 30000) for x in a]
    hu = dr._rescale_slices(small, [(1.0, -1024.0), (1.0, -1024.0)], True)
    assert hu.dtype == np.int16 and hu[0, 0, 1] == -24 and hu[1, 1, 1] == -1016 and hu[0, 1, 1] == 28976
    hu = dr._rescale_slices(a, [(1.0, -1024.0), (1.0, -1024.0)], True)   # 65535 - 1024 does not fit int16
    assert hu.dtype == np.float32 and hu[0, 1, 1] == 64511.0
    hu = dr._rescale_slices(a, [(0.5, -10.0), (2.0, 0.0)], False)
    assert hu.dtype == np.float32 and hu[0, 1, 0] == 990.0 and hu[1, 0, 0] == 10.0


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")   # that test file holds a non-conformant UID
def test_third_party_files_from_pydicom_test_data(tmp_path):
    """Files written by other software (pydicom's bundled test data): a RELATIVE/BEAM dose is refused; with its
    units and summation changed it reads as pixel x 1e-6 Gy (also RLE-compressed and big-endian copies); the
    plan has 30 fractions; the structure set's isocentre POINT ROIs are skipped with warnings."""
    from pydicom.data import get_testdata_file
    with pytest.raises(InputError, match="RELATIVE"):
        dr.read_rtdose(get_testdata_file("rtdose.dcm"))
    for name in ("rtdose.dcm", "rtdose_rle.dcm", "rtdose_expb.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.DoseUnits, ds.DoseSummationType = "GY", "PLAN"
        ds.save_as(tmp_path / name)
        vol = dr.read_rtdose(tmp_path / name)
        assert vol.grid.size == (10, 10, 15) and vol.grid.spacing == (10.0, 10.0, 5.0)
        np.testing.assert_allclose(vol.array, ds.pixel_array.astype(np.float64) * 1e-6, rtol=1e-6)
    assert dr.read_rtplan(get_testdata_file("rtplan.dcm")).fractions == 30
    rois, _, warns = dr.read_rtstruct_contours(get_testdata_file("rtstruct.dcm"))
    assert [r.name for r in rois] == ["patient"] and sum("POINT" in w for w in warns) == 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS", "ignore:Value \"1.5\" is not valid")
def test_rtstruct_malformed_roi_numbers_and_colour(tmp_path):
    """A multi-valued or fractional ReferencedROINumber / ROINumber is an InputError naming the field (it was a
    TypeError: an internal error, not one line and exit 2); a single-valued ROIDisplayColor only loses the colour."""
    import pydicom
    sq = [square(0, 0, 5, 0.0)]
    path = make_rtstruct(tmp_path / "rs.dcm", {"A": sq})
    ds = pydicom.dcmread(path)
    ds.ROIContourSequence[0].ROIDisplayColor = 255
    ds.save_as(tmp_path / "colour.dcm")
    (roi,), _, _ = dr.read_rtstruct_contours(tmp_path / "colour.dcm")
    assert roi.name == "A" and roi.color is None and len(roi.contours) == 1
    for keyword, seq, value, text in [("ReferencedROINumber", "ROIContourSequence", [1, 2], "2 values"),
                                      ("ROINumber", "StructureSetROISequence", "1.5", "'1.5'")]:
        ds = pydicom.dcmread(path)
        setattr(getattr(ds, seq)[0], keyword, value)
        bad = tmp_path / f"{keyword}.dcm"
        ds.save_as(bad)
        with pytest.raises(InputError, match=f"must be one whole number, got {text}") as err:
            dr.read_rtstruct_contours(bad)
        assert err.value.field == keyword and err.value.source == str(bad)
