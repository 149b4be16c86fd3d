"""``reirradiation-npc metrics``: analytic values through the command line, file formats and input rules.

Dose: D = 20 + 1.2 x (Gy, x in mm) on a 2.5 mm grid (NRRD). Structures (NRRD masks, finer than the dose and
covering only a small part of it): a 0.4 cc sphere on a 0.5 mm grid and a 12 x 5 x 4 mm box on a 1 mm grid.
Reference values by hand: see test_dvh_subvoxel.py for the cap formulas; for the box D(v) = 20 + 1.2 (x1 - v/A).
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from ReirradiationNPCLib.cli import main

A, G = 20.0, 1.2                 # Gy, Gy/mm along x
R04 = (0.4 * 1000 * 3 / (4 * math.pi)) ** (1 / 3)
SPHERE_C = (0.7, -0.4, 0.9)
BOX = (-6.0, 6.0, -2.0, 3.0, -3.0, 1.0)   # x0, x1, y0, y1, z0, z1 (mm)
DEFAULT_KEYS = ["Dmax", "Dmin", "Dmean", "D0.03cc", "D2cc", "D95%", "D5%"]


def _write(path, arr, origin, spacing, units=None):
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    if units:
        img.SetMetaData("units", units)
    sitk.WriteImage(img, str(path), True)
    return path


def _axes(size, origin, h):
    k, j, i = np.indices((size[2], size[1], size[0]), dtype=np.float64)
    return origin[0] + h * i, origin[1] + h * j, origin[2] + h * k


def cap_height(v_mm3, R):
    lo, hi = 0.0, 2 * R
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if math.pi * mid * mid * (3 * R - mid) / 3 < v_mm3:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    size, origin = (16, 20, 20), (-15.0, -25.0, -25.0)   # D >= 2 Gy everywhere
    x, _, _ = _axes(size, origin, 2.5)
    _write(d / "dose.nrrd", (A + G * x).astype(np.float32), origin, (2.5,) * 3, "Gy")
    s = d / "structures"
    s.mkdir()
    h = 0.5
    n = int(math.ceil(R04 / h)) + 3
    so = tuple(math.floor(c / h) * h - n * h for c in SPHERE_C)
    x, y, z = _axes((2 * n + 1,) * 3, so, h)
    m = (x - SPHERE_C[0]) ** 2 + (y - SPHERE_C[1]) ** 2 + (z - SPHERE_C[2]) ** 2 <= R04 ** 2
    _write(s / "Sphere04.nrrd", m.astype(np.uint8), so, (h,) * 3)
    x0, x1, y0, y1, z0, z1 = BOX
    bo = (x0 - 1.5, y0 - 1.5, z0 - 1.5)
    bsize = (int(x1 - x0) + 4, int(y1 - y0) + 4, int(z1 - z0) + 4)
    x, y, z = _axes(bsize, bo, 1.0)
    m = (x > x0) & (x < x1) & (y > y0) & (y < y1) & (z > z0) & (z < z1)
    _write(s / "Box.nrrd", m.astype(np.uint8), bo, (1.0,) * 3)
    return d


def run(*args):
    return CliRunner().invoke(main, ["metrics", *[str(a) for a in args]])


def load(path):
    data = json.loads(path.read_text())
    return {s["name"]: s for s in data["structures"]}, data


def test_json_default_set_analytic(files, tmp_path):
    out = tmp_path / "m.json"
    r = run("--dose", files / "dose.nrrd", "--structures", files / "structures", "--output", out)
    assert r.exit_code == 0, r.output
    by, data = load(out)
    assert set(by) == {"Sphere04", "Box"}
    for s in by.values():
        assert list(s["metrics"]) == DEFAULT_KEYS
        assert set(s) >= {"name", "volume_cc", "metrics"}
    sp = by["Sphere04"]
    v = 4 / 3 * math.pi * R04 ** 3
    xc = SPHERE_C[0]
    assert sp["volume_cc"] == pytest.approx(0.4, rel=0.01)
    m = sp["metrics"]
    assert m["Dmean"] == pytest.approx(A + G * xc, rel=0.01)
    assert m["D95%"] == pytest.approx(A + G * (xc + R04 - cap_height(0.95 * v, R04)), rel=0.01)
    assert m["D5%"] == pytest.approx(A + G * (xc + R04 - cap_height(0.05 * v, R04)), rel=0.01)
    assert m["D0.03cc"] == pytest.approx(A + G * (xc + R04 - cap_height(30.0, R04)), rel=0.02)
    assert m["D2cc"] is None                        # larger than the organ: undefined, not a number
    assert m["Dmax"] == pytest.approx(A + G * (xc + R04), abs=G * 0.5)
    x0, x1, y0, y1, z0, z1 = BOX
    area = (y1 - y0) * (z1 - z0)
    b = by["Box"]
    assert b["volume_cc"] == pytest.approx(area * (x1 - x0) / 1000.0, rel=1e-9)
    assert b["metrics"]["Dmean"] == pytest.approx(A + G * (x0 + x1) / 2, rel=1e-6)
    assert b["metrics"]["D0.03cc"] == pytest.approx(A + G * (x1 - 30.0 / area), rel=0.002)
    assert b["metrics"]["D95%"] == pytest.approx(A + G * (x1 - 0.95 * (x1 - x0)), rel=0.002)
    assert b["sampling"]["samples"] > 1000 and data["quantity"] == "physical dose"


def test_extra_metrics_and_csv(files, tmp_path):
    out = tmp_path / "m.csv"
    r = run("--dose", files / "dose.nrrd", "--structures", files / "structures", "--metric", "D0.1cc",
            "--metric", "V25Gy", "--metric", "V25Gy%", "--output", out)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert [row["name"] for row in rows] == ["Box", "Sphere04"]      # one row per structure
    assert list(rows[0]) == ["name", "volume_cc"] + DEFAULT_KEYS + ["D0.1cc", "V25Gy", "V25Gy%"]
    box = rows[0]
    x0, x1, y0, y1, z0, z1 = BOX
    area = (y1 - y0) * (z1 - z0)
    v25 = area * (x1 - (25.0 - A) / G) / 1000.0                   # cc at >= 25 Gy
    assert float(box["V25Gy"]) == pytest.approx(v25, rel=0.005)
    assert float(box["V25Gy%"]) == pytest.approx(100 * v25 / (area * (x1 - x0) / 1000), rel=0.005)
    assert float(box["D0.1cc"]) == pytest.approx(A + G * (x1 - 100.0 / area), rel=0.002)
    assert rows[1]["D2cc"] == ""                                   # undefined -> empty cell


def test_eqd2_conversion(files, tmp_path):
    phys, eq = tmp_path / "p.json", tmp_path / "e.json"
    assert run("--dose", files / "dose.nrrd", "--structures", files / "structures", "-o", phys).exit_code == 0
    r = run("--dose", files / "dose.nrrd", "--structures", files / "structures", "--fractions", 5,
            "--alpha-beta", 3, "-o", eq)
    assert r.exit_code == 0, r.output
    p, _ = load(phys)
    e, data = load(eq)
    assert data["quantity"] == "EQD2" and data["fractions"] == 5 and data["alpha_beta_gy"] == 3

    def hand(D):
        return D * (D / 5 + 3) / 5
    for name in ("Box", "Sphere04"):
        for key in ("Dmax", "Dmin", "D0.03cc", "D95%"):
            assert e[name]["metrics"][key] == pytest.approx(hand(p[name]["metrics"][key]), rel=1e-4), (name, key)
        # Dmean of EQD2 is not EQD2 of Dmean: box in D = a + g x has mean D^2 = Dmean^2 + g^2 L^2 / 12
    x0, x1 = BOX[0], BOX[1]
    dm = A + G * (x0 + x1) / 2
    md2 = dm ** 2 + G ** 2 * (x1 - x0) ** 2 / 12
    assert e["Box"]["metrics"]["Dmean"] == pytest.approx((md2 / 5 + 3 * dm) / 5, rel=1e-4)


def test_refuses_to_overwrite(files, tmp_path):
    out = tmp_path / "m.json"
    out.write_text("keep me")
    r = run("--dose", files / "dose.nrrd", "--structures", files / "structures", "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    assert out.read_text() == "keep me"
    r = run("--dose", files / "dose.nrrd", "--structures", files / "structures", "-o", out, "--overwrite")
    assert r.exit_code == 0 and "structures" in json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]      # no temporary file left behind


@pytest.mark.parametrize("args,field", [
    (["--fractions", "5"], "--alpha-beta"),
    (["--alpha-beta", "3"], "--fractions"),
    (["--fractions", "0", "--alpha-beta", "3"], "--fractions"),
    (["--fractions", "5", "--alpha-beta", "-1"], "--alpha-beta"),
    (["--metric", "D5Gy"], "--metric"),
    (["-o", "out.txt"], "--output"),
])
def test_bad_input_exit_2(files, tmp_path, args, field):
    args = [a if a != "out.txt" else str(tmp_path / a) for a in args]
    r = run("--dose", files / "dose.nrrd", "--structures", files / "structures", *args)
    assert r.exit_code == 2, r.output
    assert field in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_single_mask_file_and_table(files):
    r = run("--dose", files / "dose.nrrd", "--structures", files / "structures" / "Box.nrrd")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].split()[:2] == ["structure", "volume"] and lines[2].startswith("Box")


def test_structure_beyond_dose_grid_is_reported(tmp_path):
    size, origin = (8, 8, 8), (0.0, 0.0, 0.0)
    _write(tmp_path / "dose.nrrd", np.full((8, 8, 8), 10.0, np.float32), origin, (2.5,) * 3)
    (tmp_path / "s").mkdir()
    m = np.zeros((10, 10, 40), np.uint8)
    m[2:8, 2:8, 2:38] = 1                       # x from 0 to 36 mm (1 mm voxels); dose grid ends at 18.75 mm
    _write(tmp_path / "s" / "Long.nrrd", m, (-1.5, 0.5, 0.5), (1.0,) * 3)
    out = tmp_path / "m.json"
    r = run("--dose", tmp_path / "dose.nrrd", "--structures", tmp_path / "s", "-o", out)
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())["structures"][0]
    inside = (18.75 - 0.0) / 36.0                # x in [0, 18.75] of [0, 36] mm
    assert s["outside_dose_grid_fraction"] == pytest.approx(1 - inside, abs=0.02)
    assert s["metrics"]["Dmean"] == pytest.approx(10.0 * inside, rel=0.03)
    assert "outside the dose grid" in r.output


def _rtstruct(path, rois):
    """A minimal RTSTRUCT: ``rois`` = {name: [(x, y) polygon (mm), [z planes (mm)]]}."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.PatientID = "METRICS-TEST"
    frame = generate_uid()
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref])
    ssroi, roic = [], []
    for num, (name, (poly, zs)) in enumerate(rois.items(), start=1):
        r = Dataset()
        r.ROINumber = num
        r.ROIName = name
        r.ReferencedFrameOfReferenceUID = frame
        ssroi.append(r)
        c = Dataset()
        c.ReferencedROINumber = num
        conts = []
        for z in zs:
            ct = Dataset()
            ct.ContourGeometricType = "CLOSED_PLANAR"
            pts = [v for x, y in poly for v in (x, y, z)]
            ct.NumberOfContourPoints = len(poly)
            ct.ContourData = [f"{v:.4f}" for v in pts]
            conts.append(ct)
        c.ContourSequence = Sequence(conts)
        roic.append(c)
    ds.StructureSetROISequence = Sequence(ssroi)
    ds.ROIContourSequence = Sequence(roic)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_rtstruct_input(files, tmp_path):
    """Contours on 2.5 mm planes offset from the dose planes: a 10 x 6 mm rectangle on 3 planes (each plane a
    2.5 mm slab: 0.45 cc) and a small circle (r = 3 mm, 64-gon, 2 planes) in D = 20 + 1.2 x; all contours share
    the planes, as ROIs drawn on one CT do."""
    th = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    circle = [(3.0 * math.cos(t) + 0.37, 3.0 * math.sin(t) - 0.21) for t in th]
    rect = [(-5.2, -2.9), (4.8, -2.9), (4.8, 3.1), (-5.2, 3.1)]
    path = _rtstruct(tmp_path / "rs.dcm", {"Rect": (rect, [-2.2, 0.3, 2.8]), "Circle": (circle, [0.3, 2.8])})
    out = tmp_path / "m.json"
    r = run("--dose", files / "dose.nrrd", "--structures", path, "-o", out)
    assert r.exit_code == 0, r.output
    by, _ = load(out)
    assert by["Rect"]["volume_cc"] == pytest.approx(10 * 6 * 2.5 * 3 / 1000, rel=0.01)
    assert by["Rect"]["metrics"]["Dmean"] == pytest.approx(A + G * (-0.2), rel=0.005)
    assert by["Rect"]["metrics"]["D0.03cc"] == pytest.approx(A + G * (4.8 - 30.0 / (6 * 7.5)), rel=0.01)
    area = 0.5 * 64 * 9.0 * math.sin(2 * math.pi / 64)      # the 64-gon's area (mm^2)
    assert by["Circle"]["volume_cc"] == pytest.approx(area * 5.0 / 1000, rel=0.02)
    assert by["Circle"]["metrics"]["Dmean"] == pytest.approx(A + G * 0.37, rel=0.01)


