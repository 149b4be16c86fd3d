"""The MRML adapter: Slicer nodes -> engine inputs, engine results -> Slicer nodes.

Works in 3D Slicer (with SlicerRT) and headless on the PyPI ``slicer-core`` (see :mod:`.mrml_headless`). No Qt, no
dialogs: errors are :class:`errors.InputError`, progress goes through a callback.

Coordinates: Slicer nodes live in RAS millimetres, the engine in LPS millimetres (DICOM / ITK). Converting one to
the other negates the first two axes: p_LPS = F p_RAS with F = diag(-1, -1, 1). Arrays stay indexed (k, j, i).
Transforms: a node under a transform node has local coordinates; the transform's "to parent" maps them to world.
To read a course dose at the evaluation grid's points, the engine needs the map reference-local -> dose-local
(ITK resampling convention), i.e. Slicer's ``GetTransformBetweenNodes(reference parent, dose parent)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from . import budget
from . import planning as planning_aids
from .analysis import Analysis, CourseData, StructureData, compute, isodose_levels, unmet_conditions_text
from .case import CaseSpec, CourseSpec
from .errors import InputError
from .geometry import Grid, Volume, grids_overlap, resample_linear
from .io import Structure
from .masks import structure_on_grid
from .pipeline import Prepared, build_results
from .protocol import Protocol, load_protocol, parse_metric
from .results import Results
from .sampling import crop_box, crop_to_structure

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
F3 = np.diag([-1.0, -1.0, 1.0])
F4 = np.diag([-1.0, -1.0, 1.0, 1.0])

#: SlicerRT marks dose volumes with this attribute (value "1"); its isodose and DVH modules look for it.
DOSE_VOLUME_ATTRIBUTE = "DicomRtImport.DoseVolume"
#: SlicerRT reads the dose unit from these attributes of the volume's parent (study) item.
DOSE_UNIT_NAME_ATTRIBUTE = "DicomRtImport.DoseUnitName"
DOSE_UNIT_VALUE_ATTRIBUTE = "DicomRtImport.DoseUnitValue"
#: Our own attributes, so that nodes can be found again (and a saved scene keeps what they are).
ROLE_ATTRIBUTE = "ReirradiationNPC.Role"
COURSE_ATTRIBUTE = "ReirradiationNPC.Course"
#: SlicerRT's dose colour table (vtkSlicerRtCommon::DEFAULT_DOSE_COLOR_TABLE_NAME, also its singleton tag): used when
#: SlicerRT made it; without SlicerRT (slicer-core) an equivalent continuous table of the same name is made here, so
#: that SlicerRT finds and reuses it when the scene is opened in Slicer
DOSE_COLOR_TABLE_NAME = "Dose_ColorTable"
HEADROOM_COLOR_TABLE_NAME = "ReirradiationNPC headroom"
#: Subject-hierarchy level of the study item (vtkMRMLSubjectHierarchyConstants::GetDICOMLevelStudy())
STUDY_LEVEL = "Study"
#: Attribute of the analysis folder naming the analysis: a re-run with the same name replaces that folder
ANALYSIS_NAME_ATTRIBUTE = "ReirradiationNPC.AnalysisName"
#: Percentile of the dose voxels (above the display threshold) used as the top of the colour window
WINDOW_PERCENTILE = 99.5
#: 3D opacity of the target segments: the nested margins stay see-through so organs and violations behind them show
MARGIN_OPACITY = {"GTV": 0.45, "CTV": 0.2, "PTV": 0.15}
#: points per block when a non-linear transform is sampled on the evaluation grid (bounds the memory used)
SLAB_POINTS = 2_000_000
PALETTE = [(0.12, 0.47, 0.71), (1.0, 0.50, 0.05), (0.17, 0.63, 0.17), (0.58, 0.40, 0.74), (0.55, 0.34, 0.29),
           (0.89, 0.47, 0.76), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81), (0.68, 0.78, 0.91),
           (1.0, 0.73, 0.47), (0.60, 0.87, 0.54), (0.77, 0.69, 0.84), (0.77, 0.61, 0.58)]
#: Organ colours (RGB 0-1) by protocol organ key without its _l/_r side, used for the structure segments and their
#: DVH curves. No reds or ambers: in the 3D view those mean a failed (red) or warned (amber) limit.
ORGAN_COLORS = {
    "brainstem": (0.47, 0.36, 0.80), "spinal_cord": (0.13, 0.62, 0.30), "optic_chiasm": (0.05, 0.66, 0.74),
    "optic_nerve": (0.05, 0.66, 0.74), "temporal_lobe": (0.72, 0.62, 0.86), "carotid": (0.58, 0.22, 0.50),
    "cochlea": (0.36, 0.52, 0.14), "parotid": (0.55, 0.80, 0.55), "mandible": (0.80, 0.80, 0.72),
    "tm_joint": (0.70, 0.70, 0.60), "pituitary": (0.55, 0.45, 0.35), "eye": (0.50, 0.72, 0.95),
    "lens": (0.70, 0.88, 1.00),
}
#: PALETTE entries for structures without an organ colour (the oranges of PALETTE are left out: amber = warn)
_STRUCTURE_PALETTE = [c for c in PALETTE if not (c[0] > 0.9 and c[2] < 0.6)]


def structure_color(structure, index: int) -> tuple[float, float, float]:
    """Display colour (RGB 0-1) of a structure: its organ's colour, else a palette colour by ``index``."""
    organ = getattr(structure, "organ", None)
    key = getattr(organ, "key", "") or ""
    for suffix in ("_l", "_r"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return ORGAN_COLORS.get(key, _STRUCTURE_PALETTE[index % len(_STRUCTURE_PALETTE)])


def _scene(scene=None):
    scene = scene or slicer.mrmlScene
    if scene is None:
        raise RuntimeError("no MRML scene: run inside Slicer or call mrml_headless.start() first")
    return scene


def scene_or_default(scene=None):
    """``scene``, or the application's scene when None (the presenter reaches ``slicer`` only through here)."""
    return _scene(scene)


def subject_hierarchy(scene=None):
    """The subject hierarchy node of ``scene`` (default: the application's scene)."""
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(_scene(scene))


def segment_tag(segment, tag: str) -> str:
    """The value of a segment's tag ("" when absent)."""
    value = vtk.reference("")
    segment.GetTag(tag, value)
    return str(value)


# ------------------------------------------------------------------------------------------------ geometry

def _matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def grid_from_ijk_to_ras(ijk_to_ras: np.ndarray, dims: tuple[int, int, int], extent_start=(0, 0, 0)) -> Grid:
    """Engine grid (LPS) of an image whose voxel (i, j, k) lies at ``ijk_to_ras @ (i, j, k, 1)`` (RAS mm)."""
    a = np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"image has a degenerate IJK-to-RAS matrix (spacing {spacing.tolist()})", field="geometry")
    direction_ras = a[:3, :3] / spacing
    origin_ras = a[:3, :3] @ np.asarray(extent_start, dtype=float) + a[:3, 3]
    direction = F3 @ direction_ras
    origin = F3 @ origin_ras
    return Grid(tuple(int(d) for d in dims), tuple(float(v) for v in origin), tuple(float(s) for s in spacing),
                tuple(float(v) for v in direction.ravel()))


