"""Dose metrics of structures on one dose (the ``reirradiation-npc metrics`` command).

One dose (physical Gy, or converted to EQD2 sample by sample when the number of fractions and an alpha/beta are
given) and a set of structures; for each structure its volume (cc) and dose-volume metrics from sub-voxel samples
(``sampling.py``, ``dvh.py``). Output as JSON ``{"structures": [{"name", "volume_cc", "metrics": {...}}, ...]}``
(doses in Gy, ``V<x>Gy`` in cc, ``V<x>Gy%`` in percent) or CSV (one row per structure), written atomically.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from . import SOFTWARE_NAME, __version__, dvh
from .eqd2 import eqd2
from .errors import InputError
from .geometry import Grid, Volume
from .io import IMAGE_SUFFIXES, Structure, _suffix, read_sitk, read_structures, stem
from .sampling import describe_for_dose, sample_structure
from .threads import map_in_order

log = logging.getLogger(__name__)

#: The default metric set of the ``metrics`` command (besides the volume).
DEFAULT_SET = ("Dmax", "Dmin", "Dmean", "D0.03cc", "D2cc", "D95%", "D5%")
#: In-plane lattice spacing (mm) an RTSTRUCT is rasterised on for metrics (finer than a dose grid).
RTSTRUCT_LATTICE_MM = 1.0
#: Structures rasterised and evaluated at a time (threads; at most the number of CPUs). One: after the by-axis
#: dose and the D<x> tails, what is left is mostly short numpy calls that hold the GIL, so two threads cost ~35 %
#: more CPU for no gain in wall time on 2 cores (docs/benchmarks.md, issue 15 metrics section).
THREADS = 1


def metric_names(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The default set plus ``extra`` (validated, duplicates dropped, order kept)."""
    names = list(DEFAULT_SET)
    for m in extra:
        try:
            parsed = dvh.parse(m)
        except ValueError as exc:
            raise InputError(str(exc), field="--metric") from None
        names.append(parsed.name)
    return list(dict.fromkeys(names))


def check_fractionation(fractions: int | None, alpha_beta: float | None) -> None:
    """Fractions and alpha/beta go together: both (EQD2) or neither (physical dose)."""
    if (fractions is None) != (alpha_beta is None):
        given, missing = ("--fractions", "--alpha-beta") if fractions is not None else ("--alpha-beta",
                                                                                         "--fractions")
        raise InputError(f"{given} needs {missing} too (EQD2 needs both the number of fractions and alpha/beta)",
                         field=missing)
    if fractions is not None and fractions < 1:
        raise InputError(f"must be a whole number >= 1, got {fractions}", field="--fractions")
    if alpha_beta is not None and not (math.isfinite(alpha_beta) and alpha_beta > 0):
        raise InputError(f"must be > 0 Gy, got {alpha_beta}", field="--alpha-beta")


