"""``reirradiation-npc review``: a run's results in the browser on Kitware's trame-slicer (Slicer's MRML scene and
views rendered on the server, streamed to the page). Read-only: the run's folder is only read (scene.mrb is unzipped
into a temporary folder by trame-slicer's loader); nothing is written into it.

Page: the verdict (with ``verdict_code``) at the top; axial, coronal, sagittal and 3D views of the current CT with the
cumulative EQD2 colour wash and the segmentations of the scene (violations in red); the constraint table beside them.
Clicking a row centres the slice views on that structure's worst voxel of the cumulative EQD2 map.

Needs the ``review`` extra (``pip install "reirradiation-npc[review]"``); the engine never imports this module.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from .errors import InputError
from .review_results import RunOutput, load_run, table_rows, verdict_line, worst_point

log = logging.getLogger(__name__)

EXTRA_HINT = 'pip install "reirradiation-npc[review]"  (trame-slicer[standalone], playwright)'
LAYOUT_ID = "Quad View"
WASH_OPACITY = 0.5


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

    def __init__(self, run: RunOutput, server=None):
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
        self.cumulative = None
        self.structures = None
        self._worst_cache = {}
        from .mrml_web_panels import ReviewPanels
        self.panels = ReviewPanels(self)  # DVH of the selected organ, registration check (review_panels.py)
        self._build_ui()
        self.layout_manager.set_layout(LAYOUT_ID)
        self._load()
        self._show()
        if self.cumulative is not None and self.cumulative.GetImageData() is not None:
            self.server.state.wash_max = int(np.ceil(self.cumulative.GetImageData().GetScalarRange()[1]))
        self.server.state.change("wash_opacity", "wash_threshold")(self._on_wash)

    # ------------------------------------------------------------------------------------------------ loading
    def _load(self) -> None:
        scene = self.slicer_app.scene
        io = self.slicer_app.io_manager
        if self.run.scene is not None:
            ok = io.load_scene(str(self.run.scene))
            # Import reports failure for any node it could not fully restore (e.g. a plot or a node class this
            # slicer-core has no reader for) while the volumes and segmentations are loaded: judge by what is there
            if scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0:
                raise InputError(f"{self.run.scene}: Slicer could not load this scene bundle", field="RESULTS_DIR")
            if not ok:
                log.warning("scene.mrb loaded with warnings (some nodes may be missing)")
        else:
            # no scene.mrb: the NRRD outputs (volumes and .seg.nrrd segmentations), no CT (it is not in the folder)
            vols = [p for p in self.run.nrrd if not p.name.endswith(".seg.nrrd")]
            segs = [p for p in self.run.nrrd if p.name.endswith(".seg.nrrd")]
            if vols:
                io.load_volumes([str(p) for p in vols])
            for p in segs:
                io.load_segmentation(str(p))
        self.cumulative = self._find_cumulative(scene)
        self.ct = self._find_ct(scene)
        self.structures = scene.GetFirstNodeByName("Structures")

    @staticmethod
    def _find_cumulative(scene):
        from .mrml import ROLE_ATTRIBUTE
        nodes = list(scene.GetNodesByClass("vtkMRMLScalarVolumeNode"))
        for n in nodes:
            if n.GetAttribute(ROLE_ATTRIBUTE) == "cumulative_eqd2":
                return n
        for n in nodes:  # NRRD fallback: the file name is the node name
            if n.GetName() in ("cumulative_eqd2", "cumulative_eqd2.nrrd"):
                return n
        return None

    @staticmethod
    def _find_ct(scene):
        from .mrml import DOSE_VOLUME_ATTRIBUTE
        for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
            if n.GetName().startswith("CT") and not n.GetAttribute(DOSE_VOLUME_ATTRIBUTE):
                return n
        return None

    def _show(self) -> None:
        """CT in the background, the cumulative EQD2 wash in the foreground of every slice view."""
        bg = self.ct or self.cumulative
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_background_volume_id(bg.GetID() if bg else None)
            if self.cumulative is not None and bg is not self.cumulative:
                view.set_foreground_volume_id(self.cumulative.GetID())
                view.set_foreground_opacity(WASH_OPACITY)
            view.fit_view_to_content()
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_camera()
            view.reset_view()
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    def _on_wash(self, wash_opacity=None, wash_threshold=None, **_):
        """Opacity of the EQD2 wash in the slice views; voxels below the threshold (Gy) are not washed."""
        if wash_opacity is not None:
            for view in self.slicer_app.view_manager.get_slice_views():
                view.set_foreground_opacity(float(wash_opacity))
                view.schedule_render()
        if wash_threshold is not None and self.cumulative is not None:
            display = self.cumulative.GetDisplayNode()
            if display is not None:
                top = float(self.cumulative.GetImageData().GetScalarRange()[1])
                display.SetApplyThreshold(1 if float(wash_threshold) > 0 else 0)
                display.SetLowerThreshold(float(wash_threshold))
                display.SetUpperThreshold(max(top, float(wash_threshold)) + 1.0)
            for view in self.slicer_app.view_manager.get_slice_views():
                view.schedule_render()

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
        self.panels.show_dvh(row["index"])
        found = self.worst_of(row["structure"])
        if found is None:
            state.selected_info = f"{row['structure']}: no segment or no dose map in this scene to centre on"
            return
        ras, value = found
        for view in self.slicer_app.view_manager.get_slice_views():
            node = self.slicer_app.scene.GetNodeByID(view.get_view_node_id())
            if node is not None:
                node.JumpSliceByCentering(float(ras[0]), float(ras[1]), float(ras[2]))
            view.schedule_render()
        state.selected_info = (f"{row['structure']}: worst voxel {value:.2f} Gy cumulative EQD2 at RAS "
                               f"({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) mm")

    # ---------------------------------------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        state = self.server.state
        state.trame__title = "ReirradiationNPC review"
        state.rows = self.rows
        state.selected = -1
        state.selected_info = "Click a constraint row to centre the slice views on that structure's worst voxel."
        state.verdict = verdict_line(self.run.results)
        code = (self.run.results.get("summary") or {}).get("verdict_code") or ""
        state.verdict_code = code

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
                    with html.Div(id="constraints", style="flex: 2 1 0; overflow: auto; font-size: 12px; "
                                                          "padding: 4px;"):
                        with html.Div(style="display: flex; gap: 12px; align-items: center;"):
                            html.Label("EQD2 wash opacity {{ wash_opacity }}")
                            html.Input(id="wash-opacity", type="range", min=0, max=1, step=0.05,
                                       v_model=("wash_opacity", WASH_OPACITY))
                            html.Label("hide below {{ wash_threshold }} Gy")
                            html.Input(id="wash-threshold", type="range", min=0, max=("wash_max", 100), step=1,
                                       v_model=("wash_threshold", 0))
                        html.Div("{{ selected_info }}", id="selected-info", style="margin: 4px 0;")
                        self.panels.build_ui()  # DVH of the selected organ, registration check
                        with html.Table(style="border-collapse: collapse; width: 100%;"):
                            with html.Thead():
                                with html.Tr():
                                    for h in ("structure", "metric", "scope", "status", "value", "limit",
                                              "basis", "verified", "source"):
                                        html.Th(h, style="text-align: left; border-bottom: 1px solid #888; "
                                                   "padding: 1px 4px;")
                            with html.Tbody():
                                with html.Tr(v_for="row in rows", key="row.index",
                                             classes="constraint-row",
                                             click=(self.select_row, "[row.index]"),
                                             style=("{cursor: 'pointer', background: row.index === selected ? "
                                                    "'#c6dafc' : (row.status === 'fail' ? '#f4c7c3' : "
                                                    "(row.status === 'pass' ? 'transparent' : '#fce8b2'))}",)):
                                    for key in ("structure", "metric", "scope", "status", "value", "limit",
                                                "basis", "verified", "source"):
                                        html.Td(f"{{{{ row.{key} }}}}", classes=f"col-{key}",
                                                style="padding: 1px 4px;")


def serve(results_dir, port: int = 8080, host: str = "127.0.0.1", echo=print) -> None:
    """Load the run's results and serve the review page until interrupted (Ctrl-C)."""
    run = load_run(results_dir)
    check_available()
    sys.argv = sys.argv[:1]  # trame parses the command line too; ours is already parsed
    app = ReviewApp(run)
    where = "scene.mrb" if run.scene else "NRRD outputs (no scene.mrb)"
    echo(f"review of {Path(results_dir)} ({where}) at http://{host}:{port}/  (Ctrl-C stops)")
    try:
        app.server.start(port=port, host=host, open_browser=False, show_connection_info=False)
    except KeyboardInterrupt:
        pass
    echo("review stopped")
