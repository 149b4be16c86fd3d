"""The panel's behaviour without Qt (presenter.py on slicer-core): course order and naming, transforms (setting,
clearing, never re-parenting the user's dose), the DICOM provenance checks of a dose, re-run replacement, display
toggles, registration review with a manual 6-DOF adjustment, run/cancel state and the exports."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from ReirradiationNPCLib.mrml_headless import unavailable_reason

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"slicer-core not available: {_REASON}")

ROOT = Path(__file__).resolve().parents[1]


def _presenter(scene, database=None):
    from ReirradiationNPCLib.presenter import PanelState, Presenter
    return Presenter(PanelState(), scene=scene, dicom_database=database)


# ------------------------------------------------------------------------------------------ course list

def test_courses_are_named_in_time_order_and_the_first_added_stays_first():
    """Add, add: [course1, course2]; the first course added keeps its dose, stays first (oldest) and is named
    course1 - not the current course named in reverse. The last course is the current one."""
    from ReirradiationNPCLib import mrml_headless
    app = mrml_headless.start()
    pr = _presenter(app.scene)
    first_dose = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "first dose")
    assert pr.add_course() == 0
    pr.set_course_fields(0, dose=first_dose, fractions=33)
    assert [c.name for c in pr.p.courses] == ["course1"]
    assert pr.course_labels() == ["course1  (current)"]
    assert pr.add_course() == 1
    assert [c.name for c in pr.p.courses] == ["course1", "course2"]
    assert pr.p.courses[0].dose is first_dose and pr.p.courses[0].fractions == 33
    assert pr.course_labels() == ["course1  (prior)", "course2  (current)"]
    assert pr.p.selectedCourse == 1 and pr.is_current(1) and not pr.is_current(0)
    pr.rename_course(1, "reRT")
    pr.add_course()
    assert [c.name for c in pr.p.courses] == ["course1", "reRT", "course3"]
    # moving a course renumbers automatic names by position; the user's name is kept
    assert pr.move_course(0, +1) == 1
    assert [c.name for c in pr.p.courses] == ["reRT", "course2", "course3"]
    assert pr.p.courses[1].dose is first_dose
    pr.remove_course(0)
    assert [c.name for c in pr.p.courses] == ["course1", "course2"] and pr.p.courses[0].dose is first_dose
    for bad in ("", "course2", "cumulative", "a b"):
        with pytest.raises(Exception):
            pr.rename_course(0, bad)


# ------------------------------------------------------------------------------------------- transforms

def _ramp_case(scene):
    """Current dose 2 Gy on a small grid; prior dose 30 + 0.5 x Gy (x in LPS mm) on a larger grid; a 2x2x2 mm
    cube segment at the origin; a transform node shifting +5 mm in LPS x (-5 mm in RAS x)."""
    import vtk

    from ReirradiationNPCLib import mrml
    from ReirradiationNPCLib.geometry import Grid, Volume
    cur = Grid((9, 5, 5), (-8.0, -4.0, -4.0), (2.0, 2.0, 2.0))
    prior_grid = Grid((40, 12, 12), (-40.0, -12.0, -12.0), (2.0, 2.0, 2.0))
    x = prior_grid.index_to_physical(np.array([[i, 0, 0] for i in range(40)], float))[:, 0]
    prior = np.broadcast_to((30.0 + 0.5 * x)[None, None, :], prior_grid.shape).astype(np.float32).copy()
    prior_node = mrml.add_volume_node(Volume(prior, prior_grid), "prior dose", scene)
    cur_node = mrml.add_volume_node(Volume(np.full(cur.shape, 2.0, np.float32), cur), "current dose", scene)
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "prior to current")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, -5.0)
    t.SetMatrixTransformToParent(m)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.CreateDefaultDisplayNodes()
    mrml.add_segment(seg, "Brainstem", np.ones((1, 1, 1), bool), (slice(2, 3), slice(2, 3), slice(4, 5)), cur,
                     (0.5, 0.5, 0.5))
    return prior_node, cur_node, t, seg


def _prior_value_at_origin(pr):
    from ReirradiationNPCLib import mrml
    prep = mrml.prepare_from_nodes(pr.course_inputs(), pr.p.segmentation,
                                   str(ROOT / "Resources" / "Protocols" / "synthetic-demo.yaml"))
    k, j, i = 2, 2, 4  # LPS (0, 0, 0) on the current grid
    return float(prep.courses[0].dose[k, j, i]), prep.courses[0].registration


def test_transform_is_used_without_reparenting_the_dose_and_clearing_removes_it():
    """With the course transform (+5 mm LPS x) the prior dose read at x = 0 is 30 + 0.5 (0 - 5) = 27.5 Gy; the
    user's dose node is never put under the transform; after clearing, the dose is read untransformed (30 Gy)."""
    from ReirradiationNPCLib import mrml_headless
    app = mrml_headless.start()
    prior, cur, t, seg = _ramp_case(app.scene)
    pr = _presenter(app.scene)
    pr.add_course()
    pr.add_course()
    pr.set_course_fields(0, dose=prior, fractions=30, intervalMonths=24.0)
    pr.set_course_fields(1, dose=cur, fractions=30)
    pr.p.segmentation = seg
    assert _prior_value_at_origin(pr)[0] == pytest.approx(30.0, abs=1e-4)
    pr.set_transform(0, t)
    value, method = _prior_value_at_origin(pr)
    assert value == pytest.approx(27.5, abs=1e-4) and "prior to current" in method
    assert prior.GetParentTransformNode() is None  # never re-parented
    pr.set_transform(0, None)
    assert pr.p.courses[0].transform is None
    assert _prior_value_at_origin(pr)[0] == pytest.approx(30.0, abs=1e-4)
    assert prior.GetParentTransformNode() is None