def ijk_to_ras_from_grid(grid: Grid) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of an engine grid."""
    m = np.eye(4)
    m[:3, :3] = F3 @ grid.direction_matrix @ np.diag(grid.spacing)
    m[:3, 3] = F3 @ np.asarray(grid.origin)
    return m


def volume_from_node(node, dtype=np.float32) -> Volume:
    """A scalar volume node as an engine Volume (LPS geometry, array k, j, i). Ignores any parent transform."""
    if node is None or node.GetImageData() is None:
        raise InputError("volume has no image data", source=node.GetName() if node else "(none)", field="volume")
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    img = node.GetImageData()
    if img.GetNumberOfScalarComponents() != 1:
        raise InputError("expected a scalar volume", source=node.GetName(), field="volume")
    dims = img.GetDimensions()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(dims[::-1])
    arr = arr.astype(dtype, copy=True) if dtype is not None else arr.copy()
    vol = Volume(arr, grid_from_ijk_to_ras(_matrix_to_numpy(m), dims))
    vol.name = node.GetName()
    vol.meta["node_id"] = node.GetID()
    return vol


def _image_data(array: np.ndarray) -> vtk.vtkImageData:
    arr = np.ascontiguousarray(array)
    img = vtk.vtkImageData()
    img.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    vtk_arr = numpy_support.numpy_to_vtk(arr.ravel(), deep=True)
    img.GetPointData().SetScalars(vtk_arr)
    return img


def add_volume_node(volume: Volume, name: str, scene=None, cls: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding ``volume`` (geometry converted LPS -> RAS)."""
    scene = _scene(scene)
    node = scene.AddNewNodeByClass(cls, name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras_from_grid(volume.grid)))
    node.SetAndObserveImageData(_image_data(volume.array))
    node.CreateDefaultDisplayNodes()
    return node


# ----------------------------------------------------------------------------------------------- transforms

def _parent_transform(node):
    return node.GetParentTransformNode() if node is not None else None


_PARENT = object()


def resampling_transform(reference_node, moving_node, reference_grid: Grid,
                         moving_frame=_PARENT) -> sitk.Transform | None:
    """ITK transform mapping reference-local LPS points to ``moving_node``-local LPS points (None: identity).

    ``moving_frame``: the transform node whose frame the moving data is in (default: its parent transform node).
    A course's transform is given this way, so the user's dose node is never re-parented.
    Linear transforms become an exact affine transform; others are sampled at the voxel centres of
    ``reference_grid`` into a displacement field.
    """
    src = _parent_transform(reference_node)
    dst = _parent_transform(moving_node) if moving_frame is _PARENT else moving_frame
    if src is dst:
        return None
    m = vtk.vtkMatrix4x4()
    if slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(src, dst, m):
        a = F4 @ _matrix_to_numpy(m) @ F4
        if np.allclose(a, np.eye(4), atol=1e-9):
            return None
        t = sitk.AffineTransform(3)
        t.SetMatrix(tuple(float(v) for v in a[:3, :3].ravel()))
        t.SetTranslation(tuple(float(v) for v in a[:3, 3]))
        return t
    general = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(src, dst, general)
    nk, nj, ni = reference_grid.shape
    disp = np.empty((nk, nj, ni, 3), dtype=np.float64)
    j, i = np.meshgrid(np.arange(nj, dtype=float), np.arange(ni, dtype=float), indexing="ij")
    slab = max(1, SLAB_POINTS // max(nj * ni, 1))  # a few slices at a time: bounded memory on large grids
    for k0 in range(0, nk, slab):
        k1 = min(k0 + slab, nk)
        k = np.repeat(np.arange(k0, k1, dtype=float), nj * ni)
        ijk = np.stack([np.tile(i.ravel(), k1 - k0), np.tile(j.ravel(), k1 - k0), k], axis=1)
        pts_lps = reference_grid.index_to_physical(ijk)
        pts = vtk.vtkPoints()
        pts.SetData(numpy_support.numpy_to_vtk(pts_lps @ F3, deep=True))
        out = vtk.vtkPoints()
        general.TransformPoints(pts, out)
        moved_lps = numpy_support.vtk_to_numpy(out.GetData()).astype(float) @ F3
        disp[k0:k1] = (moved_lps - pts_lps).reshape(k1 - k0, nj, ni, 3)
    field = sitk.GetImageFromArray(disp, isVector=True)
    reference_grid.apply_to(field)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def transform_node_from_sitk(transform: sitk.Transform, name: str, scene=None):
    """A linear transform node for prior data from an affine ITK transform mapping reference LPS points to prior
    LPS points (the resampling direction): the node's 'from parent' (world -> prior local) is that map in RAS."""
    scene = _scene(scene)
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    a = np.eye(4)
    for axis in range(3):  # exact for an affine map: columns are the images of the unit vectors minus the origin's
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        a[:3, axis] = np.asarray(transform.TransformPoint(tuple(unit))) - origin
    a[:3, 3] = origin
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformFromParent(_numpy_to_matrix(F4 @ a @ F4))
    return node


def grid_transform_node_from_sitk(transform: sitk.Transform, reference_grid: Grid, name: str, scene=None):
    """A grid (displacement-field) transform node for prior data from any ITK transform mapping reference LPS
    points to prior LPS points, sampled at the voxel centres of ``reference_grid`` (a deformable registration,
    like the grid transforms SlicerRT makes from a DICOM deformable registration)."""
    scene = _scene(scene)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, list(reference_grid.size),
                                              reference_grid.origin, reference_grid.spacing,
                                              reference_grid.direction)
    disp_lps = sitk.GetArrayFromImage(field).reshape(-1, 3)  # T(p) - p at each voxel centre, LPS mm
    disp_ras = disp_lps @ F3  # the same vectors in RAS (F3 is its own inverse and transpose)
    image = vtk.vtkImageData()
    image.SetDimensions(*reference_grid.size)
    image.SetSpacing(*reference_grid.spacing)
    image.SetOrigin(*(F3 @ np.asarray(reference_grid.origin)))
    arr = numpy_support.numpy_to_vtk(np.ascontiguousarray(disp_ras, dtype=np.float64), deep=True)
    arr.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(arr)
    grid_tf = slicer.vtkOrientedGridTransform()
    grid_tf.SetDisplacementGridData(image)
    direction = np.eye(4)
    direction[:3, :3] = F3 @ reference_grid.direction_matrix
    grid_tf.SetGridDirectionMatrix(_numpy_to_matrix(direction))
    grid_tf.SetInterpolationModeToLinear()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(grid_tf)
    return node


