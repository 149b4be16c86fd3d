"""A Slicer scene bundle (``scene.mrb``) from a command-line run: the reference CT, the course doses as the
analysis used them, the structures, the EQD2 volumes, targets and violation segments, the constraint table and the DVH chart, with slice
views set up for review (CT behind, cumulative EQD2 as a colour wash) and a layout with the DVH plot.

Needs ``slicer-core`` (see :mod:`.mrml_headless`). The bundle is written to a temporary name then moved.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .analysis import Analysis
from .errors import InputError
from .geometry import Grid, Volume
from .pipeline import Prepared
from .results import Results
from .timing import StageClock

log = logging.getLogger(__name__)

#: 3D opacity of the organ-at-risk surfaces: violation segments inside them stay visible through them
ORGAN_OPACITY_3D = 0.3


def check_available() -> None:
    """Raise InputError with an install hint when slicer-core is missing (call before any work)."""
    from .mrml_headless import unavailable_reason
    reason = unavailable_reason()
    if reason:
        raise InputError(f"--scene needs slicer-core: {reason}", field="--scene")


def patient_of(prep: Prepared) -> dict:
    """Patient and study naming for the subject hierarchy: the case file's ``patient`` (id, name), completed from
    the reference CT's DICOM header when it has one (PatientID, PatientName, StudyInstanceUID, StudyDescription)."""
    dicom = (prep.reference_image.meta.get("dicom") or {}) if prep.reference_image is not None else {}
    patient = dict(getattr(prep.case, "patient", None) or {})
    patient.setdefault("id", dicom.get("PatientID") or "")
    patient.setdefault("name", dicom.get("PatientName") or patient.get("id") or "")
    if dicom.get("StudyInstanceUID"):
        patient["study_uid"] = dicom["StudyInstanceUID"]
    patient["study"] = dicom.get("StudyDescription") or "Reirradiation study"
    return patient


def load_inputs(prep: Prepared, folder_name: str = "Inputs", scene=None, study_item: int | None = None) -> dict:
    """The analysis inputs as nodes, under a folder ``folder_name`` in the patient's study: the reference CT, each
    course's physical dose as the analysis used it (mapped onto the evaluation grid, registration applied) and the
    structures as read. Nothing is read again from disk: what is shown is what was computed on."""
    import slicer

    from . import mrml
    scene = scene or slicer.mrmlScene
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = study_item or mrml.ensure_study(scene, None, patient_of(prep))
    folder = sh.CreateFolderItem(study, folder_name)
    nodes: dict = {"folder": folder, "doses": {}, "images": {}}
    if prep.reference_image is not None:
        ct = mrml.add_volume_node(prep.reference_image, "CT (reference)", scene)
        ct.SetAttribute(mrml.ROLE_ATTRIBUTE, "reference_image")
        ct.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        ct.GetDisplayNode().AutoWindowLevelOff()
        ct.GetDisplayNode().SetWindowLevel(400.0, 40.0)
        nodes["images"]["reference"] = ct
        mrml._set_parent(sh, ct, folder)
    for c in prep.courses:
        node = mrml.add_volume_node(Volume(c.dose, prep.grid), f"Dose {c.name} (physical, evaluation grid)", scene)
        mrml._mark_dose(node, "course_dose", c.name)
        node.SetAttribute("ReirradiationNPC.Fractions", str(c.fractions))
        if len(getattr(c, "groups", ())) > 1:  # one EQD2 term per fraction group
            node.SetAttribute("ReirradiationNPC.FractionGroups", c.fractions_text)
        node.SetAttribute("ReirradiationNPC.Registration", c.registration)
        mrml._dose_display(node, mrml.dose_color_table(scene), mrml.display_top_gy(c.dose))
        nodes["doses"][c.name] = node
        mrml._set_parent(sh, node, folder)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Structures")
    seg.CreateDefaultDisplayNodes()
    seg.SetAttribute(mrml.ROLE_ATTRIBUTE, "structures")
    if "reference" in nodes["images"]:
        seg.SetReferenceImageGeometryParameterFromVolumeNode(nodes["images"]["reference"])
    ref_grid = prep.reference_image.grid if prep.reference_image is not None else None
    for idx, s in enumerate(prep.structures):
        mask, grid = s.source_mask, s.source_grid  # the structure as read (cropped to its bounding box)
        if mask is None or grid is None:
            if not s.mask.size or not s.mask.any():
                continue
            mask, box, grid = s.mask, s.box, prep.grid
        else:
            box, grid = _on_reference(mask, grid, s.source_parent, ref_grid)
        if not mask.any():
            continue
        role = s.organ.role if s.organ is not None else None
        sid = mrml.add_segment(seg, s.name, mask, box, grid, mrml.structure_color(s, idx),
                               0.15 if role == "body" else ORGAN_OPACITY_3D)
        seg.GetDisplayNode().SetSegmentOpacity2DFill(sid, 0.15 if role == "body" else 0.5)
        # in 3D: the organs at risk, semi-transparent; not the body (it would hide everything) nor the targets
        # (the targets-and-violations segmentation shows GTV/CTV/PTV)
        seg.GetDisplayNode().SetSegmentVisibility3D(sid, role not in ("body", "target"))
    if seg.GetSegmentation().GetNumberOfSegments():
        seg.CreateClosedSurfaceRepresentation()
    seg.GetDisplayNode().SetVisibility3D(True)
    nodes["structures"] = seg
    mrml._set_parent(sh, seg, folder)
    return nodes