def test_dose_already_under_another_transform_is_refused_not_combined():
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.errors import InputError
    app = mrml_headless.start()
    prior, cur, t, seg = _ramp_case(app.scene)
    other = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "other")
    prior.SetAndObserveTransformNodeID(other.GetID())
    pr = _presenter(app.scene)
    pr.add_course()
    pr.add_course()
    pr.set_course_fields(0, dose=prior, fractions=30, intervalMonths=24.0)
    pr.set_course_fields(1, dose=cur, fractions=30)
    pr.p.segmentation = seg
    pr.set_transform(0, t)
    with pytest.raises(InputError, match="use one of them"):
        _prior_value_at_origin(pr)


def test_review_fuses_the_prior_ct_and_clearing_the_transform_restores_it():
    """Review puts the prior CT under the course transform in the foreground over the current CT; clearing the
    course's transform puts the prior CT back under its previous parent (none)."""
    from ReirradiationNPCLib import mrml_headless
    app = mrml_headless.start()
    prior, cur, t, seg = _ramp_case(app.scene)
    comp = app.scene.AddNode(_slice_composite("Red"))
    pr = _presenter(app.scene)
    pr.add_course()
    pr.add_course()
    pr.set_course_fields(0, dose=prior, ct=prior)  # the ramp volumes stand in for the CTs
    pr.set_course_fields(1, dose=cur, ct=cur)
    pr.set_transform(0, t)
    pr.review(0)
    assert prior.GetParentTransformNode() is t
    assert comp.GetBackgroundVolumeID() == cur.GetID() and comp.GetForegroundVolumeID() == prior.GetID()
    pr.set_transform(0, None)
    assert prior.GetParentTransformNode() is None


def _slice_composite(tag):
    import slicer
    comp = slicer.vtkMRMLSliceCompositeNode()
    comp.SetSingletonTag(tag)
    comp.SetLayoutName(tag)
    return comp


