"""The MRML layer on real MRML scenes from the PyPI package slicer-core (no Qt): nodes -> engine -> nodes,
transforms, the offscreen 3D view and the scene bundle written by ``run --scene``.

Skipped (with the reason) when slicer-core is not importable; CI installs it through the ``slicer`` extra.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ReirradiationNPCLib.mrml_headless import unavailable_reason

_REASON = unavailable_reason()
needs_slicer = pytest.mark.skipif(_REASON is not None, reason=f"slicer-core not available: {_REASON}")

OUTPUT = Path(__file__).resolve().parent / "output"
F3 = np.diag([-1.0, -1.0, 1.0])


def _eqd2_by_hand(dose_gy, fractions, ab):
    """EQD2 = D (D/n + a/b) / (2 + a/b), written out here independently of the engine."""
    dose_gy = np.asarray(dose_gy, dtype=np.float64)
    return dose_gy * (dose_gy / fractions + ab) / (2.0 + ab)


def vtk_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _linear_transform_node(scene, to_parent_lps_4x4, name="registration"):
    """A linear transform node whose 'to parent' map is given in LPS (converted here to Slicer's RAS)."""
    import vtk
    f4 = np.diag([-1.0, -1.0, 1.0, 1.0])
    a = f4 @ np.asarray(to_parent_lps_4x4, dtype=float) @ f4
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(m)
    return node


@pytest.fixture(scope="module")
def engine_run(synthetic_case):
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import prepare
    from ReirradiationNPCLib import mrml
    prep = prepare(load_case(synthetic_case))
    analysis, results, plan = mrml.run_engine(prep)
    return prep, analysis, results, plan


@pytest.fixture(scope="module")
def built(engine_run):
    """A headless scene holding the synthetic case's inputs and every output node."""
    from ReirradiationNPCLib import mrml_headless, mrml_scene
    prep, analysis, results, plan = engine_run
    app = mrml_headless.start()
    inputs, outputs = mrml_scene.build_scene(prep, analysis, results, name="Synthetic analysis", scene=app.scene,
                                             planning=plan)
    return app, inputs, outputs


# ------------------------------------------------------------------------------------------- geometry

@needs_slicer
def test_lps_grid_becomes_ras_node_geometry_by_hand():
    """Origin (10, 20, 30) mm LPS, spacing (2, 3, 4) mm, identity LPS axes -> RAS origin (-10, -20, 30) and
    IJK-to-RAS diagonal (-2, -3, 4); voxel (1, 1, 1) lies at LPS (12, 23, 34) = RAS (-12, -23, 34)."""
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.geometry import Grid, Volume
    app = mrml_headless.start()
    from ReirradiationNPCLib import mrml
    arr = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    node = mrml.add_volume_node(Volume(arr, Grid((2, 3, 4), (10.0, 20.0, 30.0), (2.0, 3.0, 4.0))), "v", app.scene)
    assert node.GetOrigin() == pytest.approx((-10.0, -20.0, 30.0))
    assert node.GetSpacing() == pytest.approx((2.0, 3.0, 4.0))
    ijk_to_ras = np.array(mrml.ijk_to_ras_from_grid(mrml.volume_from_node(node).grid))
    assert ijk_to_ras @ [1, 1, 1, 1] == pytest.approx([-12.0, -23.0, 34.0, 1.0])
    assert np.array_equal(mrml.volume_from_node(node).array, arr)


@needs_slicer
def test_oblique_grid_round_trips_through_a_node():
    """A rotated (oblique) grid: node -> engine grid gives back the same LPS geometry and voxel positions."""
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.geometry import Grid, Volume
    app = mrml_headless.start()
    from ReirradiationNPCLib import mrml
    a = math.radians(30.0)
    direction = (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)
    grid = Grid((5, 4, 3), (-7.5, 12.0, 40.0), (1.5, 2.0, 2.5), direction)
    node = mrml.add_volume_node(Volume(np.zeros(grid.shape, np.float32), grid), "oblique", app.scene)
    back = mrml.volume_from_node(node).grid
    assert back.same_as(grid, tol_mm=1e-9)
    ras = np.array(mrml.ijk_to_ras_from_grid(back)) @ [4, 3, 2, 1]
    assert F3 @ ras[:3] == pytest.approx(grid.index_to_physical(np.array([[4.0, 3.0, 2.0]]))[0])


@needs_slicer
def test_segments_round_trip_with_their_geometry():
    """A 2x2x2-voxel box segment written onto an offset grid comes back as 8 voxels at the same LPS place."""
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.geometry import Grid
    app = mrml_headless.start()
    from ReirradiationNPCLib import mrml
    grid = Grid((10, 10, 10), (-5.0, -5.0, -5.0), (1.0, 1.0, 2.0))
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.CreateDefaultDisplayNodes()
    mask = np.ones((2, 2, 2), bool)
    mrml.add_segment(seg, "Cube", mask, (slice(3, 5), slice(4, 6), slice(6, 8)), grid, (0.1, 0.2, 0.3))
    segment = seg.GetSegmentation().GetNthSegment(0)
    assert (segment.GetNameAutoGenerated(), segment.GetColorAutoGenerated()) == (False, False)  # ours, not Slicer's
    (s,) = mrml.structures_from_segmentation(seg)
    assert s.name == "Cube" and s.color == pytest.approx((0.1, 0.2, 0.3))
    assert int(s.mask.sum()) == 8
    first = np.argwhere(s.mask)[0][::-1].astype(float)  # (i, j, k) of the first voxel on the segment's grid
    assert s.grid.index_to_physical(first[None])[0] == pytest.approx([-5.0 + 6, -5.0 + 4, -5.0 + 2 * 3])


@needs_slicer
def test_segments_sharing_a_ct_size_layer_come_back_as_their_boxes():
    """Two 2x2x2 cubes as labels 1 and 2 of one 20 x 20 x 10 labelmap, imported as one shared layer (Slicer gives it
    the labels' union extent, i 3-13, j 2-16, k 1-7; the Segment Editor's layers span the whole reference image):
    each segment comes back as its own 2x2x2 box (not an 11 x 15 x 7 mask) at its LPS place, with the shared layer
    as its parent grid."""
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.geometry import Grid, Volume
    app = mrml_headless.start()
    import slicer
    from ReirradiationNPCLib import mrml
    grid = Grid((20, 20, 10), (-10.0, -10.0, -5.0), (1.0, 1.0, 2.0))
    lab = np.zeros(grid.shape, np.uint8)
    lab[1:3, 2:4, 3:5] = 1                       # k, j, i
    lab[6:8, 15:17, 12:14] = 2
    vol = mrml.add_volume_node(Volume(lab, grid), "labels", app.scene)
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labelmap")
    slicer.modules.volumes.logic().CreateLabelVolumeFromVolume(app.scene, labelmap, vol)
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
    structures = mrml.structures_from_segmentation(seg)
    assert len(structures) == 2
    for s, (k, j, i) in zip(sorted(structures, key=lambda s: s.name), [(1, 2, 3), (6, 15, 12)]):
        assert s.mask.shape == (2, 2, 2) and int(s.mask.sum()) == 8
        assert s.grid.index_to_physical(np.zeros((1, 3)))[0] == pytest.approx(
            grid.index_to_physical(np.array([[i, j, k]], float))[0])
        assert s.parent is not None and s.parent[0].size == (11, 15, 7)


# ---------------------------------------------------------------------------------------- transforms

@needs_slicer
@pytest.mark.parametrize("kind", ["linear", "grid"])
def test_prior_dose_under_a_translation_is_read_through_it_by_hand(kind, monkeypatch):
    """Prior dose = 30 + 0.5 x Gy (x = LPS mm in its own frame), under a transform whose 'to parent' shifts it by
    +5 mm in LPS x. At an evaluation point p the prior's local point is p - 5 mm, so the dose there is
    30 + 0.5 (x_p - 5) Gy: at x_p = 0 mm, 27.5 Gy; at x_p = 8 mm, 31.5 Gy. ``grid``: the same shift as a
    displacement-field (grid) transform node, as SlicerRT loads a deformable registration."""
    import SimpleITK as sitk
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.geometry import Grid, Volume
    app = mrml_headless.start()
    from ReirradiationNPCLib import mrml
    cur_grid = Grid((9, 5, 5), (-8.0, -4.0, -4.0), (2.0, 2.0, 2.0))
    prior_grid = Grid((40, 12, 12), (-40.0, -12.0, -12.0), (2.0, 2.0, 2.0))
    x_prior = prior_grid.index_to_physical(np.array([[i, 0, 0] for i in range(40)], float))[:, 0]
    prior = np.broadcast_to((30.0 + 0.5 * x_prior)[None, None, :], prior_grid.shape).astype(np.float32)
    prior_node = mrml.add_volume_node(Volume(prior.copy(), prior_grid), "prior dose", app.scene)
    cur_node = mrml.add_volume_node(Volume(np.full(cur_grid.shape, 2.0, np.float32), cur_grid), "current dose",
                                    app.scene)
    if kind == "linear":
        shift = np.eye(4)
        shift[0, 3] = 5.0
        tnode = _linear_transform_node(app.scene, shift)
    else:  # world -> prior local is p - 5 mm in LPS x (the resampling direction)
        monkeypatch.setattr(mrml, "SLAB_POINTS", 100)  # sample the grid transform in several blocks of slices
        field_grid = Grid((12, 8, 8), (-11.0, -7.0, -7.0), (2.0, 2.0, 2.0))
        tnode = mrml.grid_transform_node_from_sitk(sitk.TranslationTransform(3, (-5.0, 0.0, 0.0)), field_grid,
                                                   "deformable", app.scene)
        assert tnode.IsA("vtkMRMLGridTransformNode")
    prior_node.SetAndObserveTransformNodeID(tnode.GetID())
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "structures")
    seg.CreateDefaultDisplayNodes()
    mrml.add_segment(seg, "Brainstem", np.ones((1, 1, 1), bool), (slice(2, 3), slice(2, 3), slice(4, 5)),
                     cur_grid, (1, 1, 0))
    courses = [mrml.CourseInput("prior", prior_node, 30, 24.0), mrml.CourseInput("current", cur_node, 10)]
    prep = mrml.prepare_from_nodes(courses, seg, "synthetic-demo")
    d = prep.courses[0].dose
    x_eval = cur_grid.index_to_physical(np.array([[i, 0, 0] for i in range(9)], float))[:, 0]
    assert x_eval[4] == 0.0 and d[2, 2, 4] == pytest.approx(27.5, abs=1e-4)
    assert x_eval[8] == 8.0 and d[2, 2, 8] == pytest.approx(31.5, abs=1e-4)
    assert np.allclose(d, (30.0 + 0.5 * (x_eval - 5.0))[None, None, :], atol=1e-4)
    assert prep.courses[0].registration == f"transform node {tnode.GetName()}"
    # brainstem voxel at x = 0: prior 27.5 Gy / 30 fx and current 2 Gy / 10 fx at a/b 2 Gy, no credit
    analysis, results, _ = mrml.run_engine(prep)
    expected = _eqd2_by_hand(27.5, 30, 2.0) + _eqd2_by_hand(2.0, 10, 2.0)
    brainstem = next(s for s in results.structures if s.name == "Brainstem")
    assert brainstem.metrics["cumulative"]["Dmean"] == pytest.approx(expected, abs=0.02)


