"""Registration of prior courses: known rigid transforms recovered, transform files and DICOM REG read in the right
direction, dose mapped through a known transform equals the analytic dose, coverage warnings, QA in results.

Direction convention under test: a registration's transform maps reference-frame points p to prior-frame points
T(p) (ITK resampling convention); the prior dose is sampled at T(p).
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from ReirradiationNPCLib import registration as reg
from ReirradiationNPCLib import synthetic
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.geometry import Grid, Volume, resample_linear
from ReirradiationNPCLib.io import write_volume

#: bounding box of the phantom's head (LPS mm): synthetic.HEAD (centre 0, 2, 28; semi-axes 76, 92, 82) above z = -10,
#: and the neck down to the bottom of the CT
HEAD_BOX = (np.array([-76.0, -90.0, -54.0]), np.array([76.0, 94.0, 110.0]))


def box_corners(lo, hi):
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def max_corner_error(tx: sitk.Transform, truth: sitk.Transform, lo=HEAD_BOX[0], hi=HEAD_BOX[1]) -> float:
    """Largest displacement error (mm) over the corners of a box: for two rigid transforms the difference is an
    affine map, whose largest norm over a box is attained at a corner."""
    return max(float(np.linalg.norm(np.subtract(tx.TransformPoint(tuple(c)), truth.TransformPoint(tuple(c)))))
               for c in box_corners(lo, hi))


def phantom_pair(grid: Grid, truth: sitk.Transform, seed: int = 7) -> tuple[Volume, Volume]:
    """Reference CT and a prior CT showing the same anatomy through ``truth`` (reference p -> prior q = T(p)): the
    prior voxel at q shows the anatomy at T^-1(q). Independent noise in the two images."""
    inv = truth.GetInverse()
    M, b = reg.affine_of(inv)
    ref = Volume(synthetic.phantom_ct(grid).astype(np.int16), grid)
    prior = Volume(synthetic.phantom_ct(grid, transform=lambda q: q @ M.T + b, seed=seed).astype(np.int16), grid)
    return ref, prior


# ----------------------------------------------------------------------------------------------- rigid

#: the demo CT's geometry (1.5 x 1.5 x 2.5 mm). At 2 mm isotropic voxels the rotation about the cranio-caudal axis
#: of this nearly symmetric phantom is recovered less well (up to 0.7 mm at the head box's corners).
GRID = synthetic.CT_GRID
KNOWN = [  # (rotations about x, y, z in degrees; translation mm), about the head centre
    ((0.5, -3.0, 5.0), (-15.0, 8.0, 12.0)),
    ((-4.0, 2.5, -1.5), (10.0, -14.0, -6.0)),
]


@pytest.mark.parametrize("angles, shift", KNOWN, ids=["rz5_shift15", "rx4_shift14"])
def test_rigid_recovers_a_known_transform(angles, shift):
    truth = sitk.Euler3DTransform((0.0, 2.0, 28.0), *[math.radians(a) for a in angles], shift)
    ref, prior = phantom_pair(GRID, truth)
    t0 = time.perf_counter()
    out = reg.register_course("c1", {"method": "rigid"}, ref, prior)
    wall = time.perf_counter() - t0
    err = max_corner_error(out.transform, truth)
    assert err < 0.5, f"max displacement error over the head box {err:.3f} mm"
    before = max_corner_error(sitk.Euler3DTransform(), truth)
    assert before > 10.0  # the test is not trivially passed by the identity
    assert out.metric_after > out.metric_before + 0.1
    # speed is measured in benchmarks/run_benchmarks.py (not asserted here: CI machines are shared)
    print(f'registration wall time {wall:.1f} s')
    M, b = out.affine_matrix()
    Mt, bt = reg.affine_of(truth)
    assert np.allclose(M @ M.T, np.eye(3), atol=1e-9)           # a rotation
    assert abs(math.degrees(math.acos((np.trace(M @ Mt.T) - 1) / 2))) < 0.2


#: 2 mm isotropic voxels: the head's top is cut by the field of view like the demo CT's
GRID_2MM = Grid((120, 120, 125), (-119.0, -119.0, -150.0), (2.0, 2.0, 2.0))


def _random_rigid(seed: int) -> sitk.Euler3DTransform:
    """Seeded rotations up to 5 deg about each axis and shifts up to 15 mm, about the head centre."""
    rng = np.random.default_rng(seed)
    angles, shift = rng.uniform(-5.0, 5.0, 3), rng.uniform(-15.0, 15.0, 3)
    return sitk.Euler3DTransform((0.0, 2.0, 28.0), *[math.radians(a) for a in angles], tuple(shift))


@pytest.mark.parametrize("seed", [11, 7])
def test_rigid_recovers_random_transforms_at_2mm_isotropic(seed):
    """Seed 11 (1 deg about the cranio-caudal axis, the weakly constrained rotation of this nearly symmetric phantom)
    failed before the final correlation stage (0.87 mm). The analytic phantom is rendered without partial volume,
    so even starting from the truth the best-matching transform lies 0.2-0.35 mm (head-box corners) away."""
    truth = _random_rigid(seed)
    ref, prior = phantom_pair(GRID_2MM, truth, seed=seed + 100)
    t0 = time.perf_counter()
    out = reg.register_course("c1", {"method": "rigid"}, ref, prior)
    wall = time.perf_counter() - t0
    assert max_corner_error(sitk.Euler3DTransform(), truth) > 10.0
    err = max_corner_error(out.transform, truth)
    assert err < 0.5, f"max displacement error over the head box {err:.3f} mm"
    # speed is measured in benchmarks/run_benchmarks.py (not asserted here: CI machines are shared)
    print(f'registration wall time {wall:.1f} s')
    assert out.parameters["metric"] == "correlation"


def test_demo_case_rigid_registration_recovers_the_known_offset(synthetic_case):
    """The demo's case.yaml registers ct_prior.nrrd rigidly; the known offset (R about z 2 deg, t = 6, -4, 7.5 mm)
    must come back within 0.5 mm over the head box, and the mapped prior dose must match the dose generated
    directly in the current frame (dose_course1.nrrd) up to interpolation."""
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import prepare
    case_path = synthetic_case.parent / "case.yaml"
    data = yaml.safe_load(case_path.read_text())
    assert data["courses"][0]["registration"] == {"method": "rigid"}
    assert data["courses"][0]["dose"] == "dose_course1_prior_frame.nrrd"
    prep = prepare(load_case(case_path))
    o = prep.registrations["course1"]
    truth = synthetic.prior_to_current_sitk_transform()
    assert max_corner_error(o.transform, truth) < 0.5
    from ReirradiationNPCLib.io import read_dose
    direct = read_dose(synthetic_case.parent / "dose_course1.nrrd")
    expected = resample_linear(direct, prep.grid)
    mapped = prep.courses[0].dose
    covered = prep.courses[0].coverage if prep.courses[0].coverage is not None else np.ones(mapped.shape, bool)
    inside = resample_linear(Volume(np.ones(direct.grid.shape, np.float32), direct.grid), prep.grid) > 0.999
    # the dose is cut to 0 Gy at the body surface: compare >= 6 mm inside the body, where both prior-dose grids
    # cover the voxel
    ext = sitk.ReadImage(str(synthetic_case.parent / "structures" / "External.nrrd"))
    inner = sitk.Resample(sitk.BinaryErode(ext, [4, 4, 3]), prep.grid.reference_image(), sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0)
    body = (sitk.GetArrayFromImage(inner) > 0) & covered & inside
    assert body.sum() > 100000
    # both are 3 mm samplings of one smooth analytic dose (20 % / 5 mm fall-off): median difference small
    assert np.median(np.abs(mapped[body] - expected[body])) < 0.5
    assert np.percentile(np.abs(mapped[body] - expected[body]), 99) < 5.0


# ------------------------------------------------------------------------------------------ file method

def test_file_method_reads_an_itk_transform_and_its_inverse(tmp_path):
    truth = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.02, -0.03, 0.05, (4.0, -5.0, 6.0))
    path = tmp_path / "t.tfm"
    sitk.WriteTransform(truth, str(path))
    out = reg.register_course("c1", {"method": "file", "transform": path}, None, None)
    pts = box_corners(*HEAD_BOX)
    for p in pts:
        assert np.allclose(out.transform.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p)), atol=1e-9)
    inv = reg.register_course("c1", {"method": "file", "transform": path, "invert": True}, None, None)
    for p in pts:
        assert np.allclose(inv.transform.TransformPoint(truth.TransformPoint(tuple(p))), p, atol=1e-9)
    # matrix and translation in the QA record: q = M p + b
    qa = reg.qa_dict(out)
    M, b = np.asarray(qa["matrix"]), np.asarray(qa["translation_mm"])
    p = np.array([10.0, -20.0, 30.0])
    assert np.allclose(M @ p + b, truth.TransformPoint(tuple(p)), atol=1e-9)


def test_file_method_refuses_a_corrupt_transform_file(tmp_path):
    bad = tmp_path / "bad.tfm"
    bad.write_text("not a transform\n")
    with pytest.raises(InputError, match="bad.tfm"):
        reg.register_course("c1", {"method": "file", "transform": bad}, None, None, key="courses[0].registration")


def _write_reg(path, reg_frame: str, items: list[tuple[str, np.ndarray]]):
    """A minimal rigid Spatial Registration object written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "REG"
    ds.PatientID = "TEST"
    ds.FrameOfReferenceUID = reg_frame
    seq = []
    for frame, m in items:
        mx = Dataset()
        mx.FrameOfReferenceTransformationMatrixType = "RIGID"
        mx.FrameOfReferenceTransformationMatrix = [f"{v:.10g}" for v in np.asarray(m).ravel()]
        mreg = Dataset()
        mreg.MatrixSequence = Sequence([mx])
        it = Dataset()
        it.FrameOfReferenceUID = frame
        it.MatrixRegistrationSequence = Sequence([mreg])
        seq.append(it)
    ds.RegistrationSequence = Sequence(seq)
    ds.save_as(str(path), enforce_file_format=True)