def test_manual_adjustment_moves_points_by_hand_and_zero_gives_back_the_registration():
    """Base transform: +1, +2, +3 mm (RAS). Adjustment tx = 5 mm: the origin goes to (6, 2, 3). rz = 90 deg about
    the centre c: c + (10, 0, 0) goes to c + (0, 10, 0) before the base translation. All zero: the base exactly."""
    import vtk

    from ReirradiationNPCLib import mrml_headless, mrml_review
    app = mrml_headless.start()
    t = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "reg")
    m = vtk.vtkMatrix4x4()
    for axis, v in enumerate((1.0, 2.0, 3.0)):
        m.SetElement(axis, 3, v)
    t.SetMatrixTransformToParent(m)
    c = (10.0, -20.0, 30.0)
    a = mrml_review.adjust(t, tx=5.0, center=c)
    assert a @ [0, 0, 0, 1] == pytest.approx([6.0, 2.0, 3.0, 1.0])
    a = mrml_review.adjust(t, rz=90.0, center=c)
    p = np.array([c[0] + 10.0, c[1], c[2], 1.0])
    assert a @ np.linalg.inv(mrml_review.registered_to_parent(t)) @ p == pytest.approx([c[0], c[1] + 10.0, c[2], 1])
    a = mrml_review.adjust(t, rx=30.0, ry=-20.0, tz=4.0, center=c)
    r = a[:3, :3] @ np.linalg.inv(mrml_review.registered_to_parent(t)[:3, :3])
    assert r @ r.T == pytest.approx(np.eye(3), abs=1e-12) and np.linalg.det(r) == pytest.approx(1.0)
    assert math.degrees(math.acos((np.trace(r) - 1) / 2)) > 20
    assert mrml_review.adjustment_of(t) == (0.0, 0.0, 4.0, 30.0, -20.0, 0.0)
    out = vtk.vtkMatrix4x4()
    mrml_review.adjust(t, center=c)
    t.GetMatrixTransformToParent(out)
    assert [out.GetElement(i, 3) for i in range(3)] == pytest.approx([1.0, 2.0, 3.0], abs=1e-12)
    assert np.allclose([[out.GetElement(i, j) for j in range(3)] for i in range(3)], np.eye(3), atol=1e-12)


def test_manual_adjustment_refuses_a_deformable_transform():
    from ReirradiationNPCLib import mrml_headless, mrml_review
    from ReirradiationNPCLib.errors import InputError
    app = mrml_headless.start()
    g = app.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "deformable")
    with pytest.raises(InputError, match="linear"):
        mrml_review.adjust(g, tx=1.0)


# ------------------------------------------------------------------------------------ dose provenance

class FakeDicomDatabase:
    """ctkDICOMDatabase's two look-ups, over the files of one folder."""

    def __init__(self, folder):
        import pydicom
        self.series, self.instances = {}, {}
        for f in Path(folder).glob("*.dcm"):
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
            self.series.setdefault(str(ds.SeriesInstanceUID), []).append(str(f))
            self.instances[str(ds.SOPInstanceUID)] = str(f)

    def filesForSeries(self, uid):  # noqa: N802 - ctk's name
        return self.series.get(uid, [])

    def fileForInstance(self, uid):  # noqa: N802
        return self.instances.get(uid, "")


def _rtdose_node(scene, folder, *, summation="PLAN", dose_type="PHYSICAL", plan_fractions=30, max_gy=60.0):
    """An RTDOSE and its RTPLAN written to ``folder``, and a volume node as SlicerRT loads it: voxels in Gy, the
    series UID on its subject-hierarchy item under a study, the plan's UID in DICOM.ReferencedInstanceUIDs."""
    import pydicom
    import slicer

    from ReirradiationNPCLib import mrml
    from ReirradiationNPCLib.dicom_export import write_rtdose, write_rtplan
    from ReirradiationNPCLib.geometry import Grid, Volume
    from ReirradiationNPCLib.synthetic_dicom import _study
    folder.mkdir(parents=True, exist_ok=True)
    ident = _study("20250101", "S1", "test study")
    plan_uid = write_rtplan(folder / "plan.dcm", ident, fractions=plan_fractions, label="P",
                            prescription_gy=60.0, series_description="plan")
    grid = Grid((4, 4, 3), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    arr = np.linspace(0.0, max_gy, 48, dtype=np.float32).reshape(grid.shape)
    write_rtdose(Volume(arr, grid), ident, folder / "dose.dcm", series_description="dose", dose_type=dose_type,
                 summation=summation, referenced_plan_uids=[plan_uid])
    ds = pydicom.dcmread(str(folder / "dose.dcm"), stop_before_pixels=True)
    node = mrml.add_volume_node(Volume(arr, grid), "RTDOSE", scene)
    node.SetAttribute("DicomRtImport.DoseVolume", "1")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "P"), "S")
    item = sh.CreateItem(study, node)
    sh.SetItemUID(item, "DICOM", str(ds.SeriesInstanceUID))
    sh.SetItemAttribute(item, "DICOM.ReferencedInstanceUIDs", plan_uid)
    return node