@needs_slicer
def test_synthetic_prior_dose_in_its_own_frame_maps_like_the_registered_one(synthetic_case, engine_run):
    """The synthetic prior dose rendered in the prior CT's frame, under a transform node holding the known offset
    (prior -> current: p = R^T (q - t)), gives the prior dose of the already-registered file within resampling
    error; the inverse transform (a sign error) does not."""
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.io import read_dose, read_structures
    from ReirradiationNPCLib.synthetic import prior_frame_transform
    prep_ref = engine_run[0]
    app = mrml_headless.start()
    from ReirradiationNPCLib import mrml
    case_dir = synthetic_case.parent
    prior_node = mrml.add_volume_node(read_dose(case_dir / "dose_course1_prior_frame.nrrd"), "prior", app.scene)
    cur_node = mrml.add_volume_node(read_dose(case_dir / "dose_course2.nrrd"), "current", app.scene)
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "structures")
    seg.CreateDefaultDisplayNodes()
    for s in read_structures(case_dir / "structures"):
        if s.name in ("Brainstem", "SpinalCord"):
            from ReirradiationNPCLib.geometry import bounding_box
            box = bounding_box(s.mask)
            mrml.add_segment(seg, s.name, s.mask[box], box, s.grid, (1, 0, 0))
    R, t = prior_frame_transform()
    to_parent = np.eye(4)
    to_parent[:3, :3] = R.T
    to_parent[:3, 3] = -R.T @ t
    tnode = _linear_transform_node(app.scene, to_parent)
    prior_node.SetAndObserveTransformNodeID(tnode.GetID())
    # the engine's ITK form of the offset (current -> prior, the resampling direction) gives the same node matrix
    from ReirradiationNPCLib.synthetic import prior_to_current_sitk_transform
    via_sitk = mrml.transform_node_from_sitk(prior_to_current_sitk_transform(), "via sitk", app.scene)
    a, b = vtk_matrix(tnode.GetMatrixTransformToParent()), vtk_matrix(via_sitk.GetMatrixTransformToParent())
    assert np.allclose(a, b, atol=1e-9)
    courses = [mrml.CourseInput("course1", prior_node, 33, 30.0), mrml.CourseInput("course2", cur_node, 54)]
    prep = mrml.prepare_from_nodes(courses, seg, "synthetic-demo")
    registered = prep_ref.courses[0].dose
    # compare inside the brainstem and the cord (deep in the body: away from the dose's cut at the skin)
    inside = np.zeros(registered.shape, bool)
    for st in prep.structures:
        inside[st.box] |= st.mask
    diff = np.abs(prep.courses[0].dose - registered)[inside]
    assert float(registered[inside].max()) > 40.0
    # measured: mean 0.54 Gy, 99th percentile 2.9 Gy (two linear interpolations of a 3 mm grid; the demo's first
    # course holds the cord at ~45 Gy with nodal targets 2 mm beside it, a steep lateral gradient across the cord)
    assert float(np.percentile(diff, 99)) < 4.0 and float(diff.mean()) < 0.8
    # a sign error (the inverse map) misplaces the dose by ~15 mm: large differences
    tnode.SetMatrixTransformToParent(tnode.GetMatrixTransformFromParent())  # swap: now current -> prior
    wrong = mrml.prepare_from_nodes(courses, seg, "synthetic-demo")
    wrong_diff = np.abs(wrong.courses[0].dose - registered)[inside]
    assert float(wrong_diff.mean()) > 2.0  # measured: 4.4 Gy (correct map: 0.06 Gy)


