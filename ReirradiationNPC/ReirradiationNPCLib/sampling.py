"""Sub-voxel sampling of a structure for dose metrics.

A structure mask lives on its own grid (often finer than the dose, and covering only part of it). To make
dose-volume metrics of small organs (chiasm, cochlea: 0.05-0.6 cc, a handful of 2.5 mm dose voxels) converge, the
structure is described by many sample points, each standing for an equal volume:

1. The mask's bounding box (on the mask's own grid, padded by one empty voxel) is subdivided: each mask voxel is
   split into ``f_i x f_j x f_k`` sub-voxels (integer factors per axis, chosen automatically, see
   :func:`choose_factors`).
2. By default every sub-voxel of every mask voxel belongs to the structure: the mask is taken exactly as given
   (its voxels are the partial-volume resolution of the contour), only sampled more finely for the dose. This is
   exact for shapes whose faces lie on voxel faces (boxes) and, for curved shapes, unbiased (volume = voxel count
   x voxel volume). Optionally (``occupancy="linear"``) the mask is linearly interpolated at the sub-voxel
   centres and thresholded at 0.5, which rounds the staircase; this rounds true edges too (a box), so it is not
   the default.
   A mask much finer than the sample edge in-plane and coarser along z (an RTSTRUCT rasterised on a fine
   in-plane lattice with one plane per contour plane) is instead merged in-plane (blocks of fine voxels, sample
   edge <= ``MAX_MERGED_EDGE_MM``) and split along z; each sample is weighted by the volume of the mask voxels it
   stands for, so the volume stays exactly the mask's (see :func:`_anisotropic_factors`).
3. The dose is interpolated trilinearly at each sample's physical position (vectorised numpy, any dose grid and
   orientation; only the dose voxels around the samples are read).

Everything happens inside the structure's bounding box; nothing is allocated on the full dose grid.
Units: positions in LPS mm, volumes in cc (cm^3), doses in Gy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .geometry import Grid, bounding_box

log = logging.getLogger(__name__)

#: Aim for at least this many samples inside a structure (small organs get sub-voxel sampling).
TARGET_SAMPLES = 20_000
#: Largest sub-division factor per axis.
MAX_FACTOR = 16
#: Upper bound on the number of sub-voxels evaluated in a structure's bounding box (memory and time cap).
MAX_BOX_SAMPLES = 4_000_000
#: Structures with more mask voxels than this are sampled by blocks of mask voxels (each block one sample at its
#: centre, weighted by the volume of its mask voxels): keeps memory and time bounded for a fine External.
MAX_SAMPLES = 400_000
#: Sub-voxel edges are not made finer than this (mm): below it, dose interpolation gains nothing.
MIN_SAMPLE_SPACING_MM = 0.1

#: Merged samples (fine mask voxels merged into one sample) have edges no longer than this (mm): a sample centre
#: then lies within a quarter of this from every mask voxel it stands for, which bounds how far Dmax can fall short.
MAX_MERGED_EDGE_MM = 0.5

OCCUPANCY_RULE = "mask linearly interpolated at sub-voxel centres; inside when >= 0.5"


def choose_factors(spacing_mm, n_voxels: int, box_voxels: int, target: int = TARGET_SAMPLES,
                   max_factor: int = MAX_FACTOR, max_box: int = MAX_BOX_SAMPLES) -> tuple[int, int, int]:
    """Sub-division factors (i, j, k) of the mask voxels so that the structure gets about ``target`` samples.

    The sample edge aimed at is ``h = (V / target)^(1/3)`` (mm, ``V`` the mask volume), so samples are near
    isotropic; each factor is ``ceil(spacing / h)`` clipped to ``[1, max_factor]`` and to sample edges of at least
    ``MIN_SAMPLE_SPACING_MM``. Large structures keep factor 1 (their own mask voxels). The number of sub-voxels in
    the bounding box is kept under ``max_box`` by lowering the largest factor first.
    """
    sp = np.asarray(spacing_mm, dtype=float)
    if n_voxels <= 0:
        return (1, 1, 1)
    vol_mm3 = n_voxels * float(np.prod(sp))
    h = max((vol_mm3 / target) ** (1.0 / 3.0), MIN_SAMPLE_SPACING_MM)
    f = np.clip(np.ceil(sp / h - 1e-9), 1, max_factor).astype(int)
    f = np.minimum(f, np.maximum(np.floor(sp / MIN_SAMPLE_SPACING_MM), 1).astype(int))
    while int(np.prod(f)) * box_voxels > max_box and f.max() > 1:
        f[int(np.argmax(f))] -= 1
    return tuple(int(v) for v in f)


@dataclass
class StructureSamples:
    """Samples of one structure: the inside cells of a regular sampling grid; each stands for ``sample_volume_cc``.

    ``grid`` is the sampling grid (sub-voxel centres, aligned with the mask's grid, covering its bounding box);
    ``flat`` the flat (k, j, i) indices of its cells that belong to the structure.
    """

    grid: Grid | None
    flat: np.ndarray                 # int64 flat indices into grid.shape
    sample_volume_cc: float | np.ndarray  # cc per sample (one value for all, or one per sample)
    info: dict = field(default_factory=dict)  # the sampling used (recorded in results)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.flat.size)

    @property
    def volume_cc(self) -> float:
        if isinstance(self.sample_volume_cc, np.ndarray):
            return float(self.sample_volume_cc.sum())
        return self.n * self.sample_volume_cc

    @property
    def points_mm(self) -> np.ndarray:
        """(N, 3) LPS mm of the samples (computed on demand)."""
        if self.n == 0:
            return np.zeros((0, 3))
        k, j, i = np.unravel_index(self.flat, self.grid.shape)
        return self.grid.index_to_physical(np.stack([i, j, k], axis=1).astype(np.float64))

    def dose(self, array: np.ndarray, grid: Grid, outside: float = 0.0) -> np.ndarray:
        """Dose (Gy, float64) at each sample: trilinear interpolation of ``array`` (indexed k, j, i) on ``grid``.

        Only the part of ``array`` around the structure is read (SimpleITK linear resampling onto the sampling
        grid). Samples beyond ``grid``'s extent (more than half a voxel past its outermost voxel centres) get
        ``outside``; within that half voxel the edge value is extended.
        """
        vals = _aligned_linear(self, array, grid, float(outside))
        if vals is None:
            vals = self._resample(array, grid, sitk.sitkLinear, float(outside))
        return vals.astype(np.float64)

    def outside_fraction(self, grid: Grid) -> float:
        """Fraction of the samples beyond ``grid``'s extent (voxel centres +- half a voxel)."""
        if self.n == 0:
            return 0.0
        if self._within(grid):
            return 0.0
        key = ("inside", _grid_key(grid))
        if key not in self._cache:
            self._cache[key] = self._resample(None, grid, sitk.sitkNearestNeighbor, 0.0, whole=True) > 0
        return float(1.0 - self._cache[key].mean())

    def fraction_in(self, mask: np.ndarray, grid: Grid) -> float:
        """Fraction of samples whose nearest voxel of ``grid`` is set in the bool ``mask`` (0 outside the grid)."""
        if self.n == 0:
            return 0.0
        hit = self._resample(np.asarray(mask, dtype=np.uint8), grid, sitk.sitkNearestNeighbor, 0.0) > 0
        return float(hit.mean())

    def _resample(self, array: np.ndarray, grid: Grid, interpolator, default: float, whole: bool = False
                  ) -> np.ndarray:
        """Values of ``array`` (on ``grid``) at the samples. ``whole``: ``array`` stands for a constant 1 map."""
        if self.n == 0:
            return np.zeros(0, dtype=np.float32)
        region = self._region(grid)
        if region is None:
            return np.full(self.n, default, dtype=np.float32)
        lo, hi = region
        if whole:
            crop = np.ones((hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]), dtype=np.uint8)
        else:
            crop = np.ascontiguousarray(array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]])
        if crop.dtype not in (np.float32, np.float64, np.uint8):
            crop = crop.astype(np.float32)
        img = sitk.GetImageFromArray(crop)
        grid.subgrid(tuple(lo), tuple(hi)).apply_to(img)
        out_type = sitk.sitkFloat32 if crop.dtype == np.float32 else img.GetPixelID()
        ref = self.grid.reference_image()
        res = sitk.Resample(img, ref, sitk.Transform(), interpolator, default, out_type)
        vals = sitk.GetArrayViewFromImage(res).ravel()[self.flat].copy()
        del res
        return vals

    def _within(self, grid: Grid) -> bool:
        """True when every sample centre lies within ``grid``'s extent (voxel centres +- half a voxel, less a
        1e-6 voxel margin): the corners of the sampling grid's centre box, mapped into ``grid``'s index space,
        all do (the box is convex, so every centre inside it does too)."""
        g = self.grid
        corners = np.array([[a, b, c] for a in (0, g.size[0] - 1) for b in (0, g.size[1] - 1)
                            for c in (0, g.size[2] - 1)], dtype=np.float64)
        idx = grid.physical_to_index(g.index_to_physical(corners))
        size = np.asarray(grid.size, dtype=np.float64)
        return bool(np.all(idx >= -0.5 + 1e-6) and np.all(idx <= size - 0.5 - 1e-6))

    def _region(self, grid: Grid):
        """Index box [lo, hi) (i, j, k) of ``grid`` around the sampling grid, one voxel margin; None if disjoint.

        At the true edges of ``grid`` the box stops at the edge, so SimpleITK's own half-voxel border rule applies
        there; elsewhere the margin keeps the interpolation identical to interpolating the whole array.
        """
        key = ("region", _grid_key(grid))
        if key in self._cache:
            return self._cache[key]
        g = self.grid
        corners = np.array([[a, b, c] for a in (-0.5, g.size[0] - 0.5) for b in (-0.5, g.size[1] - 0.5)
                            for c in (-0.5, g.size[2] - 0.5)])
        idx = grid.physical_to_index(g.index_to_physical(corners))
        size = np.asarray(grid.size)
        lo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, size)
        region = None if np.any(hi <= lo) else (tuple(int(v) for v in lo), tuple(int(v) for v in hi))
        self._cache[key] = region
        return region