def register_ct_nodes(course_name: str, method: str, reference_ct_node, prior_ct_node,
                      progress: Progress | None = None, scene=None):
    """Register a prior course's CT to the current (reference) CT with the engine's registration
    (``registration.register_course``, method ``rigid`` or ``deformable``); returns the transform node to put the
    prior dose under (linear, or a displacement grid on the reference CT's grid) and a one-line QA summary."""
    from . import registration
    say = progress or (lambda m: None)
    if method not in ("rigid", "deformable"):
        raise InputError(f"registration method {method!r} is not one Slicer can run (rigid, deformable; or select "
                         "an existing transform node)", field="registration.method")
    if reference_ct_node is None or prior_ct_node is None:
        raise InputError(f"{method} registration needs the current course's CT and this course's CT",
                         source=course_name, field="courses.ct")
    say(f"registering {course_name} ({method})")
    reference = volume_from_node(reference_ct_node)
    outcome = registration.register_course(course_name, {"method": method}, reference,
                                           volume_from_node(prior_ct_node), progress=say)
    if method == "rigid":
        node = transform_node_from_sitk(outcome.linear or outcome.transform, f"{course_name} registration", scene)
    else:
        node = grid_transform_node_from_sitk(outcome.transform, reference.grid, f"{course_name} registration",
                                             scene)
    node.SetAttribute(ROLE_ATTRIBUTE, "registration")
    parts = [f"{course_name}: {outcome.method} registration in {outcome.time_s:.1f} s"]
    if outcome.metric_before is not None and outcome.metric_after is not None:
        parts.append(f"Mattes MI {outcome.metric_before:.3f} -> {outcome.metric_after:.3f}")
    if outcome.max_deformation_mm:
        parts.append(f"max deformation beyond the rigid part {outcome.max_deformation_mm:.1f} mm")
    if outcome.jacobian:
        parts.append("Jacobian " + ", ".join(f"{k} {v}" for k, v in outcome.jacobian.items()
                                            if isinstance(v, (int, float, str))))
    parts += [f"Dice {k}: {v:.3f}" for k, v in (outcome.dice or {}).items() if isinstance(v, (int, float))]
    parts += list(outcome.notes)
    return node, "; ".join(parts)


def _coverage(source: Grid, target: Grid, transform: sitk.Transform | None) -> np.ndarray | None:
    """Bool map on ``target``: voxels that fall inside ``source`` (None when all do)."""
    ones = sitk.Image([int(s) for s in source.size], sitk.sitkUInt8) + 1
    source.apply_to(ones)
    out = sitk.Resample(ones, target.reference_image(), transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt8)
    cov = sitk.GetArrayViewFromImage(out) > 0
    return None if cov.all() else cov.copy()


# ---------------------------------------------------------------------------------------------- structures

def structures_from_segmentation(segmentation_node) -> list[Structure]:
    """Every segment as an engine Structure on its own binary-labelmap geometry (LPS)."""
    if segmentation_node is None:
        raise InputError("no segmentation selected", field="structures")
    seg = segmentation_node.GetSegmentation()
    if seg.GetNumberOfSegments() == 0:
        raise InputError("segmentation has no segments", source=segmentation_node.GetName(), field="structures")
    out = []
    for idx in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(idx)
        segment = seg.GetSegment(sid)
        image = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                segmentation_node, sid, image):
            raise InputError(f"segment {segment.GetName()!r} has no binary labelmap",
                             source=segmentation_node.GetName(), field="structures")
        ext = image.GetExtent()
        dims = (ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1)
        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        color = tuple(float(c) for c in segment.GetColor())
        if min(dims) <= 0 or image.GetPointData().GetScalars() is None:
            mask = np.zeros((1, 1, 1), dtype=bool)
            grid = grid_from_ijk_to_ras(_matrix_to_numpy(m), (1, 1, 1))
            out.append(Structure(segment.GetName(), mask, grid, segmentation_node.GetName(), color))
            continue
        arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
        grid = grid_from_ijk_to_ras(_matrix_to_numpy(m), dims, extent_start=(ext[0], ext[2], ext[4]))
        # segments may share one labelmap layer, each with its own label value; a layer drawn in the Segment Editor
        # spans the whole reference image, so each segment is kept as its bounding box (with its parent grid: the
        # same numbers as the whole mask), not as a CT-size mask per segment
        mask, box_grid, box = crop_box(arr == segment.GetLabelValue(), grid)
        out.append(Structure(segment.GetName(), mask, box_grid, segmentation_node.GetName(), color,
                             parent=(grid, box)))
    return out


def _oriented_image(mask: np.ndarray, grid: Grid, lo: tuple[int, int, int] = (0, 0, 0)):
    """``mask`` (k, j, i) as an oriented image at index ``lo`` (i, j, k) of ``grid``: its extent starts at ``lo``
    and its geometry is ``grid``'s, so segments on one grid share one geometry (Slicer then stacks them into the
    .seg.nrrd by copying, not by resampling each one: 1.2 s -> 0.3 s for the demo's 15 structures)."""
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(_image_data(mask.astype(np.uint8)))
    if any(lo):
        image.SetExtent(lo[0], lo[0] + mask.shape[2] - 1, lo[1], lo[1] + mask.shape[1] - 1,
                        lo[2], lo[2] + mask.shape[0] - 1)
    image.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras_from_grid(grid)))
    return image


def add_segment(segmentation_node, name: str, mask: np.ndarray, box: tuple[slice, slice, slice], grid: Grid,
                color: tuple[float, float, float], opacity: float = 1.0, attributes: dict | None = None) -> str:
    """Add a segment from a bool crop ``mask`` at ``box`` (k, j, i) of ``grid``; returns the segment ID."""
    seg = segmentation_node.GetSegmentation()
    sid = seg.AddEmptySegment("", name, list(color))
    # named and coloured by us: without this the saved segment says NameAutoGenerated=1 / ColorAutoGenerated=1,
    # and Slicer may rename or recolour it (e.g. from a terminology) when the scene is loaded
    segment = seg.GetSegment(sid)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    # its own labelmap layer: segments overlap (organs inside the body, margins nested, violations inside organs),
    # and writing into a shared layer would erase the other segments' voxels where they overlap
    seg.SeparateSegmentLabelmap(sid)
    image = _oriented_image(mask, grid, tuple(int(b.start) for b in box[::-1]))
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentation_node, sid):
        raise RuntimeError(f"could not set the labelmap of segment {name!r}")
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetSegmentOpacity3D(sid, opacity)
        display.SetSegmentOpacity2DFill(sid, min(opacity, 0.5))
    for k, v in (attributes or {}).items():
        seg.GetSegment(sid).SetTag(k, str(v))
    return sid


# -------------------------------------------------------------------------------------------------- inputs

@dataclass
class CourseInput:
    """One course as Slicer holds it. ``interval_months`` is None for the current (last) course."""

    name: str
    dose_node: object
    fractions: int
    interval_months: float | None = None
    #: the course's transform node (prior courses): the dose is read through it as if it were under it; the dose
    #: node itself is not re-parented. None: the dose node's own parent transform (if any) is used.
    transform_node: object = None
    #: factor applied to the voxels (the fractions for a per-fraction RTDOSE, the stated RBE of a physical particle
    #: dose; from mrml_provenance)
    multiplier: float = 1.0
    #: how the volume became the course dose (summation type, RBE): ``DoseHeaderCheck.assumptions()`` (None: unknown)
    dose_kind: dict | None = None


