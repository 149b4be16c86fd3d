"""Offscreen rendering of a 3D view of a MRML scene (no Qt): Slicer's own 3D displayable managers draw the
segmentations and models into a VTK render window that is never shown. With no X display VTK picks EGL, then
OSMesa (the Mesa packages in ``.ci/run``). Used for tests, screenshots and the documentation figure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

log = logging.getLogger(__name__)

_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
             "vtkMRMLModelDisplayableManager", "vtkMRMLSegmentationsDisplayableManager3D")


@dataclass
class OffscreenView:
    view_node: object
    render_window: object
    renderer: object
    managers: object

    def render(self) -> None:
        self.managers.RequestRender()
        self.render_window.Render()

    def camera_node(self):
        dm = self.managers.GetDisplayableManagerByClassName("vtkMRMLCameraDisplayableManager")
        return dm.GetCameraNode() if dm is not None else None

    def look_from(self, direction_ras: tuple[float, float, float], focus_ras=None, distance_mm: float = 600.0,
                  view_up_ras=(0.0, 0.0, 1.0)) -> None:
        """Place the camera on the line through ``focus_ras`` along ``direction_ras`` (RAS), looking at it.

        The view's camera node is moved (Slicer's camera displayable manager keeps the renderer's camera in step
        with it)."""
        self.renderer.ResetCamera()
        focus = np.asarray(focus_ras if focus_ras is not None else self.renderer.GetActiveCamera().GetFocalPoint(),
                           dtype=float)
        d = np.asarray(direction_ras, dtype=float)
        d /= np.linalg.norm(d)
        cam_node = self.camera_node()
        if cam_node is not None:
            cam_node.SetFocalPoint(*focus)
            cam_node.SetPosition(*(focus + distance_mm * d))
            cam_node.SetViewUp(*view_up_ras)
        cam = self.renderer.GetActiveCamera()
        cam.SetFocalPoint(*focus)
        cam.SetPosition(*(focus + distance_mm * d))
        cam.SetViewUp(*view_up_ras)
        self.renderer.ResetCameraClippingRange()
        self.render()

    def look_at_points(self, points_ras, direction_ras, view_up_ras=(0.0, 0.0, 1.0), margin: float = 1.06) -> None:
        """Look at the points ``points_ras`` (N x 3, RAS mm) from ``direction_ras`` (from the points toward the
        camera), centred and as close as keeps every point in the picture.

        ``view_up_ras`` is made perpendicular to the direction; ``margin`` > 1 leaves a border (a fraction of the
        field of view). Perspective camera with the renderer camera's (vertical) view angle."""
        p = np.asarray(points_ras, dtype=float).reshape(-1, 3)
        d = np.asarray(direction_ras, dtype=float)
        d /= np.linalg.norm(d)
        up = np.asarray(view_up_ras, dtype=float)
        up = up - up.dot(d) * d
        up /= np.linalg.norm(up)
        right = np.cross(up, d)  # screen x (the camera looks along -d)
        x, y, z = p @ right, p @ up, p @ d
        # focus: the middle of the points across the screen, at the depth of their middle
        centre = (x.max() + x.min()) / 2 * right + (y.max() + y.min()) / 2 * up + (z.max() + z.min()) / 2 * d
        x, y, z = x - centre @ right, y - centre @ up, z - centre @ d
        w, h = self.render_window.GetSize()
        tan_v = np.tan(np.radians(self.renderer.GetActiveCamera().GetViewAngle()) / 2.0) / margin
        tan_h = tan_v * w / h
        # a point at screen offsets (x, y) and depth z toward the camera is in the picture when |x| <= tan_h (D - z)
        # and |y| <= tan_v (D - z), D being the camera's distance from the focus
        distance = float(np.max(np.maximum(np.abs(x) / tan_h, np.abs(y) / tan_v) + z))
        self.look_from(d, focus_ras=centre, distance_mm=distance, view_up_ras=tuple(up))

    def world_to_pixel(self, ras) -> tuple[int, int]:
        """(column, row) of a RAS point in the saved image (row 0 at the top)."""
        self.renderer.SetWorldPoint(*ras, 1.0)
        self.renderer.WorldToDisplay()
        x, y, _ = self.renderer.GetDisplayPoint()
        height = self.render_window.GetSize()[1]
        return int(round(x)), int(round(height - 1 - y))

    def pixels(self) -> np.ndarray:
        """The rendered image as (rows, columns, RGB) uint8, row 0 at the top."""
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.render_window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        img = grab.GetOutput()
        w, h, _ = img.GetDimensions()
        arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[:, :, :3]
        return arr[::-1].copy()

    def save_png(self, path: Path) -> Path:
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.render_window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
        return Path(path)

    def close(self) -> None:
        self.managers.SetMRMLDisplayableNode(None)
        self.render_window.Finalize()