# ------------------------------------------------------------------------------------------- outputs

@needs_slicer
def test_eqd2_volumes_are_dose_volumes_with_the_engine_values(built, engine_run):
    from ReirradiationNPCLib import mrml
    prep, analysis, results, _ = engine_run
    _, _, out = built
    nodes = [out.cumulative] + [out.course_eqd2[c.name] for c in prep.courses]
    for node in nodes:
        assert node.IsA("vtkMRMLScalarVolumeNode")
        assert node.GetAttribute(mrml.DOSE_VOLUME_ATTRIBUTE) == "1"
        display = node.GetDisplayNode()
        assert display.GetColorNodeID() == out.color_table.GetID()
        assert display.GetApplyThreshold() == 1 and display.GetLowerThreshold() == pytest.approx(0.5)
    assert np.array_equal(mrml.volume_from_node(out.cumulative).array, analysis.cumulative.astype(np.float32))
    for c in prep.courses:
        assert np.array_equal(mrml.volume_from_node(out.course_eqd2[c.name]).array, analysis.course_eqd2[c.name])
    assert mrml.volume_from_node(out.cumulative).grid.same_as(prep.grid, tol_mm=1e-6)
    # colour table: 256 colours from blue (0 Gy) to red (top)
    ct = out.color_table
    rgba = [0.0] * 4
    ct.GetColor(0, rgba)
    assert rgba[:3] == pytest.approx([0, 0, 1])
    ct.GetColor(255, rgba)
    assert rgba[:3] == pytest.approx([1, 0, 0])


@needs_slicer
def test_everything_sits_under_one_analysis_folder_in_the_patients_study(built):
    """The analysis folder is a child of a study item (subject hierarchy level Study) that carries the dose-unit
    attributes SlicerRT reads from a dose volume's study ancestor; every output node, plot series included, is
    under that folder; nothing of the analysis sits at the scene root."""
    import slicer
    from ReirradiationNPCLib import mrml
    app, inputs, out = built
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    assert sh.GetItemName(out.folder_item) == "Synthetic analysis"
    study = sh.GetItemParent(out.folder_item)
    assert study == out.study_item and sh.GetItemLevel(study) == "Study"
    assert sh.GetItemLevel(sh.GetItemParent(study)) == "Patient"
    assert sh.GetItemAncestorAtLevel(sh.GetItemByDataNode(out.cumulative), "Study") == study
    assert sh.GetItemAttribute(study, "DicomRtImport.DoseUnitName") == "GY"
    assert sh.GetItemAttribute(study, "DicomRtImport.DoseUnitValue") == "1.0"
    assert sh.GetItemParent(inputs["folder"]) == study
    roles = mrml.find_output_nodes(out.folder_item, app.scene)
    for role, n in (("cumulative_eqd2", 1), ("course_eqd2", 2), ("alpha_beta", 1), ("overlays", 1),
                    ("constraints", 1), ("dvh_data", 1), ("dvh_chart", 1), ("dvh_limits", 1), ("isodose", 1),
                    ("protocol", 1)):
        assert len(roles.get(role, [])) == n, role
    chart = out.dvh_chart
    under = {id(n) for nodes in roles.values() for n in nodes}
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(i)
        assert sh.GetItemParent(sh.GetItemByDataNode(series)) == out.folder_item, series.GetName()
    for cls in ("vtkMRMLPlotSeriesNode", "vtkMRMLTableNode", "vtkMRMLPlotChartNode"):
        for node in slicer.util.getNodesByClass(cls, app.scene):
            item = sh.GetItemByDataNode(node)
            assert item and sh.GetItemParent(item) == out.folder_item, node.GetName()
    assert len(under) >= 8