def _check_course_inputs(courses: list[CourseInput]) -> None:
    if not courses:
        raise InputError("add at least one course (the last one is the current course)", field="courses")
    names = [c.name for c in courses]
    for i, c in enumerate(courses):
        key = f"courses[{i}]"
        if not c.name or c.name in names[:i] or c.name == "cumulative":
            raise InputError(f"course name {c.name!r} is empty, reserved or used twice", field=f"{key}.name")
        if c.dose_node is None:
            raise InputError("no dose volume selected", source=c.name, field=f"{key}.dose")
        if isinstance(c.fractions, bool) or int(c.fractions) != c.fractions or c.fractions < 1:
            raise InputError(f"fractions must be a whole number >= 1, got {c.fractions!r}", source=c.name,
                             field=f"{key}.fractions")
        current = i == len(courses) - 1
        if not current and (c.interval_months is None or not np.isfinite(c.interval_months)
                            or c.interval_months < 0):
            raise InputError("interval (months from the end of this prior course to the current one) must be "
                             f">= 0, got {c.interval_months!r}", source=c.name, field=f"{key}.interval_months")


def _check_dose(vol: Volume, name: str, field_name: str) -> None:
    if not np.isfinite(vol.array).all():
        raise InputError("dose contains NaN or infinite voxels", source=name, field=field_name)
    if vol.array.size and float(vol.array.min()) < 0:
        raise InputError("dose contains negative values", source=name, field=field_name)
    from .io import MAX_PLAUSIBLE_DOSE_GY
    if vol.array.size and float(vol.array.max()) > MAX_PLAUSIBLE_DOSE_GY:
        raise InputError(f"maximum dose {float(vol.array.max()):.5g} exceeds {MAX_PLAUSIBLE_DOSE_GY:g} Gy: "
                         "is the dose in cGy? physical dose in Gy is required", source=name, field=field_name)


def prepare_from_nodes(courses: list[CourseInput], segmentation_node, protocol: Protocol | str,
                       reference_image_node=None, progress: Progress | None = None) -> Prepared:
    """Engine inputs from nodes. The evaluation grid is the current (last) course's dose grid.

    Prior doses under a transform node are read through it (reference-local -> dose-local). The segmentation
    and the optional reference CT (used for the margins' air crop) must be in the current dose's frame.
    """
    say = progress or (lambda m: None)
    _check_course_inputs(courses)
    if isinstance(protocol, str):
        protocol = load_protocol(protocol)
    ref_node = courses[-1].dose_node
    if _parent_transform(segmentation_node) is not _parent_transform(ref_node):
        raise InputError("the segmentation and the current dose are under different transforms; put them in "
                         "the same frame (or harden the transform)", source=segmentation_node.GetName(),
                         field="structures")
    ref_img = None
    if reference_image_node is not None:
        if _parent_transform(reference_image_node) is not _parent_transform(ref_node):
            raise InputError("the CT and the current dose are under different transforms",
                             source=reference_image_node.GetName(), field="reference.image")
        ref_img = volume_from_node(reference_image_node)
    say("reading dose volumes")
    doses = []
    for i, c in enumerate(courses):
        vol = volume_from_node(c.dose_node)
        if c.multiplier != 1.0:
            vol.array *= np.float32(c.multiplier)
        _check_dose(vol, c.dose_node.GetName(), f"courses[{i}].dose")
        doses.append(vol)
    grid = doses[-1].grid
    course_data, specs = [], []
    for i, (c, dose) in enumerate(zip(courses, doses)):
        is_current = i == len(courses) - 1
        say(f"mapping dose of {c.name}")
        frame = _parent_transform(c.dose_node)
        if c.transform_node is not None and not is_current:
            if frame is not None and frame is not c.transform_node:
                raise InputError(f"the dose is under transform {frame.GetName()!r} and the course's transform is "
                                 f"{c.transform_node.GetName()!r}: use one of them", source=c.dose_node.GetName(),
                                 field=f"courses[{i}].transform")
            frame = c.transform_node
        t = None if is_current else resampling_transform(ref_node, c.dose_node, grid, moving_frame=frame)
        if t is None and not grids_overlap(dose.grid, grid):
            raise InputError("dose grid does not overlap the current dose grid", source=c.dose_node.GetName(),
                             field=f"courses[{i}].dose")
        arr = resample_linear(dose, grid, transform=t)
        cov = _coverage(dose.grid, grid, t)
        if cov is not None and not cov.any():
            raise InputError("after its transform, this dose does not overlap the current dose grid",
                             source=c.dose_node.GetName(), field=f"courses[{i}].dose")
        method = "identity" if t is None else f"transform node {frame.GetName() if frame else '(reference)'}"
        course_data.append(CourseData(name=c.name, dose=arr, fractions=int(c.fractions),
                                      interval_months=None if is_current else float(c.interval_months),
                                      is_current=is_current, registration=method, dose_file=c.dose_node.GetName(),
                                      coverage=cov))
        specs.append(CourseSpec(name=c.name, dose=Path(c.dose_node.GetName()), fractions=int(c.fractions),
                                interval_months=None if is_current else float(c.interval_months),
                                registration={"method": method}, is_current=is_current))
    say("reading structures")
    warnings = []
    structures = []
    for s in structures_from_segmentation(segmentation_node):
        organ = protocol.match(s.name)
        on = structure_on_grid(s, grid)
        if on is None:
            warnings.append(f"structure {s.name!r} has no voxel on the evaluation grid (outside it or empty)")
            mask, box = np.zeros((0, 0, 0), bool), (slice(0, 0),) * 3
        else:
            mask, box = on
        src_mask, src_grid = crop_to_structure(s.mask, s.grid)  # sub-voxel metrics use the mask as drawn
        structures.append(StructureData(s.name, mask, box, organ, source_mask=src_mask, source_grid=src_grid))
    scene_url = ref_node.GetScene().GetURL() if ref_node.GetScene() is not None else ""
    case = CaseSpec(path=Path(scene_url or "MRML scene"), reference_image=None,
                    reference_structures=Path(segmentation_node.GetName()), grid="dose",
                    protocol=protocol.path, courses=specs)
    kinds = {c.name: c.dose_kind for c in courses if c.dose_kind}
    return Prepared(case, protocol, grid, course_data, structures, ref_img, warnings, dose_kinds=kinds)


def run_engine(prep: Prepared, progress: Progress | None = None):
    """analysis.compute, the planning aids (margins, violations, headroom, remaining dose) and
    pipeline.build_results on prepared inputs, as ``run`` does, without writing files.

    Returns (analysis, results, planning)."""
    analysis = compute(prep.grid, prep.courses, prep.structures, prep.protocol, progress)
    plan = planning_aids.compute(prep, analysis, progress)
    from . import robustness as _robustness
    rob = _robustness.compute(prep, analysis, progress)
    results = build_results(prep, analysis)
    planning_aids.add_to_results(results, plan)
    _robustness.add_to_results(results, rob)
    from .risk_estimates import add_to_results as _add_risk
    _add_risk(results, prep, analysis)
    return analysis, results, plan