def test_rtdose_header_and_plan_are_checked_through_the_dicom_database(tmp_path):
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.errors import InputError
    from ReirradiationNPCLib.mrml_provenance import dose_provenance
    app = mrml_headless.start()
    node = _rtdose_node(app.scene, tmp_path / "plan")
    db = FakeDicomDatabase(tmp_path / "plan")
    prov = dose_provenance(node, 30, db, app.scene)
    assert prov.kind == "rtdose" and prov.checked and prov.multiplier == 1.0
    assert prov.header["DoseSummationType"] == "PLAN" and prov.plan_file.endswith("plan.dcm")
    with pytest.raises(InputError, match="disagrees with the plan"):
        dose_provenance(node, 33, db, app.scene)  # the plan says 30 fractions
    # the dose of one session (2 Gy maximum) is multiplied by the fractions, as on the command line
    node = _rtdose_node(app.scene, tmp_path / "fx", summation="FRACTION_SESSION", max_gy=2.0)
    prov = dose_provenance(node, 30, FakeDicomDatabase(tmp_path / "fx"), app.scene)
    assert prov.multiplier == 30.0 and any(re.search(r"multiplied by (the )?30", n) for n in prov.notes)
    # an EQD2 / RBE-weighted RTDOSE and a per-beam RTDOSE are refused
    node = _rtdose_node(app.scene, tmp_path / "eff", dose_type="EFFECTIVE")
    with pytest.raises(InputError, match="EFFECTIVE"):
        dose_provenance(node, 30, FakeDicomDatabase(tmp_path / "eff"), app.scene)
    node = _rtdose_node(app.scene, tmp_path / "beam", summation="BEAM")
    with pytest.raises(InputError, match="BEAM"):
        dose_provenance(node, 30, FakeDicomDatabase(tmp_path / "beam"), app.scene)
    # a DICOM dose whose file is not in the database cannot be checked: flagged, not passed
    prov = dose_provenance(node, 30, FakeDicomDatabase(tmp_path / "nothing-here"), app.scene)
    assert prov.kind == "dicom_unreadable" and not prov.checked


def test_per_fraction_rtdose_reaches_the_engine_multiplied(tmp_path):
    """The presenter's course inputs carry the multiplier; prepare_from_nodes reads 30 x the voxels."""
    from ReirradiationNPCLib import mrml, mrml_headless
    app = mrml_headless.start()
    node = _rtdose_node(app.scene, tmp_path / "fx", summation="FRACTION_SESSION", max_gy=2.0)
    pr = _presenter(app.scene, FakeDicomDatabase(tmp_path / "fx"))
    pr.add_course()
    pr.set_course_fields(0, dose=node, fractions=30)
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.CreateDefaultDisplayNodes()
    from ReirradiationNPCLib.geometry import Grid
    mrml.add_segment(seg, "Brainstem", np.ones((1, 1, 1), bool), (slice(2, 3), slice(1, 2), slice(1, 2)),
                     Grid((4, 4, 3), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0)), (0.5, 0.5, 0.5))
    pr.p.segmentation = seg
    pre = pr.preflight()
    assert pre.confirm == []
    prep = mrml.prepare_from_nodes(pre.inputs, seg, str(ROOT / "Resources" / "Protocols" / "synthetic-demo.yaml"))
    assert float(prep.courses[0].dose.max()) == pytest.approx(60.0, rel=1e-5)


def test_dose_choices_offer_rtdose_volumes_first_and_mark_the_rest_unchecked(tmp_path):
    from ReirradiationNPCLib import mrml_headless
    app = mrml_headless.start()
    ct = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    ours = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "old cumulative EQD2")
    ours.SetAttribute("ReirradiationNPC.Role", "cumulative_eqd2")
    rtdose = _rtdose_node(app.scene, tmp_path / "d")
    choices = _presenter(app.scene).dose_choices()
    assert [c.node for c in choices] == [rtdose, ct]
    assert choices[0].checked and not choices[1].checked and "unchecked" in choices[1].label


# -------------------------------------------------------------------------------- compute on the synthetic case

@pytest.fixture(scope="module")
def synthetic_nodes(synthetic_case):
    """The synthetic case as nodes a user would have: CT, two physical doses (no DICOM provenance), structures."""
    from ReirradiationNPCLib import mrml_headless, mrml_scene
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import prepare
    prep = prepare(load_case(synthetic_case))
    app = mrml_headless.start()
    inputs = mrml_scene.load_inputs(prep, scene=app.scene)
    for node in inputs["doses"].values():  # as a user's NRRD doses: no DICOM provenance, no dose attribute
        node.RemoveAttribute("ReirradiationNPC.Role")
        node.RemoveAttribute("DicomRtImport.DoseVolume")
    return app, prep, inputs