def open_view(app_logic, scene, size=(800, 600), name: str = "1", background=(1.0, 1.0, 1.0)) -> OffscreenView:
    """A 3D view of ``scene`` drawn offscreen by Slicer's displayable managers."""
    factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for m in _MANAGERS:
        if not factory.IsDisplayableManagerRegistered(m):
            factory.RegisterDisplayableManager(m)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.SetMultiSamples(0)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(*background)
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()  # displayable managers expect one; it is never started
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.SetRenderer(renderer)
    group.Initialize(factory, renderer)
    view_logic = slicer.vtkMRMLViewLogic()
    view_logic.SetMRMLApplicationLogic(app_logic)
    view_logic.SetMRMLScene(scene)
    # reuse the scene's 3D view node of that name (e.g. made by the layout logic): a second one would not be added
    view_node = scene.GetSingletonNode(name, "vtkMRMLViewNode") or view_logic.AddViewNode(name)
    view_node.SetBoxVisible(False)
    view_node.SetAxisLabelsVisible(False)
    view_node.SetBackgroundColor(*background)
    view_node.SetBackgroundColor2(*background)
    view_node.SetUseDepthPeeling(True)  # nested semi-transparent surfaces drawn in depth order
    group.SetMRMLDisplayableNode(view_node)
    view = OffscreenView(view_node, window, renderer, group)
    view._keep = (interactor, view_logic)  # keep the VTK objects alive with the view
    log.debug("offscreen render window: %s", window.GetClassName())
    view.render()
    return view


#: Camera direction of the review picture, from the scene toward the camera (RAS): anterior-left-superior, so the
#: left carotid, the spinal cord and the brainstem behind the target are seen apart, the temporal lobes at an angle.
REVIEW_DIRECTION_RAS = (-1.5, 1.0, 0.5)


def shown_surface_points(*segmentation_nodes) -> np.ndarray:
    """Vertices (N x 3, RAS mm) of the closed surfaces of the segments shown in 3D (segmentation and segment
    visible in 3D) of ``segmentation_nodes``; empty (0 x 3) when none is shown. Closed surfaces are created where
    missing. The nodes must not sit under transforms (the MRML layer's segmentations do not)."""
    chunks = [np.zeros((0, 3))]
    for node in segmentation_nodes:
        display = node.GetDisplayNode() if node is not None else None
        if display is None or not display.GetVisibility() or not display.GetVisibility3D():
            continue
        node.CreateClosedSurfaceRepresentation()
        seg = node.GetSegmentation()
        for n in range(seg.GetNumberOfSegments()):
            sid = seg.GetNthSegmentID(n)
            if not display.GetSegmentVisibility(sid) or not display.GetSegmentVisibility3D(sid):
                continue
            surface = node.GetClosedSurfaceInternalRepresentation(sid)
            if surface is not None and surface.GetNumberOfPoints():
                chunks.append(numpy_support.vtk_to_numpy(surface.GetPoints().GetData()).astype(float))
    return np.concatenate(chunks)


def review_camera(view: OffscreenView, *segmentation_nodes, direction_ras=REVIEW_DIRECTION_RAS) -> np.ndarray:
    """Point the camera of ``view`` from ``direction_ras`` at everything shown in 3D of ``segmentation_nodes``
    (organs at risk, targets, violations), fitted to the picture. Returns the surface points fitted (RAS mm)."""
    points = shown_surface_points(*segmentation_nodes)
    if len(points):
        view.look_at_points(points, direction_ras)
    return points


def save_review_png(app_logic, scene, structures_node, overlays_node, path: Path, size=(800, 600),
                    background=(1.0, 1.0, 1.0)) -> Path:
    """Render the 3D review picture (organs at risk semi-transparent, targets see-through, violations opaque red
    / amber) offscreen from anterior-left-superior and save it as a PNG at ``path``."""
    view = open_view(app_logic, scene, size=size, background=background)
    try:
        if not view.render_window.SupportsOpenGL():
            raise RuntimeError("no OpenGL for offscreen rendering (VTK found neither EGL nor OSMesa)")
        review_camera(view, structures_node, overlays_node)
        return view.save_png(Path(path))
    finally:
        view.close()