def load_structures(path: Path, dose_grid: Grid, warnings: list[str]) -> list[Structure]:
    """A folder of masks, a Slicer .seg.nrrd, a single mask file (name = file stem) or an RTSTRUCT file.

    Masks are kept on their own grid (they may be finer than the dose and cover only part of it). An RTSTRUCT is
    rasterised on the dose grid refined in-plane to <= ``RTSTRUCT_LATTICE_MM``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("not found", source=str(path), field="--structures")
    if path.is_file():
        from .dicom_rt import is_dicom_file
        if is_dicom_file(path):
            return read_rtstruct_fine(path, dose_grid, warnings)
        if _suffix(path) in IMAGE_SUFFIXES:
            img = read_sitk(path, "--structures")
            if img.GetNumberOfComponentsPerPixel() != 1:
                raise InputError("expected a scalar mask image", source=str(path), field="--structures")
            import SimpleITK as sitk
            arr = sitk.GetArrayFromImage(img)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InputError("mask contains NaN", source=str(path), field="--structures")
            mask = arr > 0.5 if arr.dtype.kind == "f" else arr != 0
            return [Structure(stem(path), mask, Grid.of_image(img), str(path))]
    return read_structures(path, "--structures")


def read_rtstruct_fine(path: Path, dose_grid: Grid, warnings: list[str]) -> list[Structure]:
    """An RTSTRUCT rasterised ROI by ROI, each on a lattice fine enough for its size.

    Lattice per ROI: the dose grid's orientation; in-plane spacing = the ROI's smallest in-plane extent / 100,
    between 0.05 mm and ``RTSTRUCT_LATTICE_MM``; one lattice plane on each contour plane (spacing = the structure
    set's plane spacing), so every contour plane fills exactly one lattice plane. Rasterisation itself is
    :func:`dicom_rt.rasterise_contours` (even-odd rule, in-plane coverage >= 0.5).
    """
    from .dicom_rt import plane_spacing_mm, rasterise_contours, read_rtstruct_contours
    src = str(path)
    rois, _, warns = read_rtstruct_contours(path, "--structures")
    warnings.extend(warns)
    if not rois:
        raise InputError("no ROI with closed planar contours", source=src, field="ROIContourSequence")
    rot = dose_grid.direction_matrix
    normal = rot[:, 2]
    slab = plane_spacing_mm(rois, normal, dose_grid.spacing[2])

    def one(roi) -> tuple[Structure, bool]:
        pts = np.concatenate(roi.contours)
        local = pts @ rot                                  # coordinates along the dose grid's i, j, k axes (mm)
        extent = local.max(axis=0) - local.min(axis=0)
        h = float(np.clip(min(extent[0], extent[1]) / 100.0, 0.05, RTSTRUCT_LATTICE_MM))
        # the ROI's smallest in-plane coordinates on a pixel edge; a lattice plane on its first contour plane
        origin = rot @ np.array([local[:, 0].min() + h / 2, local[:, 1].min() + h / 2, local[:, 2].min()])
        lattice = Grid((1, 1, 1), tuple(float(v) for v in origin), (h, h, slab), dose_grid.direction)
        res = rasterise_contours(roi.contours, lattice, slab, name=roi.name, src=src)
        if res is None:
            mask, lo = np.zeros((1, 1, 1), bool), (0, 0, 0)
        else:
            mask, lo = res
        k, j, i = mask.shape
        return (Structure(roi.name, mask, lattice.subgrid(lo, (lo[0] + i, lo[1] + j, lo[2] + k)), src, roi.color),
                res is None)

    done = map_in_order(one, rois, THREADS)                 # in the ROIs' order
    for roi, (_, empty) in zip(rois, done):
        if empty:
            warnings.append(f"{Path(src).name}: ROI {roi.name!r} covers no sample point (too small?)")
    return [s for s, _ in done]


def compute(dose: Volume, structures: list[Structure], names: list[str], fractions: int | None = None,
            alpha_beta: float | None = None) -> dict:
    """Metrics of every structure on ``dose`` (physical Gy); EQD2 (Gy) when ``fractions`` and ``alpha_beta``."""
    check_fractionation(fractions, alpha_beta)

    def one(s: Structure) -> tuple[dict, list[str]]:
        warns: list[str] = []
        samples = sample_structure(s.mask, s.grid)
        entry = {"name": s.name, "volume_cc": samples.volume_cc, "metrics": {n: None for n in names},
                 "outside_dose_grid_fraction": 0.0, "sampling": describe_for_dose(samples, dose.grid)}
        if samples.n == 0:
            warns.append(f"{s.name}: empty structure; no metrics")
            return entry, warns
        outside = samples.outside_fraction(dose.grid)
        entry["outside_dose_grid_fraction"] = outside
        if outside >= 1.0:
            warns.append(f"{s.name}: lies entirely outside the dose grid; no metrics")
            return entry, warns
        if outside > 0:
            warns.append(f"{s.name}: {100 * outside:.1f}% of its volume lies outside the dose grid; the dose "
                         "there is read as 0 Gy")
        d = samples.dose(dose.array, dose.grid)
        if fractions is not None:
            d = eqd2(d, fractions, alpha_beta)
        entry["metrics"] = dvh.metrics(d, samples.sample_volume_cc, names)
        return entry, warns

    # structures are independent: THREADS at a time (SimpleITK's resampling and numpy's sorts run without the
    # GIL); results and warnings in the structures' order, the same numbers as one at a time
    done = map_in_order(one, structures, THREADS)
    rows = [entry for entry, _ in done]
    warnings = [w for _, warns in done for w in warns]
    quantity = "physical dose" if fractions is None else "EQD2"
    return {
        "software": {"name": SOFTWARE_NAME, "version": __version__},
        "dose_file": dose.meta.get("path", ""),
        "quantity": quantity,
        "fractions": fractions,
        "alpha_beta_gy": alpha_beta,
        "units": {"dose": "Gy" if fractions is None else "Gy (EQD2)", "volume_cc": "cc", "V<x>Gy": "cc",
                  "V<x>Gy%": "percent of the structure volume"},
        "method": ("sub-voxel samples of each mask on its own grid; dose interpolated trilinearly at each sample"
                   + ("; EQD2 computed per sample from its own dose per fraction" if fractions else "")
                   + "; D<x>cc and V<x>Gy from the continuous (mid-point) cumulative DVH"),
        "structures": rows,
        "warnings": warnings,
    }


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return None if not math.isfinite(v) else round(v, 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def to_json(result: dict) -> str:
    return json.dumps(_clean(result), indent=2)


def to_csv(result: dict, names: list[str]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "volume_cc"] + list(names))
    for r in result["structures"]:
        vals = [r["metrics"].get(n) for n in names]
        w.writerow([r["name"], _fmt(r["volume_cc"])] + [_fmt(v) for v in vals])
    return buf.getvalue()


def _fmt(v) -> str:
    return "" if v is None or not math.isfinite(float(v)) else f"{float(v):.6g}"


def check_output(path: Path, overwrite: bool) -> str:
    """The output format (``json`` or ``csv``) of ``path``; refuses an existing file unless ``overwrite``."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("json", "csv"):
        raise InputError("output must end in .json or .csv", source=str(path), field="--output")
    if path.is_dir():
        raise InputError("is a folder, expected a file name", source=str(path), field="--output")
    if path.exists() and not overwrite:
        raise InputError("exists (use --overwrite to replace it)", source=str(path), field="--output")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError("folder does not exist", source=str(parent), field="--output")
    return fmt


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and move it into place (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent if str(path.parent) else "."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def format_table(result: dict, names: list[str]) -> str:
    unit = "Gy EQD2" if result["fractions"] else "Gy"
    def label(n: str) -> str:
        if n.startswith("V"):
            return n if n.endswith("%") else f"{n} cc"
        return f"{n} {unit}"
    head = ["structure", "volume cc"] + [label(n) for n in names]
    rows = [head]
    for r in result["structures"]:
        rows.append([r["name"], _num(r["volume_cc"], 3)] + [_num(r["metrics"].get(n), 2) for n in names])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