def test_compute_flags_doses_without_dicom_provenance_and_a_rerun_replaces_its_results(synthetic_nodes, tmp_path):
    """Doses from files: not computed unless the user confirms them; once confirmed, the results carry the
    warning and the status says so. Computing again replaces the analysis' nodes (one folder, no duplicates)."""
    import slicer

    from ReirradiationNPCLib import mrml
    from ReirradiationNPCLib.errors import InputError
    app, prep, inputs = synthetic_nodes
    pr = _presenter(app.scene)
    for name in ("course1", "course2"):
        i = pr.add_course()
        c = next(x for x in prep.courses if x.name == name)
        pr.set_course_fields(i, dose=inputs["doses"][name], fractions=c.fractions,
                             intervalMonths=c.interval_months or 0.0)
    pr.set_course_fields(1, ct=inputs["images"]["reference"])
    pr.p.segmentation = inputs["structures"]
    pr.p.analysisName = "Synthetic"
    pre = pr.preflight()
    assert len(pre.confirm) == 2 and all("no DICOM provenance" in m for m in pre.confirm)
    protocol = prep.protocol
    asked = []
    with pytest.raises(InputError, match="not confirmed"):
        pr.compute(protocol, confirm=lambda msgs: asked.append(msgs) or False)
    assert asked and len(asked[0]) == 2 and pr.p.cumulativeEQD2 is None and not mrml.analysis_folders(app.scene)
    messages = []
    out = pr.compute(protocol, confirm=lambda msgs: True, progress=messages.append)
    results = pr.last[2]
    # the check maps of ``run --scene`` (one alpha/beta and credit each), as dose volumes in the analysis folder
    from ReirradiationNPCLib.analysis import check_maps
    expected = check_maps(pr.last[0].courses, pr.last[0].structures, protocol)[0]
    assert expected and len(out.check_maps) == len(expected)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    for node, m in zip(out.check_maps, expected):
        assert app.scene.IsNodePresent(node) and node.GetAttribute("ReirradiationNPC.CheckMap") == m.stem
        assert node.GetAttribute("ReirradiationNPC.Role") == "check_eqd2"
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == out.folder_item
        arr = slicer.util.arrayFromVolume(node)
        assert float(arr.max()) == pytest.approx(float(m.compute(pr.last[0].courses).max()), rel=1e-5)
    assert sum("no DICOM provenance" in w and "confirmed" in w for w in results.warnings) == 2
    assert "2 dose(s) without a DICOM header check" in pr.p.status
    assert messages and pr.run.running == ""
    n_nodes = app.scene.GetNumberOfNodes()
    again = pr.compute(protocol, confirm=lambda msgs: True)
    assert again.replaced == 1 and mrml.analysis_folders(app.scene) == [again.folder_item]
    assert app.scene.GetNumberOfNodes() == n_nodes
    assert pr.p.cumulativeEQD2 is again.cumulative and not app.scene.IsNodePresent(out.cumulative)
    assert len(slicer.util.getNodesByClass("vtkMRMLPlotChartNode", app.scene)) == 1
    # the user's inputs are untouched
    for node in inputs["doses"].values():
        assert app.scene.IsNodePresent(node) and node.GetParentTransformNode() is None
    # exports of what was computed: report.html by the command line's renderer (never over an existing one) and
    # the cumulative EQD2 as an RTDOSE with DoseType EFFECTIVE in the given patient/study (a new file each time)
    report = pr.save_report(tmp_path / "report")
    text = report.read_text(encoding="utf-8")
    assert results.summary["verdict"] in text and "no DICOM provenance" in text
    with pytest.raises(InputError, match="already exists"):
        pr.save_report(tmp_path / "report")
    import pydicom

    from ReirradiationNPCLib.synthetic_dicom import _study
    ident = _study("20250101", "S1", "test")
    first = pr.export_rtdose_file(tmp_path / "dicom", ident)
    second = pr.export_rtdose_file(tmp_path / "dicom", ident)
    assert first.name == "cumulative_eqd2.dcm" and second.name == "cumulative_eqd2-2.dcm"
    # the check maps go with it, one RTDOSE each, named as ``run`` names them, never over the first export's
    check_files = pr.exported_files[1:]
    assert [f.name for f in check_files] == [f"{m.stem}-2.dcm" for m in expected]
    for m in expected:
        assert (tmp_path / "dicom" / f"{m.stem}.dcm").is_file()
    cds = pydicom.dcmread(str(check_files[0]))
    assert cds.DoseType == "EFFECTIVE" and cds.StudyInstanceUID == ident["StudyInstanceUID"]
    assert f"a/b {expected[0].alpha_beta:g}" in cds.SeriesDescription
    cdose = cds.pixel_array.astype(float) * float(cds.DoseGridScaling)
    assert cdose.max() == pytest.approx(float(expected[0].compute(pr.last[0].courses).max()), rel=1e-4)
    ds = pydicom.dcmread(str(first))
    assert ds.DoseType == "EFFECTIVE" and ds.StudyInstanceUID == ident["StudyInstanceUID"]
    dose = ds.pixel_array.astype(float) * float(ds.DoseGridScaling)
    assert dose.max() == pytest.approx(float(pr.last[1].cumulative.max()), rel=1e-6)
    with pytest.raises(InputError, match="DICOM"):
        pr.export_rtdose_file(tmp_path / "dicom", {})


