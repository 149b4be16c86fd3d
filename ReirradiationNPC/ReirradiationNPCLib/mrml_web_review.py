"""``reirradiation-npc review``: a run's results in the browser on Kitware's trame-slicer (Slicer's MRML scene and
views rendered on the server, streamed to the page). Read-only: the run's folder is only read (scene.mrb is unzipped
into a temporary folder by trame-slicer's loader); nothing is written into it, nor into the run's inputs.

Page: the verdict (with ``verdict_code``) at the top; axial, coronal, sagittal and 3D views of the current CT with a
colour wash (cumulative EQD2 by default; each course's EQD2 and physical dose, headroom and remaining dose from a
selector), isodose lines at the protocol's limit levels (toggle), the structures, targets and violations (red); the
constraint table beside them. Clicking a row centres the slice views on that structure's worst voxel of the
cumulative EQD2 map and highlights its violation regions (the others dimmed).

The DVH of the selected organ and the registration check are :class:`.mrml_web_panels.ReviewPanels`
(``app.review_panels``), built above the table. Further panels: ``PANELS`` (or ``ReviewApp(run, panels=[...])``):
a callable ``panel(app)`` called while the side column is built, below the table; it builds its trame UI there and
may append callbacks ``callback(app, row, found)`` to ``app.on_row_selected`` (``found``: (ras, Gy) of the worst
voxel or None).

Needs the ``review`` extra (``pip install "reirradiation-npc[review]"``); the engine never imports this module.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import bounding_box
from .review_results import (RunOutput, WashChoice, isodose_levels, load_run, recorded_input, sort_wash_choices,
                             table_rows, verdict_line, violation_segments, wash_choice, wash_kind_of_file,
                             worst_point)
from .stop_signals import sigterm_as_ctrl_c

log = logging.getLogger(__name__)

EXTRA_HINT = 'pip install "reirradiation-npc[review]"  (trame-slicer[standalone], playwright)'
LAYOUT_ID = "Quad View"
WASH_OPACITY = 0.5
#: 3D opacities: organs see-through (as in scene.mrb), the GTV and the violations opaque, CTV/PTV faint so that the
#: GTV and the violations inside them stay visible
ORGAN_OPACITY_3D = 0.3
TARGET_OPACITY_3D = {"GTV": 1.0, "CTV": 0.25, "PTV": 0.12}
#: when a row is selected: the other organs' and violations' opacity (3D and slice fill)
DIMMED_3D = 0.06
DIMMED_2D = 0.05
SELECTED_ORGAN_3D = 0.5
#: threshold window of the headroom map: all finite values (NaN = no point limit there is not washed)
HEADROOM_SPAN = 1.0e6
#: extra panels for the side column (callables ``panel(app)``), built in this order below the table
PANELS: list = []


def check_available() -> None:
    """InputError naming the pip extra when trame-slicer (or slicer-core under it) cannot be imported."""
    try:
        import trame  # noqa: F401
        import trame_slicer.core  # noqa: F401
        import trame_slicer.rca_view  # noqa: F401
        import slicer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken slicer-core/vtk combination
        raise InputError(f"review needs the 'review' extra ({type(exc).__name__}: {exc}); install it with "
                         f"{EXTRA_HINT}", field="review") from None


class ReviewApp:
    """The trame server, the Slicer application under it and the review page."""

    def __init__(self, run: RunOutput, server=None, panels=None):
        from trame.app import get_server
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.run = run
        self.server = server or get_server(None, client_type="vue3")
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.rows = table_rows(run.results)
        self.extra_panels = list(PANELS if panels is None else panels)
        self.on_row_selected: list = []
        self.cumulative = None
        self.ct = None
        self.structures = None
        self.overlays: list = []        # segmentation nodes with the targets and the violations
        self.isodose = None
        self.wash: dict = {}            # key -> (WashChoice, volume node)
        self.wash_key = None
        self.scene_note = ""
        self._worst_cache: dict = {}
        self._opacity_3d: dict = {}     # (segmentation node ID, segment ID) -> 3D opacity before highlighting
        from .mrml_web_panels import ReviewPanels
        self.review_panels = ReviewPanels(self)  # DVH of the selected organ, registration check (review_panels.py)
        self._build_ui()
        self.layout_manager.set_layout(LAYOUT_ID)
        self._load()
        self._show()
        self._prepare_3d()
        self._reset_3d()
        state = self.server.state
        state.wash_items = [{"key": c.key, "label": c.label} for c, _ in self.wash.values()]
        state.isodose_available = self.isodose is not None
        state.isodose_levels = ", ".join(f"{x:g}" for x in isodose_levels(run.results))
        state.scene_note = self.scene_note
        if self.wash_key is not None:
            state.wash_key = self.wash_key
            self.set_wash(self.wash_key)
        state.change("wash_key")(self._on_wash_key)
        state.change("wash_opacity")(self._on_opacity)
        state.change("wash_threshold")(self._on_threshold)
        state.change("isodose_on")(self._on_isodose)

    # ------------------------------------------------------------------------------------------------ loading
    def _load(self) -> None:
        scene = self.slicer_app.scene
        if self.run.scene is not None:
            ok = self.slicer_app.io_manager.load_scene(str(self.run.scene))
            # Import reports failure for any node it could not fully restore (e.g. a plot or a node class this
            # slicer-core has no reader for) while the volumes and segmentations are loaded: judge by what is there
            if scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0:
                raise InputError(f"{self.run.scene}: Slicer could not load this scene bundle", field="RESULTS_DIR")
            if not ok:
                log.warning("scene.mrb loaded with warnings (some nodes may be missing)")
        else:
            self._load_without_scene()
        from .mrml import ROLE_ATTRIBUTE
        self.cumulative = self._find_cumulative(scene)
        self.ct = self.ct or self._find_ct(scene)
        self.structures = self.structures or self._find_role(scene, "vtkMRMLSegmentationNode", "structures",
                                                             "Structures")
        self.overlays = [n for n in scene.GetNodesByClass("vtkMRMLSegmentationNode")
                         if n.GetAttribute(ROLE_ATTRIBUTE) == "overlays"]
        self.isodose = self.isodose or self._find_role(scene, "vtkMRMLSegmentationNode", "isodose")
        self._collect_wash_maps(scene)

    def _load_without_scene(self) -> None:
        """No scene.mrb: the NRRD outputs, and the CT and structures from the run's inputs when they are reachable
        and unchanged since the run (sha256 of results.json provenance). Nothing is written anywhere."""
        from . import mrml
        from .mrml import ROLE_ATTRIBUTE
        scene = self.slicer_app.scene
        io = self.slicer_app.io_manager
        notes = ["No scene.mrb in the results folder: the NRRD outputs are shown."]
        vols = [p for p in self.run.nrrd if not p.name.endswith(".seg.nrrd")]
        segs = [p for p in self.run.nrrd if p.name.endswith(".seg.nrrd")]
        for p in vols:
            found = wash_kind_of_file(p.name)
            if found is None:
                continue  # check maps, alpha/beta, worst case: not wash choices
            node = io.load_volumes([str(p)])
            node = node[0] if isinstance(node, (list, tuple)) else node
            if node is None:
                continue
            kind, course = found
            node.SetAttribute(ROLE_ATTRIBUTE, kind)
            if course:
                node.SetAttribute(mrml.COURSE_ATTRIBUTE, course)
            node.SetName(p.name[: -len(".nrrd")])
        for p in segs:
            # the targets and the violations; not the robustness worst case nor the remaining-dose regions (they
            # are other questions: they would be mistaken for the violations)
            if p.name not in ("margins.seg.nrrd", "violations.seg.nrrd"):
                continue
            node = io.load_segmentation(str(p))
            if node is not None:
                node.SetAttribute(ROLE_ATTRIBUTE, "overlays")
        cum = self._find_cumulative(scene)
        cum_array = None
        if cum is not None:
            cum_volume = mrml.volume_from_node(cum)   # one copy of the map, for its window and its isodose lines
            cum_array = cum_volume.array
            top = mrml.display_top_gy(cum_array)
            ctab = mrml.dose_color_table(scene)
            for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
                role = n.GetAttribute(ROLE_ATTRIBUTE)
                if role in ("cumulative_eqd2", "course_eqd2"):
                    mrml._dose_display(n, ctab, top)  # one window for all EQD2 maps, as in scene.mrb
                elif role in ("headroom", "remaining_dose"):
                    mrml.limit_map_display(n, mrml.volume_from_node(n).array, role, scene)
            levels = isodose_levels(self.run.results)
            if levels:  # in memory only, the same rule as the scene's isodose lines
                self.isodose = mrml.isodose_segmentation(cum_array, cum_volume.grid, levels, ctab, top,
                                                         "isodose lines", scene)
                if self.isodose is not None:
                    self.isodose.CreateDefaultDisplayNodes()
        notes.append(self._load_inputs_read_only())
        self.scene_note = " ".join(n for n in notes if n)

    def _load_inputs_read_only(self) -> str:
        """The reference CT and structures of the run from results.json provenance, if reachable and unchanged.
        Returns the sentence the page shows about it."""
        from . import mrml
        from .dicom_rt import load_image_any, load_structures_any
        from .provenance import path_sha256
        from .mrml import ROLE_ATTRIBUTE
        scene = self.slicer_app.scene
        ct_entry = recorded_input(self.run.results, "reference.image")
        if ct_entry is None:
            return ("The run recorded no reference CT (results.json provenance): no CT underlay, and clicking a "
                    "row cannot centre on an organ.")
        path, sha = ct_entry
        if not path.exists():
            return (f"The run's CT ({path}) is not reachable from here: no CT underlay, and clicking a row cannot "
                    f"centre on an organ. Run with --scene for review.")
        if sha and path_sha256(path) != sha:
            return (f"The run's CT ({path}) has changed since the run (sha256 differs from results.json): not "
                    f"shown. Run with --scene for review.")
        try:
            ct = load_image_any(path, "reference.image")
        except InputError as exc:
            return f"The run's CT could not be read ({exc}): no CT underlay."
        node = mrml.add_volume_node(ct, "CT (reference, read from the run's inputs)", scene)
        node.SetAttribute(ROLE_ATTRIBUTE, "reference_image")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        display.AutoWindowLevelOff()
        display.SetWindowLevel(400.0, 40.0)
        self.ct = node
        text = f"CT underlay read from the run's input {path} (unchanged since the run: sha256 matches)."
        st_entry = recorded_input(self.run.results, "reference.structures")
        if st_entry is None or not st_entry[0].exists():
            return text + " The structures are not reachable: clicking a row cannot centre on an organ."
        st_path, st_sha = st_entry
        if st_sha and path_sha256(st_path) != st_sha:
            return text + f" The structures ({st_path}) changed since the run: not shown."
        try:
            structures = load_structures_any(st_path, "reference.structures", lattice=ct.grid)
        except (InputError, ValueError) as exc:
            return text + f" The structures could not be read ({exc})."
        roles = {s.get("name"): s.get("role") for s in self.run.results.get("structures") or []
                 if isinstance(s, dict)}
        seg = self._structures_node([s for s in structures if s.mask.any()], roles)
        if seg is None:
            return text + " No structure in the run's structures input."
        self.structures = seg
        return text + f" Structures read from {st_path} (unchanged)."

    def _structures_node(self, structures: list, roles: dict):
        """The structures (engine Structures on their own grids) as a segmentation node, in memory."""
        from . import mrml
        from .mrml import ROLE_ATTRIBUTE
        if not structures:
            return None
        seg = self.slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Structures")
        seg.CreateDefaultDisplayNodes()
        seg.SetAttribute(ROLE_ATTRIBUTE, "structures")
        if self.ct is not None:
            seg.SetReferenceImageGeometryParameterFromVolumeNode(self.ct)
        display = seg.GetDisplayNode()
        for idx, s in enumerate(structures):
            role = roles.get(s.name)
            # the structure's bounding box only (a mask file is a whole CT-size array)
            box = bounding_box(s.mask) or (slice(0, 1),) * 3
            sid = mrml.add_segment(seg, s.name, s.mask[box], box, s.grid,
                                   tuple(s.color or mrml.structure_color(s, idx)),
                                   0.15 if role == "body" else ORGAN_OPACITY_3D)
            display.SetSegmentOpacity2DFill(sid, 0.15 if role == "body" else 0.5)
            display.SetSegmentVisibility3D(sid, role not in ("body", "target"))
        return seg

    @staticmethod
    def _find_role(scene, cls: str, role: str, name: str | None = None):
        from .mrml import ROLE_ATTRIBUTE
        for n in scene.GetNodesByClass(cls):
            if n.GetAttribute(ROLE_ATTRIBUTE) == role:
                return n
        return scene.GetFirstNodeByName(name) if name else None

    @staticmethod
    def _find_volume(scene, role: str, fallback):
        """The scalar volume of the scene with ``role``, else the first for which ``fallback(node)`` holds."""
        node = ReviewApp._find_role(scene, "vtkMRMLScalarVolumeNode", role)
        if node is not None:
            return node
        return next((n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if fallback(n)), None)

    @staticmethod
    def _find_cumulative(scene):
        # NRRD fallback: the file name is the node name
        return ReviewApp._find_volume(scene, "cumulative_eqd2",
                                      lambda n: n.GetName() in ("cumulative_eqd2", "cumulative_eqd2.nrrd"))

    @staticmethod
    def _find_ct(scene):
        from .mrml import DOSE_VOLUME_ATTRIBUTE
        return ReviewApp._find_volume(scene, "reference_image", lambda n: n.GetName().startswith("CT")
                                      and not n.GetAttribute(DOSE_VOLUME_ATTRIBUTE))

    def _collect_wash_maps(self, scene) -> None:
        """The selector's maps: the volumes of the scene by their role (a map the run did not write is absent)."""
        from .mrml import COURSE_ATTRIBUTE, ROLE_ATTRIBUTE
        choices = []
        for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
            role = n.GetAttribute(ROLE_ATTRIBUTE)
            if role in ("course_eqd2", "course_dose") and n.GetAttribute(COURSE_ATTRIBUTE):
                choices.append((wash_choice(role, n.GetAttribute(COURSE_ATTRIBUTE)), n))
            elif role in ("headroom", "remaining_dose") or n is self.cumulative:
                choices.append((wash_choice("cumulative_eqd2" if n is self.cumulative else role), n))
        ordered = sort_wash_choices([c for c, _ in choices])
        nodes = {c.key: n for c, n in choices}
        self.wash = {c.key: (c, nodes[c.key]) for c in ordered}
        self.wash_key = ordered[0].key if ordered else None

    # ------------------------------------------------------------------------------------------------- display
    def _prepare_3d(self) -> None:
        """Closed surfaces built in memory (never saved) for the structures, targets and violations; organs
        semi-transparent, the GTV and the violations opaque, CTV/PTV faint; isodose lines not in 3D.

        Called after the slice views are set up (``_show``). Every segmentation's labelmaps are merged into as few
        layers as the overlaps allow (in memory). Segmentations made or read before the slice views were fitted
        (the no-scene path) otherwise kept 2D pipelines that composited a large segment's fill (the body) as if
        opaque, darkening everything under it; the merge after the fit rebuilds them (found by trial, see
        docs/review.md)."""
        for node in [self.structures, self.isodose] + self.overlays:
            if node is not None:
                node.GetSegmentation().CollapseBinaryLabelmaps(False)
        if self.structures is not None:
            self.structures.CreateClosedSurfaceRepresentation()
            display = self.structures.GetDisplayNode()
            if display is not None:
                display.SetVisibility3D(True)
                seg = self.structures.GetSegmentation()
                for i in range(seg.GetNumberOfSegments()):
                    sid = seg.GetNthSegmentID(i)
                    if display.GetSegmentVisibility3D(sid):
                        display.SetSegmentOpacity3D(sid, ORGAN_OPACITY_3D)
        for overlay in self.overlays:
            seg = overlay.GetSegmentation()
            seg.SetConversionParameter("Smoothing factor", "0.0")  # a few-voxel violation stays those voxels
            overlay.CreateClosedSurfaceRepresentation()
            display = overlay.GetDisplayNode()
            if display is not None:
                display.SetVisibility3D(True)
                for i in range(seg.GetNumberOfSegments()):
                    sid = seg.GetNthSegmentID(i)
                    target = seg.GetNthSegment(i).GetName().split(" ")[0]
                    display.SetSegmentVisibility3D(sid, True)
                    display.SetSegmentOpacity3D(sid, TARGET_OPACITY_3D.get(target, 1.0))
        if self.isodose is not None and self.isodose.GetDisplayNode() is not None:
            self.isodose.GetDisplayNode().SetVisibility3D(False)
        for node in [self.structures] + self.overlays:
            if node is None or node.GetDisplayNode() is None:
                continue
            seg, display = node.GetSegmentation(), node.GetDisplayNode()
            for i in range(seg.GetNumberOfSegments()):
                sid = seg.GetNthSegmentID(i)
                self._opacity_3d[(node.GetID(), sid)] = (display.GetSegmentOpacity3D(sid),
                                                        display.GetSegmentOpacity2DFill(sid),
                                                        display.GetSegmentOpacity2DOutline(sid))

    def _show(self) -> None:
        """CT in the background of every slice view (else the cumulative EQD2), fitted to the content."""
        bg = self.ct or self.cumulative
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_background_volume_id(bg.GetID() if bg else None)
            view.set_foreground_volume_id(None)
            view.set_foreground_opacity(WASH_OPACITY)
            view.fit_view_to_content()
        self._render()

    def _reset_3d(self) -> None:
        """3D camera on the content (after the closed surfaces exist)."""
        for view in self.slicer_app.view_manager.get_threed_views():
            # trame-slicer's 3D views use depth peeling on an 8x multisampled window: on Mesa's offscreen renderer
            # every translucent surface (the organs) then disappears. Without multisampling depth peeling works.
            view.render_window().SetMultiSamples(0)
            view.reset_camera()
            view.reset_view()
        self._render()

    def _render(self, slices_only: bool = False) -> None:
        vm = self.slicer_app.view_manager
        for view in (vm.get_slice_views() if slices_only else vm.get_views()):
            view.schedule_render()

    def set_wash(self, key) -> None:
        """Show the map ``key`` of the selector as the wash of every slice view, with its own window and colours."""
        if key not in self.wash:
            return
        choice, node = self.wash[key]
        self.wash_key = key
        state = self.server.state
        bg = self.ct or self.cumulative
        wash_id = None if bg is node else node.GetID()  # no CT: the map itself is the background
        # while the registration check has the foreground, the wash comes back when it is turned off
        if not self.review_panels.wash_held(wash_id):
            for view in self.slicer_app.view_manager.get_slice_views():
                view.set_foreground_volume_id(wash_id)
        display = node.GetDisplayNode()
        if choice.kind == "headroom" and display is not None:
            display.SetApplyThreshold(1)  # NaN (no point limit there) falls outside and is not washed
            display.SetLowerThreshold(-HEADROOM_SPAN)
            display.SetUpperThreshold(HEADROOM_SPAN)
        state.wash_legend = self.legend(choice, node)
        state.wash_is_dose = choice.kind != "headroom"
        image = node.GetImageData()
        top = float(image.GetScalarRange()[1]) if image is not None else 1.0
        state.wash_max = max(int(np.ceil(top)), 1)
        threshold = 0.0
        if display is not None and display.GetApplyThreshold() and choice.kind != "headroom":
            threshold = max(float(display.GetLowerThreshold()), 0.0)
        state.wash_threshold = threshold
        self._render(slices_only=True)

    @staticmethod
    def legend(choice: WashChoice, node) -> str:
        """One line saying what the colours of the selected map mean (its window as displayed)."""
        display = node.GetDisplayNode()
        lo = display.GetWindowLevelMin() if display is not None else 0.0
        hi = display.GetWindowLevelMax() if display is not None else 1.0
        if choice.kind == "headroom":
            return (f"{choice.label}: red = over the tightest point limit (full red at {lo:.0f} Gy), white = at the "
                    f"limit (0 Gy), green = room left (full green at +{hi:.0f} Gy); not washed where no point "
                    f"limit applies.")
        if choice.kind == "remaining_dose":
            return (f"{choice.label}: blue 0 Gy (no dose allowed) to red ≥ {hi:.0f} Gy physical; not washed where "
                    f"no limit applies (−1) or the limit is not representable as a voxel map (−2).")
        return f"{choice.label}: dose colours blue {lo:.0f} Gy to red ≥ {hi:.0f} Gy."

    def _on_wash_key(self, wash_key=None, **_):
        if wash_key is not None and wash_key != self.wash_key:
            self.set_wash(wash_key)

    def _on_opacity(self, wash_opacity=None, **_):
        if wash_opacity is None:
            return
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_foreground_opacity(float(wash_opacity))
        self._render(slices_only=True)

    def _on_threshold(self, wash_threshold=None, **_):
        """Voxels of the selected dose map below the threshold (Gy) are not washed (0 = every voxel ≥ 0 Gy for
        the remaining-dose map, no threshold for the others). Not for headroom (a signed map)."""
        if wash_threshold is None or self.wash_key is None:
            return
        choice, node = self.wash[self.wash_key]
        display = node.GetDisplayNode()
        if display is None or choice.kind == "headroom" or node.GetImageData() is None:
            return
        value = float(wash_threshold)
        top = float(node.GetImageData().GetScalarRange()[1])
        display.SetApplyThreshold(1 if (value > 0 or choice.kind == "remaining_dose") else 0)
        display.SetLowerThreshold(max(value, 0.0))
        display.SetUpperThreshold(max(top, value) + 1.0)
        self._render(slices_only=True)

    def _on_isodose(self, isodose_on=None, **_):
        if isodose_on is None or self.isodose is None or self.isodose.GetDisplayNode() is None:
            return
        self.isodose.GetDisplayNode().SetVisibility(bool(isodose_on))
        self.isodose.GetDisplayNode().SetVisibility3D(False)
        self._render(slices_only=True)

    def highlight(self, structure: str | None) -> None:
        """The violation regions of ``structure`` (results.json ``violations[].segment``) and its organ stand out;
        the other violations and organs are dimmed. ``None`` restores the initial display."""
        wanted = set(violation_segments(self.run.results, structure)) if structure else set()
        every_violation = {str(v.get("segment")) for v in self.run.results.get("violations") or []
                           if isinstance(v, dict)}
        for node, kind in [(self.structures, "organ")] + [(n, "overlay") for n in self.overlays]:
            if node is None or node.GetDisplayNode() is None:
                continue
            seg, display = node.GetSegmentation(), node.GetDisplayNode()
            for i in range(seg.GetNumberOfSegments()):
                sid, name = seg.GetNthSegmentID(i), seg.GetNthSegment(i).GetName()
                o3, o2, ol = self._opacity_3d.get((node.GetID(), sid), (1.0, 0.5, 1.0))
                if structure is None:
                    display.SetSegmentOpacity3D(sid, o3)
                    display.SetSegmentOpacity2DFill(sid, o2)
                    display.SetSegmentOpacity2DOutline(sid, ol)
                    continue
                if kind == "overlay":
                    if name in wanted:
                        display.SetSegmentOpacity3D(sid, 1.0)
                        display.SetSegmentOpacity2DFill(sid, 0.9)
                        display.SetSegmentOpacity2DOutline(sid, 1.0)
                    elif name in every_violation:
                        display.SetSegmentOpacity3D(sid, DIMMED_3D)
                        display.SetSegmentOpacity2DFill(sid, DIMMED_2D)
                        display.SetSegmentOpacity2DOutline(sid, 0.2)
                    else:  # a target: see-through in 3D so that it does not hide the selected violation
                        display.SetSegmentOpacity3D(sid, min(o3, DIMMED_3D))
                else:
                    if name == structure:
                        display.SetSegmentOpacity3D(sid, max(o3, SELECTED_ORGAN_3D))
                        display.SetSegmentOpacity2DOutline(sid, 1.0)
                    else:
                        display.SetSegmentOpacity3D(sid, min(o3, DIMMED_3D))
                        display.SetSegmentOpacity2DFill(sid, min(o2, DIMMED_2D))
        self._render()

    # ------------------------------------------------------------------------------------------- worst voxel
    def worst_of(self, structure: str):
        """(RAS, Gy) of the highest cumulative EQD2 voxel inside ``structure`` (None when not found)."""
        if structure in self._worst_cache:
            return self._worst_cache[structure]
        out = None
        if self.cumulative is not None and self.structures is not None:
            from .mrml import ijk_to_ras_from_grid, structures_from_segmentation, volume_from_node
            dose = volume_from_node(self.cumulative)
            ras_to_ijk = np.linalg.inv(ijk_to_ras_from_grid(dose.grid))
            for s in structures_from_segmentation(self.structures):
                if s.name == structure:
                    out = worst_point(s.mask, ijk_to_ras_from_grid(s.grid), dose.array, ras_to_ijk)
                    break
        self._worst_cache[structure] = out
        return out

    def select_row(self, index) -> None:
        state = self.server.state
        try:
            row = self.rows[int(index)]
        except (TypeError, ValueError, IndexError):
            return
        state.selected = row["index"]
        self.review_panels.show_dvh(row["index"])
        self.highlight(row["structure"])
        found = self.worst_of(row["structure"])
        if found is None:
            state.selected_info = f"{row['structure']}: no segment or no dose map in this scene to centre on"
        else:
            ras, value = found
            for view in self.slicer_app.view_manager.get_slice_views():
                node = self.slicer_app.scene.GetNodeByID(view.get_view_node_id())
                if node is not None:
                    node.JumpSliceByCentering(float(ras[0]), float(ras[1]), float(ras[2]))
                view.schedule_render()
            state.selected_info = (f"{row['structure']}: worst voxel {value:.2f} Gy on the cumulative EQD2 display "
                                   f"map at RAS ({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) mm (the row is judged "
                                   "on its check map: see the table)")
        for callback in self.on_row_selected:
            callback(self, row, found)

    def clear_selection(self) -> None:
        """No row selected: every organ and violation shown as at load (the slice positions stay)."""
        state = self.server.state
        state.selected = -1
        state.selected_info = "No row selected: every organ and violation shown."
        self.highlight(None)

    # ---------------------------------------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        state = self.server.state
        state.trame__title = "ReirradiationNPC review"
        state.rows = self.rows
        state.selected = -1
        state.selected_info = ("Click a constraint row to centre the slice views on that structure's worst voxel "
                               "and highlight its violation regions.")
        state.verdict = verdict_line(self.run.results)
        state.verdict_code = (self.run.results.get("summary") or {}).get("verdict_code") or ""
        state.wash_items = []
        state.wash_legend = ""
        state.wash_is_dose = True
        state.isodose_available = False
        state.isodose_levels = ""
        state.scene_note = ""

        with SinglePageLayout(self.server, full_height=True) as layout:
            self.ui = layout
            layout.title.set_text("ReirradiationNPC review")
            with layout.toolbar:
                v3.VSpacer()
                html.Div("{{ verdict }}", id="verdict", classes="text-body-2 mr-4",
                         style="white-space: normal; max-width: 70%;")
            with layout.content:
                with html.Div(style="display: flex; height: calc(100vh - 64px); width: 100%;"):
                    with html.Div(id="views", style="flex: 3 1 0; position: relative; min-width: 0;"):
                        self.layout_manager.initialize_layout_grid(layout)
                    with html.Div(id="side", style="flex: 2 1 0; overflow: auto; font-size: 12px; padding: 4px;"):
                        self._build_wash_controls(html)
                        self._build_selection(html)
                        self.review_panels.build_ui()  # DVH of the selected organ, registration check
                        self._build_table(html)
                        with html.Div(id="side-panels") as self.side_column:
                            for panel in self.extra_panels:
                                panel(self)

    def _build_wash_controls(self, html) -> None:
        html.Div("{{ scene_note }}", id="scene-note", v_if="scene_note",
                 style="margin: 2px 0; padding: 2px 4px; background: #fce8b2;")
        with html.Div(style="display: flex; gap: 8px; align-items: center; flex-wrap: wrap;"):
            html.Label("Wash", for_="wash-map")
            with html.Select(id="wash-map", v_model=("wash_key", None), style="border: 1px solid #888; "
                                                                            "padding: 1px 4px; max-width: 100%;"):
                html.Option("{{ c.label }}", v_for="c in wash_items", key="c.key", value=("c.key",))
            with html.Label(v_if="isodose_available"):
                html.Input(id="isodose-toggle", type="checkbox", v_model=("isodose_on", True))
                html.Span(" isodose lines of the cumulative EQD2 at the limit levels ({{ isodose_levels }} Gy)")
        html.Div("{{ wash_legend }}", id="wash-legend", style="margin: 2px 0; color: #444;")
        with html.Div(style="display: flex; gap: 12px; align-items: center;"):
            html.Label("wash opacity {{ wash_opacity }}")
            html.Input(id="wash-opacity", type="range", min=0, max=1, step=0.05,
                       v_model=("wash_opacity", WASH_OPACITY))
            with html.Span(v_show="wash_is_dose"):
                html.Label("hide below {{ wash_threshold }} Gy")
                html.Input(id="wash-threshold", type="range", min=0, max=("wash_max", 100), step=0.5,
                           v_model=("wash_threshold", 0))

    def _build_selection(self, html) -> None:
        with html.Div(style="display: flex; gap: 8px; align-items: center; margin: 4px 0;"):
            html.Div("{{ selected_info }}", id="selected-info", style="flex: 1 1 auto;")
            html.Button("show all", id="clear-selection", click=self.clear_selection, v_show="selected >= 0",
                        title="undo the highlight of the selected row (the slice positions stay)",
                        style="border: 1px solid #888; border-radius: 3px; padding: 0 6px;")

    def _build_table(self, html) -> None:
        with html.Table(id="constraints", style="border-collapse: collapse; width: 100%;"):
            with html.Thead():
                with html.Tr():
                    for h in ("structure", "metric", "scope", "status", "value", "limit", "basis", "verified",
                              "source"):
                        html.Th(h, style="text-align: left; border-bottom: 1px solid #888; padding: 1px 4px;")
            with html.Tbody():
                with html.Tr(v_for="row in rows", key="row.index", classes="constraint-row",
                             click=(self.select_row, "[row.index]"),
                             style=("{cursor: 'pointer', background: row.index === selected ? "
                                    "'#c6dafc' : (row.status === 'fail' ? '#f4c7c3' : "
                                    "(row.status === 'pass' ? 'transparent' : '#fce8b2'))}",)):
                    for key in ("structure", "metric", "scope", "status", "value", "limit", "basis", "verified",
                                "source"):
                        html.Td(f"{{{{ row.{key} }}}}", classes=f"col-{key}", style="padding: 1px 4px;")