# ------------------------------------------------------------------------------------------------- outputs

@dataclass
class OutputNodes:
    folder_item: int
    course_eqd2: dict = field(default_factory=dict)   # course name -> volume node
    cumulative: object = None
    alpha_beta: object = None
    overlays: object = None                           # segmentation node: targets, violations
    constraints_table: object = None
    dvh_table: object = None
    dvh_chart: object = None
    color_table: object = None
    violations: list = field(default_factory=list)    # budget.Violation, same order as their segments
    planning: object = None                           # planning aids shown (margins, violations, maps)
    headroom: object = None                           # volume node (Gy EQD2), if the engine computed it
    remaining: object = None                          # volume node (physical Gy), if the engine computed it
    worst_violation_ras: tuple | None = None          # RAS mm of the hottest voxel of the worst violation
    study_item: int = 0                               # subject-hierarchy study the analysis folder sits in
    isodose: object = None                            # segmentation node: isodose lines at the limit levels
    protocol_text: object = None                      # text node: the protocol file used, verbatim
    replaced: int = 0                                 # previous analysis folders of the same name removed
    check_maps: list = field(default_factory=list)    # check-map volume nodes (mrml_scene.add_check_maps)


def dose_color_table(scene=None):
    """The dose colour table: SlicerRT's ``Dose_ColorTable`` when SlicerRT is loaded (its Isodose logic makes it),
    else an equivalent continuous table of that name (blue -> cyan -> green -> yellow -> red), made once per scene."""
    scene = _scene(scene)
    existing = scene.GetFirstNodeByName(DOSE_COLOR_TABLE_NAME)
    if existing is not None:
        return existing
    isodose_logic = getattr(slicer, "vtkSlicerIsodoseModuleLogic", None)  # SlicerRT's, in Slicer with SlicerRT
    if isodose_logic is not None:
        try:
            node = isodose_logic.CreateDefaultDoseColorTable(scene)
            if node is not None:
                return node
        except Exception:  # noqa: BLE001 - SlicerRT present but its default tables missing: use ours
            log.debug("SlicerRT's dose colour table could not be made; using an equivalent one", exc_info=True)
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(DOSE_COLOR_TABLE_NAME)
    node.SetSingletonTag(DOSE_COLOR_TABLE_NAME)  # the same node ID as SlicerRT's: SlicerRT reuses it
    node.SetTypeToUser()
    _ramp(node, [[0.0, 0, 0, 1], [0.25, 0, 1, 1], [0.5, 0, 1, 0], [0.75, 1, 1, 0], [1.0, 1, 0, 0]])
    node.SetAttribute(ROLE_ATTRIBUTE, "dose_color_table")
    scene.AddNode(node)
    return node


def _ramp(node, stops, n: int = 256) -> None:
    node.SetNumberOfColors(n)
    stops = np.asarray(stops, dtype=float)
    x = np.linspace(0, 1, n)
    rgb = np.stack([np.interp(x, stops[:, 0], stops[:, c]) for c in (1, 2, 3)], axis=1)
    for i in range(n):
        node.SetColor(i, f"{i}", *rgb[i], 1.0)


def headroom_color_table(scene=None):
    """Diverging table for headroom (Gy EQD2 left below the tightest limit): red at and below 0 (over a limit),
    white at the window's middle, green with room to spare."""
    scene = _scene(scene)
    existing = scene.GetFirstNodeByName(HEADROOM_COLOR_TABLE_NAME)
    if existing is not None:
        return existing
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(HEADROOM_COLOR_TABLE_NAME)
    node.SetSingletonTag(HEADROOM_COLOR_TABLE_NAME)
    node.SetTypeToUser()
    _ramp(node, [[0.0, 0.8, 0.0, 0.0], [0.5, 1.0, 1.0, 1.0], [1.0, 0.0, 0.6, 0.1]])
    node.SetAttribute(ROLE_ATTRIBUTE, "headroom_color_table")
    scene.AddNode(node)
    return node


def display_top_gy(array: np.ndarray, threshold_gy: float = 0.5, percentile: float = WINDOW_PERCENTILE) -> float:
    """Top of the colour window: the ``percentile`` of the voxels at or above ``threshold_gy`` (a few hot voxels
    must not wash out the rest, as the maximum would); at least 1 Gy."""
    a = np.asarray(array)
    shown = a[a >= threshold_gy]
    if shown.size == 0:
        return 1.0
    return max(float(np.percentile(shown, percentile)), 1.0)


def _dose_display(node, color_table, top_gy: float, threshold_gy: float = 0.5) -> None:
    """Colour wash: dose colours from 0 to ``top_gy``; voxels below ``threshold_gy`` transparent in slice views."""
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color_table.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, max(top_gy, 1.0))
    display.AutoThresholdOff()
    display.SetThreshold(threshold_gy, max(top_gy, 1.0) * 10)
    display.SetApplyThreshold(1)


def limit_map_display(node, array: np.ndarray, role: str, scene=None) -> None:
    """Display of a limit map (not a plan dose). ``headroom``: the diverging headroom table over a window symmetric
    about 0 Gy (± the ``WINDOW_PERCENTILE`` of |headroom|, at least 1 Gy); ``remaining_dose``: the dose table from
    0 Gy, the negative markers (−1 no limit, −2 not representable) below the threshold and not washed."""
    finite = array[np.isfinite(array)]
    if role == "headroom":
        span = float(np.percentile(np.abs(finite), WINDOW_PERCENTILE)) if finite.size else 1.0
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(headroom_color_table(scene).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(-max(span, 1.0), max(span, 1.0))
    else:
        _dose_display(node, dose_color_table(scene), display_top_gy(finite) if finite.size else 1.0,
                      threshold_gy=0.0)


def add_color_legend(node, title: str):
    """A colour legend for ``node`` in the slice and 3D views (Slicer's colour legend display node); None when the
    scene cannot make one."""
    try:
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
    except Exception:  # noqa: BLE001 - a missing legend must not stop the analysis
        legend = None
    if legend is not None:
        legend.SetTitleText(title)
        legend.SetLabelFormat("%.0f")
    return legend


def _mark_dose(node, role: str, course: str | None = None) -> None:
    node.SetAttribute(DOSE_VOLUME_ATTRIBUTE, "1")
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    if course:
        node.SetAttribute(COURSE_ATTRIBUTE, course)


def _set_parent(sh, node, folder: int) -> None:
    """Put ``node`` under ``folder``. Slicer's (Qt) subject-hierarchy plugins create an item for every new node;
    headless nothing does, so the item is created here."""
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, folder)
    else:
        sh.CreateItem(folder, node)


def _table_columns(table_node, columns: list[tuple[str, str, list]]) -> None:
    """Fill a table node: (name, 'string' | 'double', values)."""
    table = table_node.GetTable()
    for name, kind, values in columns:
        arr = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
        arr.SetName(name)
        for v in values:
            if kind == "string":
                arr.InsertNextValue("" if v is None else str(v))
            else:
                arr.InsertNextValue(float("nan") if v is None else float(v))
        table.AddColumn(arr)
    table_node.Modified()


