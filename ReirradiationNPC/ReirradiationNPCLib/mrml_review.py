"""Registration review in the scene: the prior CT fused over the current CT through the course's transform, and a
manual 6-DOF adjustment (translations in mm, rotations in degrees, in RAS about a centre) of a linear transform,
applied on top of the transform as registered so that it can be undone exactly. No Qt.
"""

from __future__ import annotations

import math

import numpy as np
import slicer
import vtk

from .errors import InputError

#: the transform's "to parent" matrix before any manual adjustment (16 numbers, row-major, RAS)
BASE_ATTRIBUTE = "ReirradiationNPC.RegisteredToParent"
#: the manual adjustment applied: "tx ty tz rx ry rz" (mm, degrees)
ADJUSTMENT_ATTRIBUTE = "ReirradiationNPC.ManualAdjustment"
#: on a CT this module put under a course transform for review: the ID of its previous parent transform ("" none)
REVIEW_PREVIOUS_PARENT = "ReirradiationNPC.ReviewPreviousParent"
REVIEW_TRANSFORM = "ReirradiationNPC.ReviewTransform"


def _to_numpy(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _to_vtk(a) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r][c]))
    return m


def rigid_matrix(tx: float = 0.0, ty: float = 0.0, tz: float = 0.0, rx: float = 0.0, ry: float = 0.0,
                 rz: float = 0.0, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 RAS matrix: rotation R = Rz Ry Rx (degrees, right-handed about the R, A, S axes) about ``center`` (mm),
    then translation (tx, ty, tz) mm: p -> R (p - c) + c + t."""
    ax, ay, az = (math.radians(v) for v in (rx, ry, rz))
    rot_x = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    rot_y = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rot_z = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    r = rot_z @ rot_y @ rot_x
    c = np.asarray(center, dtype=float)
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = c - r @ c + np.array([tx, ty, tz], dtype=float)
    return out


def registered_to_parent(transform_node) -> np.ndarray:
    """The transform's "to parent" matrix without the manual adjustment (the one stored at the first adjustment)."""
    text = transform_node.GetAttribute(BASE_ATTRIBUTE)
    if text:
        return np.array([float(v) for v in text.split()]).reshape(4, 4)
    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToParent(m)
    return _to_numpy(m)


def adjust(transform_node, tx=0.0, ty=0.0, tz=0.0, rx=0.0, ry=0.0, rz=0.0, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Set the transform to (adjustment) o (transform as registered): the prior data moves in the current CT's
    frame by the given rigid motion. Zero everywhere gives back the registered transform exactly. Linear
    transforms only. Returns the new "to parent" matrix (RAS)."""
    if transform_node is None:
        raise InputError("select or compute a transform for this course first", field="courses.transform")
    if not transform_node.IsLinear():
        raise InputError("manual adjustment works on a linear (rigid) transform; this one is deformable",
                         source=transform_node.GetName(), field="courses.transform")
    base = registered_to_parent(transform_node)
    if not transform_node.GetAttribute(BASE_ATTRIBUTE):
        transform_node.SetAttribute(BASE_ATTRIBUTE, " ".join(f"{v:.17g}" for v in base.ravel()))
    out = rigid_matrix(tx, ty, tz, rx, ry, rz, center) @ base
    transform_node.SetMatrixTransformToParent(_to_vtk(out))
    transform_node.SetAttribute(ADJUSTMENT_ATTRIBUTE, " ".join(f"{v:g}" for v in (tx, ty, tz, rx, ry, rz)))
    return out


def adjustment_of(transform_node) -> tuple:
    text = transform_node.GetAttribute(ADJUSTMENT_ATTRIBUTE) if transform_node is not None else None
    return tuple(float(v) for v in text.split()) if text else (0.0,) * 6


def volume_center_ras(node) -> tuple:
    """Centre of a volume's bounds (RAS mm), the default centre of rotation."""
    b = [0.0] * 6
    node.GetRASBounds(b)
    return ((b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2)


def show_fused(current_ct, prior_ct, transform_node, scene=None, opacity: float = 0.5) -> None:
    """The prior CT over the current CT in every slice view, the prior CT seen through ``transform_node``.

    The prior CT is put under the transform for display (its previous parent is remembered on the node and put
    back by :func:`end_review` or by clearing the course's transform); the dose node is never touched."""
    scene = scene or slicer.mrmlScene
    if prior_ct is None or current_ct is None:
        raise InputError("registration review needs the current course's CT and this course's CT",
                         field="courses.ct")
    if prior_ct.GetAttribute(REVIEW_TRANSFORM) is None:
        prev = prior_ct.GetParentTransformNode()
        prior_ct.SetAttribute(REVIEW_PREVIOUS_PARENT, prev.GetID() if prev is not None else "")
    prior_ct.SetAttribute(REVIEW_TRANSFORM, transform_node.GetID() if transform_node is not None else "")
    prior_ct.SetAndObserveTransformNodeID(transform_node.GetID() if transform_node is not None else None)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        comp = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        comp.SetBackgroundVolumeID(current_ct.GetID())
        comp.SetForegroundVolumeID(prior_ct.GetID())
        comp.SetForegroundOpacity(opacity)


def end_review(prior_ct) -> None:
    """Put back the parent transform the prior CT had before :func:`show_fused` (nothing if it was not reviewed)."""
    if prior_ct is None or prior_ct.GetAttribute(REVIEW_TRANSFORM) is None:
        return
    prev = prior_ct.GetAttribute(REVIEW_PREVIOUS_PARENT) or None
    prior_ct.SetAndObserveTransformNodeID(prev)
    prior_ct.RemoveAttribute(REVIEW_TRANSFORM)
    prior_ct.RemoveAttribute(REVIEW_PREVIOUS_PARENT)


def set_foreground(scene, node, opacity: float = 0.5) -> None:
    """``node`` (or nothing) as the foreground layer of every slice view."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        comp = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        comp.SetForegroundVolumeID(node.GetID() if node is not None else None)
        if node is not None:
            comp.SetForegroundOpacity(opacity)
