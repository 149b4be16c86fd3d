"""The RBE of every course in every output's assumptions (issue 10 item 2): results.json, the command line's
summary, the report's course table, the NRRD descriptions of the EQD2 maps and the exported RTDOSEs
(SeriesDescription / DoseComment / ImageComments).

The demo's DICOM case with the prior course rewritten as a proton physical dose (pixels / 1.1, ``radiation:
proton``, ``rbe: 1.1``: multiplied once by 1.1) and the current course stated ``radiation: photon``; a second run
with nothing stated (radiation not stated).
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
import yaml
from click.testing import CliRunner

from ReirradiationNPCLib import dicom_rt as dr
from ReirradiationNPCLib.cli import main

from test_dose_summation import _case_with, _rewrite


def test_rbe_words_and_tags():
    assert dr.rbe_words({"rbe": 1.1, "rbe_applied": True, "radiation": "proton"}) == \
        "RBE 1.1 (proton physical dose x 1.1, applied once)"
    assert dr.rbe_words({"rbe": 1.1, "rbe_applied": False, "radiation": "proton"}) == \
        "RBE 1.1 (RBE-weighted dose as exported, not applied again)"
    assert dr.rbe_words({"rbe": None, "radiation": "photon"}) == "RBE 1, photons"
    assert dr.rbe_words({"rbe": None, "radiation": "not stated (no RT Ion plan: photons/electrons, RBE 1)"}) == \
        "RBE 1, radiation not stated (no RT Ion plan)"
    assert dr.rbe_words(None) == "RBE 1, radiation not stated (no RT Ion plan)"
    assert dr.rbe_tag({"rbe": 1.1}) == "RBE 1.1" and dr.rbe_tag({"radiation": "electron"}) == "RBE 1 electrons"
    assert len(dr.rbe_tag(None)) < 30


@pytest.fixture(scope="module")
def proton_run(tmp_path_factory):
    from ReirradiationNPCLib.synthetic_dicom import generate_dicom
    folder = generate_dicom(tmp_path_factory.mktemp("rbe_outputs") / "case").parent
    phys = _rewrite(folder / "rtdose_course1_registered.dcm", folder / "rtdose_course1_proton.dcm",
                    pixel_divisor=1.1)
    case = _case_with(folder, "case_proton.yaml", 0, dose=phys.name, radiation="proton", rbe=1.1)
    data = yaml.safe_load(case.read_text())
    data["courses"][1]["radiation"] = "photon"
    case.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path_factory.mktemp("rbe_out") / "o"
    r = CliRunner().invoke(main, ["run", str(case), "-o", str(out), "--dicom-courses"])
    assert r.exit_code == 0, r.output
    return out, r.output


PRIOR = "RBE 1.1 (proton physical dose x 1.1, applied once)"
CURRENT = "RBE 1, photons"


def test_results_json_and_cli_say_the_rbe(proton_run):
    out, stdout = proton_run
    a = json.loads((out / "results.json").read_text())["assumptions"]["courses"]
    assert [c["rbe_text"] for c in a] == [PRIOR, CURRENT]
    assert f"course course1: 33 fractions, {PRIOR}" in stdout
    assert f"course course2: 54 fractions, {CURRENT}" in stdout


def test_report_course_table_says_the_rbe(proton_run):
    html = (proton_run[0] / "report.html").read_text()
    assert "RBE 1.10: physical dose multiplied once by the stated RBE 1.1" in html
    assert CURRENT in html


def _desc(path: Path) -> str:
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r.GetMetaData("description")


def test_nrrd_descriptions_say_the_rbe(proton_run):
    out = proton_run[0]
    assert PRIOR in _desc(out / "eqd2_course1.nrrd") and CURRENT in _desc(out / "eqd2_course2.nrrd")
    cum = _desc(out / "cumulative_eqd2.nrrd")
    assert f"course course1: {PRIOR}" in cum and f"course course2: {CURRENT}" in cum
    check = sorted(out.glob("cumulative_eqd2_ab*.nrrd"))
    assert check and all(PRIOR in _desc(p) for p in check)


def test_rtdose_exports_say_the_rbe(proton_run):
    out = proton_run[0]
    cum = pydicom.dcmread(out / "cumulative_eqd2.dcm", stop_before_pixels=True)
    assert "RBE 1.1/1" in cum.SeriesDescription and "RBE 1.1/1" in cum.DoseComment
    assert PRIOR in cum.ImageComments and CURRENT in cum.ImageComments
    assert len(cum.SeriesDescription) <= 64 and len(cum.DoseComment) <= 64
    c1 = pydicom.dcmread(out / "eqd2_course1.dcm", stop_before_pixels=True)
    assert "RBE 1.1" in c1.SeriesDescription and c1.DoseComment.startswith("EQD2 RBE 1.1, 33 fx")
    assert PRIOR in c1.ImageComments
    c2 = pydicom.dcmread(out / "eqd2_course2.dcm", stop_before_pixels=True)
    assert "RBE 1 photons" in c2.DoseComment and CURRENT in c2.ImageComments
    for p in out.glob("cumulative_eqd2_ab*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.SeriesDescription.endswith("RBE 1.1/1") and PRIOR in ds.ImageComments


def test_nothing_stated_says_radiation_not_stated(tmp_path):
    """The demo as generated (its plans name no radiation): every output says so, never 'photons'."""
    from ReirradiationNPCLib.analysis import compute
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import build_results, prepare
    from ReirradiationNPCLib.synthetic_dicom import generate_dicom
    folder = generate_dicom(tmp_path / "case").parent
    prep = prepare(load_case(folder / "case_identity.yaml"))
    res = build_results(prep, compute(prep.grid, prep.courses, prep.structures, prep.protocol)).to_dict()
    assert [c["rbe_text"] for c in res["assumptions"]["courses"]] == \
        ["RBE 1, radiation not stated (no RT Ion plan)"] * 2
    from ReirradiationNPCLib.dicom_export import course_rbe_tags
    assert course_rbe_tags(prep) == "RBE 1"