@needs_slicer
def test_dose_volumes_use_the_dose_colour_table_windowed_at_a_high_percentile(built, engine_run):
    """SlicerRT's dose colour table name (Dose_ColorTable, its singleton tag too); the window's top is the 99.5th
    percentile of the cumulative EQD2 voxels >= 0.5 Gy (computed here with numpy), not the maximum; a colour legend."""
    import slicer
    from ReirradiationNPCLib import mrml
    _, analysis, _, _ = engine_run
    _, _, out = built
    assert out.color_table.GetName() == "Dose_ColorTable" and out.color_table.GetSingletonTag() == "Dose_ColorTable"
    a = analysis.cumulative
    expected_top = float(np.percentile(a[a >= 0.5], 99.5))
    assert expected_top < float(a.max())
    display = out.cumulative.GetDisplayNode()
    assert display.GetWindowLevelMax() if hasattr(display, "GetWindowLevelMax") else True
    assert display.GetWindow() == pytest.approx(expected_top, rel=1e-4)
    assert display.GetLevel() == pytest.approx(expected_top / 2, rel=1e-4)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(out.cumulative)
    assert legend is not None and "EQD2" in legend.GetTitleText()
    assert mrml.display_top_gy(np.zeros((2, 2, 2))) == 1.0


@needs_slicer
def test_isodose_lines_at_the_protocols_cumulative_gy_limits(built, engine_run):
    """One isodose segment per distinct cumulative Gy limit reached; each holds exactly the voxels with cumulative
    EQD2 >= its level; outline only in slice views, hidden in 3D."""
    from ReirradiationNPCLib import mrml
    prep, analysis, _, _ = engine_run
    _, _, out = built
    levels = sorted({float(c.limit) for c in analysis.constraints
                     if c.scope == "cumulative" and c.unit == "Gy" and c.limit})
    reached = [lv for lv in levels if (analysis.cumulative >= lv).any()]
    seg = out.isodose.GetSegmentation()
    assert seg.GetNumberOfSegments() == len(reached) > 2
    structures = {s.name: s for s in mrml.structures_from_segmentation(out.isodose)}
    display = out.isodose.GetDisplayNode()
    for lv in reached:
        name = f"Isodose {lv:g} Gy EQD2"
        s = structures[name]
        from ReirradiationNPCLib.masks import structure_on_grid
        mask, box = structure_on_grid(s, prep.grid)
        full = np.zeros(prep.grid.shape, bool)
        full[box] = mask
        assert np.array_equal(full, analysis.cumulative >= lv), name
        sid = seg.GetSegmentIdBySegmentName(name)
        assert display.GetSegmentOpacity2DFill(sid) == 0.0 and not display.GetSegmentVisibility3D(sid)


@needs_slicer
def test_rerun_replaces_its_own_previous_results(engine_run):
    """Creating the outputs twice under the same analysis name leaves one folder and one set of nodes (the first
    set removed); another name adds a second analysis beside it."""
    import slicer
    from ReirradiationNPCLib import mrml, mrml_headless
    prep, analysis, results, plan = engine_run
    app = mrml_headless.start()
    first = mrml.create_output_nodes(prep, analysis, results, "A", app.scene, planning=plan)
    n_nodes = app.scene.GetNumberOfNodes()
    second = mrml.create_output_nodes(prep, analysis, results, "A", app.scene, planning=plan)
    assert second.replaced == 1 and first.replaced == 0
    assert mrml.analysis_folders(app.scene, "A") == [second.folder_item]
    assert app.scene.GetNumberOfNodes() == n_nodes
    assert not app.scene.IsNodePresent(first.cumulative) and app.scene.IsNodePresent(second.cumulative)
    assert second.study_item == first.study_item  # the same study is reused
    third = mrml.create_output_nodes(prep, analysis, results, "B", app.scene, planning=plan)
    assert sorted(mrml.analysis_folders(app.scene)) == sorted([second.folder_item, third.folder_item])
    assert len(slicer.util.getNodesByClass("vtkMRMLPlotChartNode", app.scene)) == 2


@needs_slicer
def test_outputs_go_under_the_study_of_a_dicom_loaded_dose_and_keep_its_unit_value(engine_run):
    """A current dose under a DICOM study (as SlicerRT loads it, with DoseUnitValue = its DoseGridScaling): the
    analysis goes under that study and the study's existing dose-unit value is not overwritten."""
    import slicer
    from ReirradiationNPCLib import mrml, mrml_headless
    prep, analysis, results, plan = engine_run
    app = mrml_headless.start()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Anon")
    study = sh.CreateStudyItem(patient, "CT study")
    sh.SetItemAttribute(study, "DicomRtImport.DoseUnitName", "GY")
    sh.SetItemAttribute(study, "DicomRtImport.DoseUnitValue", "2.5e-05")
    dose = mrml.add_volume_node(prep_volume(prep), "RTDOSE", app.scene)
    sh.CreateItem(study, dose)
    out = mrml.create_output_nodes(prep, analysis, results, "R", app.scene, planning=plan, reference_node=dose)
    assert out.study_item == study and sh.GetItemParent(out.folder_item) == study
    assert sh.GetItemAttribute(study, "DicomRtImport.DoseUnitValue") == "2.5e-05"


def prep_volume(prep):
    from ReirradiationNPCLib.geometry import Volume
    return Volume(prep.courses[-1].dose.astype(np.float32), prep.grid)


@needs_slicer
def test_protocol_text_travels_with_the_analysis(built, engine_run):
    import hashlib
    prep, _, _, _ = engine_run
    _, _, out = built
    data = Path(prep.protocol.path).read_bytes()
    assert out.protocol_text.GetText() == data.decode("utf-8")
    assert out.protocol_text.GetAttribute("ReirradiationNPC.ProtocolSHA256") == hashlib.sha256(data).hexdigest()