def test_cancel_stops_a_run_at_its_next_step_before_any_node_is_made(synthetic_nodes):
    from ReirradiationNPCLib import mrml
    from ReirradiationNPCLib.presenter import Cancelled
    app, prep, inputs = synthetic_nodes
    pr = _presenter(app.scene)
    for name in ("course1", "course2"):
        i = pr.add_course()
        c = next(x for x in prep.courses if x.name == name)
        pr.set_course_fields(i, dose=inputs["doses"][name], fractions=c.fractions,
                             intervalMonths=c.interval_months or 0.0)
    pr.p.segmentation = inputs["structures"]
    pr.p.analysisName = "Cancelled run"
    states = []

    def progress(message):
        states.append(pr.button_states())
        if len(states) == 2:
            pr.run.cancel()

    with pytest.raises(Cancelled):
        pr.compute(prep.protocol, confirm=lambda msgs: True, progress=progress)
    assert not states[0]["compute"] and not states[0]["add"] and states[0]["cancel"]  # disabled while running
    assert pr.run.running == "" and pr.button_states()["compute"]
    assert mrml.analysis_folders(app.scene, "Cancelled run") == []


def test_run_state_refuses_a_second_run_while_one_is_running():
    from ReirradiationNPCLib.presenter import RunState
    run = RunState()
    run.begin("compute")
    with pytest.raises(RuntimeError):
        run.begin("register")
    run.end()
    run.begin("register")


def test_display_toggles_put_headroom_or_remaining_dose_in_the_slice_layer(synthetic_nodes):
    from ReirradiationNPCLib import mrml
    app, prep, inputs = synthetic_nodes
    from ReirradiationNPCLib.pipeline import build_results  # noqa: F401 - the engine run below
    analysis, results, plan = mrml.run_engine(prep)
    out = mrml.create_output_nodes(prep, analysis, results, "Display", app.scene, planning=plan)
    red = app.scene.AddNode(_slice_composite("RedDisplay"))
    pr = _presenter(app.scene)
    pr.p.cumulativeEQD2, pr.p.overlays = out.cumulative, out.overlays
    assert pr.apply_display() is out.cumulative and red.GetForegroundVolumeID() == out.cumulative.GetID()
    pr.p.showRemainingDose = True
    assert pr.apply_display() is out.remaining and red.GetForegroundVolumeID() == out.remaining.GetID()
    pr.p.showHeadroom = True
    assert pr.apply_display() is out.headroom and red.GetForegroundVolumeID() == out.headroom.GetID()
    pr.p.showHeadroom = pr.p.showRemainingDose = False
    pr.p.showMargins = False
    pr.apply_display()
    seg, display = out.overlays.GetSegmentation(), out.overlays.GetDisplayNode()
    import vtk
    for i in range(seg.GetNumberOfSegments()):
        kind = vtk.reference("")
        seg.GetNthSegment(i).GetTag("ReirradiationNPC.Kind", kind)
        assert display.GetSegmentVisibility(seg.GetNthSegmentID(i)) == (str(kind) != "margin")


# ---------------------------------------------------------------------------------------------- small parts

def test_protocol_edits_never_overwrite(tmp_path):
    from ReirradiationNPCLib.presenter import next_free_path
    p = tmp_path / "npc-edited.yaml"
    assert next_free_path(p) == p
    p.write_text("a")
    assert next_free_path(p) == tmp_path / "npc-edited-2.yaml"
    (tmp_path / "npc-edited-2.yaml").write_text("b")
    assert next_free_path(p) == tmp_path / "npc-edited-3.yaml"
    assert next_free_path(tmp_path / "npc-edited-2.yaml") == tmp_path / "npc-edited-3.yaml"