def _axis_linear(first: float, step: float, m: int, n: int):
    """One axis of trilinear interpolation: ``m`` sample positions ``first + a step`` (continuous indices of an axis
    of ``n`` voxels) -> lower and upper voxel index, the fraction towards the upper one, and whether each position
    lies within the axis (voxel centres +- half a voxel, the lower bound included). At the axis ends the edge value
    is extended: the index is clamped and the fraction is 0 (below the first centre) or moot (beyond the last)."""
    c = first + np.arange(m) * step
    inside = (c >= -0.5) & (c < n - 0.5)
    lo = np.clip(np.floor(c), 0, n - 1).astype(np.intp)
    frac = np.maximum(c - lo, 0.0)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, frac, inside


#: Sampling and dose grids whose direction matrices differ by at most this are taken as parallel (fast path below).
PARALLEL_TOLERANCE = 1e-9


def _aligned_linear(samples: StructureSamples, array: np.ndarray, grid: Grid, outside: float):
    """Trilinear interpolation of ``array`` (float32 or float64, indexed k, j, i on ``grid``) at the samples, when the
    sampling grid's axes are parallel to ``grid``'s (the usual case: masks and dose share an orientation); None
    otherwise (then SimpleITK resamples, :meth:`StructureSamples._resample`).

    On parallel grids trilinear interpolation separates by axis: the sample positions along each axis are one row of
    continuous indices, so the dose is interpolated along i, then j, then k, each as ``a + (b - a) t`` in float64 --
    the order and the formula of ITK's linear interpolator, with its border rule (inside: continuous index in
    [-0.5, n - 0.5) on every axis; the edge value extended within that half voxel; ``outside`` beyond), and the
    result in the array's type as SimpleITK returns it. Only the dose voxels around the samples are read; the steps
    along j and k go a plane at a time (small temporaries), the last one only where samples lie. The values equal
    SimpleITK's resampling but for the last bit of a few samples (the continuous indices are computed once per axis
    here, accumulated along each scan line there). ``samples.flat`` must be sorted (as the sampling makes it; None
    otherwise)."""
    if samples.n == 0 or array.dtype not in (np.float32, np.float64) or array.ndim != 3:
        return None
    g = samples.grid
    rot = grid.direction_matrix
    flat = samples.flat
    if np.abs(g.direction_matrix - rot).max() > PARALLEL_TOLERANCE or np.any(flat[1:] < flat[:-1]):
        return None
    first = (np.asarray(g.origin) - np.asarray(grid.origin)) @ rot / np.asarray(grid.spacing)
    step = np.asarray(g.spacing) / np.asarray(grid.spacing)
    (li, hi_i, ti, in_i), (lj, hi_j, tj, in_j), (lk, hi_k, tk, in_k) = (
        _axis_linear(float(first[a]), float(step[a]), g.size[a], grid.size[a]) for a in range(3))
    i0, j0, k0 = int(li[0]), int(lj[0]), int(lk[0])            # lowest indices read (positions increase)
    crop = np.asarray(array[k0:int(hi_k[-1]) + 1, j0:int(hi_j[-1]) + 1, i0:int(hi_i[-1]) + 1], dtype=np.float64)
    a, b = crop[:, :, li - i0], crop[:, :, hi_i - i0]
    b -= a
    b *= ti
    b += a                                                        # along i: (dose k, dose j, samples i)
    ni, nj, nk = g.size
    plane = nj * ni
    along_j = np.empty((b.shape[0], nj, ni))                      # along j: (dose k, samples j, samples i)
    tj = tj[:, None]
    for kd in range(b.shape[0]):                                  # a dose plane at a time: small temporaries
        lo = b[kd][lj - j0]
        np.subtract(b[kd][hi_j - j0], lo, out=along_j[kd])
        along_j[kd] *= tj
        along_j[kd] += lo
    along_j = along_j.reshape(b.shape[0], plane)
    # along k, a sampling plane at a time, only for the samples on it (flat is sorted: plane c holds
    # flat[bounds[c]:bounds[c + 1]])
    bounds = np.searchsorted(flat, np.arange(nk + 1) * plane)
    vals = np.empty(flat.size, dtype=array.dtype)
    buf = np.empty(plane)
    for c in range(nk):
        s0, s1 = int(bounds[c]), int(bounds[c + 1])
        if s0 == s1:
            continue
        lo_c, hi_c = int(lk[c]) - k0, int(hi_k[c]) - k0
        lower = along_j[lo_c]
        if hi_c != lo_c and tk[c] != 0.0:                         # else a + (b - a) 0 = a
            np.subtract(along_j[hi_c], lower, out=buf)
            buf *= tk[c]
            buf += lower
            lower = buf
        vals[s0:s1] = lower[flat[s0:s1] - c * plane]
    if not (in_i.all() and in_j.all() and in_k.all()):
        inside = (in_k[:, None, None] & in_j[None, :, None] & in_i[None, None, :]).reshape(-1)[flat]
        vals[~inside] = outside
    return vals