@needs_slicer
def test_violation_segments_are_red_where_organ_eqd2_exceeds_the_limit(built, engine_run, synthetic_case):
    """Brainstem D0.03cc cumulative limit 50 Gy fails in the demo. Its red segment must hold exactly the
    brainstem voxels whose cumulative EQD2 at a/b 2 Gy, computed here by hand from the two course doses
    (no recovery credit for the brainstem), exceeds 50 Gy."""
    from ReirradiationNPCLib import mrml
    prep, analysis, results, _ = engine_run
    _, _, out = built
    seg = out.overlays.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    fails = [c for c in results.constraints if c.status == "fail" and c.unit == "Gy"]
    assert {c.structure for c in fails} >= {"Brainstem", "A_Carotid_L"}
    for c in fails:
        hits = [n for n in names if n.startswith(f"{c.structure} {c.metric} >")]
        assert len(hits) == 1, (c.structure, names)
        color = seg.GetSegment(seg.GetSegmentIdBySegmentName(hits[0])).GetColor()
        assert color[0] > 0.8 and color[1] < 0.2 and color[2] < 0.2
    brain = next(s for s in prep.structures if s.name == "Brainstem")
    by_hand = sum(_eqd2_by_hand(c.dose[brain.box], c.fractions, 2.0) for c in prep.courses)
    expected = brain.mask & (by_hand > 50.0)
    assert expected.sum() > 0
    structs = {s.name: s for s in mrml.structures_from_segmentation(out.overlays)}
    red = structs[next(n for n in names if n.startswith("Brainstem D0.03cc >"))]
    # the same voxels, compared by their LPS positions (the segment comes back on its own labelmap grid)
    got = red.grid.index_to_physical(np.argwhere(red.mask)[:, ::-1].astype(float))
    want = prep.grid.index_to_physical((np.argwhere(expected) + [b.start for b in brain.box])[:, ::-1].astype(float))
    assert got.shape == want.shape
    assert np.allclose(np.array(sorted(map(tuple, got))), np.array(sorted(map(tuple, want))), atol=1e-4)
    # margins: GTV/CTV/PTV semi-transparent, nested volumes
    display = out.overlays.GetDisplayNode()
    m_names = out.planning.margins.names
    gtv, ctv, ptv = (structs[m_names[k]] for k in ("GTV", "CTV", "PTV"))
    assert int(gtv.mask.sum()) < int(ctv.mask.sum()) < int(ptv.mask.sum())
    # every voxel survives: nested segments written into one shared labelmap layer would erase each other
    for key, t in zip(("GTV", "CTV", "PTV"), (gtv, ctv, ptv)):
        assert int(t.mask.sum()) == int(getattr(out.planning.margins, key.lower()).sum())
    for t, want in ((gtv, 0.45), (ctv, 0.2), (ptv, 0.15)):
        assert display.GetSegmentOpacity3D(seg.GetSegmentIdBySegmentName(t.name)) == pytest.approx(want)
    for v in out.violations:  # opaque, so that they stand out through the see-through margins and organs
        assert display.GetSegmentOpacity3D(seg.GetSegmentIdBySegmentName(v.name)) == 1.0


@needs_slicer
def test_structure_segments_keep_every_voxel_and_show_the_organs_in_3d(built, engine_run):
    """Each structure segment holds exactly its mask's voxels (the body overlaps every organ: in one shared
    labelmap layer it erased the brainstem, carotids and cochleae); organs at risk are shown in 3D,
    semi-transparent, in their organ colours; the body and the targets are not shown in 3D."""
    from ReirradiationNPCLib import mrml
    from ReirradiationNPCLib.mrml_scene import ORGAN_OPACITY_3D
    prep = engine_run[0]
    _, inputs, _ = built
    node = inputs["structures"]
    display = node.GetDisplayNode()
    got = {s.name: int(s.mask.sum()) for s in mrml.structures_from_segmentation(node)}
    for s in prep.structures:
        want = int((s.source_mask if s.source_mask is not None else s.mask).sum())
        assert want > 0 and got[s.name] == want, s.name
        sid = node.GetSegmentation().GetSegmentIdBySegmentName(s.name)
        role = s.organ.role if s.organ is not None else None
        assert display.GetSegmentVisibility3D(sid) == (role not in ("body", "target")), s.name
    assert display.GetVisibility3D()
    brain = node.GetSegmentation().GetSegmentIdBySegmentName("Brainstem")
    assert display.GetSegmentOpacity3D(brain) == pytest.approx(ORGAN_OPACITY_3D) and ORGAN_OPACITY_3D < 1
    assert node.GetSegmentation().GetSegment(brain).GetColor() == pytest.approx(mrml.ORGAN_COLORS["brainstem"])
    left, right = (node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName(n)).GetColor()
                   for n in ("OpticNrv_L", "OpticNrv_R"))
    assert left == pytest.approx(right)  # one colour per organ, both sides


@needs_slicer
def test_constraint_table_rows_equal_the_engine_results(built, engine_run):
    from ReirradiationNPCLib import mrml
    _, _, results, _ = engine_run
    _, _, out = built
    table = out.constraints_table.GetTable()
    assert table.GetNumberOfRows() == len(results.constraints) > 0
    col = {table.GetColumnName(i): table.GetColumn(i) for i in range(table.GetNumberOfColumns())}
    assert list(col) == list(mrml.CONSTRAINT_COLUMNS)
    for r, c in enumerate(results.constraints):
        assert col["Status"].GetValue(r) == c.status
        assert col["Organ"].GetValue(r) == c.organ
        assert col["Structure"].GetValue(r) == (c.structure or "")
        assert col["Metric"].GetValue(r) == c.metric and col["Scope"].GetValue(r) == c.scope
        for name, value in (("Value", c.value), ("Limit", c.limit), ("Margin", c.margin)):
            got = col[name].GetValue(r)
            assert (math.isnan(got) if value is None else got == pytest.approx(value, abs=1e-9)), (name, r)
        assert col["Verified"].GetValue(r) == ("yes" if c.verified else "NO")
        assert col["Basis"].GetValue(r) == (c.basis or "") and col["Course"].GetValue(r) == (c.course or "")
        for name, value in (("Value undiscounted", c.value_undiscounted), ("Value credited", c.value_credited)):
            got = col[name].GetValue(r)
            assert (math.isnan(got) if value is None else got == pytest.approx(value, abs=1e-9)), (name, r)
    assert out.constraints_table.GetAttribute("ReirradiationNPC.Verdict") == results.summary["verdict"]