CONSTRAINT_COLUMNS = ("Status", "Organ", "Structure", "Metric", "Scope", "Course", "Basis", "Value",
                      "Value undiscounted", "Value credited", "Limit", "Unit", "Margin", "Unmet conditions",
                      "Verified", "Source", "Alpha/beta (Gy)", "Recovery credit", "Worst value", "Best value",
                      "Status in worst", "Worst scenario")


def constraints_table(results: Results, name: str, scene=None):
    """One row per evaluated constraint, in the engine's order; values as the engine computed them."""
    scene = _scene(scene)
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    rows = results.constraints
    credit = [", ".join(f"{k} {100 * v:g}%" for k, v in c.recovery_credit.items()) for c in rows]
    _table_columns(node, [
        ("Status", "string", [c.status for c in rows]),
        ("Organ", "string", [c.organ for c in rows]),
        ("Structure", "string", [c.structure or "" for c in rows]),
        ("Metric", "string", [c.metric for c in rows]),
        ("Scope", "string", [c.scope for c in rows]),
        ("Course", "string", [getattr(c, "course", None) for c in rows]),   # per_course / current rows
        # cumulative rows: the sum the limit is judged on ("undiscounted" | "credited"); Value is that one
        ("Basis", "string", [getattr(c, "basis", None) for c in rows]),
        ("Value", "double", [c.value for c in rows]),
        ("Value undiscounted", "double", [getattr(c, "value_undiscounted", None) for c in rows]),
        ("Value credited", "double", [getattr(c, "value_credited", None) for c in rows]),
        ("Limit", "double", [c.limit for c in rows]),
        ("Unit", "string", [c.unit for c in rows]),
        ("Margin", "double", [c.margin for c in rows]),
        ("Unmet conditions", "string", [unmet_conditions_text(getattr(c, "conditions", None)) for c in rows]),
        ("Verified", "string", ["yes" if c.verified else "NO" for c in rows]),
        ("Source", "string", [c.source for c in rows]),
        ("Alpha/beta (Gy)", "double", [c.alpha_beta for c in rows]),
        ("Recovery credit", "string", credit),
        # robustness (robustness.py): the row over the range of its assumptions
        ("Worst value", "double", [(c.robustness or {}).get("worst_value") for c in rows]),
        ("Best value", "double", [(c.robustness or {}).get("best_value") for c in rows]),
        ("Status in worst", "string", [(c.robustness or {}).get("status_worst") for c in rows]),
        ("Worst scenario", "string", [((c.robustness or {}).get("worst_scenario") or {}).get("label")
                                      for c in rows]),
    ])
    node.SetAttribute(ROLE_ATTRIBUTE, "constraints")
    node.SetAttribute("ReirradiationNPC.RobustStatus", str(results.summary.get("robust_status") or ""))
    node.SetAttribute("ReirradiationNPC.Verdict", results.summary["verdict"])
    node.SetAttribute("ReirradiationNPC.VerdictCode", str(results.summary.get("verdict_code") or ""))
    return node


def dvh_chart(prep: Prepared, analysis: Analysis, name: str, scene=None):
    """Cumulative-EQD2 DVH per organ (the engine's display curves: organ α/β, recovery credit applied) with a
    dashed vertical line at each point/volume-dose limit in Gy and a marker at each volume limit.
    Returns (table node, limits table node or None, chart node)."""
    scene = _scene(scene)
    shown = [s for s in prep.structures if s.organ is not None and s.organ.role != "body"
             and "cumulative" in analysis.dvh_curves.get(s.name, {})]
    curves = {s.name: analysis.dvh_curves[s.name]["cumulative"] for s in shown}
    # the engine's curves share one dose bin from 0 Gy: the longest dose axis holds every other one
    levels = max((c.dose_gy for c in curves.values()), key=len, default=np.zeros(1))
    cols = [("EQD2 (Gy)", "double", levels.tolist())]
    for s in shown:
        pct = np.zeros(levels.size)
        v = curves[s.name].volume_percent
        pct[: v.size] = v
        cols.append((s.name, "double", pct.tolist()))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} DVH data")
    _table_columns(table, cols)
    table.SetAttribute(ROLE_ATTRIBUTE, "dvh_data")
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} DVH")
    chart.SetTitle("Cumulative EQD2 DVH (organ alpha/beta, recovery credit applied)")
    chart.SetXAxisTitle("Cumulative EQD2 (Gy)")
    chart.SetYAxisTitle("Volume (%)")
    chart.SetAttribute(ROLE_ATTRIBUTE, "dvh_chart")
    colors = {}
    order = {id(x): i for i, x in enumerate(prep.structures)}  # same colours as the structure segments
    for s in shown:
        color = structure_color(s, order[id(s)])
        colors[s.name] = color
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"DVH {s.name}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("EQD2 (Gy)")
        series.SetYColumnName(s.name)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetColor(*color)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    limit_cols, limit_series = [], []
    total_cc = {n: c.total_cc for n, c in curves.items()}
    for c in analysis.constraints:
        if c.structure not in colors or c.limit is None or c.scope != "cumulative":
            continue
        metric = parse_metric(c.metric)
        if metric.kind in ("mean", "min"):
            continue  # a mean or minimum dose limit is not a point of the DVH curve
        tag = f"{c.structure} {c.metric} limit"
        if c.unit == "Gy":
            xs, ys, line = [c.limit, c.limit], [0.0, 100.0], True
        else:
            if c.unit == "%":
                pct = c.limit
            elif total_cc[c.structure] > 0:
                pct = 100.0 * c.limit / total_cc[c.structure]
            else:
                continue
            xs, ys, line = [metric.param] * 2, [pct, pct], False
        limit_cols += [(f"{tag} x", "double", xs), (f"{tag} y", "double", ys)]
        limit_series.append((tag, colors[c.structure], line))
    limits = None
    if limit_cols:
        limits = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} DVH limits")
        _table_columns(limits, limit_cols)
        limits.SetAttribute(ROLE_ATTRIBUTE, "dvh_limits")
        for tag, color, line in limit_series:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", tag)
            series.SetAndObserveTableNodeID(limits.GetID())
            series.SetXColumnName(f"{tag} x")
            series.SetYColumnName(f"{tag} y")
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            if line:
                series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            else:
                series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleDiamond)
            series.SetColor(*color)
            series.SetAttribute(ROLE_ATTRIBUTE, "dvh_limit")
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table, limits, chart


def hottest_point_ras(prep: Prepared, violation) -> tuple[float, float, float] | None:
    """RAS (mm) of the voxel with the highest organ EQD2 inside a violation region."""
    s = next((x for x in prep.structures if x.name == violation.structure), None)
    if s is None or not violation.mask.any():
        return None
    dose = budget.constraint_eqd2(s, prep.courses, prep.protocol, violation)  # its scope, basis and course
    local = np.unravel_index(int(np.argmax(np.where(violation.mask, dose, -np.inf))), violation.mask.shape)
    kji = [b.start + x for b, x in zip(violation.box, local)]
    ijk = np.array([kji[::-1]], dtype=float)
    return tuple(float(v) for v in F3 @ prep.grid.index_to_physical(ijk)[0])