def _rigid_4x4(deg_z: float, t) -> np.ndarray:
    a = math.radians(deg_z)
    m = np.eye(4)
    m[:3, :3] = [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = t
    return m


def _with_frame(frame: str) -> Volume:
    v = Volume(np.zeros((2, 2, 2), np.int16), Grid((2, 2, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    v.meta["dicom"] = {"FrameOfReferenceUID": frame}
    return v


def test_dicom_reg_matrix_maps_registered_frame_to_reference_frame(tmp_path):
    """PS3.3 C.20.2.1.1: the matrix maps the registered (prior) frame into the REG's frame (the reference). The
    engine's transform maps reference -> prior, i.e. the inverse of that matrix."""
    ref_uid, prior_uid = "1.2.3.1", "1.2.3.2"
    M = _rigid_4x4(3.0, (5.0, -7.0, 9.0))              # prior point q -> reference point M q
    path = tmp_path / "reg.dcm"
    _write_reg(path, ref_uid, [(ref_uid, np.eye(4)), (prior_uid, M)])
    q = np.array([12.0, -30.0, 44.0])
    p = (M @ np.append(q, 1.0))[:3]                     # the same anatomical point in the reference frame
    opts = {"method": "file", "transform": path}
    # frames of reference known (DICOM images): checked
    out = reg.register_course("c1", opts, _with_frame(ref_uid), None, prior_dose=_with_frame(prior_uid))
    assert np.allclose(out.transform.TransformPoint(tuple(p)), q, atol=1e-6)
    assert any("checked" in n for n in out.notes)
    # frames unknown (NRRD inputs): the REG's own frame is the reference
    out2 = reg.register_course("c1", opts, None, None)
    assert np.allclose(out2.transform.TransformPoint(tuple(p)), q, atol=1e-6)
    assert any("not checked" in n for n in out2.notes)
    # a REG written the other way round (its frame is the prior course's): the matrix maps reference -> prior
    path_b = tmp_path / "reg_b.dcm"
    _write_reg(path_b, prior_uid, [(prior_uid, np.eye(4)), (ref_uid, np.linalg.inv(M))])
    out3 = reg.register_course("c1", {"method": "file", "transform": path_b}, _with_frame(ref_uid), None,
                               prior_dose=_with_frame(prior_uid))
    assert np.allclose(out3.transform.TransformPoint(tuple(p)), q, atol=1e-6)
    # a REG that does not name the prior course's frame is refused
    with pytest.raises(InputError, match="does not name frame of reference 9.9.9"):
        reg.register_course("c1", opts, _with_frame(ref_uid), None, prior_dose=_with_frame("9.9.9"))


def test_dicom_reg_refuses_a_non_rigid_matrix_labelled_rigid(tmp_path):
    M = _rigid_4x4(0.0, (1.0, 2.0, 3.0))
    M[0, 0] = 1.2
    path = tmp_path / "reg.dcm"
    _write_reg(path, "1.2", [("1.2", np.eye(4)), ("1.3", M)])
    with pytest.raises(InputError, match="not a rotation"):
        reg.register_course("c1", {"method": "file", "transform": path}, None, None)


# ------------------------------------------------------------------------------- pipeline: dose mapping

def _box_case(tmp_path, shift_mm=(10.0, 0.0, 0.0)):
    """A small analytic case: 2 mm evaluation grid (the current dose grid), a Brainstem box, a prior dose that is
    linear in the prior frame, a known translation (reference p -> prior p + shift) as a .tfm, prior structures in
    the prior frame, a prior CT."""
    g = Grid((40, 40, 40), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    d = tmp_path / "case"
    (d / "structures").mkdir(parents=True)
    (d / "prior_structures").mkdir()
    organ = np.zeros(g.shape, np.uint8)
    organ[10:20, 10:20, 10:20] = 1                       # x, y, z centres 20..38 mm
    write_volume(Volume(organ, g), d / "structures" / "Brainstem.nrrd")
    write_volume(Volume(np.full(g.shape, 10.0, np.float32), g), d / "dose_current.nrrd", units="Gy")
    # prior dose grid in the prior frame: x centres 0..38 mm only, full y and z
    pg = Grid((20, 40, 40), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in pg.shape), indexing="ij")
    x, y, z = 2.0 * i, 2.0 * j, 2.0 * k
    write_volume(Volume((20.0 + 0.5 * x + 0.25 * y - 0.1 * z).astype(np.float32), pg), d / "dose_prior.nrrd",
                 units="Gy")
    tx = sitk.TranslationTransform(3, shift_mm)
    sitk.WriteTransform(tx, str(d / "known.tfm"))
    # the same organ seen in the prior frame (shifted by +shift), on a prior CT grid
    s = [int(round(v / 2.0)) for v in shift_mm]
    prior_organ = np.zeros(g.shape, np.uint8)
    prior_organ[10 + s[2]:20 + s[2], 10 + s[1]:20 + s[1], 10 + s[0]:20 + s[0]] = 1
    write_volume(Volume(prior_organ, g), d / "prior_structures" / "Brainstem.nrrd")
    ct = np.full(g.shape, -1000, np.int16)
    ct[4:36, 4:36, 4:36] = 40
    write_volume(Volume(ct, g), d / "ct.nrrd")
    write_volume(Volume(np.roll(ct, s[0], axis=2), g), d / "ct_prior.nrrd")
    case = {"reference": {"image": "ct.nrrd", "structures": "structures"}, "grid": "dose",
            "protocol": "synthetic-demo",
            "courses": [{"name": "prior", "dose": "dose_prior.nrrd", "fractions": 30, "interval_months": 24,
                         "image": "ct_prior.nrrd", "structures": "prior_structures",
                         "registration": {"method": "file", "transform": "known.tfm"}},
                        {"name": "current", "dose": "dose_current.nrrd", "fractions": 10}]}
    (d / "case.yaml").write_text(yaml.safe_dump(case, sort_keys=False))
    return d / "case.yaml", g


def test_prior_dose_through_a_known_transform_equals_the_analytic_dose_and_coverage_is_warned(tmp_path):
    from ReirradiationNPCLib.analysis import compute
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import build_results, prepare
    case_path, g = _box_case(tmp_path)
    prep = prepare(load_case(case_path))
    c = prep.courses[0]
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in g.shape), indexing="ij")
    x, y, z = 2.0 * i, 2.0 * j, 2.0 * k
    qx = x + 10.0                                         # the prior-frame point of each evaluation voxel
    analytic = 20.0 + 0.5 * qx + 0.25 * y - 0.1 * z
    covered = qx <= 38.0
    # linear interpolation of a linear function is exact where the prior grid covers the point
    np.testing.assert_allclose(c.dose[covered], analytic[covered], atol=1e-4)
    assert np.all(c.dose[qx > 39.0] == 0.0)               # beyond the prior grid: 0 Gy, and flagged below
    assert c.coverage is not None
    np.testing.assert_array_equal(c.coverage[:, :, :15], True)   # x <= 28 -> q <= 38
    np.testing.assert_array_equal(c.coverage[:, :, 15:], False)  # x >= 30 -> q >= 40
    analysis = compute(prep.grid, prep.courses, prep.structures, prep.protocol)
    msgs = [w for w in analysis.warnings if "Brainstem" in w and "'prior'" in w]
    assert msgs, analysis.warnings
    # organ x centres 20..38 mm -> prior 30..48 mm; the grid ends at 38 (+1 mm half voxel): half the organ is out
    frac = float(re.search(r"([\d.]+)% of its volume", msgs[0]).group(1))
    assert abs(frac - 50.0) < 1.0
    # QA in the results tree: the transform, Dice of the prior Brainstem mapped back (exact shift: 1.0)
    res = build_results(prep, analysis).to_dict()
    r = res["registration"]["prior"]
    assert r["method"] == "file" and r["translation_mm"] == [10.0, 0.0, 0.0]
    assert r["dice"]["Brainstem"]["current"] == "Brainstem"
    assert r["dice"]["Brainstem"]["dice"] == pytest.approx(1.0)
    assert r["transform_file"] == "transform_prior.tfm"
    assert r["mattes_mi_after"] > r["mattes_mi_before"]


def test_run_writes_the_transform_and_the_registered_prior_ct(tmp_path):
    from ReirradiationNPCLib.pipeline import run_case
    case_path, g = _box_case(tmp_path)
    out = tmp_path / "out"
    run_case(case_path, out)
    tx = sitk.ReadTransform(str(out / "transform_prior.tfm"))
    assert np.allclose(tx.TransformPoint((1.0, 2.0, 3.0)), (11.0, 2.0, 3.0))
    reg_ct = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "prior_ct_prior_registered.nrrd")))
    ref_ct = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case" / "ct.nrrd")))
    # the prior CT is the reference CT shifted by +10 mm in x; mapped back it matches away from the FOV edge
    np.testing.assert_array_equal(reg_ct[:, :, :30], ref_ct[:, :, :30])