@needs_slicer
def test_constraint_table_shows_basis_both_sums_course_and_unmet_conditions():
    """Hand-made rows in results.json's shape: a credited cumulative row whose interval condition does not hold,
    and a per-course row. The table shows the judged basis, both sums, the course and the unmet condition as text."""
    from types import SimpleNamespace

    from ReirradiationNPCLib import mrml, mrml_headless
    from ReirradiationNPCLib.results import ConstraintResult
    app = mrml_headless.start()
    cumulative = ConstraintResult(
        organ="Brainstem", structure="Brainstem", metric="D0.03cc", scope="cumulative", value=52.5, limit=60.0,
        unit="Gy", status="condition_not_met", source="test", verified=False, margin=7.5, alpha_beta=2.0,
        recovery_credit={"course1": 0.25}, basis="credited", value_undiscounted=61.0, value_credited=52.5,
        conditions=[{"condition": "interval since course course1 >= 24 months", "required": 24.0,
                     "actual": 18.0, "met": False},
                    {"condition": "course course1 D0.03cc <= 54 Gy EQD2", "required": 54.0, "actual": 40.0,
                     "met": True}])
    per_course = ConstraintResult(
        organ="Brainstem", structure="Brainstem", metric="D0.03cc", scope="per_course", value=40.0, limit=54.0,
        unit="Gy", status="pass", source="test", verified=True, margin=14.0, alpha_beta=2.0, course="course1")
    results = SimpleNamespace(constraints=[cumulative, per_course],
                              summary={"verdict": "v", "verdict_code": "conditions_not_met"})
    node = mrml.constraints_table(results, "hand-made", scene=app.scene)
    table = node.GetTable()
    names = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert names == list(mrml.CONSTRAINT_COLUMNS)
    for required in ("Basis", "Value undiscounted", "Value credited", "Course", "Unmet conditions", "Status",
                     "Worst value", "Best value"):  # the robustness columns stay
        assert required in names
    col = {n: table.GetColumn(i) for i, n in enumerate(names)}
    assert table.GetNumberOfRows() == 2
    assert col["Status"].GetValue(0) == "condition_not_met"
    assert col["Basis"].GetValue(0) == "credited"
    assert col["Value"].GetValue(0) == pytest.approx(52.5)
    assert col["Value undiscounted"].GetValue(0) == pytest.approx(61.0)
    assert col["Value credited"].GetValue(0) == pytest.approx(52.5)
    assert col["Course"].GetValue(0) == ""
    assert col["Unmet conditions"].GetValue(0) == "interval since course course1 >= 24 months (actual: 18.00)"
    assert col["Recovery credit"].GetValue(0) == "course1 25%"
    assert col["Status"].GetValue(1) == "pass" and col["Course"].GetValue(1) == "course1"
    assert col["Basis"].GetValue(1) == "" and col["Unmet conditions"].GetValue(1) == ""
    assert math.isnan(col["Value undiscounted"].GetValue(1)) and math.isnan(col["Value credited"].GetValue(1))
    assert col["Value"].GetValue(1) == pytest.approx(40.0)
    assert node.GetAttribute("ReirradiationNPC.VerdictCode") == "conditions_not_met"


@needs_slicer
def test_dvh_chart_has_a_curve_per_organ_and_limit_markers(built, engine_run):
    prep, analysis, _, _ = engine_run
    _, _, out = built
    chart = out.dvh_chart
    names = [chart.GetNthPlotSeriesNode(i).GetName() for i in range(chart.GetNumberOfPlotSeriesNodes())]
    organs = [s.name for s in prep.structures if s.organ is not None and s.organ.role != "body"]
    for o in organs:
        assert f"DVH {o}" in names
    assert "Brainstem D0.03cc limit" in names
    table = out.dvh_table.GetTable()
    col = {table.GetColumnName(i): table.GetColumn(i) for i in range(table.GetNumberOfColumns())}
    for o in organs:
        assert col[o].GetValue(0) == pytest.approx(100.0)  # every voxel receives at least 0 Gy
        values = np.array([col[o].GetValue(r) for r in range(table.GetNumberOfRows())])
        assert np.all(np.diff(values) <= 1e-9)  # cumulative DVH never rises
    # the 50 Gy brainstem limit line is vertical at 50 Gy, from 0 to 100 %
    series = next(chart.GetNthPlotSeriesNode(i) for i in range(len(names)) if names[i] == "Brainstem D0.03cc limit")
    lim = series.GetTableNode().GetTable()
    xs = lim.GetColumnByName("Brainstem D0.03cc limit x")
    ys = lim.GetColumnByName("Brainstem D0.03cc limit y")
    assert [xs.GetValue(0), xs.GetValue(1)] == [50.0, 50.0] and [ys.GetValue(0), ys.GetValue(1)] == [0.0, 100.0]


# -------------------------------------------------------------------------------------------- render

