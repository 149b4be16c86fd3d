"""Issue 17: the exported DICOM maps read back by an independent contour-based DVH (Testing/contour_dvh.py: the
RTSTRUCT's contours, a 0.25 mm lattice, even-odd rule, trilinear dose; no engine code) reproduce results.json.

The synthetic DICOM case (prior dose pre-registered, so the run is quick) is run once for the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

import contour_dvh as cd


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    from ReirradiationNPCLib.pipeline import run_case
    from ReirradiationNPCLib.synthetic_dicom import generate_dicom
    root = tmp_path_factory.mktemp("checkmaps")
    case = generate_dicom(root / "case").parent
    out = root / "out"
    run_case(case / "case_identity.yaml", out)
    results = json.loads((out / "results.json").read_text())
    contours = cd.read_contours(case / "rtstruct_current.dcm")
    return {"case": case, "out": out, "results": results, "contours": contours,
            "slice_mm": cd.ct_slice_spacing(case / "ct_current")}


def _dvh(run, name, dose_file, body=False):
    g = cd.read_dose(run["out"] / dose_file)
    return cd.structure_dvh(run["contours"][name], run["slice_mm"], g,
                            max_points_per_plane=20_000 if body else 400_000)


def test_every_structure_reads_back_on_its_check_map(dicom_run):
    """Dmean and D0.03cc within 3 % (5 % under 1 cc) of results.json on the file check_on_file names; the
    contour volume within 2 % of the table's. (Measured on the demo: <= 0.25 %.)"""
    res = dicom_run["results"]
    assert len(res["structures"]) >= 10
    for s in res["structures"]:
        chk = s["check_on_file"]
        assert chk["nrrd"].startswith("cumulative_eqd2_ab") and chk["dicom"] == chk["nrrd"][:-5] + ".dcm"
        assert chk["alpha_beta"] == s["alpha_beta"]
        assert chk["recovery_credit"] == {k: v for k, v in s["recovery_credit"].items() if v > 0}
        assert (dicom_run["out"] / chk["dicom"]).is_file() and (dicom_run["out"] / chk["nrrd"]).is_file()
        dvh = _dvh(dicom_run, s["name"], chk["dicom"], body=s["role"] == "body")
        tol = 0.05 if s["volume_cc"] < 1.0 else 0.03
        m = s["metrics"]["cumulative"]
        assert dvh.volume_cc == pytest.approx(s["volume_cc"], rel=0.02), s["name"]
        assert dvh.mean == pytest.approx(m["Dmean"], rel=tol), s["name"]
        if m["D0.03cc"] is not None:
            assert dvh.d_cc(0.03) == pytest.approx(m["D0.03cc"], rel=tol), s["name"]


def test_credited_organ_has_an_undiscounted_map_too(dicom_run):
    """The demo's spinal cord (50 % credit on course 1 after 14 months): its table values on the credited map,
    the undiscounted map beside it; the credited map is lower everywhere the prior course gave dose."""
    s = next(s for s in dicom_run["results"]["structures"] if s["name"] == "SpinalCord")
    chk = s["check_on_file"]
    assert chk["recovery_credit"] == {"course1": 0.5}
    assert chk["nrrd"] == "cumulative_eqd2_ab2_credit50.nrrd"
    assert chk["undiscounted"] == {"nrrd": "cumulative_eqd2_ab2.nrrd", "dicom": "cumulative_eqd2_ab2.dcm"}
    cred = _dvh(dicom_run, "SpinalCord", chk["dicom"])
    plain = _dvh(dicom_run, "SpinalCord", chk["undiscounted"]["dicom"])
    assert plain.mean > cred.mean + 0.5


def test_display_map_differs_at_organ_edges(dicom_run):
    """The single display map takes, per dose voxel, the largest value of the organs covering it; a contour-based
    DVH on it mixes the neighbours' values at organ edges. The demo's credited cord reads far higher on it than
    the table (uncredited neighbours and the default alpha/beta around it): the reason for the check maps."""
    s = next(s for s in dicom_run["results"]["structures"] if s["name"] == "SpinalCord")
    disp = _dvh(dicom_run, "SpinalCord", "cumulative_eqd2.dcm")
    assert disp.d_cc(0.03) > 1.2 * s["metrics"]["cumulative"]["D0.03cc"]
    maps = dicom_run["results"]["maps"]
    assert maps["display"]["dicom"] == "cumulative_eqd2.dcm" and "largest" in maps["display"]["rule"]
    assert dicom_run["results"]["assumptions"]["alpha_beta"]["map_rule"] == maps["display"]["rule"]