def worst_violation(violations: list, constraints: list):
    """The region of the failed Gy constraint exceeded by the largest fraction of its limit (None without one)."""
    ranked = sorted((c for c in constraints if c.status == "fail" and c.value is not None and c.limit),
                    key=lambda c: (c.value - c.limit) / abs(c.limit), reverse=True)
    for c in ranked:
        for v in violations:
            if (v.status == "fail" and v.structure == c.structure and v.metric == c.metric and v.scope == c.scope
                    and v.mask.any()):
                return v
    return None


MARGIN_COLORS = planning_aids.MARGIN_COLORS  # one source for the target colours


# ------------------------------------------------------------------------------------ subject hierarchy

def study_of(node, scene=None) -> int:
    """The subject-hierarchy study item above ``node`` (0 when it has none: e.g. a volume loaded from a file)."""
    if node is None:
        return 0
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(_scene(scene))
    item = sh.GetItemByDataNode(node)
    return sh.GetItemAncestorAtLevel(item, STUDY_LEVEL) if item else 0


def ensure_study(scene=None, node=None, patient: dict | None = None) -> int:
    """The study item the analysis goes under: the study of ``node`` (the current dose or CT; SlicerRT puts the
    RTDOSE it loads under its DICOM study), else a study this module made before in this scene, else a new patient
    and study named from ``patient`` (``name``/``id``; DICOM ``StudyInstanceUID`` as the study's UID when known).

    The study carries SlicerRT's dose-unit attributes (``DicomRtImport.DoseUnitName`` GY,
    ``DicomRtImport.DoseUnitValue`` 1.0): set when absent, never overwritten (SlicerRT puts the RTDOSE's
    DoseGridScaling in the value; its modules read both from the study)."""
    scene = _scene(scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = study_of(node, scene)
    if not study:
        ids = vtk.vtkIdList()
        sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
        ours = [ids.GetId(i) for i in range(ids.GetNumberOfIds())
                if sh.GetItemAttribute(ids.GetId(i), ROLE_ATTRIBUTE) == "study"]
        study = ours[0] if ours else 0
    if not study:
        patient = patient or {}
        subject = sh.CreateSubjectItem(sh.GetSceneItemID(), str(patient.get("name") or patient.get("id")
                                                                or "Patient"))
        study = sh.CreateStudyItem(subject, str(patient.get("study") or "Reirradiation study"))
        sh.SetItemAttribute(study, ROLE_ATTRIBUTE, "study")
        if patient.get("study_uid"):
            sh.SetItemUID(study, "DICOM", str(patient["study_uid"]))
        if patient.get("id"):
            sh.SetItemUID(subject, "DICOM", str(patient["id"]))
    if not sh.GetItemAttribute(study, DOSE_UNIT_NAME_ATTRIBUTE):
        sh.SetItemAttribute(study, DOSE_UNIT_NAME_ATTRIBUTE, "GY")
    if not sh.GetItemAttribute(study, DOSE_UNIT_VALUE_ATTRIBUTE):
        sh.SetItemAttribute(study, DOSE_UNIT_VALUE_ATTRIBUTE, "1.0")
    return study


def _items_below(sh, parent: int) -> list[int]:
    ids = vtk.vtkIdList()
    sh.GetItemChildren(parent, ids, True)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def analysis_folders(scene=None, name: str | None = None) -> list[int]:
    """Analysis folders in the scene (all, or those of analysis ``name``)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(_scene(scene))
    return [i for i in _items_below(sh, sh.GetSceneItemID())
            if sh.GetItemAttribute(i, ROLE_ATTRIBUTE) == "analysis"
            and (name is None or sh.GetItemAttribute(i, ANALYSIS_NAME_ATTRIBUTE) == name)]


def remove_analysis(folder_item: int, scene=None) -> None:
    """Remove an analysis folder with every node under it (a re-run replaces its own previous results)."""
    scene = _scene(scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    nodes = [sh.GetItemDataNode(i) for i in _items_below(sh, folder_item)]
    nodes = [n for n in nodes if n is not None]
    helpers = []  # display (colour legends included) and storage nodes go with their data node
    for node in nodes:
        for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
            helpers.append(node.GetNthDisplayNode(i))
        if hasattr(node, "GetStorageNode"):
            helpers.append(node.GetStorageNode())
    for node in nodes + helpers:  # the subject hierarchy drops the items of removed nodes
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)
    if sh.GetItemName(folder_item):
        sh.RemoveItem(folder_item, False, True)


def isodose_segmentation(cumulative: np.ndarray, grid: Grid, levels: list[float], color_table, top_gy: float,
                         name: str, scene=None):
    """Isodose lines of the cumulative EQD2 at ``levels`` (Gy): one segment per level holding the voxels at or
    above it, shown as an outline in the slice views (no fill) and hidden in 3D. None without a level reached."""
    scene = _scene(scene)
    seg = None
    for level in levels:
        mask = cumulative >= level
        if not mask.any():
            continue
        if seg is None:
            seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            seg.CreateDefaultDisplayNodes()
            seg.SetAttribute(ROLE_ATTRIBUTE, "isodose")
        idx = np.nonzero(mask)
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in idx)
        rgba = [0.0] * 4
        color_table.GetColor(int(round(255 * min(level / max(top_gy, 1e-6), 1.0))), rgba)
        sid = add_segment(seg, f"Isodose {level:g} Gy EQD2", mask[box], box, grid, tuple(rgba[:3]), 1.0,
                          {"ReirradiationNPC.Kind": "isodose", "ReirradiationNPC.LevelGy": f"{level:g}"})
        display = seg.GetDisplayNode()
        display.SetSegmentOpacity2DFill(sid, 0.0)
        display.SetSegmentOpacity2DOutline(sid, 1.0)
        display.SetSegmentVisibility3D(sid, False)
    return seg


def protocol_text_node(protocol, name: str, scene=None):
    """The protocol file used, verbatim, as a text node saved with the scene (with its path and SHA-256), so that a
    saved scene reproduces the analysis even when the file has changed or is gone. None if it cannot be read."""
    import hashlib
    path = Path(getattr(protocol, "path", "") or "")
    try:
        data = path.read_bytes()
    except OSError:
        return None
    node = _scene(scene).AddNewNodeByClass("vtkMRMLTextNode", name)
    node.SetText(data.decode("utf-8"))
    node.SetAttribute(ROLE_ATTRIBUTE, "protocol")
    node.SetAttribute("ReirradiationNPC.ProtocolPath", str(path))
    node.SetAttribute("ReirradiationNPC.ProtocolSHA256", hashlib.sha256(data).hexdigest())
    return node


def create_output_nodes(prep: Prepared, analysis: Analysis, results: Results, name: str, scene=None,
                        progress: Progress | None = None, planning=None, study_item: int | None = None,
                        reference_node=None) -> OutputNodes:
    """Every result as nodes under one analysis folder called ``name``, inside the patient's study.

    ``study_item``: the study to use; else that of ``reference_node`` (the current dose or CT), else one made by
    :func:`ensure_study`. A previous analysis folder of the same name is removed first, with all its nodes: a
    re-run replaces its own previous results (other analyses are left alone; give another name to keep both).
    ``planning``: the engine's planning aids (margins, violations, headroom, remaining dose) when already
    computed (``planning.compute``); computed here otherwise.
    """
    scene = _scene(scene)
    say = progress or (lambda m: None)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    replaced = 0
    for old in analysis_folders(scene, name):
        remove_analysis(old, scene)
        replaced += 1
    study = study_item or ensure_study(scene, reference_node, getattr(prep.case, "patient", None))
    if not sh.GetItemAttribute(study, DOSE_UNIT_NAME_ATTRIBUTE):
        sh.SetItemAttribute(study, DOSE_UNIT_NAME_ATTRIBUTE, "GY")
    if not sh.GetItemAttribute(study, DOSE_UNIT_VALUE_ATTRIBUTE):
        sh.SetItemAttribute(study, DOSE_UNIT_VALUE_ATTRIBUTE, "1.0")
    folder = sh.CreateFolderItem(study, name)
    sh.SetItemAttribute(folder, ROLE_ATTRIBUTE, "analysis")
    sh.SetItemAttribute(folder, ANALYSIS_NAME_ATTRIBUTE, name)
    sh.SetItemAttribute(folder, "ReirradiationNPC.Verdict", str(results.summary.get("verdict", "")))
    sh.SetItemAttribute(folder, "ReirradiationNPC.VerdictCode", str(results.summary.get("verdict_code") or ""))
    out = OutputNodes(folder_item=folder, study_item=study, replaced=replaced)
    ctab = dose_color_table(scene)
    out.color_table = ctab
    grid = prep.grid

    def keep(node):
        if node is not None:
            _set_parent(sh, node, folder)
        return node

    say("creating EQD2 volumes")
    top = display_top_gy(analysis.cumulative)
    cum = keep(add_volume_node(Volume(analysis.cumulative.astype(np.float32, copy=False), grid),
                               f"{name} cumulative EQD2", scene))
    _mark_dose(cum, "cumulative_eqd2")
    _dose_display(cum, ctab, top)
    add_color_legend(cum, "Cumulative EQD2 (Gy)")
    out.cumulative = cum
    for c in prep.courses:
        node = keep(add_volume_node(Volume(analysis.course_eqd2[c.name].astype(np.float32, copy=False), grid),
                                    f"{name} EQD2 {c.name}", scene))
        _mark_dose(node, "course_eqd2", c.name)
        node.SetAttribute("ReirradiationNPC.Fractions", str(c.fractions))
        if len(getattr(c, "groups", ())) > 1:  # one EQD2 term per fraction group
            node.SetAttribute("ReirradiationNPC.FractionGroups", c.fractions_text)
        _dose_display(node, ctab, top)
        out.course_eqd2[c.name] = node
    ab = keep(add_volume_node(Volume(analysis.alpha_beta.astype(np.float32, copy=False), grid),
                              f"{name} alpha-beta map", scene))
    ab.SetAttribute(ROLE_ATTRIBUTE, "alpha_beta")
    out.alpha_beta = ab

    say("creating isodose lines at the protocol's limit levels")
    out.isodose = keep(isodose_segmentation(analysis.cumulative, grid, isodose_levels(analysis.constraints), ctab,
                                            top, f"{name} isodose lines", scene))

    say("creating target and violation segments")
    seg = keep(scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} targets and violations"))
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(cum)
    seg.SetAttribute(ROLE_ATTRIBUTE, "overlays")
    plan = planning if planning is not None else planning_aids.compute(prep, analysis, progress)
    out.planning = plan
    margins_found = plan.margins
    if margins_found is not None:
        for key in ("GTV", "CTV", "PTV"):
            mask = getattr(margins_found, key.lower())
            if mask.any():
                add_segment(seg, margins_found.names.get(key, key), mask, margins_found.box, margins_found.grid,
                            MARGIN_COLORS[key], MARGIN_OPACITY[key], {"ReirradiationNPC.Kind": "margin",
                                                                "ReirradiationNPC.Target": key})
    viol = [v for v in plan.violations if v.mask.any()]
    for v in viol:
        add_segment(seg, v.name, v.mask, v.box, grid, v.color, 1.0,
                    {"ReirradiationNPC.Kind": "violation" if v.status == "fail" else "warning",
                     "ReirradiationNPC.ThresholdGy": f"{v.threshold_gy:.4f}"})
    out.violations = viol
    w = worst_violation(viol, analysis.constraints)
    if w is not None:
        out.worst_violation_ras = hottest_point_ras(prep, w)
        if out.worst_violation_ras is not None:
            seg.SetAttribute("ReirradiationNPC.WorstViolationRAS", " ".join(f"{v:.3f}" for v in out.worst_violation_ras))
    for attr, role, label in (("headroom", "headroom", "headroom (Gy EQD2)"),
                              ("remaining", "remaining_dose", "remaining dose (Gy physical)")):
        value = getattr(plan, attr, None)
        arr = getattr(value, "array", value)
        if isinstance(arr, np.ndarray) and arr.shape == grid.shape:
            node = keep(add_volume_node(Volume(arr.astype(np.float32, copy=False), grid), f"{name} {label}", scene))
            node.SetAttribute(ROLE_ATTRIBUTE, role)
            limit_map_display(node, arr, role, scene)
            setattr(out, attr, node)
    if seg.GetSegmentation().GetNumberOfSegments():
        # no smoothing: a violation of a few voxels must be shown as those voxels, not shrunk away
        seg.GetSegmentation().SetConversionParameter("Smoothing factor", "0.0")
        seg.CreateClosedSurfaceRepresentation()
    seg.GetDisplayNode().SetVisibility3D(True)
    out.overlays = seg

    say("creating constraint table and DVH chart")
    out.constraints_table = keep(constraints_table(results, f"{name} constraints", scene))
    table, limits, chart = dvh_chart(prep, analysis, name, scene)
    out.dvh_table, out.dvh_chart = table, chart
    for node in (table, limits, chart):
        keep(node)
    if chart is not None:  # every plot series too: nothing of the analysis at the scene root
        for i in range(chart.GetNumberOfPlotSeriesNodes()):
            keep(chart.GetNthPlotSeriesNode(i))
    out.protocol_text = keep(protocol_text_node(prep.protocol, f"{name} protocol", scene))
    if out.protocol_text is not None:
        sh.SetItemAttribute(folder, "ReirradiationNPC.ProtocolSHA256",
                            out.protocol_text.GetAttribute("ReirradiationNPC.ProtocolSHA256"))
    return out


def find_output_nodes(folder_item: int, scene=None) -> dict[str, list]:
    """Nodes under an analysis folder grouped by their ``ReirradiationNPC.Role`` attribute."""
    scene = _scene(scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(folder_item, ids, True)
    out: dict[str, list] = {}
    for n in range(ids.GetNumberOfIds()):
        node = sh.GetItemDataNode(ids.GetId(n))
        if node is not None:
            out.setdefault(node.GetAttribute(ROLE_ATTRIBUTE) or "", []).append(node)
    return out