@needs_slicer
def test_offscreen_3d_view_shows_the_violation_in_red(built, engine_run):
    """Render the targets-and-violations segmentation offscreen, looking at the brainstem violation from its side
    away from the PTV (the violation lies on the brainstem's face toward the target), save the PNG, and find the
    violation red at the violation's projection and the semi-transparent margins around it; with the violation
    segments hidden, that place is not red."""
    from ReirradiationNPCLib import mrml_render
    prep = engine_run[0]
    app, _, out = built
    seg = out.overlays
    brain = next(v for v in out.violations if v.structure == "Brainstem" and v.status == "fail")
    centre = F3 @ prep.grid.index_to_physical(
        (np.argwhere(brain.mask).mean(axis=0) + [b.start for b in brain.box])[::-1][None])[0]
    m = out.planning.margins
    ptv_centre = F3 @ m.subgrid.index_to_physical(np.argwhere(m.ptv).mean(axis=0)[::-1][None])[0]

    def reds(a):
        a = a.astype(int)
        return int(((a[..., 0] > 150) & (a[..., 1] < 60) & (a[..., 2] < 60)).sum())

    structures = built[1]["structures"].GetDisplayNode()
    structures.SetVisibility3D(False)  # this close-up is of the targets-and-violations segmentation alone
    view = mrml_render.open_view(app.app_logic, app.scene, size=(640, 480))
    if not view.render_window.SupportsOpenGL():
        view.close()
        structures.SetVisibility3D(True)
        pytest.skip("no OpenGL for offscreen rendering (VTK found neither EGL nor OSMesa: see .ci/run's Mesa packages)")
    try:
        view.look_from(centre - ptv_centre, focus_ras=centre, distance_mm=160.0)
        OUTPUT.mkdir(exist_ok=True)
        png = view.save_png(OUTPUT / "mrml_3d_violation_closeup.png")
        assert png.stat().st_size > 1000
        px = view.pixels()
        col, row = view.world_to_pixel(centre)
        assert abs(col - 320) <= 1 and abs(row - 240) <= 1  # the focus is at the centre of the picture
        near = px[row - 10: row + 11, col - 10: col + 11]
        assert reds(near) >= 50, f"no violation red at pixel {(col, row)}"
        # the margins: a bluish PTV tint (blue channel well above red) around it
        bluish = int((px[..., 2].astype(int) > px[..., 0].astype(int) + 30).sum())
        assert bluish > 500
        display = seg.GetDisplayNode()
        sids = [seg.GetSegmentation().GetSegmentIdBySegmentName(v.name) for v in out.violations]
        for sid in sids:
            display.SetSegmentVisibility(sid, False)
        view.render()
        assert reds(view.pixels()[row - 10: row + 11, col - 10: col + 11]) == 0
        for sid in sids:
            display.SetSegmentVisibility(sid, True)
        view.render()
    finally:
        view.close()
        structures.SetVisibility3D(True)