def serve(results_dir, port: int = 8080, host: str = "127.0.0.1", echo=print, idle_stop_s: int = 0) -> None:
    """Load the run's results and serve the review page until interrupted (Ctrl-C or SIGTERM), or, when
    ``idle_stop_s`` > 0, until no browser has been connected for that many seconds (counted from the start, and
    again each time the last browser leaves). 0: never by itself (trame's own default, used before, was 300 s)."""
    idle_stop_s = int(idle_stop_s)
    if idle_stop_s < 0:
        raise InputError(f"--idle-stop must be >= 0 seconds, not {idle_stop_s}", field="--idle-stop")
    run = load_run(results_dir)
    check_available()
    sys.argv = sys.argv[:1]  # trame parses the command line too; ours is already parsed
    app = ReviewApp(run)
    where = "scene.mrb" if run.scene else "NRRD outputs (no scene.mrb)"
    idle = f"; stops after {idle_stop_s} s without a browser" if idle_stop_s else ""
    echo(f"review of {Path(results_dir)} ({where}) at http://{host}:{port}/  (Ctrl-C stops{idle})")
    why = ""
    try:
        with sigterm_as_ctrl_c():  # SIGTERM (e.g. a service manager) stops as cleanly as Ctrl-C
            app.server.start(port=port, host=host, open_browser=False, show_connection_info=False,
                             timeout=idle_stop_s)
        # start() returns by itself only through its idle timeout (0: never)
        why = f" (no browser connected for {idle_stop_s} s)" if idle_stop_s else ""
    except KeyboardInterrupt:
        pass
    echo("review stopped" + why)
