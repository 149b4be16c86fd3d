"""Guideline target margins: CTV = GTV + margin, PTV = CTV + margin, with exact Euclidean distances in mm.

Algorithm (see docs/science.md, section 7.1):

- A voxel joins the CTV when its centre lies within ``ctv_mm`` (inclusive, 1 µm tolerance) of the GTV's surface,
  represented by the centres of the voxel faces separating a GTV voxel from a 6-neighbour outside it. Distances
  are exact Euclidean millimetres on the (possibly anisotropic) margin grid: SimpleITK's
  ``SignedMaurerDistanceMap`` (``useImageSpacing=True``) on a half-spacing grid whose even points are the voxel
  centres. The work is done in the GTV's bounding box padded by the total margin (never the full grid).
- The CTV is cropped to the body structure (``crop_to``), out of air (CT number < ``air_hu`` on the reference CT),
  and away from the named critical organs (voxels whose centre is closer than ``avoid.distance_mm`` to the organ's
  surface, same face-centre rule, and the organ's own voxels, are removed). The GTV itself is never removed: CTV = crop(GTV ⊕ m) ∪ GTV.
- The PTV is the CTV grown by ``ptv_mm`` the same way, cropped to the body only (a PTV may reach into air), and
  always contains the CTV.
- Margins are computed on the reference image grid when the case has a reference image, else on the evaluation
  grid. Reported: GTV/CTV/PTV volumes (cc), the volume each crop removed, PTV ∩ OAR overlap per organ structure (cc),
  and the minimum distance from the GTV to each organ structure (mm, voxel centre to voxel centre; 0 when they
  touch or overlap).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .analysis import StructureData
from .geometry import Grid, bounding_box
from .io import Structure
from .masks import structure_on_grid
from .protocol import MarginRecipe, Organ, Protocol

log = logging.getLogger(__name__)

#: tolerance (mm) for "within the margin": a centre exactly at the margin distance is inside
TIE_MM = 1e-3

Box = tuple[slice, slice, slice]


@dataclass
class GridStructure:
    """A structure on the margin grid: bool crop ``mask`` over the (k, j, i) ``box``."""

    name: str
    mask: np.ndarray
    box: Box
    organ: Organ | None


@dataclass
class MarginInputs:
    grid: Grid
    grid_source: str                         # "reference image" | "evaluation grid"
    structures: list[GridStructure]
    ct: np.ndarray | None                    # HU on ``grid`` (k, j, i) or None


@dataclass
class Margins:
    """Margin volumes as crops over ``box`` of ``grid`` plus the reported numbers."""

    grid: Grid
    box: Box
    gtv: np.ndarray
    ctv: np.ndarray
    ptv: np.ndarray
    names: dict[str, str]                    # "GTV" | "CTV" | "PTV" -> segment name
    report: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def subgrid(self) -> Grid:
        lo = tuple(s.start for s in self.box[::-1])
        hi = tuple(s.stop for s in self.box[::-1])
        return self.grid.subgrid(lo, hi)


# ------------------------------------------------------------------------------------------ distances

def distance_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance (mm, float32) from every voxel centre to the nearest voxel centre of ``mask``.

    ``mask`` is indexed (k, j, i); ``spacing`` is (x, y, z) in mm. Voxels of ``mask`` get values <= 0 (minus the
    distance to the mask's outer layer). An empty mask gives +inf everywhere.
    """
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    img = sitk.GetImageFromArray(mask.astype(np.uint8, copy=False))
    img.SetSpacing(tuple(float(s) for s in spacing))
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True,
                                     backgroundValue=0)
    return sitk.GetArrayFromImage(d)