# ----------------------------------------------------------------------------------------- case files

@pytest.mark.parametrize("registration, field", [
    ({"method": "rigid", "mesh_size": 4}, "courses[0].registration.mesh_size"),
    ({"method": "rigid", "mask": "head"}, "courses[0].registration.mask"),
    ({"method": "file"}, "courses[0].registration.transform"),
    ({"method": "deformable", "mesh_size": 0}, "courses[0].registration.mesh_size"),
    ({"method": "rigid", "metric": "mutual"}, "courses[0].registration.metric"),
    ({"method": "deformable", "algorithm": "syn"}, "courses[0].registration.algorithm"),
    ({"method": "rigid", "algorithm": "demons"}, "courses[0].registration.algorithm"),
    ({"method": "deformable", "demons_iterations": [10, 10]}, "courses[0].registration.demons_iterations"),
    ({"method": "rigid", "shrink_factors": [4, 2], "smoothing_sigmas_mm": [1.0]},
     "courses[0].registration.smoothing_sigmas_mm"),
])
def test_bad_registration_options_name_the_field(tmp_path, registration, field):
    from ReirradiationNPCLib.case import parse_case
    data = {"reference": {"image": "ct.nrrd", "structures": "s"}, "protocol": "synthetic-demo",
            "courses": [{"name": "a", "dose": "a.nrrd", "fractions": 30, "interval_months": 12, "image": "p.nrrd",
                         "registration": registration},
                        {"name": "b", "dose": "b.nrrd", "fractions": 10}]}
    with pytest.raises(InputError) as exc:
        parse_case(data, tmp_path / "case.yaml")
    assert field in str(exc.value)


