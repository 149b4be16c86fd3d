"""Reading and writing images, doses and structures (NRRD / NIfTI / Slicer .seg.nrrd).

Every reader validates what it returns and raises :class:`InputError` naming the file and the field.
Doses are physical dose in Gy.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid, Volume, check_finite_geometry
from .sampling import crop_box
from .threads import map_in_order

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: A physical dose above this (Gy) in an NPC course is taken as a unit error (cGy given as Gy).
MAX_PLAUSIBLE_DOSE_GY = 150.0


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".seg.nrrd", ".nii.gz"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def stem(path: Path) -> str:
    s = _suffix(path)
    return path.name[: len(path.name) - len(s)] if s else path.name


def read_sitk(path: Path, what: str) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", source=str(path), field=what)
    if path.is_dir():
        raise InputError("is a folder, expected an image file", source=str(path), field=what)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError("not a readable image (NRRD or NIfTI expected) or the file is corrupt",
                         source=str(path), field=what) from None
    if img.GetDimension() != 3:
        raise InputError(f"expected a 3D image, got {img.GetDimension()}D", source=str(path), field=what)
    check_finite_geometry(Grid.of_image(img), str(path))
    return img


def read_image(path: Path, what: str = "image") -> Volume:
    img = read_sitk(path, what)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("expected a scalar image", source=str(path), field=what)
    vol = Volume.from_sitk(img, name=stem(Path(path)))
    vol.meta["path"] = str(path)
    return vol


def _units_of(img: sitk.Image) -> str | None:
    for key in img.GetMetaDataKeys():
        if key.lower() in ("units", "dose_units", "doseunits", "nrrd_units"):
            return img.GetMetaData(key).strip()
    return None


def read_dose(path: Path, what: str = "dose") -> Volume:
    """Physical dose in Gy, validated: finite, non-negative, plausibly in Gy. Returned as float32."""
    img = read_sitk(path, what)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("expected a scalar dose image", source=str(path), field=what)
    units = _units_of(img)
    if units is not None and units.strip('"').lower() not in ("gy", "gray"):
        raise InputError(f"dose units are {units!r}; physical dose in Gy is required", source=str(path),
                         field=what)
    vol = Volume.from_sitk(img, name=stem(Path(path)), dtype=np.float32)
    arr = vol.array
    if not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise InputError(f"dose contains {n} NaN or infinite voxel(s)", source=str(path), field=what)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0:
        raise InputError(f"dose contains negative values (minimum {lo:.4g} Gy)", source=str(path), field=what)
    if hi > MAX_PLAUSIBLE_DOSE_GY:
        raise InputError(f"maximum dose {hi:.5g} exceeds {MAX_PLAUSIBLE_DOSE_GY:g} Gy: is the dose in cGy? "
                         "physical dose in Gy is required", source=str(path), field=what)
    vol.meta["path"] = str(path)
    return vol


# ------------------------------------------------------------------------------------------- structures

@dataclass
class Structure:
    """A binary structure on its own grid (the grid it was read on). ``mask`` is bool, indexed k, j, i.

    ``parent``: set by readers that crop (``read_structures(..., crop=True)``): the grid of the file and the
    (k, j, i) box of ``mask`` in it; ``grid`` is then that box's sub-grid. :func:`masks.structure_on_grid` computes
    from the parent grid, so a crop gives exactly the numbers the whole mask gives.
    """

    name: str
    mask: np.ndarray
    grid: Grid
    source: str
    color: tuple[float, float, float] | None = None
    parent: tuple[Grid, tuple[slice, slice, slice]] | None = None

    def volume(self) -> Volume:
        return Volume(self.mask.astype(np.uint8), self.grid, self.name)


def _structure(name: str, arr: np.ndarray, grid: Grid, source: str, color=None, crop: bool = False) -> Structure:
    """A Structure from a mask array (bool, or non-zero = inside); ``crop``: kept as its bounding box only, with
    ``parent`` set (an empty mask: one voxel at the grid's corner)."""
    if not crop:
        return Structure(name, arr if arr.dtype == np.bool_ else arr != 0, grid, source, color)
    mask, sub, box = crop_box(arr, grid)
    return Structure(name, mask, sub, source, color, parent=(grid, box))


def read_structures(path: Path, what: str = "structures", crop: bool = False) -> list[Structure]:
    """A folder of binary masks (file stem = structure name) or a Slicer ``.seg.nrrd``.

    ``crop``: each mask kept as its bounding box (see ``Structure.parent``): a 512 x 512 x 150 mask is read,
    boxed and dropped (``READ_THREADS`` files at a time) instead of being held whole (the pipeline's way)."""
    path = Path(path)
    if not path.exists():
        raise InputError("not found", source=str(path), field=what)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) in IMAGE_SUFFIXES + (".seg.nrrd",))
        if not files:
            raise InputError("folder holds no mask files (.nrrd, .nii, .nii.gz)", source=str(path), field=what)
        # cropped: two files at a time (reading and unzipping run without the GIL); whole masks one at a time
        parts = map_in_order(lambda f: _read_mask_file(f, what, crop), files, READ_THREADS if crop else 1)
        out = [s for part in parts for s in part]
    elif _suffix(path) == ".seg.nrrd":
        out = read_segmentation(path, what, crop=crop)
    else:
        raise InputError("expected a folder of masks or a Slicer .seg.nrrd", source=str(path), field=what)
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"structure name {dup[0]!r} appears more than once", source=str(path), field=what)
    return out


#: mask files read at once by ``read_structures(..., crop=True)`` (SimpleITK releases the GIL while it reads)
READ_THREADS = 2