def surface_distance_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance (mm, float32, >= 0) from every voxel centre to the surface of ``mask``.

    The surface is represented by the centres of the voxel faces separating a mask voxel from a 6-neighbour outside
    the mask (the midpoints between the two voxel centres). Distances are computed exactly (Maurer) on a grid of
    half the spacing whose even points are the voxel centres; memory is about 8x the box. An empty mask gives +inf.
    """
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    K, J, I = mask.shape
    fine = np.zeros((2 * K - 1, 2 * J - 1, 2 * I - 1), dtype=np.uint8)
    fine[0::2, 0::2, 1::2] = mask[:, :, 1:] != mask[:, :, :-1]
    fine[0::2, 1::2, 0::2] = mask[:, 1:, :] != mask[:, :-1, :]
    fine[1::2, 0::2, 0::2] = mask[1:, :, :] != mask[:-1, :, :]
    if not fine.any():  # the mask fills the whole box: no face inside it
        return np.full(mask.shape, np.inf, dtype=np.float32)
    d = distance_mm(fine, tuple(s / 2.0 for s in spacing))
    return np.ascontiguousarray(d[0::2, 0::2, 0::2])


def grow(mask: np.ndarray, margin_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """``mask`` plus every voxel whose centre lies within ``margin_mm`` (inclusive) of its surface."""
    if margin_mm <= 0:
        return mask.copy()
    return mask | (surface_distance_mm(mask, spacing) <= margin_mm + TIE_MM)


def pad_box(box: Box, pad_kji: tuple[int, int, int], shape) -> tuple[Box, bool]:
    """``box`` grown by ``pad_kji`` voxels per axis, clipped to ``shape``; also whether clipping happened."""
    out, clipped = [], False
    for s, p, n in zip(box, pad_kji, shape):
        lo, hi = s.start - p, s.stop + p
        clipped |= lo < 0 or hi > n
        out.append(slice(max(lo, 0), min(hi, n)))
    return tuple(out), clipped


def union_box(boxes: list[Box]) -> Box:
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))


def paste(struct_mask: np.ndarray, struct_box: Box, work_box: Box, out: np.ndarray | None = None) -> np.ndarray:
    """The part of a cropped structure falling inside ``work_box``, as a bool array shaped like the work box."""
    shape = tuple(s.stop - s.start for s in work_box)
    res = np.zeros(shape, dtype=bool) if out is None else out
    inter = [slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(struct_box, work_box)]
    if any(s.stop <= s.start for s in inter):
        return res
    src = tuple(slice(s.start - a.start, s.stop - a.start) for s, a in zip(inter, struct_box))
    dst = tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(inter, work_box))
    res[dst] |= struct_mask[src]
    return res


def _pad_for(mm: float, spacing_xyz) -> tuple[int, int, int]:
    sp_kji = spacing_xyz[::-1]
    return tuple(int(math.ceil(mm / s)) + 2 for s in sp_kji)


def gather_inputs(structures: list[StructureData], reference_image, evaluation_grid: Grid) -> MarginInputs:
    """The case's structures brought onto the margin grid: the reference image's grid if any (``reference_image``
    is a :class:`~.geometry.Volume` of CT numbers in HU), else the evaluation grid. Each structure is taken from the
    mask as read (``source_mask``) when kept, else from its evaluation-grid crop."""
    if reference_image is not None:
        grid, source, ct = reference_image.grid, "reference image", reference_image.array
    else:
        grid, source, ct = evaluation_grid, "evaluation grid", None
    out = []
    for s in structures:
        src_mask, src_grid = getattr(s, "source_mask", None), getattr(s, "source_grid", None)
        if src_mask is not None and src_grid is not None:
            mask, sgrid = src_mask, src_grid
        elif s.mask.size:
            mask = s.mask
            sgrid = evaluation_grid.subgrid(tuple(b.start for b in s.box[::-1]), tuple(b.stop for b in s.box[::-1]))
        else:
            continue
        on = onto_grid(s.name, mask, sgrid, grid)
        if on is not None:
            out.append(GridStructure(s.name, on[0], on[1], s.organ))
    return MarginInputs(grid, source, out, ct)


def onto_grid(name: str, mask: np.ndarray, mask_grid: Grid, grid: Grid) -> tuple[np.ndarray, Box] | None:
    """A mask on ``mask_grid`` as a bool crop and (k, j, i) box on ``grid``: copied when ``mask_grid`` is a
    voxel-aligned part of ``grid`` (same spacing and direction, whole-voxel offset), else resampled."""
    aligned = (np.allclose(mask_grid.spacing, grid.spacing, rtol=1e-6, atol=1e-6)
               and np.allclose(mask_grid.direction, grid.direction, atol=1e-6))
    if aligned:
        off = grid.physical_to_index(np.asarray([mask_grid.origin]))[0]
        if np.allclose(off, np.round(off), atol=1e-3):
            off_kji = np.round(off).astype(int)[::-1]
            lo = np.maximum(off_kji, 0)
            hi = np.minimum(off_kji + np.asarray(mask.shape), np.asarray(grid.shape))
            if np.any(hi <= lo):
                return None
            crop = mask[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, off_kji))]
            inner = bounding_box(crop)
            if inner is None:
                return None
            box = tuple(slice(int(a) + b.start, int(a) + b.stop) for a, b in zip(lo, inner))
            return np.ascontiguousarray(crop[inner], dtype=bool), box
    return structure_on_grid(Structure(name, mask, mask_grid, "margins"), grid)


# ----------------------------------------------------------------------------------------- resolution

def _find(structures: list[GridStructure], name: str, protocol: Protocol | None = None) -> list[GridStructure]:
    """Structures named ``name`` (case-insensitive); failing that, those matching ``name``'s organ in the protocol."""
    key = name.strip().casefold()
    hits = [s for s in structures if s.name.strip().casefold() == key]
    if hits or protocol is None:
        return hits
    organ = protocol.match(name) or protocol.organs.get(name)
    return [s for s in structures if organ is not None and s.organ is not None and s.organ.key == organ.key]