def _grid_key(grid: Grid):
    return (grid.size, grid.origin, grid.spacing, grid.direction)


def sample_structure(mask: np.ndarray, grid: Grid, factors: tuple[int, int, int] | None = None,
                     target: int = TARGET_SAMPLES, occupancy: str = "nearest") -> StructureSamples:
    """Sub-voxel samples of the bool ``mask`` (indexed k, j, i) on its own ``grid``.

    ``factors`` (i, j, k) forces the sub-division; by default :func:`choose_factors` picks it.
    ``occupancy``: ``"nearest"`` (default) takes every sub-voxel of every mask voxel (the mask as given);
    ``"linear"`` takes the sub-voxels where the linearly interpolated mask is >= 0.5, which rounds the mask's
    staircase (and true edges); there a mask voxel that would keep no sub-voxel at all (an isolated voxel or a
    one-voxel-thin part) keeps all of its sub-voxels, so no part of the contoured structure goes unsampled.

    The structure volume is the mask's own volume (voxel count x voxel volume, an unbiased estimate for a mask
    made from voxel centres); each sample stands for an equal share of it. Smoothing only moves where the
    samples sit, so the shape follows the contour more closely while the volume stays that of the mask.
    """
    if occupancy not in ("linear", "nearest"):
        raise ValueError(f"occupancy must be 'linear' or 'nearest', got {occupancy!r}")
    mask = np.asarray(mask)
    box = bounding_box(mask)
    sp = np.asarray(grid.spacing, dtype=float)
    if box is None:
        info = {"method": "empty mask", "mask_spacing_mm": sp.tolist(), "samples": 0, "mask_volume_cc": 0.0,
                "volume_cc": 0.0}
        return StructureSamples(None, np.zeros(0, dtype=np.int64), 0.0, info)
    crop = np.asarray(mask[box], dtype=bool)
    n_vox = int(np.count_nonzero(crop))
    mask_cc = n_vox * grid.voxel_volume_cc
    box_ijk = np.array([crop.shape[2], crop.shape[1], crop.shape[0]])
    if factors is None and occupancy == "nearest":
        mixed = _anisotropic_factors(sp, n_vox, target)
        if mixed is not None:
            return _merged_samples(crop, box, grid, n_vox, *mixed)
    if factors is None and n_vox > MAX_SAMPLES:
        return _block_samples(crop, box, grid, n_vox)
    if factors is None:
        factors = choose_factors(sp, n_vox, int(np.prod(box_ijk)), target)
    f = np.asarray(factors, dtype=int)
    fk, fj, fi = int(f[2]), int(f[1]), int(f[0])
    lo_ijk = np.array([box[2].start, box[1].start, box[0].start], dtype=float)
    first = lo_ijk - 0.5 + 0.5 / f  # continuous mask index of the first sub-voxel centre
    sgrid = Grid(tuple(int(v) for v in box_ijk * f), tuple(float(v) for v in grid.index_to_physical(first[None])[0]),
                 tuple(float(v) for v in sp / f), grid.direction)
    n_orphans = 0
    if np.all(f == 1):
        inside = crop
    elif occupancy == "nearest":
        inside = _upsample(crop, fk, fj, fi)
    else:
        # zero-padded crop as an image on the mask's grid, linearly resampled onto the sub-voxel centres
        img = sitk.GetImageFromArray(np.pad(crop.astype(np.float32), 1))
        img.SetSpacing(tuple(float(s) for s in sp))
        img.SetDirection(grid.direction)
        img.SetOrigin(tuple(float(v) for v in grid.index_to_physical((lo_ijk - 1.0)[None])[0]))
        occ_img = sitk.Resample(img, sgrid.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        inside = sitk.GetArrayFromImage(occ_img) >= 0.5
        del occ_img
        K, J, I = crop.shape
        has = inside.reshape(K, fk, J, fj, I, fi).any(axis=(1, 3, 5))
        orphans = crop & ~has
        n_orphans = int(np.count_nonzero(orphans))
        if n_orphans:
            inside |= _upsample(orphans, fk, fj, fi)
    flat = np.flatnonzero(inside)
    del inside
    n = int(flat.size)
    sample_cc = mask_cc / n if n else 0.0
    smoothed = occupancy == "linear" and bool(np.any(f > 1))
    info = {
        "method": "sub-voxel" if np.any(f > 1) else "mask voxels",
        "subdivision_ijk": f.tolist(),
        "sub_voxels_per_mask_voxel": int(np.prod(f)),
        "sample_spacing_mm": (sp / f).tolist(),
        "mask_spacing_mm": sp.tolist(),
        "samples": n,
        "mask_volume_cc": mask_cc,
        "volume_cc": mask_cc,
        "occupancy": (OCCUPANCY_RULE + f"; {n_orphans} isolated or one-voxel-thin mask voxel(s) sampled whole"
                      if smoothed else "every sub-voxel of every mask voxel"),
        "dose_interpolation": "trilinear at sample centres",
    }
    log.debug("sampled structure: %s", info)
    return StructureSamples(sgrid, flat, sample_cc, info)


def _anisotropic_factors(sp: np.ndarray, n_vox: int, target: int):
    """Merge and split factors (i, j, k) for a mask much finer than the sample edge along some axis and coarser
    along another (an RTSTRUCT rasterised on a fine in-plane lattice with one plane per contour plane); None
    otherwise (then the mask voxels are subdivided, or blocked when very many, as before).

    Sample edge aimed at: ``h = (V / target)^(1/3)`` (as :func:`choose_factors`), at most
    ``MAX_MERGED_EDGE_MM``. Along an axis with spacing <= h / 2, ``floor(h / spacing)`` mask voxels merge into one
    sample edge; along an axis with spacing > h, each mask voxel splits into ``ceil(spacing / h)`` (at most
    ``MAX_FACTOR``). Masks on CT or dose grids (spacing > 0.25 mm in-plane) never merge.
    """
    vol_mm3 = n_vox * float(np.prod(sp))
    h = min(max((vol_mm3 / target) ** (1.0 / 3.0), MIN_SAMPLE_SPACING_MM), MAX_MERGED_EDGE_MM)
    merge = np.maximum(np.floor(h / sp + 1e-9), 1).astype(int)
    split = np.clip(np.ceil(sp / h - 1e-9), 1, MAX_FACTOR).astype(int)
    split = np.minimum(split, np.maximum(np.floor(sp / MIN_SAMPLE_SPACING_MM), 1).astype(int))
    if not (np.any(merge >= 2) and np.any(split >= 2)):
        return None
    split[merge >= 2] = 1
    return merge, split


def _merged_samples(crop: np.ndarray, box, grid: Grid, n_vox: int, merge: np.ndarray, split: np.ndarray
                    ) -> StructureSamples:
    """Blocks of ``merge`` (i, j, k) mask voxels, each split into ``split`` (i, j, k) sub-blocks; one sample at the
    centre of every sub-block that holds mask voxels, weighted by the volume of those voxels (so the structure
    volume stays exactly the mask's; the dose is read at the sub-block centre)."""
    sp = np.asarray(grid.spacing, dtype=float)
    bk, bj, bi = int(merge[2]), int(merge[1]), int(merge[0])
    fk, fj, fi = int(split[2]), int(split[1]), int(split[0])
    K, J, I = crop.shape
    nk, nj, ni = -(-K // bk), -(-J // bj), -(-I // bi)
    if (nk * bk, nj * bj, ni * bi) != crop.shape:
        padded = np.zeros((nk * bk, nj * bj, ni * bi), dtype=bool)
        padded[:K, :J, :I] = crop
    else:
        padded = crop
    counts = _block_counts(padded, bk, bj, bi)
    del padded
    if fk * fj * fi > 1:
        counts = _upsample(counts, fk, fj, fi)
    flat = np.flatnonzero(counts)
    nsub = fk * fj * fi
    weights = counts.ravel()[flat].astype(np.float64) * (grid.voxel_volume_cc / nsub)
    del counts
    lo_ijk = np.array([box[2].start, box[1].start, box[0].start], dtype=float)
    step = merge / split                         # sample edge in mask voxels
    first = lo_ijk - 0.5 + step / 2.0            # continuous mask index of the first sample centre
    sgrid = Grid((ni * fi, nj * fj, nk * fk), tuple(float(v) for v in grid.index_to_physical(first[None])[0]),
                 tuple(float(v) for v in sp * step), grid.direction)
    info = {
        "method": "merged/split mask voxels (mask finer than the sample edge along some axes)",
        "merge_ijk": merge.tolist(),
        "subdivision_ijk": split.tolist(),
        "sample_spacing_mm": (sp * step).tolist(),
        "mask_spacing_mm": sp.tolist(),
        "samples": int(flat.size),
        "mask_volume_cc": n_vox * grid.voxel_volume_cc,
        "volume_cc": float(weights.sum()),
        "occupancy": "each sample weighted by the volume of the mask voxels it stands for; dose at its centre",
        "dose_interpolation": "trilinear at sample centres",
    }
    log.debug("sampled structure: %s", info)
    return StructureSamples(sgrid, flat, weights, info)


def _block_samples(crop: np.ndarray, box, grid: Grid, n_vox: int) -> StructureSamples:
    """Very large structures: one sample per block of mask voxels, at the block centre, weighted by the volume of
    the block's mask voxels (the structure volume stays exact; the dose is read at block centres)."""
    sp = np.asarray(grid.spacing, dtype=float)
    b = np.ones(3, dtype=int)                    # i, j, k
    while n_vox / float(np.prod(b)) > MAX_SAMPLES:
        b[int(np.argmin(sp * b))] += 1           # grow the finest block edge first (blocks stay near isotropic)
    bk, bj, bi = int(b[2]), int(b[1]), int(b[0])
    K, J, I = crop.shape
    nk, nj, ni = -(-K // bk), -(-J // bj), -(-I // bi)
    padded = np.zeros((nk * bk, nj * bj, ni * bi), dtype=bool)
    padded[:K, :J, :I] = crop
    counts = _block_counts(padded, bk, bj, bi)
    del padded
    flat = np.flatnonzero(counts)
    weights = counts.ravel()[flat].astype(np.float64) * grid.voxel_volume_cc
    lo_ijk = np.array([box[2].start, box[1].start, box[0].start], dtype=float)
    first = lo_ijk + (b - 1) / 2.0             # continuous mask index of the first block centre
    bgrid = Grid((ni, nj, nk), tuple(float(v) for v in grid.index_to_physical(first[None])[0]),
                 tuple(float(v) for v in sp * b), grid.direction)
    info = {
        "method": "blocks of mask voxels (very large structure)",
        "block_ijk": b.tolist(),
        "mask_voxels_per_sample": int(np.prod(b)),
        "sample_spacing_mm": (sp * b).tolist(),
        "mask_spacing_mm": sp.tolist(),
        "samples": int(flat.size),
        "mask_volume_cc": n_vox * grid.voxel_volume_cc,
        "volume_cc": float(weights.sum()),
        "occupancy": "each block weighted by the volume of its mask voxels; dose at the block centre",
        "dose_interpolation": "trilinear at sample centres",
    }
    return StructureSamples(bgrid, flat, weights, info)


def _block_counts(padded: np.ndarray, bk: int, bj: int, bi: int) -> np.ndarray:
    """Number of set voxels in each bk x bj x bi block of the bool array ``padded`` (shape a multiple of the block):
    uint32 (K / bk, J / bj, I / bi). Sums of strided slices, one axis after the other (the same whole numbers as
    ``padded.reshape(...).sum(axis=(1, 3, 5))``, about 5x faster)."""
    u = padded.view(np.uint8)
    acc = u[:, :, 0::bi].astype(np.uint16 if bi * bj < 2 ** 16 else np.uint32)
    for c in range(1, bi):
        acc += u[:, :, c::bi]
    if bj > 1:
        rows = acc[:, 0::bj].copy()
        for b in range(1, bj):
            rows += acc[:, b::bj]
        acc = rows
    out = acc[0::bk].astype(np.uint32)
    for a in range(1, bk):
        out += acc[a::bk]
    return out


def _upsample(a: np.ndarray, fk: int, fj: int, fi: int) -> np.ndarray:
    return np.repeat(np.repeat(np.repeat(a, fk, axis=0), fj, axis=1), fi, axis=2)


def describe_for_dose(samples: StructureSamples, dose_grid: Grid) -> dict:
    """The sampling record with the samples per dose voxel on ``dose_grid`` added."""
    info = dict(samples.info)
    if samples.n and samples.volume_cc > 0:
        info["samples_per_dose_voxel"] = dose_grid.voxel_volume_cc * samples.n / samples.volume_cc
    info["dose_grid_spacing_mm"] = list(dose_grid.spacing)
    return info


def crop_box(mask: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid, tuple[slice, slice, slice]]:
    """``mask`` (non-zero = inside) cropped to its bounding box as bool, the grid of that box and the box (k, j, i
    slices of ``mask``); an empty mask: one empty voxel at the grid's corner."""
    box = bounding_box(mask)
    if box is None:
        box = (slice(0, 1),) * 3
        return np.zeros((1, 1, 1), dtype=bool), grid.subgrid((0, 0, 0), (1, 1, 1)), box
    lo = tuple(b.start for b in box[::-1])
    hi = tuple(b.stop for b in box[::-1])
    part = mask[box]
    part = np.array(part, dtype=bool) if part.dtype == np.bool_ else part != 0
    return part, grid.subgrid(lo, hi), box


def crop_to_structure(mask: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """``mask`` cropped to its bounding box, with the grid of that box (keeps memory to the structure)."""
    part, sub, _ = crop_box(mask, grid)
    return part, sub
