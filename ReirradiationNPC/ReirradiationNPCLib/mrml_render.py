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
    group.SetMRMLDisplayableNode(view_node)
    view = OffscreenView(view_node, window, renderer, group)
    view._keep = (interactor, view_logic)  # keep the VTK objects alive with the view
    log.debug("offscreen render window: %s", window.GetClassName())
    view.render()
    return view