def test_rigid_without_the_prior_ct_is_a_clear_error(tmp_path):
    ref = Volume(np.zeros((4, 4, 4), np.int16), Grid((4, 4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    with pytest.raises(InputError, match=r"courses\[0\]\.image"):
        reg.register_course("a", {"method": "rigid"}, ref, None, key="courses[0].registration")


# ------------------------------------------------------------------------------- deformable QA machinery

def _mask_image(grid: Grid) -> sitk.Image:
    m = sitk.GetImageFromArray(np.ones(grid.shape, np.uint8))
    return grid.apply_to(m)


def test_jacobian_check_of_known_transforms():
    g = Grid((20, 20, 20), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    mask = _mask_image(g)
    scale = sitk.AffineTransform(3)
    scale.SetMatrix((1.1, 0, 0, 0, 1.1, 0, 0, 0, 1.1))
    jac = reg.jacobian_check(scale, mask)
    assert jac["min"] == pytest.approx(1.331, abs=1e-6) and jac["max"] == pytest.approx(1.331, abs=1e-6)
    assert jac["folded_voxels"] == 0 and jac["voxels_checked"] == 20 ** 3
    # a B-spline whose one control point is pulled 150 mm along x across a 12.7 mm mesh: it folds
    img = _mask_image(g)
    b = sitk.BSplineTransformInitializer(img, [3, 3, 3], 3)
    params = np.zeros(len(b.GetParameters()))
    n = len(params) // 3
    params[2 + 6 * 2 + 36 * 2] = 150.0                   # x-coefficient of control point (2, 2, 2), inside
    b.SetParameters(tuple(params))
    jac = reg.jacobian_check(reg.compose(sitk.Euler3DTransform(), b), mask)
    assert jac["min"] <= 0 and jac["folded_voxels"] > 0
    assert reg.bspline_max_displacement_mm(b) == pytest.approx(150.0)


def test_compose_applies_the_bspline_first():
    g = Grid((10, 10, 10), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    b = sitk.BSplineTransformInitializer(_mask_image(g), [2, 2, 2], 3)
    params = np.zeros(len(b.GetParameters()))
    params[: len(params) // 3] = 1.5                     # every control point displaces x by 1.5 mm
    b.SetParameters(tuple(params))
    rot = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, math.radians(90.0), (0.0, 0.0, 0.0))
    c = reg.compose(rot, b)
    p = (5.0, 6.0, 7.0)
    # b(p) = (6.5, 6, 7); rotation by 90 deg about z: (x, y) -> (-y, x)
    assert np.allclose(c.TransformPoint(p), (-6.0, 6.5, 7.0), atol=1e-9)


# ------------------------------------------------------------------------------- deformable: known deformation

DEFORM_GRID = Grid((80, 80, 84), (-118.5, -118.5, -150.0), (3.0, 3.0, 3.0))


def _known_u(x, y, z, amplitude=4.0):
    """Smooth known displacement (mm): reference point p maps to p + u(p) in the prior frame (|u| up to ~4.9 mm)."""
    ux = amplitude * np.sin(2 * np.pi * (z + 20) / 180.0) * np.cos(2 * np.pi * y / 240.0)
    uy = 0.8 * amplitude * np.cos(2 * np.pi * x / 200.0) * np.sin(2 * np.pi * (z - 30) / 200.0)
    uz = 0.7 * amplitude * np.sin(2 * np.pi * (x + y) / 220.0)
    return ux, uy, uz


def _inverse_of_known(q):
    """T^-1(q) for T(p) = p + u(p), by fixed-point iteration x = q - u(x) (|grad u| << 1: converges)."""
    x = q.copy()
    for _ in range(30):
        x = q - np.stack(_known_u(x[:, 0], x[:, 1], x[:, 2]), axis=1)
    return x


def _texture_hu(p):
    """Soft-tissue texture (HU, +-~60) as a function of anatomical position (mm), so it deforms with the anatomy
    like real CT texture (fat, muscle, vessels). Without it the phantom's large uniform regions (the neck is a
    featureless cylinder) make the deformation unobservable there: demons then reached only 2.6 mm mean error."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    v = (np.sin(2 * np.pi * x / 23 + 0.3) * np.cos(2 * np.pi * y / 19 + 1.1) * np.sin(2 * np.pi * z / 27 + 0.5)
         + 0.6 * np.sin(2 * np.pi * (x + 0.5 * y) / 31 + 2.0) * np.cos(2 * np.pi * (z - 0.3 * x) / 17))
    return 40.0 * v


@pytest.fixture(scope="module")
def deformed_pair_result():
    g = DEFORM_GRID
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in g.shape), indexing="ij")
    pts = g.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    ct_ref = synthetic.phantom_ct(g)
    ct_ref += _texture_hu(pts).reshape(g.shape) * (ct_ref > -400)
    # the prior voxel at q shows the anatomy at T^-1(q), so prior(T(p)) = ref(p)
    anat = _inverse_of_known(pts)
    ct_prior = synthetic.phantom_ct(g, transform=_inverse_of_known, seed=99)
    ct_prior += _texture_hu(anat).reshape(g.shape) * (ct_prior > -400)
    ref, prior = Volume(ct_ref.astype(np.int16), g), Volume(ct_prior.astype(np.int16), g)
    truth = np.stack(_known_u(pts[:, 0], pts[:, 1], pts[:, 2]), axis=1)
    body = (sitk.GetArrayFromImage(reg.body_mask(reg._float_image(ref), -400.0, 0.0)) > 0).ravel()
    t0 = time.perf_counter()
    out = reg.register_course("c1", {"method": "deformable"}, ref, prior)
    wall = time.perf_counter() - t0
    ref_img = g.reference_image()
    disp = sitk.TransformToDisplacementField(out.transform, sitk.sitkVectorFloat64, ref_img.GetSize(),
                                             ref_img.GetOrigin(), ref_img.GetSpacing(), ref_img.GetDirection())
    found = sitk.GetArrayFromImage(disp).reshape(-1, 3)
    err = np.linalg.norm(found[body] - truth[body], axis=1)
    identity_err = np.linalg.norm(truth[body], axis=1)
    return out, wall, err, identity_err


def test_deformable_recovers_a_known_smooth_deformation_without_folding(deformed_pair_result):
    """Known forward field u (reference p -> prior p + u(p), up to 4.9 mm, 3.1 mm mean in the body) on a 3 mm
    phantom: the recovered displacement T(p) - p is compared with u(p) at every body voxel. A field of the wrong
    direction would give about twice the identity's error. Measured: 0.70 mm mean, 2.0 mm 95th percentile,
    Jacobian 0.84-1.25, 11 s."""
    out, wall, err, identity_err = deformed_pair_result
    assert identity_err.mean() > 2.5                          # the deformation is not trivial
    assert out.parameters["algorithm"] == "demons"
    assert err.mean() < 1.5, (err.mean(), identity_err.mean())
    assert out.jacobian["folded_voxels"] == 0 and out.jacobian["min"] > 0
    print(f'deformable registration wall time {wall:.1f} s')  # speed: benchmarks, not tests
    assert not any("experimental" in n for n in out.notes)
    qa = reg.qa_dict(out)
    assert qa["jacobian_determinant"]["folded_voxels"] == 0 and qa["jacobian_determinant"]["voxels_checked"] > 1e5


def test_deformable_qa_reports_the_mutual_information_after_the_demons(deformed_pair_result):
    """The Mattes MI after a demons registration is evaluated (ITK's metric refused the displacement field as the
    optimised transform, and the QA said None), and it is higher than before: the phantom's deformation is
    recovered to 0.7 mm of 3.1 mm, so the registered prior CT matches the reference better than the unregistered."""
    out = deformed_pair_result[0]
    assert out.metric_before is not None and out.metric_after is not None
    assert out.metric_after > out.metric_before + 0.05, (out.metric_before, out.metric_after)
    assert reg.qa_dict(out)["mattes_mi_after"] == out.metric_after


# ------------------------------------------------------------------------------- overheads (issue 15)

def _body_mask_whole_image(image, threshold_hu, dilate_mm=5.0):
    """The body mask computed on the whole image (the definition that body_mask computes on the body's box)."""
    b = sitk.BinaryThreshold(image, float(threshold_hu), 1e9, 1, 0)
    largest = sitk.BinaryFillhole(sitk.RelabelComponent(sitk.ConnectedComponent(b), sortByObjectSize=True) == 1)
    if dilate_mm > 0:
        largest = sitk.BinaryDilate(largest, [max(1, int(round(dilate_mm / s))) for s in image.GetSpacing()])
    return sitk.GetArrayFromImage(largest).astype(np.uint8)


def test_body_mask_with_no_dilation_is_the_filled_body_itself():
    """dilate_mm=0 means no dilation: on a hand-made phantom (1 mm voxels; a 'head' block of 0 HU, voxels k 2-7,
    j 3-10, i 4-12, with an enclosed 2 x 2 x 2 air cavity; a separate one-voxel 100 HU speck) the mask is exactly the
    block with its cavity filled; the speck is dropped (it was dilated by one voxel: 872 voxels instead of 432).
    1 mm: one voxel of ITK's ball (the 3 x 3 x 3 cube without its 8 corners): the 6 x 8 x 9 block gains its six
    faces, 2 x (8 x 9 + 6 x 9 + 6 x 8) = 348 voxels, and its twelve edges, 4 x (6 + 8 + 9) = 92, not its corners:
    872. Anisotropic 1 x 1 x 3 mm voxels: 0 mm is still the block; 1 mm still one voxel along k (at least one)."""
    arr = np.full((10, 14, 16), -1000, np.int16)          # (k, j, i)
    arr[2:8, 3:11, 4:13] = 0
    arr[4:6, 5:7, 6:8] = -1000                              # enclosed cavity
    arr[9, 0, 0] = 100                                      # a one-voxel speck: not the body
    expected = np.zeros(arr.shape, np.uint8)
    expected[2:8, 3:11, 4:13] = 1
    assert int(expected.sum()) == 6 * 8 * 9 == 432
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    m0 = sitk.GetArrayFromImage(reg.body_mask(img, -400.0, 0.0))
    np.testing.assert_array_equal(m0, expected)
    m1 = sitk.GetArrayFromImage(reg.body_mask(img, -400.0, 1.0))
    assert int(m1.sum()) == 432 + 2 * (8 * 9 + 6 * 9 + 6 * 8) + 4 * (6 + 8 + 9) == 872
    assert m1[expected == 1].all() and m1[1, 3:11, 4:13].all() and m1[1, 2, 4:13].all() and not m1[1, 2, 3]
    img.SetSpacing((1.0, 1.0, 3.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reg.body_mask(img, -400.0, 0.0)), expected)
    m1 = sitk.GetArrayFromImage(reg.body_mask(img, -400.0, 1.0))
    assert int(m1.sum()) == 872 and m1[1, 3:11, 4:13].all() and m1[8, 3:11, 4:13].all()
    with pytest.raises(ValueError):
        reg.body_mask(img, -400.0, -1.0)


def test_body_mask_fills_enclosed_air_only_and_matches_the_whole_image_definition():
    """A 'head' block (0 HU, voxels k 4-11, j 4-15, i 5-14 of 1 mm) with an enclosed 2 x 2 x 2 air cavity, an air
    channel of 4 x 4 voxels open through the block's face to the last slice of the image (the block touches it), and
    a separate smaller block. Without dilation the cavity is filled; the channel is not; the small block is dropped;
    nothing lies outside the block. With 0, 2 and 5 mm of dilation the mask equals the whole-image computation voxel
    for voxel (body touching the image's border, dilation reaching it)."""
    arr = np.full((12, 20, 20), -1000, np.int16)          # (k, j, i)
    arr[4:12, 4:16, 5:15] = 0                               # head block touching the last slice (k = 11)
    arr[6:8, 6:8, 7:9] = -1000                              # enclosed cavity: filled
    arr[9:12, 10:14, 8:12] = -1000                          # channel open through the image's border: not filled
    arr[0:2, 0:2, 0:2] = 100                                # a smaller component: dropped
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetOrigin((-3.0, 5.0, 7.5))
    m0 = sitk.GetArrayFromImage(reg.body_mask(img, -400.0, 0.0))
    assert m0.dtype == np.uint8
    assert m0[4:12, 4:16, 5:15][arr[4:12, 4:16, 5:15] == 0].all()
    assert m0[6:8, 6:8, 7:9].all() and not m0[10:12, 11:13, 9:11].any() and not m0[0:2, 0:2, 0:2].any()
    assert not m0[:2].any() and not m0[:, :2].any() and not m0[:, :, :3].any() and not m0[:, 18:].any()
    for dilate in (0.0, 2.0, 5.0):
        m = reg.body_mask(img, -400.0, dilate)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(m), _body_mask_whole_image(img, -400.0, dilate))
        assert m.GetOrigin() == img.GetOrigin() and m.GetSpacing() == img.GetSpacing()
        assert m.GetPixelID() == sitk.sitkUInt8


def test_body_mask_of_the_phantom_matches_the_whole_image_definition():
    ref = Volume(synthetic.phantom_ct(synthetic.CT_GRID).astype(np.int16), synthetic.CT_GRID)
    img = reg.working_image(reg._float_image(ref), 2.5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reg.body_mask(img, -400.0)),
                                  _body_mask_whole_image(img, -400.0))


def test_registered_image_rounds_half_way_values_to_even_and_fills_outside_with_air():
    """A prior CT row 0, 3, 32767, -32768, -1 HU (1 mm voxels) moved by half a voxel along x: linear interpolation
    gives 1.5, 16385, -0.5, -16384.5 HU, rounded half to even: 2, 16385, 0, -16384; the last target voxel maps beyond
    the prior CT: -1000 HU (air)."""
    g = Grid((5, 1, 1), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    prior = Volume(np.array([[[0, 3, 32767, -32768, -1]]], np.int16), g)
    tx = sitk.TranslationTransform(3, (0.5, 0.0, 0.0))
    out = reg.RegistrationOutcome("c1", "file", tx, linear=tx)
    out.moving_image = prior
    v = reg.registered_image(out, g)
    assert v.array.dtype == np.int16 and v.grid == g
    np.testing.assert_array_equal(v.array[0, 0], [2, 16385, 0, -16384, -1000])


def test_mutual_information_qa_on_the_mask_box_equals_the_whole_image_evaluation():
    """mattes_mi evaluates the metric on the mask's box only; ITK's evaluation on the whole image (every voxel inside
    the mask) gives the same value to 1e-12."""
    truth = synthetic.prior_to_current_sitk_transform()
    ref, prior = phantom_pair(Grid((60, 64, 40), (-90.0, -94.0, -40.0), (3.0, 3.0, 3.0)), truth)
    f, m = reg._float_image(ref), reg._float_image(prior)
    body = reg.body_mask(f, -400.0)
    for tx in (sitk.Euler3DTransform(), truth):
        R = sitk.ImageRegistrationMethod()
        R.SetMetricAsMattesMutualInformation(50)
        R.SetMetricFixedMask(body)
        R.SetInterpolator(sitk.sitkLinear)
        R.SetInitialTransform(tx)
        whole = -R.MetricEvaluate(f, m)
        assert reg.mattes_mi(f, m, tx, body) == pytest.approx(whole, rel=1e-12, abs=0)