def test_slicer_segmentation_input(files, tmp_path):
    """A .seg.nrrd with two overlapping segments on a 0.5 mm grid: volumes by hand, Dmean of a box."""
    from ReirradiationNPCLib.geometry import Grid
    from ReirradiationNPCLib.io import write_segmentation
    g = Grid((40, 30, 20), (-10.25, -7.25, -5.25), (0.5, 0.5, 0.5))
    a = np.zeros(g.shape, bool)
    a[2:18, 4:24, 6:30] = True                   # x: -7.25+... 24 voxels = 12 mm, y 10 mm, z 8 mm -> 0.96 cc
    b = np.zeros(g.shape, bool)
    b[2:18, 4:24, 20:38] = True                  # overlaps a; 9 x 10 x 8 mm = 0.72 cc
    write_segmentation([("A", a, (1, 0, 0)), ("B", b, (0, 1, 0))], g, tmp_path / "s.seg.nrrd")
    out = tmp_path / "m.json"
    r = run("--dose", files / "dose.nrrd", "--structures", tmp_path / "s.seg.nrrd", "-o", out)
    assert r.exit_code == 0, r.output
    by, _ = load(out)
    assert by["A"]["volume_cc"] == pytest.approx(0.96) and by["B"]["volume_cc"] == pytest.approx(0.72)
    xa = -10.25 + 0.5 * (6 + 29) / 2              # centre of voxels i 6..29 (mm)
    assert by["A"]["metrics"]["Dmean"] == pytest.approx(A + G * xa, rel=1e-5)