def _on_reference(mask: np.ndarray, grid: Grid, parent: tuple[Grid, tuple[slice, slice, slice]] | None,
                  ref: Grid | None) -> tuple[tuple[slice, slice, slice], Grid]:
    """Where a structure's own mask (on ``grid``) goes in the scene: (k, j, i box, grid of that box). A crop of the
    reference CT's grid is placed on that grid (the same voxels): a crop of a mask file on that grid by its exact box
    (``parent``, io.Structure.parent); a box of that grid's voxels without one (an RTSTRUCT rasterised on the CT's
    own lattice) by :func:`_crop_offset`. Anything else on its own grid."""
    if parent is not None and ref is not None and parent[0].same_as(ref):
        return parent[1], ref
    offset = _crop_offset(grid, ref)
    if offset is not None:
        return tuple(slice(o, o + n) for o, n in zip(offset[::-1], mask.shape)), ref
    return (slice(0, mask.shape[0]), slice(0, mask.shape[1]), slice(0, mask.shape[2])), grid


def _crop_offset(grid: Grid, ref: Grid | None, tol_mm: float = 1e-3) -> tuple[int, int, int] | None:
    """(i, j, k) index of ``grid``'s first voxel in ``ref`` when ``grid`` is a box of ``ref``'s voxels (same spacing
    and direction, origin on a voxel centre of ``ref`` within ``tol_mm``, inside it); else None. Found by rounding:
    only for boxes whose offset is not known (a crop's is: :func:`_on_reference`)."""
    if ref is None or not np.allclose(grid.spacing, ref.spacing, atol=1e-6) \
            or not np.allclose(grid.direction, ref.direction, atol=1e-6):
        return None
    idx = ref.physical_to_index(np.asarray([grid.origin], dtype=float))[0]
    off = np.rint(idx).astype(int)
    back = ref.index_to_physical(off[None, :].astype(float))[0]
    if np.abs(back - np.asarray(grid.origin)).max() > tol_mm or np.any(off < 0) \
            or np.any(off + np.asarray(grid.size) > np.asarray(ref.size)):
        return None
    return tuple(int(v) for v in off)