@needs_slicer
def test_review_3d_view_fits_organs_and_targets_and_shows_the_carotid_violation(built, engine_run):
    """The review picture (the README/extension screenshot): anterior-left-superior camera fitted to the organs at
    risk, targets and violations shown in 3D; white background; the A_Carotid_L violation (the largest fail
    region) red where the camera projects its voxels, and not red there with the violation segments hidden."""
    from ReirradiationNPCLib import mrml_render
    prep = engine_run[0]
    app, inputs, out = built

    def reds(a):
        a = a.astype(int)
        return int(((a[..., 0] > 150) & (a[..., 1] < 60) & (a[..., 2] < 60)).sum())

    view = mrml_render.open_view(app.app_logic, app.scene, size=(800, 600))
    if not view.render_window.SupportsOpenGL():
        view.close()
        pytest.skip("no OpenGL for offscreen rendering (VTK found neither EGL nor OSMesa: see .ci/run's Mesa packages)")
    try:
        points = mrml_render.review_camera(view, inputs["structures"], out.overlays)
        OUTPUT.mkdir(exist_ok=True)
        view.save_png(OUTPUT / "mrml_3d_view.png")
        px = view.pixels()
        assert px.shape == (600, 800, 3)
        # the camera sits anterior (+A), left (-R) and superior (+S) of what it looks at
        cam = view.renderer.GetActiveCamera()
        look = np.subtract(cam.GetPosition(), cam.GetFocalPoint())
        assert look[0] < 0 and look[1] > 0 and look[2] > 0
        # fitted: the brainstem, both temporal lobes and the cord's lower end are among the surface points, every
        # point projects inside the picture, and the points span most of its height or width
        names = {inputs["structures"].GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(inputs["structures"].GetSegmentation().GetNumberOfSegments())}
        assert {"Brainstem", "Lobe_Temporal_L", "SpinalCord", "A_Carotid_L", "Cochlea_L"} <= names
        proj = np.array([view.world_to_pixel(p) for p in points[:: max(1, len(points) // 4000)]])
        assert proj[:, 0].min() >= 0 and proj[:, 0].max() < 800 and proj[:, 1].min() >= 0 and proj[:, 1].max() < 600
        span = max(np.ptp(proj[:, 0]) / 800, np.ptp(proj[:, 1]) / 600)
        assert span > 0.8
        assert (px[:5, :5] >= 250).all() and (px[-5:, -5:] >= 250).all()  # white background
        # the carotid violation: red inside the box its voxel centres project to (from the camera, not guessed)
        v = next(v for v in out.violations if v.status == "fail" and v.structure == "A_Carotid_L")
        kji = np.argwhere(v.mask) + [b.start for b in v.box]
        ras = (F3 @ prep.grid.index_to_physical(kji[:, ::-1].astype(float)).T).T
        cols, rows = np.array([view.world_to_pixel(p) for p in ras]).T
        window = (slice(rows.min() - 2, rows.max() + 3), slice(cols.min() - 2, cols.max() + 3))
        shown = reds(px[window])
        assert shown >= 30, f"no violation red in rows {window[0]}, columns {window[1]}"
        display = out.overlays.GetDisplayNode()
        sids = [out.overlays.GetSegmentation().GetSegmentIdBySegmentName(x.name) for x in out.violations]
        for sid in sids:
            display.SetSegmentVisibility(sid, False)
        view.render()
        try:
            assert reds(view.pixels()[window]) == 0
        finally:
            for sid in sids:
                display.SetSegmentVisibility(sid, True)
            view.render()
    finally:
        view.close()


# -------------------------------------------------------------------------------------------- scene

@needs_slicer
def test_demo_scene_bundle_loads_back_with_every_reference(tmp_path):
    """``reirradiation-npc demo`` (which runs the case like ``run --scene``) writes results/scene.mrb; a fresh
    slicer-core scene reads it with every node and reference: each node reference resolves to a node of the loaded
    scene; dose volumes keep their attribute and colour table; segments, table rows, chart series and their tables,
    the slice views' CT background and EQD2 foreground, and all outputs under the analysis folder."""
    import slicer
    from click.testing import CliRunner
    from ReirradiationNPCLib import mrml, mrml_headless
    from ReirradiationNPCLib.cli import main
    res = CliRunner().invoke(main, ["--quiet", "demo", "-o", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    out_dir = tmp_path / "demo" / "results"
    bundle = out_dir / "scene.mrb"
    assert bundle.is_file() and bundle.stat().st_size > 100_000
    import json
    results = json.loads((out_dir / "results.json").read_text())
    app = mrml_headless.start()
    assert app.scene.ReadFromMRB(str(bundle.resolve()), True)
    scene = app.scene
    checked = 0
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        for r in range(node.GetNumberOfNodeReferenceRoles()):
            role = node.GetNthNodeReferenceRole(r)
            for k in range(node.GetNumberOfNodeReferences(role)):
                ref_id = node.GetNthNodeReferenceID(role, k)
                if ref_id:
                    assert scene.GetNodeByID(ref_id) is not None, (node.GetName(), role, ref_id)
                    checked += 1
    assert checked > 50
    by_role = {}
    for node in slicer.util.getNodes("*", scene=scene).values():
        role = node.GetAttribute(mrml.ROLE_ATTRIBUTE) if hasattr(node, "GetAttribute") else None
        if role:
            by_role.setdefault(role, []).append(node)
    assert len(by_role["course_dose"]) == 2 and len(by_role["course_eqd2"]) == 2
    assert len(by_role["cumulative_eqd2"]) == 1 and len(by_role["reference_image"]) == 1
    # issue 17: one check map per alpha/beta (2, 3, 10) and the cord's credited map, named for what to read on them
    checks = {n.GetAttribute("ReirradiationNPC.CheckMap"): n for n in by_role["check_eqd2"]}
    assert set(checks) == {"cumulative_eqd2_ab2", "cumulative_eqd2_ab2_credit50", "cumulative_eqd2_ab3",
                           "cumulative_eqd2_ab10"}
    assert "SpinalCord" in checks["cumulative_eqd2_ab2_credit50"].GetName()
    assert "largest" in by_role["cumulative_eqd2"][0].GetAttribute("ReirradiationNPC.MapRule")
    for node in by_role["course_dose"] + by_role["course_eqd2"] + by_role["cumulative_eqd2"]:
        assert node.GetAttribute(mrml.DOSE_VOLUME_ATTRIBUTE) == "1"
        assert node.GetImageData() is not None and node.GetImageData().GetNumberOfPoints() > 0
        color = node.GetDisplayNode().GetColorNode()
        assert color is not None and color.GetName() == mrml.DOSE_COLOR_TABLE_NAME
    table = by_role["constraints"][0].GetTable()
    assert table.GetNumberOfRows() == len(results["constraints"])
    values = table.GetColumnByName("Value")
    for r, c in enumerate(results["constraints"]):
        if c["value"] is not None:  # the bundle stores tables as TSV text with 6 significant digits
            assert values.GetValue(r) == pytest.approx(c["value"], rel=1e-5)
    chart = by_role["dvh_chart"][0]
    assert chart.GetNumberOfPlotSeriesNodes() > 10
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(i)
        assert series is not None and series.GetTableNode() is not None
    seg = by_role["overlays"][0].GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert any(n.startswith("Brainstem D0.03cc >") for n in names)
    assert by_role["structures"][0].GetSegmentation().GetSegmentIdBySegmentName("Brainstem")
    ct = by_role["reference_image"][0]
    red = scene.GetSingletonNode("Red", "vtkMRMLSliceCompositeNode")
    assert red.GetBackgroundVolumeID() == ct.GetID()
    assert red.GetForegroundVolumeID() == by_role["cumulative_eqd2"][0].GetID()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(by_role["cumulative_eqd2"][0]))
    assert sh.GetItemAttribute(folder, mrml.ROLE_ATTRIBUTE) == "analysis"
    assert len(mrml.find_output_nodes(folder, scene)["course_eqd2"]) == 2
    # SlicerRT conventions: the cumulative EQD2 under a study item carrying the dose-unit attributes SlicerRT reads
    # (GetAttributeFromItemAncestor(..., "DicomRtImport.DoseUnitName", Study)); dose colour table Dose_ColorTable
    study = sh.GetItemAncestorAtLevel(sh.GetItemByDataNode(by_role["cumulative_eqd2"][0]), "Study")
    assert study and sh.GetItemParent(folder) == study
    assert sh.GetItemAttribute(study, "DicomRtImport.DoseUnitName") == "GY"
    assert float(sh.GetItemAttribute(study, "DicomRtImport.DoseUnitValue")) == 1.0
    for node in by_role["course_dose"] + by_role["course_eqd2"] + by_role["cumulative_eqd2"]:
        assert node.GetDisplayNode().GetColorNode().GetName() == "Dose_ColorTable"
        assert sh.GetItemAncestorAtLevel(sh.GetItemByDataNode(node), "Study") == study
    # every plot series, chart and table of the scene is under the analysis folder (none at the scene root)
    for cls in ("vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode", "vtkMRMLTableNode"):
        nodes = slicer.util.getNodesByClass(cls, scene)
        assert nodes, cls
        for node in nodes:
            assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder, node.GetName()
    assert len(by_role["isodose"]) == 1 and len(by_role["protocol"]) == 1
    assert "protocol_version" in by_role["protocol"][0].GetText() or by_role["protocol"][0].GetText()


def test_scene_flag_without_slicer_core_is_one_clear_line(synthetic_case, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from ReirradiationNPCLib import mrml_headless
    from ReirradiationNPCLib.cli import main
    monkeypatch.setattr(mrml_headless, "unavailable_reason", lambda: "the Python package slicer-core is not installed")
    res = CliRunner().invoke(main, ["run", str(synthetic_case), "-o", str(tmp_path / "o"), "--scene"])
    assert res.exit_code == 2
    assert "slicer-core" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o" / "results.json").exists()