# ------------------------------------------------------------------------------------------- building

def build(recipe: MarginRecipe, inputs: MarginInputs, protocol: Protocol) -> tuple[Margins | None, list[str]]:
    """Build GTV, CTV and PTV from the protocol's recipe. Returns (margins or None, warnings)."""
    warnings: list[str] = []
    grid = inputs.grid
    sp = grid.spacing
    vcc = grid.voxel_volume_cc
    gtvs, absent = [], []
    for name in recipe.gtv:
        found = [s for s in _find(inputs.structures, name) if s.mask.any()]
        if not found:
            absent.append(name)
        gtvs.extend(found)
    gtvs = list({id(s): s for s in gtvs}.values())
    if not gtvs:
        warnings.append(f"margins: no GTV structure found (looked for {', '.join(recipe.gtv)}); CTV/PTV not built")
        return None, warnings

    total = recipe.ctv_mm + recipe.ptv_mm
    core = union_box([s.box for s in gtvs])
    work, clipped = pad_box(core, _pad_for(total, sp), grid.shape)
    if clipped:
        warnings.append("margins: the GTV plus margins reaches the edge of the margin grid; CTV/PTV are cut there")
    wshape = tuple(s.stop - s.start for s in work)
    gtv = np.zeros(wshape, dtype=bool)
    for s in gtvs:
        paste(s.mask, s.box, work, out=gtv)

    ctv = grow(gtv, recipe.ctv_mm, sp)
    grown_cc = float(ctv.sum()) * vcc
    removed = {}

    body = None
    if recipe.crop_to is not None:
        found = _find(inputs.structures, recipe.crop_to, protocol)
        if not found:
            warnings.append(f"margins: body structure {recipe.crop_to!r} is absent; CTV/PTV NOT cropped to the body")
        else:
            body = np.zeros(wshape, dtype=bool)
            for s in found:
                paste(s.mask, s.box, work, out=body)
            before = int(ctv.sum())
            ctv &= body
            removed["outside_body"] = (before - int(ctv.sum())) * vcc

    air_cropped = False
    if recipe.air_hu is not None:
        if inputs.ct is None:
            warnings.append("margins: the protocol crops the CTV out of air but the case has no reference CT; "
                            "CTV NOT cropped out of air")
        else:
            before = int(ctv.sum())
            ctv &= ~(inputs.ct[work] < recipe.air_hu)
            removed["air"] = (before - int(ctv.sum())) * vcc
            air_cropped = True

    avoided = []
    if recipe.avoid_organs:
        before = int(ctv.sum())
        for okey in recipe.avoid_organs:
            organs = [s for s in inputs.structures if s.organ is not None and s.organ.key == okey and s.mask.any()]
            if not organs:
                warnings.append(f"margins: avoided organ {okey!r} has no structure; no avoidance applied for it")
                continue
            for s in organs:
                ext, _ = pad_box(work, _pad_for(recipe.avoid_distance_mm, sp), grid.shape)
                om = paste(s.mask, s.box, ext)
                if not om.any():
                    continue
                inner = tuple(slice(w.start - e.start, w.stop - e.start) for w, e in zip(work, ext))
                near = om if recipe.avoid_distance_mm <= 0 else (
                    om | (surface_distance_mm(om, sp) < recipe.avoid_distance_mm))
                ctv &= ~near[inner]
                avoided.append(s.name)
        removed["avoid"] = (before - int(ctv.sum())) * vcc

    gtv_only = gtv & ~ctv
    if gtv_only.any():
        warnings.append(f"margins: {float(gtv_only.sum()) * vcc:.3f} cc of the GTV lies outside the body, in air or "
                        "near an avoided organ; it is kept in the CTV (a CTV always contains its GTV)")
    ctv |= gtv
    del gtv_only

    ptv = grow(ctv, recipe.ptv_mm, sp)
    if body is not None:
        ptv &= body
    ptv |= ctv

    names = {"GTV": "GTV", "CTV": f"CTV (GTV + {recipe.ctv_mm:g} mm)", "PTV": f"PTV (CTV + {recipe.ptv_mm:g} mm)"}
    overlaps, distances = _organ_report(gtv, ptv, work, inputs, protocol)
    report = {
        "recipe": {"gtv": list(recipe.gtv), "ctv_mm": recipe.ctv_mm, "ptv_mm": recipe.ptv_mm,
                   "air_hu": recipe.air_hu, "crop_to": recipe.crop_to,
                   "avoid": {"organs": list(recipe.avoid_organs), "distance_mm": recipe.avoid_distance_mm},
                   "source": recipe.source, "verified": recipe.verified},
        "grid": {"source": inputs.grid_source, "spacing_mm": list(sp)},
        "gtv_structures": [s.name for s in gtvs],
        "gtv_names_absent": absent,       # names of the recipe's list not present in the case (alternatives)
        "segment_names": names,
        "volumes_cc": {"GTV": float(gtv.sum()) * vcc, "CTV": float(ctv.sum()) * vcc, "PTV": float(ptv.sum()) * vcc},
        "ctv_before_crops_cc": grown_cc,
        "ctv_removed_cc": removed,
        "cropped_to_body": body is not None,
        "cropped_out_of_air": air_cropped,
        "avoided_structures": avoided,
        "ptv_oar_overlap_cc": overlaps,
        "gtv_min_distance_mm": distances,
        "method": "voxel centres within the margin of the structure surface (centres of the voxel faces between "
                  "inside and outside); exact Euclidean distance in mm (SimpleITK SignedMaurerDistanceMap on a "
                  "half-spacing grid); GTV-organ distances are between voxel centres",
    }
    return Margins(grid, work, gtv, ctv, ptv, names, report, warnings), warnings