def _review_layout(scene, background, foreground, chart) -> None:
    """Slice views with the CT behind and the cumulative EQD2 as a half-transparent foreground; a layout with
    the DVH plot. Slicer takes these singleton view nodes over when it opens the scene."""
    import slicer
    for tag in ("Red", "Yellow", "Green"):
        comp = scene.GetSingletonNode(tag, "vtkMRMLSliceCompositeNode")
        if comp is None:
            comp = slicer.vtkMRMLSliceCompositeNode()
            comp.SetSingletonTag(tag)
            comp.SetLayoutName(tag)
            scene.AddNode(comp)
        if background is not None:
            comp.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            comp.SetForegroundVolumeID(foreground.GetID())
            comp.SetForegroundOpacity(0.5)
    if chart is not None:
        view = scene.GetSingletonNode("PlotView1", "vtkMRMLPlotViewNode")
        if view is None:
            view = slicer.vtkMRMLPlotViewNode()
            view.SetSingletonTag("PlotView1")
            view.SetLayoutName("PlotView1")
            scene.AddNode(view)
        view.SetPlotChartNodeID(chart.GetID())
    layout = scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode")
    if layout is None:
        # the layout logic registers Slicer's standard layouts in a new layout node
        layout_logic = slicer.vtkMRMLLayoutLogic()
        layout_logic.SetMRMLScene(scene)
        layout = layout_logic.GetLayoutNode()
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView)


def add_check_maps(prep: Prepared, analysis: Analysis, outputs, scene) -> list:
    """The check maps (one α/β and credit over the whole grid; docs/outputs.md) as dose volumes in the output
    folder, role ``check_eqd2``, each named for the structures to read on it; the display map is labelled with its
    rule. Computed one at a time from the course doses."""
    from . import mrml
    from .analysis import MAP_RULE, check_maps
    import slicer
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if outputs.cumulative is not None:
        outputs.cumulative.SetAttribute("ReirradiationNPC.MapRule", "display map (viewing): " + MAP_RULE)
    maps = analysis.check_maps if analysis.check_maps is not None else check_maps(
        prep.courses, prep.structures, prep.protocol)[0]
    nodes = []
    ctab = mrml.dose_color_table(scene)
    for m in maps:
        arr = m.compute(prep.courses)
        label = "undiscounted" if not m.credited else "credit " + "/".join(f"{100 * r:g}%" for r in m.credits.values())
        node = mrml.add_volume_node(Volume(arr, prep.grid), f"EQD2 check a/b {m.alpha_beta:g} {label}: "
                                    + ", ".join(m.structures), scene)
        mrml._mark_dose(node, "check_eqd2")
        node.SetAttribute("ReirradiationNPC.CheckMap", m.stem)
        node.SetAttribute("ReirradiationNPC.Description", m.description())
        mrml._dose_display(node, ctab, float(arr.max()) if arr.size else 1.0)
        mrml._set_parent(sh, node, outputs.folder_item)
        nodes.append(node)
        del arr
    return nodes


def build_scene(prep: Prepared, analysis: Analysis, results: Results, name: str = "Reirradiation analysis",
                scene=None, progress: Callable[[str], None] | None = None, planning=None):
    """Inputs and outputs as nodes in ``scene`` (default: slicer.mrmlScene). Returns (inputs, outputs).

    ``planning``: the engine's planning aids if already computed (else computed by the MRML layer)."""
    import slicer

    from . import mrml
    scene = scene or slicer.mrmlScene
    study = mrml.ensure_study(scene, None, patient_of(prep))
    inputs = load_inputs(prep, scene=scene, study_item=study)
    outputs = mrml.create_output_nodes(prep, analysis, results, name, scene, progress, planning=planning,
                                       study_item=study)
    outputs.check_maps = add_check_maps(prep, analysis, outputs, scene)
    background = inputs["images"].get("reference")
    _review_layout(scene, background, outputs.cumulative, outputs.dvh_chart)
    return inputs, outputs