def test_status_shows_the_verdict_code_when_present():
    from ReirradiationNPCLib.presenter import status_text
    assert status_text({"verdict": "LIMITS EXCEEDED", "verdict_code": "limits_exceeded"}) == \
        "[limits_exceeded] LIMITS EXCEEDED"
    assert status_text({"verdict": "x"}) == "x"  # before issue 9's field exists


def test_registration_reports_progress_and_sets_the_course_transform(monkeypatch):
    """Registration stages reach the progress callback (the widget's progress dialog); the resulting transform is
    set on the course, the CT and dose nodes are not re-parented; a cancel at a stage stops it. The optimiser
    itself is replaced by an identity stub here: its accuracy is tested in test_registration.py."""
    import SimpleITK as sitk

    from ReirradiationNPCLib import mrml, mrml_headless, registration
    from ReirradiationNPCLib.errors import InputError
    from ReirradiationNPCLib.geometry import Grid, Volume
    from ReirradiationNPCLib.presenter import Cancelled
    monkeypatch.setattr(registration, "rigid", lambda fixed, moving, opts=None, mask=None:
                        (sitk.Euler3DTransform(), {"stub": True}))
    app = mrml_headless.start()
    grid = Grid((16, 16, 8), (-16.0, -16.0, -8.0), (2.0, 2.0, 2.0))
    ct = np.full(grid.shape, -1000.0, np.float32)
    ct[2:6, 4:12, 4:12] = 40.0
    cur_ct = mrml.add_volume_node(Volume(ct, grid), "current CT", app.scene)
    prior_ct = mrml.add_volume_node(Volume(ct.copy(), grid), "prior CT", app.scene)
    pr = _presenter(app.scene)
    pr.add_course()
    pr.add_course()
    pr.set_course_fields(0, ct=prior_ct)
    pr.set_course_fields(1, ct=cur_ct)
    pr.p.registrationMethod = "existing transform"
    with pytest.raises(InputError, match="existing transform"):
        pr.register(0)
    pr.p.registrationMethod = "rigid"
    messages = []
    summary = pr.register(0, progress=messages.append)
    assert messages[:3] == ["registering course1 (rigid)", "course1: rigid registration", "course1: registration QA"]
    assert "course1: rigid registration" in summary
    assert pr.p.courses[0].transform is not None and pr.p.courses[0].transform.IsLinear()
    assert prior_ct.GetParentTransformNode() is None
    with pytest.raises(Cancelled):
        pr.register(0, progress=lambda m: pr.run.cancel())
    assert pr.run.running == ""


def test_saved_scene_reproduces_its_protocol_even_after_the_file_changed(tmp_path):
    """The analysis saved the protocol text with its hash: if the file is later edited or removed, the saved copy
    is written to a NEW file and used; the edited file is left as it is; another chosen file is not replaced."""
    import hashlib

    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.mrml import protocol_text_node
    from ReirradiationNPCLib.presenter import restore_protocol
    app = mrml_headless.start()
    original = (ROOT / "Resources" / "Protocols" / "synthetic-demo.yaml").read_text(encoding="utf-8")
    path = tmp_path / "mine.yaml"
    path.write_text(original, encoding="utf-8")
    sha = hashlib.sha256(original.encode("utf-8")).hexdigest()

    class P:
        pass
    proto = P()
    proto.path = str(path)
    protocol_text_node(proto, "A protocol", app.scene)
    assert restore_protocol(path, sha, app.scene, tmp_path / "restored") == path  # unchanged file: itself
    path.write_text(original + "\n# edited later\n", encoding="utf-8")
    restored = restore_protocol(path, sha, app.scene, tmp_path / "restored")
    assert restored != path and restored.read_text(encoding="utf-8") == original
    assert path.read_text(encoding="utf-8").endswith("# edited later\n")  # never overwritten
    path.unlink()
    again = restore_protocol(path, sha, app.scene, tmp_path / "restored")
    assert again != restored and again.read_text(encoding="utf-8") == original  # a new file each time
    other = tmp_path / "other.yaml"
    other.write_text("x", encoding="utf-8")
    assert restore_protocol(other, sha, app.scene, tmp_path / "restored") == other