def _organ_report(gtv: np.ndarray, ptv: np.ndarray, work: Box, inputs: MarginInputs, protocol: Protocol
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """PTV ∩ organ volume (cc) and minimum GTV -> organ distance (mm) for every OAR structure."""
    vcc = inputs.grid.voxel_volume_cc
    oars = [s for s in inputs.structures if s.organ is not None and s.organ.role == "oar" and s.mask.any()]
    overlaps = {}
    for s in oars:
        overlaps[s.name] = float(paste(s.mask, s.box, work)[ptv].sum()) * vcc
    distances: dict[str, float] = {}
    if not oars:
        return overlaps, distances
    # one GTV distance map over the box holding the GTV and every OAR
    gbox = tuple(slice(w.start + b.start, w.start + b.stop) for w, b in
                 zip(work, _inner_box(gtv)))
    big = union_box([gbox] + [s.box for s in oars])
    g = paste(gtv[tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(gbox, work))], gbox, big)
    d = distance_mm(g, inputs.grid.spacing)
    del g
    for s in oars:
        sub = d[tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(s.box, big))]
        vals = sub[s.mask]
        distances[s.name] = max(float(vals.min()), 0.0) + 0.0  # 0 when touching or overlapping (no -0.0)
    return overlaps, distances


def _inner_box(mask: np.ndarray) -> Box:
    b = bounding_box(mask)
    return b if b is not None else tuple(slice(0, 0) for _ in range(3))
