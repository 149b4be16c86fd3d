"""The panel's per-course RBE statements (issue 10 item 3), headless on slicer-core: dose_type / rbe / radiation
checked by the case file's own function (case.parse_dose_kind), an RBE-weighted RTDOSE accepted only when stated
(recorded, not applied), a physical proton dose multiplied once by the stated RBE, and the RBE in the results."""

from __future__ import annotations

import pytest

from ReirradiationNPCLib.mrml_headless import unavailable_reason

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"slicer-core not available: {_REASON}")

from test_presenter import ROOT, FakeDicomDatabase, _presenter, _rtdose_node  # noqa: E402


def _segmentation(scene):
    import numpy as np

    from ReirradiationNPCLib import mrml
    from ReirradiationNPCLib.geometry import Grid
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.CreateDefaultDisplayNodes()
    mrml.add_segment(seg, "Brainstem", np.ones((1, 1, 1), bool), (slice(2, 3), slice(1, 2), slice(1, 2)),
                     Grid((4, 4, 3), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0)), (0.5, 0.5, 0.5))
    return seg


def test_statements_are_checked_like_the_case_file_keys():
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.errors import InputError
    app = mrml_headless.start()
    pr = _presenter(app.scene)
    pr.add_course()
    for bad, field in (({"rbe": 7.0}, "courses[0].rbe"), ({"doseType": "BED"}, "courses[0].dose_type"),
                       ({"radiation": "neutron"}, "courses[0].radiation")):
        with pytest.raises(InputError) as exc:
            pr.set_course_fields(0, **bad)
        assert exc.value.field == field and exc.value.source == "course1"
    pr.set_course_fields(0, doseType="EFFECTIVE")          # each on its own is fine ...
    with pytest.raises(InputError, match="missing") as exc:  # ... together: EFFECTIVE needs its RBE
        pr.dose_kind_statements(0)
    assert exc.value.field == "courses[0].rbe"
    pr.set_course_fields(0, rbe=1.1, radiation="photon")
    with pytest.raises(InputError, match="not radiation: photon"):
        pr.dose_kind_statements(0)
    pr.set_course_fields(0, radiation="proton")
    assert pr.dose_kind_statements(0) == ("EFFECTIVE", 1.1, "proton")
    pr.set_course_fields(0, doseType="", rbe=0.0, radiation="")   # "" / 0 = not stated
    assert pr.dose_kind_statements(0) == (None, None, None)


def test_effective_rtdose_accepted_only_when_stated_and_recorded_not_applied(tmp_path):
    """An RTDOSE of DoseType EFFECTIVE (maximum 60 Gy): refused with nothing stated; with dose_type EFFECTIVE and
    rbe 1.1 taken as is (the engine reads 60 Gy, not 66) and the RBE recorded in the results."""
    from ReirradiationNPCLib import mrml, mrml_headless
    from ReirradiationNPCLib.errors import InputError
    app = mrml_headless.start()
    import pydicom
    node = _rtdose_node(app.scene, tmp_path / "eff", dose_type="EFFECTIVE")
    ds = pydicom.dcmread(tmp_path / "eff" / "dose.dcm")   # as a planning system writes it (not our own output)
    ds.Manufacturer, ds.SeriesDescription = "TPS", "proton RBE-weighted dose"
    ds.save_as(tmp_path / "eff" / "dose.dcm")
    pr = _presenter(app.scene, FakeDicomDatabase(tmp_path / "eff"))
    pr.add_course()
    pr.set_course_fields(0, dose=node, fractions=30)
    with pytest.raises(InputError, match="EFFECTIVE"):
        pr.preflight()
    pr.set_course_fields(0, doseType="EFFECTIVE", rbe=1.1, radiation="proton")
    pre = pr.preflight()
    assert pre.inputs[0].multiplier == 1.0 and pre.inputs[0].dose_kind["rbe"] == 1.1
    assert pre.inputs[0].dose_kind["rbe_applied"] is False
    prep = mrml.prepare_from_nodes(pre.inputs, _segmentation(app.scene),
                                   str(ROOT / "Resources" / "Protocols" / "synthetic-demo.yaml"))
    assert float(prep.courses[0].dose.max()) == pytest.approx(60.0, rel=1e-5)
    analysis, results, _ = mrml.run_engine(prep)
    c = results.assumptions["courses"][0]
    assert c["rbe"] == 1.1 and c["rbe_text"] == "RBE 1.1 (RBE-weighted dose as exported, not applied again)"


def test_physical_proton_volume_multiplied_once_by_the_stated_rbe(tmp_path):
    """A volume without a DICOM header (maximum 60 Gy), stated radiation proton and rbe 1.1: the engine reads
    66 Gy; the user is still asked to confirm the unchecked volume."""
    import numpy as np

    from ReirradiationNPCLib import mrml, mrml_headless
    from ReirradiationNPCLib.geometry import Grid, Volume
    app = mrml_headless.start()
    grid = Grid((4, 4, 3), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    arr = np.linspace(0.0, 60.0, 48, dtype=np.float32).reshape(grid.shape)
    node = mrml.add_volume_node(Volume(arr, grid), "proton dose", app.scene)
    pr = _presenter(app.scene)
    pr.add_course()
    pr.set_course_fields(0, dose=node, fractions=30, radiation="proton", rbe=1.1)
    pre = pr.preflight()
    assert pre.inputs[0].multiplier == pytest.approx(1.1) and pre.confirm
    assert pre.inputs[0].dose_kind["rbe_applied"] is True
    prep = mrml.prepare_from_nodes(pre.inputs, _segmentation(app.scene),
                                   str(ROOT / "Resources" / "Protocols" / "synthetic-demo.yaml"))
    assert float(prep.courses[0].dose.max()) == pytest.approx(66.0, rel=1e-5)
    assert prep.dose_kinds["course1"]["rbe"] == 1.1
