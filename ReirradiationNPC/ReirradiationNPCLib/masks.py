"""Structures onto the evaluation grid, kept as bounding-box crops (never a full-grid mask per structure)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import Grid, bounding_box
from .io import Structure


def box_of(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    return bounding_box(mask)


def structure_on_grid(structure: Structure, grid: Grid) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """The structure as a bool crop on ``grid`` and its (k, j, i) box; None if it has no voxel there.

    Same grid: cropped as is. Another grid: the mask is linearly interpolated at the voxel centres of ``grid``
    (within the structure's bounding box) and thresholded at 0.5.
    """
    src_box = bounding_box(structure.mask)
    if src_box is None:
        return None
    if structure.grid.same_as(grid, tol_mm=1e-4):
        crop = structure.mask[src_box]
        return crop.copy(), src_box
    # physical corners of the source box (padded by half a voxel), into the target's index space
    lo = np.array([s.start for s in src_box][::-1], dtype=float) - 0.5
    hi = np.array([s.stop - 1 for s in src_box][::-1], dtype=float) + 0.5
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    idx = grid.physical_to_index(structure.grid.index_to_physical(corners))
    # (a structure reaching beyond ``grid`` is clipped: callers compare volumes to warn)
    tlo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
    thi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, np.asarray(grid.size))
    if np.any(thi <= tlo):
        return None
    sub = grid.subgrid(tuple(tlo), tuple(thi))
    src = sitk.GetImageFromArray(structure.mask[src_box].astype(np.float32))
    structure.grid.subgrid(tuple(s.start for s in src_box[::-1]), tuple(s.stop for s in src_box[::-1])).apply_to(src)
    out = sitk.Resample(src, sub.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    m = sitk.GetArrayFromImage(out) >= 0.5
    inner = bounding_box(m)
    if inner is None:
        return None
    box = tuple(slice(int(t) + b.start, int(t) + b.stop) for t, b in zip(tlo[::-1], inner))
    return m[inner].copy(), box


def coverage_map(source: Grid, target: Grid, transform: sitk.Transform | None = None) -> np.ndarray | None:
    """Bool map on ``target``: voxels inside ``source``'s extent. None when ``source`` covers all of ``target``.

    ``transform`` (ITK convention, as in ``geometry.resample_linear``) maps ``target`` points into ``source``'s
    space; the shortcut (all of ``target`` covered) is taken only for linear transforms, whose image of the
    target's corner box is exact.
    """
    if transform is None or transform.IsLinear():
        lo, hi = target.bounds_mm()
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        if transform is not None:
            corners = np.array([transform.TransformPoint(tuple(float(v) for v in c)) for c in corners])
        idx = source.physical_to_index(corners)
        if np.all(idx >= -0.5 + 1e-6) and np.all(idx <= np.asarray(source.size) - 0.5 - 1e-6):
            return None
    ones = sitk.Image([int(s) for s in source.size], sitk.sitkUInt8) + 1
    source.apply_to(ones)
    out = sitk.Resample(ones, target.reference_image(), transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt8)
    return sitk.GetArrayViewFromImage(out) > 0