def _read_mask_file(f: Path, what: str, crop: bool) -> list[Structure]:
    if _suffix(f) == ".seg.nrrd":
        return read_segmentation(f, what, crop=crop)
    img = read_sitk(f, what)
    arr = sitk.GetArrayViewFromImage(img)   # no copy; ``img`` stays alive while it is used
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError("mask contains NaN", source=str(f), field=what)
        arr = arr > 0.5
    return [_structure(stem(f), arr, Grid.of_image(img), str(f), crop=crop)]


def read_segmentation(path: Path, what: str = "structures", crop: bool = False) -> list[Structure]:
    """Read a Slicer segmentation (.seg.nrrd): 3D labelmap or 4D layered, ``Segment<i>_*`` metadata.
    ``crop``: see :func:`read_structures`."""
    img = read_sitk(path, what)
    grid = Grid.of_image(img)
    keys = set(img.GetMetaDataKeys())
    layers = [img] if img.GetNumberOfComponentsPerPixel() == 1 else [
        sitk.VectorIndexSelectionCast(img, c) for c in range(img.GetNumberOfComponentsPerPixel())]
    arrays = [sitk.GetArrayViewFromImage(layer) for layer in layers]
    out = []
    i = 0
    while f"Segment{i}_ID" in keys or f"Segment{i}_Name" in keys:
        def md(k, default=None):
            return img.GetMetaData(f"Segment{i}_{k}") if f"Segment{i}_{k}" in keys else default
        name = md("Name") or md("ID")
        label = int(md("LabelValue", "1"))
        layer = int(md("Layer", "0"))
        if layer >= len(arrays):
            raise InputError(f"Segment{i}_Layer {layer} but the file has {len(arrays)} layer(s)",
                             source=str(path), field=what)
        color = None
        if md("Color"):
            try:
                color = tuple(float(c) for c in md("Color").split()[:3])
            except ValueError:
                color = None
        out.append(_structure(name, np.asarray(arrays[layer] == label), grid, str(path), color, crop=crop))
        i += 1
    if not out:
        raise InputError("no Segment<i>_Name entries: not a Slicer segmentation", source=str(path), field=what)
    return out


# ---------------------------------------------------------------------------------------------- writing

#: NRRD compression (gzip) pays for large volumes (a 512 x 512 x 150 int16 CT: 79 MB raw, a few MB compressed, in
#: about 0.5 s at level 1) and not for dose-grid maps (0.6 M float32 voxels: 2.4 MB raw, 0.9 MB compressed for 10x
#: the write time). Volumes with at least this many voxels, or of an integer type (masks, labels: cheap and very
#: compressible), are written compressed at COMPRESSION_LEVEL; others raw (benchmarks/run_benchmarks.py).
COMPRESS_MIN_VOXELS = 4_000_000
COMPRESSION_LEVEL = 1


def should_compress(arr: np.ndarray) -> bool:
    """Whether NRRD compression pays for this array (see COMPRESS_MIN_VOXELS)."""
    return arr.size >= COMPRESS_MIN_VOXELS or np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_


def write_volume(vol: Volume, path: Path, *, description: str = "", units: str | None = None,
                 compress: bool | None = None) -> None:
    """NRRD (or any SimpleITK format by suffix). ``compress``: None = where it pays (see COMPRESS_MIN_VOXELS)."""
    img = vol.to_sitk()
    if description:
        img.SetMetaData("description", description)
    if units:
        img.SetMetaData("units", units)
    if compress is None:
        compress = should_compress(np.asarray(vol.array))
    sitk.WriteImage(img, str(path), useCompression=bool(compress), compressionLevel=COMPRESSION_LEVEL)


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    return _SAFE.sub("_", name).strip("_") or "unnamed"


def write_segmentation(segments: list[tuple[str, np.ndarray, tuple[float, float, float]]], grid: Grid,
                       path: Path) -> None:
    """Write a Slicer .seg.nrrd (4D layered: one layer per segment, so overlaps are kept).

    ``segments``: (name, bool mask on ``grid``, RGB colour 0-1).
    """
    if not segments:
        raise ValueError("no segments to write")
    layers = [sitk.GetImageFromArray(m.astype(np.uint8)) for _, m, _ in segments]
    img = sitk.Compose(layers) if len(layers) > 1 else layers[0]
    grid.apply_to(img)
    for i, (name, mask, color) in enumerate(segments):
        img.SetMetaData(f"Segment{i}_ID", f"Segment_{i}")
        img.SetMetaData(f"Segment{i}_Name", name)
        img.SetMetaData(f"Segment{i}_NameAutoGenerated", "0")
        img.SetMetaData(f"Segment{i}_Color", " ".join(f"{c:.4f}" for c in color))
        img.SetMetaData(f"Segment{i}_ColorAutoGenerated", "0")
        img.SetMetaData(f"Segment{i}_LabelValue", "1")
        img.SetMetaData(f"Segment{i}_Layer", str(i if len(layers) > 1 else 0))
        nz = np.argwhere(mask)
        if nz.size:
            lo, hi = nz.min(axis=0)[::-1], nz.max(axis=0)[::-1]
            ext = " ".join(f"{a} {b}" for a, b in zip(lo, hi))
        else:
            ext = "0 -1 0 -1 0 -1"
        img.SetMetaData(f"Segment{i}_Extent", ext)
        img.SetMetaData(f"Segment{i}_Tags", "")
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    sitk.WriteImage(img, str(path), useCompression=True)


def ensure_writable_dir(path: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError("exists and is not a directory", source=str(path), field="--output")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError("output directory is not empty (use --overwrite to replace its outputs)",
                         source=str(path), field="--output")
    if not overwrite and path.exists() and not os.access(path, os.W_OK):
        raise InputError("output directory is not writable", source=str(path), field="--output")