def write_bundle(scene, path: Path) -> Path:
    """Write ``scene`` as a Slicer data bundle (.mrb) at ``path`` (written in a temporary folder, then moved).

    VTK's messages while zipping go to the debug log, not to the terminal.
    """
    import vtk
    path = Path(path).resolve()  # Slicer requires a full path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".scene-", dir=path.parent))
    previous = vtk.vtkOutputWindow.GetInstance()
    capture = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(capture)
    try:
        tmp = tmp_dir / path.name
        ok = scene.WriteToMRB(str(tmp))
        vtk.vtkOutputWindow.SetInstance(previous)
        log.debug("VTK while writing %s:\n%s", path, capture.GetOutput())
        if not ok or not tmp.is_file():
            raise RuntimeError(f"Slicer could not write the scene bundle {path}")
        os.replace(tmp, path)
    finally:
        vtk.vtkOutputWindow.SetInstance(previous)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


SCENE_FILE = "scene.mrb"
SCENE_DESCRIPTION = ("3D Slicer scene bundle: CT, course doses, EQD2 volumes under the patient's study, structures, "
                     "targets and violations, isodose lines, constraint table, DVH chart, the protocol used")


def scene_output(stage: Path, prep: Prepared, analysis: Analysis, results: Results, planning=None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """An extra-output writer for ``pipeline.write_outputs``/``run_case``: ``scene.mrb`` in the staging folder.
    Called at the edge (the CLI passes it), so the pipeline never imports the MRML layer."""
    write_scene(prep, analysis, results, Path(stage) / SCENE_FILE, progress, planning=planning)
    return {SCENE_FILE: SCENE_DESCRIPTION}


def write_scene(prep: Prepared, analysis: Analysis, results: Results, path: Path,
                progress: Callable[[str], None] | None = None, planning=None) -> Path:
    """Build a fresh headless scene for this analysis and write it to ``path`` (.mrb)."""
    from .mrml_headless import start
    say = progress or (lambda m: None)
    say("building the Slicer scene")
    app = start()
    name = f"Reirradiation {prep.case.patient.get('id', '')}".strip()
    build_scene(prep, analysis, results, name=name, scene=app.scene, progress=progress, planning=planning)
    say("writing scene.mrb")
    return write_bundle(app.scene, path)


def can_write_in_child_process() -> bool:
    """Whether :class:`SceneInChildProcess` can run here (:func:`.child_process.available`: Linux; not Windows, and
    not macOS, where forking a process that has loaded system frameworks is unsafe)."""
    from .child_process import available
    return available()


def _scene_in_child(stage, prep, analysis, results, planning) -> dict:
    """What the scene's child process runs (:class:`SceneInChildProcess`)."""
    try:
        from .mrml_headless import unavailable_reason
        reason = unavailable_reason()  # imported here, beside the report, when the parent has not
        if reason:
            return {"unavailable": reason}
        clock = StageClock()  # the child's own stages (silent: the parent announced them)
        desc = scene_output(stage, prep, analysis, results, planning, clock)
        return {"files": desc, "timings": clock.timings()}
    finally:
        from .mrml_headless import remove_cache_dir
        remove_cache_dir()  # the child ends with os._exit: no atexit handler runs


#: the early scene process's import, in results.json timings
EARLY_IMPORT_STAGE = "importing slicer-core (scene process, from the start of the run)"


def _early_scene_process(inbox) -> dict:
    """The scene's process started early (``SceneInChildProcess(early=True)``): it imports slicer-core and the
    MRML layer (1.5-2 s) while the parent computes, then builds and writes the scene from the staging folder and
    analysis the parent sends (pickled, ~60 MB for the demo, ~0.1 s). Nothing sent: nothing built."""
    t0 = time.perf_counter()
    from .mrml_headless import unavailable_reason
    reason = unavailable_reason()
    if reason:
        return {"unavailable": reason}
    from . import mrml  # noqa: F401 - the MRML layer's imports, ahead of the analysis
    imported = time.perf_counter() - t0
    msg = inbox()
    if msg is None:  # the run ended before its outputs (an error): the parent reports it
        return {"files": {}, "timings": {}}
    out = _scene_in_child(*msg)
    if "timings" in out:
        out["timings"] = {EARLY_IMPORT_STAGE: imported, **out["timings"]}
    return out


class SceneInChildProcess:
    """``scene.mrb`` written by a forked child process while the parent writes the report (issue 15: the two are
    independent, and on 2 cores they overlap). An extra output for ``pipeline.write_outputs`` with a ``start``:
    the child (:class:`.child_process.Child`) gets a copy of the computed analysis (fork: nothing is pickled or
    computed again), builds the scene and writes the bundle into the staging folder, and returns its files and
    stage timings; the parent waits for it after the report. A failure in the child is raised in the parent
    (InputError as InputError); when slicer-core cannot be imported in the child, no scene is written and
    ``unavailable`` says why. Linux only (:func:`can_write_in_child_process`); elsewhere use :func:`scene_output`."""

    def __init__(self, early: bool = False):
        #: why no scene was written (slicer-core could not be imported in the child), else None
        self.unavailable: str | None = None
        # ``early``: fork the child now, so that it imports slicer-core while the run computes (the demo, whose
        # parent does not import it); it is then sent the analysis at :meth:`start`. :meth:`close` ends it if the
        # run fails before its outputs.
        self._early = None
        if early:
            from .child_process import Child
            try:
                self._early = Child(_early_scene_process, inbox=True)
            except OSError:   # e.g. ENOMEM: forked again at start() (which says so if it fails again)
                log.debug("the Slicer scene's process could not be started early", exc_info=True)

    def __call__(self, stage, prep, analysis, results, planning=None, progress=None) -> dict:
        return scene_output(stage, prep, analysis, results, planning, progress)

    def start(self, stage, prep, analysis, results, planning=None, progress=None):
        from .child_process import Child, ChildError
        say = progress or (lambda m: None)
        beside = "building the Slicer scene and writing scene.mrb (in a child process, beside the report)"
        if self._early is not None:
            say(beside)
            child, self._early = self._early, None
            try:
                child.send((stage, prep, analysis, results, planning))
            except OSError:  # it ended without reading (slicer-core could not be imported): finish() says why
                log.debug("the early scene process ended before it was sent the run", exc_info=True)
        else:
            try:
                child = Child(_scene_in_child, stage, prep, analysis, results, planning)
            except OSError as exc:   # e.g. ENOMEM: the scene is built here, after the report
                log.warning("the Slicer scene's process could not be started (%s: %s); the scene is built in this "
                            "process", type(exc).__name__, exc)
                return lambda: self._here(stage, prep, analysis, results, planning, progress)
            say(beside)

        def finish() -> dict:
            try:
                msg = child.result()
            except BaseException as exc:
                if not isinstance(exc, ChildError) or exc.kind in ("died", "timeout"):
                    # it died, or was killed (interrupted while waiting): its cache folder is left to remove
                    from .mrml_headless import remove_cache_dir_of
                    remove_cache_dir_of(child.pid)
                if not isinstance(exc, ChildError):
                    raise
                if exc.input_error:
                    raise InputError(f"scene.mrb: {exc}", field="--scene") from None
                raise RuntimeError(f"scene.mrb could not be written: {exc}") from None
            if "unavailable" in msg:  # slicer-core could not be imported: no scene (the caller says so)
                self.unavailable = msg["unavailable"]
                return {}
            add = getattr(progress, "add", None)
            if callable(add):
                for k, v in msg.get("timings", {}).items():
                    add(k if k == EARLY_IMPORT_STAGE else f"{k} (child process, beside the report)", v)
            return msg["files"]

        return finish

    def _here(self, stage, prep, analysis, results, planning, progress) -> dict:
        """The scene built in this process (no child process could be forked); as in the child, a slicer-core
        that cannot be imported means no scene, and ``unavailable`` says why."""
        from .mrml_headless import unavailable_reason
        reason = unavailable_reason()
        if reason:
            self.unavailable = reason
            return {}
        return scene_output(stage, prep, analysis, results, planning, progress)

    def close(self) -> None:
        """End an early child that was never sent a run (the run failed before writing its outputs)."""
        if self._early is not None:
            self._early.kill()   # (it makes its cache folder only once it is sent a run: none to remove)
            self._early = None