def test_margins_rtstruct_volumes(dicom_run):
    """GTV, CTV and PTV of margins_rtstruct.dcm read back by the same reader: within 2 % of our masks."""
    res = dicom_run["results"]
    mc = cd.read_contours(dicom_run["out"] / "margins_rtstruct.dcm")
    vols = res["margins"]["volumes_cc"]
    assert len(mc) == 3
    g = cd.read_dose(dicom_run["out"] / "cumulative_eqd2.dcm")
    for name, planes in mc.items():
        key = name.split()[0]
        dvh = cd.structure_dvh(planes, dicom_run["slice_mm"], g)
        assert dvh.volume_cc == pytest.approx(vols[key], rel=0.02), name


def test_check_map_dicom_attributes_say_what_to_read(dicom_run):
    out, res = dicom_run["out"], dicom_run["results"]
    stems = [m["dicom"] for m in res["maps"]["check"]]
    assert stems == ["cumulative_eqd2_ab2.dcm", "cumulative_eqd2_ab2_credit50.dcm", "cumulative_eqd2_ab3.dcm",
                     "cumulative_eqd2_ab10.dcm"]
    series = set()
    for m in res["maps"]["check"]:
        ds = pydicom.dcmread(str(out / m["dicom"]), stop_before_pixels=True)
        ab = f"{m['alpha_beta']:g}"
        assert ds.SeriesDescription.startswith(f"EQD2 CHECK a/b {ab} Gy")
        assert ("credited" if m["credited"] else "undiscounted") in ds.SeriesDescription
        assert ds.DoseType == "EFFECTIVE" and ds.DoseUnits == "GY"
        assert f"a/b {ab}" in ds.DoseComment
        for name in m["structures"]:
            assert name in ds.ImageComments
        series.add(ds.SeriesInstanceUID)
    assert len(series) == len(stems)
    disp = pydicom.dcmread(str(out / "cumulative_eqd2.dcm"), stop_before_pixels=True)
    assert "DISPLAY" in disp.SeriesDescription and "VIEW ONLY" in disp.DoseComment
    assert "check_on_file" in disp.ImageComments


def test_reader_is_exact_on_a_known_box(tmp_path):
    """The reader itself: a 20 x 10 mm rectangle with a 4 x 4 mm hole, on 3 planes of 2 mm, in a dose linear in x:
    volume (200 - 16) mm^2 * 6 mm = 1.104 cc; mean dose = dose at the centroid of the holed rectangle."""
    rect = np.array([[0, 0, 0], [20, 0, 0], [20, 10, 0], [0, 10, 0]], float)
    hole = np.array([[2, 3, 0], [6, 3, 0], [6, 7, 0], [2, 7, 0]], float)
    planes = {}
    for z in (0.0, 2.0, 4.0):
        planes[z] = [rect + [0, 0, z], hole + [0, 0, z]]
    nx, ny, nz = 30, 20, 10
    x = -2.0 + np.arange(nx)
    arr = np.broadcast_to(10.0 + 0.5 * x, (nz, ny, nx)).copy()
    g = cd.DoseGrid(arr, np.array([-2.0, -5.0, -4.0]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]),
                    np.array([0, 0, 1.0]), (1.0, 1.0), np.arange(nz) * 1.0)
    dvh = cd.structure_dvh(planes, 2.0, g)
    assert dvh.volume_cc == pytest.approx(1.104, rel=1e-9)
    xc = (200 * 10 - 16 * 4) / 184          # centroid x of the holed rectangle
    assert dvh.mean == pytest.approx(10.0 + 0.5 * xc, abs=1e-9)
    # hottest 30 mm^3 over a 10 x 6 mm^2 cross-section: x from 19.5 to 20 mm -> 10 + 0.5 * 19.5 = 19.75 Gy, read on
    # the 0.25 mm lattice to within half a step (0.0625 Gy)
    assert dvh.d_cc(0.03) == pytest.approx(19.75, abs=0.0625 + 1e-9)
