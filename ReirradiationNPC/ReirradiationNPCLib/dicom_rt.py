"""Reading DICOM RT: CT series, RTDOSE, RTPLAN and RTSTRUCT into the engine's types (Volume, Structure).

Units and conventions
- Physical coordinates are DICOM patient coordinates (LPS, mm); arrays are indexed (k, j, i).
- CT: HU = stored value x RescaleSlope + RescaleIntercept; slices sorted by their position along the slice normal
  (cross product of the ImageOrientationPatient row and column directions); spacing must be uniform.
- RTDOSE: dose (Gy) = stored value x DoseGridScaling. DoseUnits RELATIVE is refused (no reference dose).
  DoseSummationType per DICOM PS3.3 C.8.8.3 (see :func:`check_rtdose_header`, the one header check, also used by
  the Slicer module): PLAN = the course; FRACTION = the entire delivery of one fraction group (taken as is, with
  that group's NumberOfFractionsPlanned from the plan); FRACTION_SESSION = one session (multiplied by the group's
  fractions); MULTI_PLAN only with a stated fraction count; BEAM, BRACHY, CONTROL_POINT, RECORD, ... refused.
  RBE-weighted (EFFECTIVE) and proton/ion physical doses only as the case states them (:func:`resolve_dose_kind`).
  GridFrameOffsetVector: relative to the first frame when its first value is 0, otherwise absolute z positions
  (DICOM allows that only for ImageOrientationPatient 1\\0\\0\\0\\1\\0). Unevenly spaced frames are refused.
- RTPLAN: fractions = FractionGroupSequence[].NumberOfFractionsPlanned.
- RTSTRUCT: see :func:`rasterise_rtstruct` for how closed planar contours become voxels.

Every problem the user can fix raises :class:`InputError` naming the file and the DICOM attribute.
"""

from __future__ import annotations

import logging
import math
import re
import struct as _struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid, Volume
from .io import MAX_PLAUSIBLE_DOSE_GY, Structure, read_dose, read_image, read_structures


def _pydicom():
    """pydicom, imported on first use (a fifth of a second: a case of NRRD files never needs it). pydicom is an
    engine dependency; the import error stays readable if it is missing."""
    try:
        import pydicom
        import pydicom.errors  # noqa: F401 - InvalidDicomError
    except ImportError as exc:  # pragma: no cover
        raise ImportError("pydicom>=2.4 is required for DICOM input and output (pip install pydicom)") from exc
    return pydicom


log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
RT_ION_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.8"
SPATIAL_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"
DEFORMABLE_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.3"

#: DoseSummationType values (DICOM PS3.3 C.8.8.3) accepted as a course's dose, and how (see check_rtdose_header):
#: PLAN = all fraction groups of the plan; MULTI_PLAN = several plans (one confirmed fraction count needed);
#: FRACTION = the entire delivery of ONE fraction group (its NumberOfFractionsPlanned from the plan);
#: FRACTION_SESSION = one session of one fraction group (multiplied by that group's fractions).
ACCEPTED_SUMMATION = ("PLAN", "MULTI_PLAN", "FRACTION", "FRACTION_SESSION")
#: Refused summation types and what to export instead.
REFUSED_SUMMATION = {
    "BEAM": "the dose of some beams only (a part of a course)",
    "BEAM_SESSION": "one session of some beams only (a part of a session)",
    "BRACHY": "the dose of brachytherapy application setups (not supported)",
    "BRACHY_SESSION": "one brachytherapy session (not supported)",
    "CONTROL_POINT": "the dose of some control points (a part of a beam)",
    "RECORD": "a dose reconstructed from treatment records (not a planned course)",
    "PLAN_OVERVIEW": "an overview of a plan, not a dose to compute with",
}
EXPORT_INSTEAD = ("export the plan sum as DoseSummationType PLAN (or one FRACTION dose per fraction group)")
#: Plausibility (both ways, with the file named when refused):
#: a whole-course or whole-group dose whose hottest voxel receives less than this per fraction (Gy) is refused --
#: it is more likely a single session (FRACTION_SESSION) or a wrong DoseGridScaling. Radical and palliative
#: courses deliver >= ~1 Gy per fraction at their hottest point.
MIN_PLAUSIBLE_COURSE_MAX_PER_FRACTION_GY = 0.5
#: a single-session dose (FRACTION_SESSION) whose maximum exceeds this (Gy) is refused: it is more likely a
#: course or fraction-group total (single-session radiosurgery hot spots stay below it).
MAX_PLAUSIBLE_SESSION_DOSE_GY = 30.0
#: Stated RBE values outside this range are refused (protons 1.1; carbon ions 2-4 and voxel-dependent).
RBE_RANGE = (1.0, 5.0)
#: Plan radiation types whose physical dose needs an RBE (RTPLAN BeamSequence / IonBeamSequence RadiationType).
PARTICLE_RADIATIONS = ("PROTON", "ION", "NEUTRON")
RADIATION_CHOICES = ("photon", "electron", "proton", "ion")
#: Tolerances (mm) for "the same" positions and spacings.
POSITION_TOL_MM = 0.01
#: Contours of one ROI closer than this along the slice normal (mm) are on one plane (even-odd together).
CONTOUR_PLANE_TOL_MM = 0.1
#: RTSTRUCT ContourGeometricType values that bound a volume (XOR: an explicit even-odd combination); contours of
#: other types (POINT, OPEN_PLANAR, OPEN_NONPLANAR) are skipped with a warning.
VOLUME_CONTOUR_TYPES = ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR")
#: Rasterisation counts the in-plane coverage of this many pixels at a time (memory: 8 bytes each, a few times).
COVERAGE_CHUNK_PIXELS = 2_000_000
#: Identity attributes copied from an image into everything derived from it.
PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
              "ReferringPhysicianName", "StudyDescription")


# ----------------------------------------------------------------------------------------------- basics

def is_dicom_file(path: Path) -> bool:
    """True when ``path`` is a DICOM file: the Part 10 preamble ('DICM' at byte 128), or -- for old exports
    without it -- a ``.dcm`` file starting with a group 0002 or 0008 element (little endian)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size < 132:
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
        return head[128:132] == b"DICM" or _raw_dataset_head(path, head)
    except OSError:
        return False


def _raw_dataset_head(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".dcm" and head[:2] in (b"\x02\x00", b"\x08\x00")


def read_dataset(path: Path, what: str, *, header_only: bool = False):
    """``pydicom.dcmread`` with every failure turned into a one-line :class:`InputError`."""
    path = Path(path)
    src = str(path)
    if not path.exists():
        raise InputError("file not found", source=src, field=what)
    if path.is_dir():
        raise InputError("is a folder, expected a DICOM file", source=src, field=what)
    pydicom = _pydicom()
    InvalidDicomError = pydicom.errors.InvalidDicomError
    try:
        try:
            ds = pydicom.dcmread(src, stop_before_pixels=header_only)
        except InvalidDicomError:
            with open(path, "rb") as fh:
                head = fh.read(132)
            if not _raw_dataset_head(path, head):
                raise
            ds = pydicom.dcmread(src, stop_before_pixels=header_only, force=True)  # no preamble (old export)
            if "SOPClassUID" not in ds:
                raise InvalidDicomError("no SOPClassUID") from None
    except InvalidDicomError:
        raise InputError("not a DICOM file (no 'DICM' header)", source=src, field=what) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt/truncated input
        raise InputError(f"corrupt or truncated DICOM file ({type(exc).__name__}: {_first_line(exc)})",
                         source=src, field=what) from None
    return ds


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0][:160] if s else type(exc).__name__


def attr(ds, keyword: str, src: str, *, required: bool = True, default=None):
    """The value of ``keyword`` (pydicom keyword); missing/empty -> InputError (or ``default``)."""
    try:
        value = getattr(ds, keyword, None)
    except Exception as exc:  # noqa: BLE001 - a malformed value (e.g. bad DS string) raises on access
        raise InputError(f"malformed value ({_first_line(exc)})", source=src, field=keyword) from None
    if value is None or (isinstance(value, (str, bytes, list)) and len(value) == 0) or \
            (hasattr(value, "__len__") and not isinstance(value, (str, bytes)) and len(value) == 0):
        if required:
            raise InputError("missing or empty", source=src, field=keyword)
        return default
    return value


def floats(ds, keyword: str, src: str, n: int | None = None) -> np.ndarray:
    """A numeric (multi-)value as float64, checked for length and finiteness."""
    value = attr(ds, keyword, src)
    try:
        arr = np.asarray([float(v) for v in (value if _is_multi(value) else [value])], dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"not numeric ({_first_line(exc)})", source=src, field=keyword) from None
    if n is not None and arr.size != n:
        raise InputError(f"expected {n} values, got {arr.size}", source=src, field=keyword)
    if not np.isfinite(arr).all():
        raise InputError("holds a non-finite number", source=src, field=keyword)
    return arr


def _whole(ds, keyword: str, src: str) -> int:
    """A required single whole number (e.g. ROINumber); anything else -> InputError naming the field."""
    value = attr(ds, keyword, src)
    try:
        if _is_multi(value):
            raise ValueError(f"{len(value)} values")
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError(repr(str(value)))
    except (TypeError, ValueError) as exc:
        raise InputError(f"must be one whole number, got {_first_line(exc)}", source=src, field=keyword) from None
    return int(number)


def _is_multi(value) -> bool:
    return hasattr(value, "__iter__") and not isinstance(value, (str, bytes))


def identity_of(ds) -> dict:
    """Patient, study, series and frame-of-reference identifiers of a dataset (strings, '' when absent)."""
    out = {}
    for k in PATIENT_KEYS + STUDY_KEYS + ("SeriesInstanceUID", "SeriesDescription", "SeriesNumber",
                                          "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
                                          "Manufacturer"):
        try:
            v = getattr(ds, k, "")
        except Exception:  # noqa: BLE001
            v = ""
        out[k] = "" if v is None else str(v)
    return out


def _require_modality(ds, src: str, expected: str) -> None:
    mod = str(attr(ds, "Modality", src)).upper()
    if mod != expected:
        raise InputError(f"Modality is {mod}, expected {expected}", source=src, field="Modality")


def _orientation(ds, src: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iop = floats(ds, "ImageOrientationPatient", src, 6)
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise InputError("row and column directions are not orthonormal", source=src,
                         field="ImageOrientationPatient")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    return r, c, np.cross(r, c)


def _grid(origin, r, c, n, spacing_i, spacing_j, spacing_k, size) -> Grid:
    d = np.stack([r, c, n], axis=1)  # columns are the i, j, k axes
    return Grid(tuple(int(s) for s in size), tuple(float(v) for v in origin),
                (float(spacing_i), float(spacing_j), float(spacing_k)), tuple(float(v) for v in d.ravel()))


def _pixel_spacing(ds, src: str) -> tuple[float, float]:
    """(spacing along i = between columns, spacing along j = between rows), mm."""
    ps = floats(ds, "PixelSpacing", src, 2)
    if np.any(ps <= 0):
        raise InputError(f"must be positive, got {ps.tolist()}", source=src, field="PixelSpacing")
    return float(ps[1]), float(ps[0])


def _pixel_array(ds, src: str) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - missing/truncated/compressed-without-decoder
        raise InputError(f"pixel data cannot be read ({_first_line(exc)})", source=src, field="PixelData") from None


# ------------------------------------------------------------------------------------------------ CT

def dicom_files(folder: Path) -> list[Path]:
    """All DICOM Part 10 files under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_dicom_file(p))


def read_ct_series(folder: Path, what: str = "image", series_uid: str | None = None) -> Volume:
    """A CT series folder as a Volume in HU (int16 when the rescale keeps integers, else float32).

    The folder (searched recursively) must hold one CT series, or ``series_uid`` picks one. ``meta["dicom"]``
    holds the patient/study/series/frame identifiers and ``meta["dicom"]["SOPInstanceUIDs"]`` the slices in
    k order (used to write RTSTRUCT/RTDOSE that refer to this CT).
    """
    folder = Path(folder)
    src = str(folder)
    if not folder.exists():
        raise InputError("folder not found", source=src, field=what)
    if not folder.is_dir():
        raise InputError("expected a folder holding one DICOM CT series", source=src, field=what)
    headers = []
    for f in dicom_files(folder):
        ds = read_dataset(f, what, header_only=True)
        if str(getattr(ds, "Modality", "")).upper() == "CT" and \
                str(getattr(ds, "SOPClassUID", "")) in (CT_IMAGE_STORAGE, ""):
            kind = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
            if "LOCALIZER" in kind:
                log.info("%s: localizer (scout) image skipped", f)
                continue
            headers.append((f, ds))
    if not headers:
        raise InputError("no DICOM CT image found in this folder", source=src, field=what)
    series: dict[str, list] = {}
    for f, ds in headers:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((f, ds))
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"no CT series with SeriesInstanceUID {series_uid} (found: {', '.join(series)})",
                             source=src, field=what)
        chosen = series[series_uid]
        log.info("%s: using CT series %s (%d slices) of %d series", src, series_uid, len(chosen), len(series))
    elif len(series) > 1:
        desc = "; ".join(f"{uid} ({len(v)} slices, {getattr(v[0][1], 'SeriesDescription', '') or 'no description'})"
                         for uid, v in series.items())
        raise InputError(f"holds {len(series)} CT series ({desc}); give a folder holding one series or its "
                         "SeriesInstanceUID", source=src, field=what)
    else:
        chosen = next(iter(series.values()))
    return _assemble_ct(chosen, src, what)


def _assemble_ct(items: list, src: str, what: str) -> Volume:
    f0, ds0 = items[0]
    r, c, n = _orientation(ds0, str(f0))
    rows, cols = int(attr(ds0, "Rows", str(f0))), int(attr(ds0, "Columns", str(f0)))
    sp_i, sp_j = _pixel_spacing(ds0, str(f0))
    pos = []
    for f, ds in items:
        fs = str(f)
        rr, cc, _ = _orientation(ds, fs)
        if np.abs(rr - r).max() > 1e-4 or np.abs(cc - c).max() > 1e-4:
            raise InputError("slices of the series have different orientations", source=fs,
                             field="ImageOrientationPatient")
        if (int(attr(ds, "Rows", fs)), int(attr(ds, "Columns", fs))) != (rows, cols):
            raise InputError("slices of the series have different sizes", source=fs, field="Rows")
        if not np.allclose(_pixel_spacing(ds, fs), (sp_i, sp_j), atol=1e-4):
            raise InputError("slices of the series have different pixel spacings", source=fs, field="PixelSpacing")
        pos.append(floats(ds, "ImagePositionPatient", fs, 3))
    pos = np.asarray(pos)
    along = pos @ n
    order = np.argsort(along, kind="stable")
    items = [items[o] for o in order]
    pos, along = pos[order], along[order]
    if len(items) > 1:
        d = np.diff(along)
        if np.any(d < POSITION_TOL_MM):
            k = int(np.argmin(d))
            raise InputError(f"two slices at the same position ({along[k]:.3f} mm along the slice normal)",
                             source=str(items[k + 1][0]), field="ImagePositionPatient")
        med = float(np.median(d))
        if np.abs(d - med).max() > max(POSITION_TOL_MM, 1e-3 * med):
            raise InputError(f"slices are unevenly spaced ({d.min():.3f} to {d.max():.3f} mm): missing slices or a "
                             "variable-thickness series; export an evenly spaced series", source=src,
                             field="ImagePositionPatient")
        dz = float((along[-1] - along[0]) / (len(items) - 1))
        # positions must lie on one line along the normal (no gantry tilt / shear)
        off = (pos - pos[0]) - np.outer(along - along[0], n)
        if np.abs(off).max() > 0.05:
            raise InputError("slice positions are not along the slice normal (gantry tilt or sheared series); "
                             "resample the series in the planning system", source=src, field="ImagePositionPatient")
    else:
        dz = float(getattr(ds0, "SliceThickness", 0) or 0)
        if dz <= 0:
            raise InputError("a single slice with no SliceThickness is not a 3D image", source=src, field=what)
    grid = _grid(pos[0], r, c, n, sp_i, sp_j, dz, (cols, rows, len(items)))
    slices = []
    int_ok = True
    slopes = []
    for f, _ in items:
        ds = read_dataset(f, what)
        fs = str(f)
        try:
            a = np.asarray(ds.pixel_array)
        except Exception:  # noqa: BLE001 - e.g. a compressed transfer syntax pydicom cannot decode here
            a = _pixels_via_sitk(f)
        if a.shape != (rows, cols):
            raise InputError(f"pixel data has shape {a.shape}, expected ({rows}, {cols})", source=fs,
                             field="PixelData")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if not (math.isfinite(slope) and math.isfinite(inter)):
            raise InputError("non-finite rescale", source=fs, field="RescaleSlope")
        int_ok &= slope == int(slope) and inter == int(inter)
        slopes.append((slope, inter))
        slices.append(a)
    hu = _rescale_slices(slices, slopes, int_ok)
    del slices
    ident = identity_of(items[0][1])
    ident["SOPInstanceUIDs"] = [str(getattr(ds, "SOPInstanceUID", "")) for _, ds in items]
    ident["SOPClassUID"] = str(getattr(items[0][1], "SOPClassUID", CT_IMAGE_STORAGE) or CT_IMAGE_STORAGE)
    vol = Volume(hu, grid, name=Path(src).name, meta={"path": src, "dicom": ident, "format": "dicom-ct"})
    return vol


def _rescale_slices(slices: list[np.ndarray], slopes: list[tuple[float, float]], int_ok: bool) -> np.ndarray:
    """HU volume (k, j, i), slice by slice: int16 when every rescale is integral and the values fit, else
    float32. No full-volume temporary beyond the output."""
    shape = (len(slices),) + slices[0].shape
    if int_ok:
        out = np.empty(shape, dtype=np.int16)
        for k, (a, (slope, inter)) in enumerate(zip(slices, slopes)):
            v = a.astype(np.int32) * int(slope) + int(inter)
            if v.min() < -32768 or v.max() > 32767:
                break
            out[k] = v
        else:
            return out
        del out
    out = np.empty(shape, dtype=np.float32)
    for k, (a, (slope, inter)) in enumerate(zip(slices, slopes)):
        out[k] = a.astype(np.float32) * np.float32(slope) + np.float32(inter)
    return out


def _pixels_via_sitk(path: Path) -> np.ndarray:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError("pixel data cannot be decoded (unsupported compression?)", source=str(path),
                         field="PixelData") from None
    a = sitk.GetArrayFromImage(img)
    # SimpleITK applies the rescale; undo it so the caller applies it once
    ds = _pydicom().dcmread(str(path), stop_before_pixels=True)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return np.rint((a.reshape(a.shape[-2:]) - inter) / slope)


# --------------------------------------------------------------------------------------------- RTPLAN

@dataclass
class PlanInfo:
    path: str
    sop_instance_uid: str
    label: str
    fraction_groups: list[int]          # NumberOfFractionsPlanned of each fraction group
    identity: dict = field(default_factory=dict)
    group_numbers: list[int] = field(default_factory=list)   # FractionGroupNumber of each group (same order)
    radiation_types: list[str] = field(default_factory=list)  # RadiationType of the beams (PHOTON, PROTON, ...)
    is_ion_plan: bool = False           # SOP class RT Ion Plan

    @property
    def fractions(self) -> int | None:
        """The fraction count when the plan has exactly one fraction group, else None (ambiguous)."""
        return self.fraction_groups[0] if len(self.fraction_groups) == 1 else None

    @property
    def is_particle(self) -> bool:
        """True for an RT Ion plan or beams of protons, ions or neutrons (the physical dose needs an RBE)."""
        return self.is_ion_plan or any(t in PARTICLE_RADIATIONS for t in self.radiation_types)

    def group_fractions(self, number: int) -> int | None:
        """NumberOfFractionsPlanned of fraction group ``number`` (FractionGroupNumber), None when absent."""
        numbers = self.group_numbers or list(range(1, len(self.fraction_groups) + 1))
        for num, n in zip(numbers, self.fraction_groups):
            if num == number:
                return n
        return None


def read_rtplan(path: Path, what: str = "plan") -> PlanInfo:
    ds = read_dataset(path, what, header_only=True)
    return plan_info_from_dataset(ds, str(path))


def plan_info_from_dataset(ds, src: str = "RTPLAN") -> PlanInfo:
    """A PlanInfo from an RTPLAN header: a pydicom Dataset or a dict of DICOM keywords (sequences as lists of
    dicts), e.g. read from Slicer's DICOM database."""
    ds = as_dataset(ds)
    _require_modality(ds, src, "RTPLAN")
    groups = attr(ds, "FractionGroupSequence", src)
    counts, numbers = [], []
    for gi, g in enumerate(groups):
        n = attr(g, "NumberOfFractionsPlanned", src)
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise InputError(f"not a whole number: {n!r}", source=src, field="NumberOfFractionsPlanned") from None
        if n < 1:
            raise InputError(f"must be >= 1, got {n}", source=src, field="NumberOfFractionsPlanned")
        counts.append(n)
        num = getattr(g, "FractionGroupNumber", None)
        try:
            numbers.append(int(num) if num not in (None, "") else gi + 1)
        except (TypeError, ValueError):
            raise InputError(f"not a whole number: {num!r}", source=src, field="FractionGroupNumber") from None
    if len(set(numbers)) != len(numbers):
        raise InputError(f"fraction group numbers repeat ({numbers})", source=src, field="FractionGroupNumber")
    radiation = set()
    for seq in ("BeamSequence", "IonBeamSequence"):
        for b in getattr(ds, seq, None) or []:
            t = str(getattr(b, "RadiationType", "") or "").strip().upper()
            if t:
                radiation.add(t)
    is_ion = str(getattr(ds, "SOPClassUID", "") or "") == RT_ION_PLAN_STORAGE or \
        bool(getattr(ds, "IonBeamSequence", None))
    return PlanInfo(src, str(attr(ds, "SOPInstanceUID", src)), str(getattr(ds, "RTPlanLabel", "") or ""),
                    counts, identity_of(ds), numbers, sorted(radiation), is_ion)


def fractions_from_plan(plan: PlanInfo, given: int | None, src: str, key: str) -> int:
    """Resolve a course's fractions from its plan and/or the case file; disagreement is refused."""
    if given is None:
        if plan.fractions is None:
            raise InputError(f"the plan has {len(plan.fraction_groups)} fraction groups "
                             f"({', '.join(map(str, plan.fraction_groups))} fractions): give fractions: explicitly",
                             source=src, field=key)
        return plan.fractions
    ok = given in plan.fraction_groups or (len(plan.fraction_groups) > 1 and given == sum(plan.fraction_groups))
    if not ok:
        raise InputError(f"fractions: {given} disagrees with the plan's NumberOfFractionsPlanned "
                         f"({', '.join(map(str, plan.fraction_groups))}) in {plan.path}", source=src, field=key)
    return given


# --------------------------------------------------------------------------------------------- RTDOSE

def _dose_geometry(ds, src: str, frames: int) -> tuple[Grid, bool]:
    """Grid of an RTDOSE and whether its frames must be reversed to make the k spacing positive."""
    r, c, n = _orientation(ds, src)
    ipp = floats(ds, "ImagePositionPatient", src, 3)
    sp_i, sp_j = _pixel_spacing(ds, src)
    rows, cols = int(attr(ds, "Rows", src)), int(attr(ds, "Columns", src))
    if frames == 1 and getattr(ds, "GridFrameOffsetVector", None) in (None, ""):
        dz = float(getattr(ds, "SliceThickness", 0) or 0)
        if dz <= 0:
            raise InputError("a single-frame dose with no GridFrameOffsetVector or SliceThickness is not a 3D "
                             "dose", source=src, field="GridFrameOffsetVector")
        return _grid(ipp, r, c, n, sp_i, sp_j, dz, (cols, rows, 1)), False
    gfov = floats(ds, "GridFrameOffsetVector", src)
    if gfov.size != frames:
        raise InputError(f"has {gfov.size} values for {frames} frames", source=src, field="GridFrameOffsetVector")
    if abs(gfov[0]) > 1e-6:
        # absolute: the z coordinates of the planes; defined by DICOM only for a standard axial orientation
        if not np.allclose(np.concatenate([r, c]), [1, 0, 0, 0, 1, 0], atol=1e-4):
            raise InputError("first value is not 0 (absolute offsets), which DICOM defines only for "
                             "ImageOrientationPatient 1\\0\\0\\0\\1\\0", source=src, field="GridFrameOffsetVector")
        if abs(gfov[0] - ipp[2]) > POSITION_TOL_MM:
            raise InputError(f"first value {gfov[0]:g} is neither 0 (relative offsets) nor the z of "
                             f"ImagePositionPatient ({ipp[2]:g}, absolute offsets)", source=src,
                             field="GridFrameOffsetVector")
        rel = gfov - gfov[0]
    else:
        rel = gfov
    if frames == 1:
        dz = float(getattr(ds, "SliceThickness", 0) or 0) or 1.0
        return _grid(ipp, r, c, n, sp_i, sp_j, dz, (cols, rows, 1)), False
    d = np.diff(rel)
    if np.any(np.abs(d) < POSITION_TOL_MM) or not (np.all(d > 0) or np.all(d < 0)):
        raise InputError("frame offsets are not strictly increasing or decreasing", source=src,
                         field="GridFrameOffsetVector")
    med = float(np.median(d))
    if np.abs(d - med).max() > max(POSITION_TOL_MM, 1e-3 * abs(med)):
        raise InputError(f"dose frames are unevenly spaced ({np.abs(d).min():g} to {np.abs(d).max():g} mm); "
                         "re-export the dose on an evenly spaced grid", source=src, field="GridFrameOffsetVector")
    dz = float((rel[-1] - rel[0]) / (frames - 1))
    if dz > 0:
        return _grid(ipp + rel[0] * n, r, c, n, sp_i, sp_j, dz, (cols, rows, frames)), False
    return _grid(ipp + rel[-1] * n, r, c, n, sp_i, sp_j, -dz, (cols, rows, frames)), True


class _DictDataset:
    """A dict of DICOM keywords seen through attribute access (``ds.DoseType``); lists of dicts become lists of
    _DictDataset (sequences). Lets the header checks run on headers read elsewhere (e.g. Slicer's DICOM database)."""

    def __init__(self, data: dict):
        self._data = dict(data)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        value = self._data.get(name)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            return [_DictDataset(v) for v in value]
        return value

    def __contains__(self, name) -> bool:
        return name in self._data


def as_dataset(ds):
    """``ds`` itself (a pydicom Dataset), or a dict of DICOM keywords wrapped for attribute access."""
    return _DictDataset(ds) if isinstance(ds, dict) else ds


@dataclass
class DoseHeaderCheck:
    """What an RTDOSE header says about the dose, after the checks of :func:`check_rtdose_header`.

    The course (or fraction-group) total in Gy -- RBE-weighted when ``rbe`` is set -- is the file's dose
    (stored value x DoseGridScaling) x ``scale``; its EQD2 uses ``fractions``.
    """
    source: str
    summation: str                      # DoseSummationType as written
    dose_type: str                      # DoseType as written (PHYSICAL | EFFECTIVE)
    scale: float                        # file dose (Gy) -> course or group total (Gy, RBE-weighted if rbe)
    fractions: int | None               # fractions of the dose's delivery (None: unknown, only when not required)
    session_factor: int = 1             # part of ``scale`` from FRACTION_SESSION (the group's fractions)
    fraction_group: int | None = None   # ReferencedFractionGroupNumber (FRACTION / FRACTION_SESSION)
    plan_fraction_groups: int | None = None  # number of fraction groups of the plan (None: no plan given)
    rbe: float | None = None            # the RBE of the course (None: photons/electrons, physical dose)
    rbe_applied: bool = False           # True: ``scale`` includes the RBE (physical particle dose x rbe)
    radiation: str = ""                 # photon | electron | proton | ion, or "" (not stated, no ion plan)
    plan_uids: list[str] = field(default_factory=list)   # ReferencedRTPlanSequence
    notes: list[str] = field(default_factory=list)       # informational (course assumptions)
    warnings: list[str] = field(default_factory=list)    # to be shown with the results

    @property
    def whole_course(self) -> bool:
        """False when the dose is one fraction group of a plan with several groups (one EQD2 term of a course)."""
        return not (self.summation in ("FRACTION", "FRACTION_SESSION") and (self.plan_fraction_groups or 1) > 1)

    def assumptions(self) -> dict:
        """For results.json (course assumptions): how the dose file became a course dose."""
        return {"file": self.source, "dose_summation_type": self.summation, "dose_type": self.dose_type,
                "scale": self.scale, "fractions": self.fractions, "fraction_group": self.fraction_group,
                "session_factor": self.session_factor, "sessions_assumed_identical": self.session_factor > 1,
                "radiation": self.radiation or "not stated (no RT Ion plan: photons/electrons, RBE 1)",
                "rbe": self.rbe, "rbe_applied": self.rbe_applied,
                "rbe_rule": _rbe_rule(self), "notes": list(self.notes)}


def _rbe_rule(c: DoseHeaderCheck) -> str:
    if c.rbe is None:
        return "physical dose of photons/electrons (RBE 1)"
    if c.rbe_applied:
        return f"physical dose multiplied once by the stated RBE {c.rbe:g}"
    return f"RBE-weighted dose (DoseType EFFECTIVE) as exported; stated RBE {c.rbe:g} recorded, not applied"


def rbe_words(kind: dict | None) -> str:
    """The RBE a course's dose carries, in words, for every output's assumptions (results.json ``rbe_text``, CLI,
    report, NRRD descriptions, RTDOSE ImageComments). ``kind``: :meth:`DoseHeaderCheck.assumptions` (or a course's
    fraction-group summary); None: nothing recorded (a dose taken as physical, RBE 1)."""
    kind = kind or {}
    rbe = kind.get("rbe")
    rad = str(kind.get("radiation") or "")
    if rbe is not None:
        if kind.get("rbe_applied"):
            return f"RBE {rbe:g} ({rad or 'particle'} physical dose x {rbe:g}, applied once)"
        return f"RBE {rbe:g} (RBE-weighted dose as exported, not applied again)"
    if rad in ("photon", "electron"):
        return f"RBE 1, {rad}s"
    return "RBE 1, radiation not stated (no RT Ion plan)"


def course_rbe_words(prep) -> str:
    """Every course's RBE in words (:func:`rbe_words`), for the descriptions of maps that sum the courses (NRRD
    and RTDOSE). ``prep``: a ``pipeline.Prepared``."""
    return "; ".join(f"course {c.name}: {rbe_words(prep.dose_kinds.get(c.name))}" for c in prep.courses)


def rbe_tag(kind: dict | None) -> str:
    """:func:`rbe_words` short enough for 64-character DICOM fields: ``RBE 1.1``, ``RBE 1 photons``, ``RBE 1
    rad. not stated``."""
    kind = kind or {}
    if kind.get("rbe") is not None:
        return f"RBE {kind['rbe']:g}"
    rad = str(kind.get("radiation") or "")
    return f"RBE 1 {rad}s" if rad in ("photon", "electron") else "RBE 1 rad. not stated"


def _is_own_eqd2(ds) -> bool:
    """An EQD2/BED map (this program's output, DoseType EFFECTIVE, Manufacturer ReirradiationNPC, or any file
    whose description names EQD2 or BED): never a course dose."""
    from . import SOFTWARE_NAME
    if str(getattr(ds, "Manufacturer", "") or "").strip() == SOFTWARE_NAME:
        return True
    text = " ".join(str(getattr(ds, k, "") or "") for k in ("SeriesDescription", "DoseComment")).upper()
    return re.search(r"\b(EQD2|EQD|BED)\b", text) is not None


def resolve_dose_kind(header_type: str | None, *, dose_type: str | None, rbe: float | None,
                      radiation: str | None, plan: PlanInfo | None, src: str, key: str = "course",
                      references_ion_plan: bool = False) -> tuple[float | None, bool, str, list[str]]:
    """RBE handling for one course dose. Returns (rbe or None, rbe applied?, radiation, warnings).

    ``header_type``: the RTDOSE's DoseType (None for a dose image, whose kind is ``dose_type`` or PHYSICAL);
    ``dose_type``, ``rbe``, ``radiation``: what the case states (None when not stated);
    ``references_ion_plan``: the RTDOSE's ReferencedRTPlanSequence names an RT Ion Plan (by SOP class), which makes
    it a particle dose even when the plan itself is not given. Rules:
    - EFFECTIVE (RBE-weighted) only with ``dose_type: EFFECTIVE`` and ``rbe:`` stated: taken as is, RBE recorded;
    - PHYSICAL of protons/ions/neutrons (``radiation: proton|ion`` or an RT Ion / particle plan) needs ``rbe:``
      and is multiplied by it once;
    - ``rbe:`` without a particle radiation (stated or from the plan) is refused;
    - a stated ``dose_type`` that differs from the RTDOSE's DoseType is refused.
    """
    kind = (header_type or dose_type or "PHYSICAL").upper()
    if header_type is not None and dose_type is not None and dose_type.upper() != header_type.upper():
        raise InputError(f"the case says dose_type: {dose_type} but the RTDOSE's DoseType is {header_type}",
                         source=src, field="DoseType")
    rad = (radiation or "").lower()
    if not rad and plan is not None and plan.is_particle:
        rad = "ion" if any(t == "ION" for t in plan.radiation_types) else "proton"
    if radiation and rad not in ("proton", "ion") and references_ion_plan:
        raise InputError(f"radiation: {radiation} but the RTDOSE references an RT Ion Plan "
                         "(ReferencedRTPlanSequence > ReferencedSOPClassUID)", source=src, field=f"{key}.radiation")
    if plan is not None and radiation and plan.radiation_types:
        plan_particle = plan.is_particle
        if plan_particle != (rad in ("proton", "ion")):
            raise InputError(f"radiation: {radiation} disagrees with the plan's RadiationType "
                             f"{', '.join(plan.radiation_types)} ({plan.path})", source=src, field=f"{key}.radiation")
    particle = rad in ("proton", "ion") or (plan is not None and plan.is_particle) or references_ion_plan
    if rbe is not None and not (RBE_RANGE[0] <= rbe <= RBE_RANGE[1]):
        raise InputError(f"rbe: {rbe:g} is outside {RBE_RANGE[0]:g}-{RBE_RANGE[1]:g}", source=src,
                         field=f"{key}.rbe")
    warnings: list[str] = []
    name = Path(src).name
    if kind == "EFFECTIVE":
        if dose_type is None or dose_type.upper() != "EFFECTIVE" or rbe is None:
            raise InputError("DoseType EFFECTIVE (an RBE-weighted dose) is accepted only when the case states it: "
                             "add dose_type: EFFECTIVE and rbe: <the RBE the planning system used> to the course",
                             source=src, field="DoseType")
        return float(rbe), False, rad, warnings
    if kind != "PHYSICAL":
        raise InputError(f"unknown DoseType {kind!r}", source=src, field="DoseType")
    if particle:
        if rbe is None:
            what = f"radiation {rad}" if rad else ("an RT Ion plan" if plan is not None and plan.is_particle
                                                   else "an RT Ion plan (referenced by the RTDOSE)")
            raise InputError(f"physical dose of {what}: state the course's rbe: (e.g. 1.1 for protons) so that it "
                             "is RBE-weighted once, or export the RBE-weighted dose (EFFECTIVE) with dose_type: "
                             "EFFECTIVE", source=src, field="DoseType")
        warnings.append(f"{name}: physical {rad or 'particle'} dose multiplied by the stated RBE {rbe:g}")
        return float(rbe), True, rad, warnings
    if rbe is not None:
        raise InputError(f"rbe: {rbe:g} is stated but the course is not a proton/ion course (state radiation: "
                         "proton or ion, or give its RT Ion plan)", source=src, field=f"{key}.rbe")
    return None, False, rad, warnings


def check_rtdose_header(ds, plan: PlanInfo | None = None, fractions: int | None = None, *,
                        dose_type: str | None = None, rbe: float | None = None, radiation: str | None = None,
                        max_dose_gy: float | None = None, require_fractions: bool = False,
                        source: str = "RTDOSE", accept_effective: bool = False, key: str = "course"
                        ) -> DoseHeaderCheck:
    """The checks of an RTDOSE header, as a pure function (no pixel data needed).

    ``ds``: a pydicom Dataset or a dict of DICOM keywords (sequences as lists of dicts), e.g.
    ``{"Modality": "RTDOSE", "DoseUnits": "GY", "DoseType": "PHYSICAL", "DoseSummationType": "FRACTION",
    "ReferencedRTPlanSequence": [{"ReferencedSOPInstanceUID": uid, "ReferencedFractionGroupSequence":
    [{"ReferencedFractionGroupNumber": 1}]}]}``. ``plan``: the course's RTPLAN (:func:`read_rtplan` or
    :func:`plan_info_from_dataset`); ``fractions``: the count the user states (None = not stated);
    ``dose_type``/``rbe``/``radiation``: the case's statements (see :func:`resolve_dose_kind`);
    ``max_dose_gy``: the file's maximum dose (stored x DoseGridScaling), when known, for the plausibility checks
    (:func:`check_dose_plausibility`); ``require_fractions``: refuse when the fraction count stays unknown.

    Returns a :class:`DoseHeaderCheck` (course-total ``scale``, ``fractions``, notes) or raises InputError (one
    line naming ``source`` and the DICOM attribute). Summation types (DICOM PS3.3 C.8.8.3):
    PLAN = the whole course (a plan with several fraction groups is refused: one FRACTION dose per group);
    MULTI_PLAN = a sum of plans, accepted only with one confirmed fraction count (stated, and equal to every
    fraction group of the given plan); FRACTION = the entire delivery of one fraction group, whose
    NumberOfFractionsPlanned comes from the plan through ReferencedRTPlanSequence > ReferencedFractionGroupSequence
    (a plan with a single group resolves without it); FRACTION_SESSION = one session of that group, multiplied by
    its fractions (sessions assumed identical); BEAM, BEAM_SESSION, BRACHY, BRACHY_SESSION, CONTROL_POINT, RECORD,
    PLAN_OVERVIEW are refused.
    """
    ds = as_dataset(ds)
    src = str(source)
    name = Path(src).name
    _require_modality(ds, src, "RTDOSE")
    units = str(attr(ds, "DoseUnits", src)).strip().upper()
    if units == "RELATIVE":
        raise InputError("DoseUnits RELATIVE cannot be converted to Gy without the reference dose; export the dose "
                         "in GY", source=src, field="DoseUnits")
    if units != "GY":
        raise InputError(f"DoseUnits {units!r} is not GY", source=src, field="DoseUnits")
    dtype = str(attr(ds, "DoseType", src)).strip().upper()
    if dtype == "ERROR":
        raise InputError("DoseType ERROR (a dose difference) is not a dose", source=src, field="DoseType")
    if dtype not in ("PHYSICAL", "EFFECTIVE"):
        raise InputError(f"unknown DoseType {dtype!r}", source=src, field="DoseType")
    if dtype == "EFFECTIVE" and not accept_effective and _is_own_eqd2(ds):
        raise InputError("an EQD2 map (DoseType EFFECTIVE, written by ReirradiationNPC or described as EQD2/BED) is "
                         "not a course dose: give the course's physical (or RBE-weighted) planning dose",
                         source=src, field="DoseType")
    summation = str(attr(ds, "DoseSummationType", src)).strip().upper()
    if summation in REFUSED_SUMMATION:
        raise InputError(f"DoseSummationType {summation} is {REFUSED_SUMMATION[summation]}, not a course dose; "
                         f"{EXPORT_INSTEAD}", source=src, field="DoseSummationType")
    if summation not in ACCEPTED_SUMMATION:
        raise InputError(f"unknown DoseSummationType {summation!r}; {EXPORT_INSTEAD}", source=src,
                         field="DoseSummationType")
    refs = list(getattr(ds, "ReferencedRTPlanSequence", None) or [])
    uids = [str(getattr(item, "ReferencedSOPInstanceUID", "") or "") for item in refs]
    notes: list[str] = []
    warnings: list[str] = []
    if plan is not None:
        if uids and plan.sop_instance_uid not in uids:
            raise InputError(f"ReferencedRTPlanSequence names plan(s) {', '.join(uids)}, not the given plan "
                             f"{plan.sop_instance_uid} ({plan.path})", source=src, field="ReferencedRTPlanSequence")
        if not uids:
            warnings.append(f"{name}: names no plan (ReferencedRTPlanSequence); its link to "
                            f"{Path(plan.path).name} is not checked")
    if accept_effective:
        rbe_v, applied, rad, w = None, False, (radiation or ""), []
    else:
        ion_ref = any(str(getattr(item, "ReferencedSOPClassUID", "") or "") == RT_ION_PLAN_STORAGE for item in refs)
        rbe_v, applied, rad, w = resolve_dose_kind(dtype, dose_type=dose_type, rbe=rbe, radiation=radiation,
                                                   plan=plan, src=src, key=key, references_ion_plan=ion_ref)
    warnings += w
    if fractions is not None and (isinstance(fractions, bool) or int(fractions) != fractions or fractions < 1):
        raise InputError(f"fractions must be a whole number >= 1, got {fractions!r}", source=src, field="fractions")
    n: int | None = None if fractions is None else int(fractions)
    group = None
    session = 1
    ngroups = len(plan.fraction_groups) if plan is not None else None
    if summation == "PLAN":
        if plan is not None and ngroups > 1:
            raise InputError(f"DoseSummationType PLAN sums the plan's {ngroups} fraction groups "
                             f"({', '.join(map(str, plan.fraction_groups))} fractions), whose EQD2 differ: export one "
                             "FRACTION dose per fraction group and list them under the course's dose:",
                             source=src, field="DoseSummationType")
        if plan is not None:
            if n is not None and n != plan.fractions:
                raise InputError(f"fractions: {n} disagrees with the plan's NumberOfFractionsPlanned "
                                 f"{plan.fractions} ({plan.path})", source=src, field="fractions")
            n = plan.fractions
    elif summation == "MULTI_PLAN":
        if n is None:
            if require_fractions:
                raise InputError("DoseSummationType MULTI_PLAN (a sum of plans) is accepted only with one confirmed "
                                 "fraction count: state fractions: in the case (all summed plans delivered in the "
                                 f"same sessions), or {EXPORT_INSTEAD} per course", source=src,
                                 field="DoseSummationType")
        elif plan is not None and any(g != n for g in plan.fraction_groups):
            raise InputError(f"DoseSummationType MULTI_PLAN with fractions: {n}, but the plan {plan.path} has "
                             f"{', '.join(map(str, plan.fraction_groups))} fractions: the summed plans must share "
                             "one fraction count", source=src, field="DoseSummationType")
        if n is not None:
            warnings.append(f"{name}: DoseSummationType MULTI_PLAN taken as one course of {n} fractions (the summed "
                            "plans assumed delivered in the same sessions)")
    else:  # FRACTION, FRACTION_SESSION: one fraction group of the plan
        if plan is None:
            raise InputError(f"DoseSummationType {summation} is the dose of one fraction group"
                             f"{' session' if summation == 'FRACTION_SESSION' else ''}: give the course's plan: "
                             "(RTPLAN) so that the group's NumberOfFractionsPlanned can be read", source=src,
                             field="DoseSummationType")
        named = []
        for item, uid in zip(refs, uids):
            if uid and uid != plan.sop_instance_uid:
                continue
            for fg in getattr(item, "ReferencedFractionGroupSequence", None) or []:
                v = getattr(fg, "ReferencedFractionGroupNumber", None)
                try:
                    named.append(int(v))
                except (TypeError, ValueError):
                    raise InputError(f"not a whole number: {v!r}", source=src,
                                     field="ReferencedFractionGroupNumber") from None
        named = sorted(set(named))
        if len(named) > 1:
            raise InputError(f"names {len(named)} fraction groups ({', '.join(map(str, named))}); a "
                             f"{summation} dose covers one", source=src, field="ReferencedFractionGroupSequence")
        if named:
            group = named[0]
            ng = plan.group_fractions(group)
            if ng is None:
                raise InputError(f"fraction group {group} is not in the plan {plan.path} (groups "
                                 f"{', '.join(map(str, plan.group_numbers))})", source=src,
                                 field="ReferencedFractionGroupNumber")
        elif ngroups == 1:
            group = plan.group_numbers[0] if plan.group_numbers else 1
            ng = plan.fraction_groups[0]
            notes.append(f"{name}: names no fraction group; the plan's only group ({ng} fractions) is used")
        else:
            raise InputError(f"DoseSummationType {summation} names no fraction group (ReferencedRTPlanSequence > "
                             f"ReferencedFractionGroupSequence) and the plan has {ngroups} groups: the fractions "
                             "cannot be resolved", source=src, field="ReferencedFractionGroupSequence")
        if n is not None and n != ng:
            raise InputError(f"fractions: {n} disagrees with fraction group {group} of the plan ({ng} fractions)",
                             source=src, field="fractions")
        n = ng
        if summation == "FRACTION":
            notes.append(f"{name}: DoseSummationType FRACTION = the entire delivery of fraction group {group} "
                         f"({ng} fractions), taken as is")
        else:
            session = ng
            warnings.append(f"{name}: DoseSummationType FRACTION_SESSION (one session) multiplied by the {ng} "
                            f"fractions of group {group}; every session is assumed identical to this one")
    if n is None and require_fractions:
        raise InputError("the number of fractions is unknown: give fractions: or plan:", source=src,
                         field="fractions")
    scale = float(session) * (float(rbe_v) if applied else 1.0)
    check = DoseHeaderCheck(src, summation, dtype, scale, n, session, group, ngroups, rbe_v, applied, rad, uids,
                            notes, warnings)
    if max_dose_gy is not None:
        check_dose_plausibility(check, max_dose_gy)
    return check


def check_dose_plausibility(check: DoseHeaderCheck, max_dose_gy: float) -> None:
    """Both ways: a single-session dose above MAX_PLAUSIBLE_SESSION_DOSE_GY, or a whole-course / whole-group dose
    below MIN_PLAUSIBLE_COURSE_MAX_PER_FRACTION_GY per fraction at its maximum, is refused; so is a course total
    above io.MAX_PLAUSIBLE_DOSE_GY. ``max_dose_gy``: the file's maximum (stored value x DoseGridScaling)."""
    src, m = check.source, float(max_dose_gy)
    if not math.isfinite(m) or m < 0:
        raise InputError(f"maximum dose {m!r} is not a finite non-negative number", source=src, field="PixelData")
    if check.session_factor > 1 or check.summation.endswith("_SESSION"):
        if m > MAX_PLAUSIBLE_SESSION_DOSE_GY:
            raise InputError(f"DoseSummationType {check.summation} (one session) with a maximum of {m:.4g} Gy: "
                             f"implausibly high for one session (> {MAX_PLAUSIBLE_SESSION_DOSE_GY:g} Gy); this looks "
                             "like a course or fraction-group total: export it as PLAN or FRACTION",
                             source=src, field="DoseSummationType")
    elif check.fractions:
        per_fx = m / check.fractions
        if per_fx < MIN_PLAUSIBLE_COURSE_MAX_PER_FRACTION_GY:
            raise InputError(f"DoseSummationType {check.summation} (the whole delivery of {check.fractions} "
                             f"fractions) with a maximum of {m:.4g} Gy = {per_fx:.3g} Gy per fraction: implausibly "
                             f"low (< {MIN_PLAUSIBLE_COURSE_MAX_PER_FRACTION_GY:g} Gy); is it one session "
                             "(FRACTION_SESSION), or is DoseGridScaling wrong?", source=src,
                             field="DoseSummationType")
    total = m * check.scale
    if total > MAX_PLAUSIBLE_DOSE_GY:
        raise InputError(f"maximum dose {total:.5g} Gy (file maximum {m:.5g} Gy x {check.scale:g}) exceeds "
                         f"{MAX_PLAUSIBLE_DOSE_GY:g} Gy: wrong DoseGridScaling, DoseUnits or DoseSummationType?",
                         source=src, field="DoseGridScaling")


def read_rtdose(path: Path, what: str = "dose", *, fractions: int | None = None, plan: PlanInfo | None = None,
                accept_effective: bool = False, dose_type: str | None = None, rbe: float | None = None,
                radiation: str | None = None, require_fractions: bool = False) -> Volume:
    """An RTDOSE as a Volume of the course's (or fraction group's) total dose in Gy (float32): physical, or
    RBE-weighted when the case states an RBE (see :func:`check_rtdose_header` for every rule).

    ``fractions``: the count the user states (None = not stated; then from the plan). ``meta["fractions"]`` holds
    the resolved count, ``meta["header_check"]`` the :class:`DoseHeaderCheck`, ``meta["notes"]`` the warnings.
    ``accept_effective`` lets DoseType EFFECTIVE through unchecked (re-reading this program's own EQD2 output).
    """
    src = str(path)
    ds = read_dataset(path, what)
    check = check_rtdose_header(ds, plan, fractions, dose_type=dose_type, rbe=rbe, radiation=radiation,
                                require_fractions=require_fractions, source=src, accept_effective=accept_effective,
                                key=what.split(".dose")[0] if ".dose" in what else "course")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    grid, flip = _dose_geometry(ds, src, frames)
    scaling = float(floats(ds, "DoseGridScaling", src, 1)[0])
    if scaling <= 0:
        raise InputError(f"must be positive, got {scaling:g}", source=src, field="DoseGridScaling")
    raw = _pixel_array(ds, src)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.shape != grid.shape:
        raise InputError(f"pixel data has shape {raw.shape}, expected (frames, rows, columns) = {grid.shape}",
                         source=src, field="PixelData")
    if raw.dtype.kind not in "ui":
        raise InputError(f"pixel data type {raw.dtype} is not an integer type", source=src, field="PixelData")
    dose = (raw.astype(np.float64) * (scaling * check.scale)).astype(np.float32)
    del raw
    if flip:
        dose = np.ascontiguousarray(dose[::-1])
    lo = float(dose.min())
    if lo < 0:
        raise InputError(f"dose contains negative values (minimum {lo:.4g} Gy)", source=src, field="PixelData")
    hi = float(dose.max())
    check_dose_plausibility(check, hi / check.scale)
    ident = identity_of(ds)
    ident.update(DoseSummationType=check.summation, DoseType=check.dose_type, ReferencedRTPlanUIDs=check.plan_uids)
    vol = Volume(dose, grid, name=Path(src).stem,
                 meta={"path": src, "dicom": ident, "notes": list(check.warnings), "format": "dicom-rtdose",
                       "fractions": check.fractions, "header_check": check,
                       "fractions_multiplied": check.session_factor if check.session_factor > 1 else None})
    log.info("%s: RTDOSE %s/%s, max %.3f Gy (x %g), grid %s", src, check.summation, check.dose_type, hi,
             check.scale, grid.size)
    return vol


# ------------------------------------------------------------------------------------------- identity

def _norm_name(name: str) -> str:
    return "^".join(p.strip().upper() for p in str(name).split("^")).rstrip("^")


def _same_patient(a: dict, a_src: str, b: dict, b_src: str) -> None:
    ida, idb = a.get("PatientID", ""), b.get("PatientID", "")
    if ida and idb and ida.strip() != idb.strip():
        raise InputError(f"PatientID {ida!r} differs from {idb!r} in {b_src} (set allow_different_patients: true "
                         "in the case file only if this is intended)", source=a_src, field="PatientID")
    na, nb = _norm_name(a.get("PatientName", "")), _norm_name(b.get("PatientName", ""))
    if na and nb and na != nb:
        raise InputError(f"PatientName {a.get('PatientName')!r} differs from {b.get('PatientName')!r} in {b_src} "
                         "(set allow_different_patients: true in the case file only if this is intended)",
                         source=a_src, field="PatientName")


def check_same_patient(items: list[tuple[str, dict]], case_patient: dict | None = None,
                       case_src: str = "") -> None:
    """All DICOM inputs ((file, identity) pairs) belong to one patient, and to the case's ``patient.id``."""
    items = [(s, i) for s, i in items if i]
    for s, i in items[1:]:
        _same_patient(i, s, items[0][1], items[0][0])
    if items and case_patient and case_patient.get("id"):
        pid = items[0][1].get("PatientID", "")
        if pid and pid.strip() != str(case_patient["id"]).strip():
            raise InputError(f"patient.id {case_patient['id']!r} differs from PatientID {pid!r} of {items[0][0]}",
                             source=case_src, field="patient.id")


# -------------------------------------------------------------------------------------------- RTSTRUCT

@dataclass
class _Roi:
    number: int
    name: str
    color: tuple[float, float, float] | None
    frame_uid: str
    contours: list[np.ndarray] = field(default_factory=list)   # each (N, 3) LPS mm, closed planar


def read_rtstruct_contours(path: Path, what: str = "structures") -> tuple[list[_Roi], dict, list[str]]:
    """ROIs with their closed planar contours (LPS mm), the file's identity, and warnings."""
    src = str(path)
    ds = read_dataset(path, what, header_only=True)
    _require_modality(ds, src, "RTSTRUCT")
    warnings: list[str] = []
    ident = identity_of(ds)
    frame = ""
    for item in getattr(ds, "ReferencedFrameOfReferenceSequence", None) or []:
        frame = str(getattr(item, "FrameOfReferenceUID", "") or "")
        if frame:
            break
    ident["FrameOfReferenceUID"] = frame
    rois: dict[int, _Roi] = {}
    for item in attr(ds, "StructureSetROISequence", src):
        num = _whole(item, "ROINumber", src)
        name = str(attr(item, "ROIName", src)).strip()
        rois[num] = _Roi(num, name, None, str(getattr(item, "ReferencedFrameOfReferenceUID", "") or frame))
    for item in getattr(ds, "ROIContourSequence", None) or []:
        num = _whole(item, "ReferencedROINumber", src)
        roi = rois.get(num)
        if roi is None:
            raise InputError(f"ROIContourSequence refers to ROI number {num}, absent from StructureSetROISequence",
                             source=src, field="ReferencedROINumber")
        try:        # display only: a malformed colour (one value, not numbers) leaves the ROI without one
            col = getattr(item, "ROIDisplayColor", None)
            if col is not None and _is_multi(col) and len(col) == 3:
                roi.color = tuple(min(max(float(v) / 255.0, 0.0), 1.0) for v in col)
        except (TypeError, ValueError):
            roi.color = None
        skipped: dict[str, int] = {}
        contours = _contour_items_fast(item)
        if contours is None:                                   # anything unusual: pydicom's own parsing
            contours = getattr(item, "ContourSequence", None) or []
        for cont in contours:
            kind = str(getattr(cont, "ContourGeometricType", "") or "").upper()
            if kind not in VOLUME_CONTOUR_TYPES:
                skipped[kind or "(no type)"] = skipped.get(kind or "(no type)", 0) + 1
                continue
            pts = _contour_points(cont, src)
            if pts.size % 3 or pts.size < 9:
                if pts.size % 3:
                    raise InputError(f"ROI {roi.name!r}: ContourData holds {pts.size} numbers (not x, y, z triples)",
                                     source=src, field="ContourData")
                skipped["fewer than 3 points"] = skipped.get("fewer than 3 points", 0) + 1
                continue
            roi.contours.append(pts.reshape(-1, 3))
        for kind, count in skipped.items():
            warnings.append(f"{Path(src).name}: ROI {roi.name!r}: {count} {kind} contour(s) skipped (only closed "
                            "planar contours define a volume)")
    out = []
    for roi in rois.values():
        if not roi.contours:
            warnings.append(f"{Path(src).name}: ROI {roi.name!r} has no closed planar contour; skipped")
            continue
        out.append(roi)
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"ROI name {dup[0]!r} appears more than once", source=src, field="ROIName")
    return out, ident, warnings


def _supersampling(grid: Grid) -> int:
    """In-plane sub-samples per voxel edge: odd, 3 or 5 (sub-sample spacing <= 0.5 mm up to 2.5 mm voxels).

    Odd, so that the ">= 0.5 coverage" rule is unbiased: with an even count a voxel whose true coverage is only
    just above 1/4 along an edge already reaches 0.5 (n = 2: one of two sub-samples), inflating every contour by
    about a quarter voxel per edge.
    """
    n = int(min(5, max(3, math.ceil(max(grid.spacing[0], grid.spacing[1]) / 0.5))))
    return n if n % 2 else n + 1


def _crossings(planes: list[list[np.ndarray]], x0: float, dx: float, ncols: int, y0: float, dy: float,
               nrows: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the edges of the polygons of each plane ((N, 2) arrays of x, y) cross the sample rows y0 + r dy:
    (p nrows + r, col) of every crossing on plane p, col the first sample column at or right of it (0 ..
    ``ncols``; a crossing at col flips the samples col, col + 1, ...).

    An edge crosses the rows with ylo <= y < yhi (half open, so every row crosses a closed polygon an even number
    of times). Vectorised over the edges of all planes and their rows."""
    polys = [q for plane in planes for q in plane]
    if not polys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    a = np.concatenate(polys)
    lens = np.array([len(q) for q in polys], dtype=np.int64)
    ends = np.cumsum(lens)
    nxt = np.arange(1, a.shape[0] + 1)
    nxt[ends - 1] = ends - lens                          # each polygon closes on its first point
    b = a[nxt]
    plane_of = np.repeat(np.repeat(np.arange(len(planes)), [len(plane) for plane in planes]), lens)
    xa, ya, xb, yb = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    ylo, yhi = np.minimum(ya, yb), np.maximum(ya, yb)
    r_lo = np.clip(np.ceil((ylo - y0) / dy), 0, nrows).astype(np.int64)   # rows with ylo <= y < yhi
    r_hi = np.clip(np.ceil((yhi - y0) / dy), 0, nrows).astype(np.int64)
    cnt = r_hi - r_lo
    keep = cnt > 0
    if not keep.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    xa, ya, xb, yb, r_lo, cnt = xa[keep], ya[keep], xb[keep], yb[keep], r_lo[keep], cnt[keep]
    e = np.repeat(np.arange(cnt.size), cnt)
    start = np.cumsum(cnt) - cnt
    r = r_lo[e] + (np.arange(e.size) - start[e])
    y = y0 + r * dy
    x = xa[e] + (y - ya[e]) * (xb[e] - xa[e]) / (yb[e] - ya[e])
    col = np.clip(np.floor((x - x0) / dx).astype(np.int64) + 1, 0, ncols)
    return plane_of[keep][e] * nrows + r, col


def evenodd_fill(polys: list[np.ndarray], x0: float, dx: float, ncols: int, y0: float, dy: float,
                 nrows: int) -> np.ndarray:
    """Even-odd rule fill of the polygons ``polys`` ((N, 2) arrays of x, y) sampled at x0 + c dx, y0 + r dy.

    Returns bool (nrows, ncols). A sample is inside when an odd number of polygon edges cross its row to its
    left (so holes and islands on one plane follow the even-odd rule). Vectorised over edges and rows.
    (:func:`evenodd_coverage` counts the same samples per pixel without making this array.)
    """
    r, col = _crossings([polys], x0, dx, ncols, y0, dy, nrows)
    if r.size == 0:
        return np.zeros((nrows, ncols), dtype=bool)
    toggles = np.bincount(r * (ncols + 1) + col, minlength=nrows * (ncols + 1)).reshape(nrows, ncols + 1)
    parity = np.bitwise_xor.accumulate((toggles[:, :ncols] & 1).astype(np.uint8), axis=1)
    return parity.astype(bool)


def evenodd_coverage(planes: list[list[np.ndarray]], x0: float, n: int, ni: int, y0: float, nj: int
                     ) -> np.ndarray:
    """For each plane's polygons, the number of the n x n sub-samples of each pixel inside them by the even-odd
    rule: (len(planes), nj, ni), int32.

    The sub-samples are those of :func:`evenodd_fill` with ``dx = dy = 1 / n``, ``ncols = ni n``, ``nrows = nj n``
    (x0, y0: the first sub-sample), and the counts are exactly the sums of its n x n blocks; but the sub-sample
    arrays are never made. The sorted crossings of each sub-sample row bound its inside runs [c0, c1), [c2, c3),
    ... (even-odd rule; a run left open at the end of a row runs to its end, as the parity does). A run end at
    column c adds to pixel column I of its pixel row the number of the pixel's sub-samples left of c,
    min(max(c - I n, 0), n), and a run start subtracts it: a difference array over the pixel columns, summed up.
    """
    ncols, nrows = ni * n, nj * n
    r, col = _crossings(planes, x0, 1.0 / n, ncols, y0, 1.0 / n, nrows)
    if r.size == 0:
        return np.zeros((len(planes), nj, ni))
    key = np.sort(r * (ncols + 1) + col)
    r, col = key // (ncols + 1), key % (ncols + 1)
    pos = np.arange(r.size)
    first = np.r_[True, r[1:] != r[:-1]]
    rank = pos - np.maximum.accumulate(np.where(first, pos, 0))
    unclosed = np.r_[first[1:], True] & (rank % 2 == 0)  # an odd number of crossings: the run goes to the end
    if unclosed.any():
        r = np.r_[r, r[unclosed]]
        col = np.r_[col, np.full(int(np.count_nonzero(unclosed)), ncols, dtype=np.int64)]
        rank = np.r_[rank, rank[unclosed] + 1]
    sign = np.where(rank % 2 == 1, 1, -1)                # run end +, run start -
    q, m = col // n, col % n
    row0 = (r // n) * (ni + 2)                           # r // n = plane nj + pixel row
    idx = np.concatenate([row0, row0 + q, row0 + q + 1])
    val = np.concatenate([sign * n, sign * (m - n), -sign * m]).astype(np.int32)
    diff = np.zeros(len(planes) * nj * (ni + 2), dtype=np.int32)
    np.add.at(diff, idx, val)
    # the three entries of every run end or start sum to 0 within its pixel row, so each row's differences total 0
    # and one running sum over all rows gives every row's own running sum: one flat pass, in whole numbers (a
    # running sum of integers is ~7x faster than of floats here; the values are exact either way)
    np.cumsum(diff, out=diff)
    return diff.reshape(len(planes), nj, ni + 2)[:, :, :ni]


def _ds_text(raw: bytes) -> bytes:
    """A raw DS value with its NULs dropped and its outer blanks stripped: its numbers are split at backslashes."""
    return raw.replace(b"\x00", b"").strip()


def _ds_numbers(tokens: list[bytes]) -> np.ndarray:
    """The numbers of a DS value (its tokens as bytes) as float64: Python's float() of each, correctly rounded,
    as numpy's cast of bytes to float64 (which calls it) gave before. ValueError on a token that is no number."""
    return np.fromiter(map(float, tokens), dtype=np.float64, count=len(tokens))


def _contour_points(cont, src: str) -> np.ndarray:
    """ContourData as float64, parsed from the raw bytes when pydicom has not converted it yet (fast)."""
    if isinstance(cont, _FastContour):
        return cont.points
    try:
        elem = cont.get_item(0x30060050)
    except Exception:  # noqa: BLE001
        elem = None
    raw = getattr(elem, "value", None)
    if isinstance(raw, (bytes, bytearray)) and getattr(elem, "VR", "DS") in ("DS", None):
        try:
            pts = _ds_numbers(_ds_text(bytes(raw)).split(b"\\"))
            if np.isfinite(pts).all():
                return pts
        except ValueError:
            pass
    return floats(cont, "ContourData", src)


# A ContourSequence read from its raw bytes: pydicom turns each of its items into a Dataset and converts their
# elements one by one when they are read (0.035 s of the 0.04 s an RTSTRUCT of 19 ROIs / 292 contours took); only
# two elements of each item are needed. The reader below takes them from the bytes of the sequence, for little
# endian data with explicit or implicit VR, items and nested sequences of defined or undefined length, and gives up
# (None: pydicom's own parsing is used, as before) on anything else or anything unusual -- big endian, a VR other
# than the standard's for ContourGeometricType (CS) or ContourData (DS), a VR that is not a standard one (pydicom
# would switch to implicit VR), an element repeated in an item, a length running past its item, a delimiter where
# none belongs, a ContourGeometricType that is not plain upper-case text, ContourData of a closed contour that
# numpy cannot parse or that holds a non-finite number. What it returns is what pydicom's path gives: the same
# geometric type text, and the ContourData bytes parsed as _contour_points parses them.

_CONTOUR_SEQUENCE_TAG = 0x30060040
_CONTOUR_TYPE_TAG = 0x30060042
_CONTOUR_DATA_TAG = 0x30060050
_ITEM_TAG, _ITEM_END_TAG, _SEQUENCE_END_TAG = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
_TAG_LENGTH = _struct.Struct("<HHI").unpack_from                 # group, element, 4-byte length (or VR + 2)
_LENGTH = _struct.Struct("<I").unpack_from
_VR_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())         # 2 reserved bytes, 4-byte length
_VR_SHORT = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_CS_PLAIN = re.compile(rb"([A-Z0-9_]*)[ \x00]*\Z")          # upper-case code string, trailing padding only


class _NotPlain(Exception):
    """The raw bytes hold something the fast ContourSequence reader leaves to pydicom."""


class _FastContour:
    """One ContourSequence item as read by :func:`_contour_items_fast`: its ContourGeometricType text ('' when
    absent or empty, as pydicom's value or '') and, for the closed types, its ContourData as float64."""
    __slots__ = ("ContourGeometricType", "points")

    def __init__(self, kind: str, points: np.ndarray | None):
        self.ContourGeometricType = kind
        self.points = points


def _element_header(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value start) of the data element at ``pos`` (little endian)."""
    group, elem, length = _TAG_LENGTH(buf, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:                            # item and delimiter tags have no VR
        return tag, None, length, pos + 8
    vr = buf[pos + 4:pos + 6]
    if vr in _VR_LONG:
        return tag, vr, _LENGTH(buf, pos + 8)[0], pos + 12
    if vr in _VR_SHORT:
        return tag, vr, length >> 16, pos + 8
    raise _NotPlain


def _skip_undefined_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """The position after the sequence delimitation item of the undefined-length sequence whose items start at
    ``pos``."""
    while True:
        tag, _, length, pos = _element_header(buf, pos, True)
        if tag == _SEQUENCE_END_TAG and length == 0:
            return pos
        if tag != _ITEM_TAG:
            raise _NotPlain
        pos = _read_item(buf, pos, None if length == _UNDEFINED_LENGTH else pos + length, implicit, ())[1]


def _read_item(buf: bytes, pos: int, end: int | None, implicit: bool, wanted: tuple[int, ...]
               ) -> tuple[dict[int, tuple[bytes | None, bytes]], int]:
    """The ``wanted`` elements ({tag: (VR, value bytes)}) of the item whose elements start at ``pos`` and end at
    ``end`` (None: at its item delimitation item), and the position after the item."""
    found: dict[int, tuple[bytes | None, bytes]] = {}
    while True:
        if end is not None and pos >= end:
            if pos > end:
                raise _NotPlain
            return found, pos
        tag, vr, length, pos = _element_header(buf, pos, implicit)
        if tag >> 16 == 0xFFFE:
            if end is None and tag == _ITEM_END_TAG and length == 0:
                return found, pos
            raise _NotPlain
        if length == _UNDEFINED_LENGTH:
            if tag in wanted or not (implicit or vr == b"SQ"):
                raise _NotPlain
            pos = _skip_undefined_sequence(buf, pos, implicit)
            continue
        value_end = pos + length
        if value_end > len(buf) or (end is not None and value_end > end):
            raise _NotPlain
        if tag in wanted:
            if tag in found:
                raise _NotPlain
            found[tag] = (vr, buf[pos:value_end])
        pos = value_end


def _contour_items_fast(item) -> list[_FastContour] | None:
    """The ContourSequence of one ROIContourSequence item (a pydicom Dataset) read from its raw bytes, or None
    when pydicom's parsing is to be used (see above). An absent or empty sequence is an empty list."""
    try:
        raw = item.get_item(_CONTOUR_SEQUENCE_TAG)
    except Exception:  # noqa: BLE001
        return None
    if raw is None:
        return []
    buf = getattr(raw, "value", None)
    implicit = getattr(raw, "is_implicit_VR", None)
    if not isinstance(buf, bytes) or getattr(raw, "is_little_endian", None) is not True or \
            implicit not in (True, False) or raw.VR not in (("SQ", None) if implicit else ("SQ",)) or \
            getattr(raw, "length", None) == _UNDEFINED_LENGTH:
        return None
    kinds, datas = [], []
    try:
        pos = 0
        while pos < len(buf):
            tag, _, length, pos = _element_header(buf, pos, True)
            if tag != _ITEM_TAG:
                raise _NotPlain
            end = None if length == _UNDEFINED_LENGTH else pos + length
            found, pos = _read_item(buf, pos, end, implicit, (_CONTOUR_TYPE_TAG, _CONTOUR_DATA_TAG))
            vr, value = found.get(_CONTOUR_TYPE_TAG, (b"CS", b""))
            m = _CS_PLAIN.match(value)
            if vr not in (b"CS", None) or m is None:
                raise _NotPlain
            kinds.append(m.group(1).decode("ascii"))
            vr, value = found.get(_CONTOUR_DATA_TAG, (None, None))
            datas.append(value if vr in (b"DS", None) else None)
    except (_NotPlain, _struct.error):
        return None
    # ContourData of the closed contours, parsed as _contour_points parses raw bytes, all at once
    closed = [i for i, kind in enumerate(kinds) if kind in VOLUME_CONTOUR_TYPES]
    if any(datas[i] is None for i in closed):
        return None
    points: list[np.ndarray | None] = [None] * len(kinds)
    if closed:
        texts = [_ds_text(datas[i]) for i in closed]
        try:
            values = _ds_numbers(b"\\".join(texts).split(b"\\"))
        except ValueError:
            return None
        if not np.isfinite(values).all():
            return None
        start = 0
        for i, text in zip(closed, texts):
            end = start + text.count(b"\\") + 1
            points[i] = values[start:end]
            start = end
    return [_FastContour(kind, pts) for kind, pts in zip(kinds, points)]


def rasterise_contours(contours: list[np.ndarray], lattice: Grid, slab_mm: float, *, name: str = "",
                       src: str = "") -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """Closed planar contours ((N, 3) LPS mm) as a bool mask on ``lattice``'s voxel lattice.

    Returns (mask indexed k, j, i; lattice index (i, j, k) of mask[0, 0, 0]) -- the index may be negative or
    beyond the lattice size: the mask covers the whole structure, not only the part inside ``lattice``.

    Method (documented in docs/dicom.md):
    - contours are taken into the lattice's continuous index space; each must lie in one slice plane of the
      lattice orientation (otherwise InputError);
    - on each contour plane the in-plane coverage of every voxel is the fraction of n x n sub-samples inside
      the polygons by the even-odd rule (holes, islands);
    - each contour plane stands for a slab of thickness ``slab_mm`` (the structure set's plane spacing) centred
      on it; a voxel's coverage is the sum over contour planes of (length of its k extent inside the slab /
      voxel k size) x in-plane coverage. So contour planes between lattice planes are shared between the
      neighbouring lattice planes, and lattice planes finer than the contours take the nearest contour;
    - a voxel belongs to the structure when its coverage is >= 0.5.
    """
    dz = lattice.spacing[2]
    planes: list[tuple[float, list[np.ndarray]]] = []
    allxy = []
    per = []
    for cont in contours:
        idx = lattice.physical_to_index(cont)
        kspan = (idx[:, 2].max() - idx[:, 2].min()) * dz
        if kspan > 0.2:
            raise InputError(f"ROI {name!r}: a contour is not parallel to the slices of the evaluation grid "
                             f"(spans {kspan:.2f} mm across them)", source=src, field="ContourData")
        per.append((float(idx[:, 2].mean()), idx[:, :2]))
        allxy.append(idx[:, :2])
    per.sort(key=lambda t: t[0])
    for kc, xy in per:
        if planes and abs(kc - planes[-1][0]) * dz <= CONTOUR_PLANE_TOL_MM:
            planes[-1][1].append(xy)
        else:
            planes.append((kc, [xy]))
    allxy = np.concatenate(allxy)
    i0, j0 = (int(v) for v in np.floor(allxy.min(axis=0) + 0.5))
    i1, j1 = (int(v) for v in np.floor(allxy.max(axis=0) + 0.5))
    ni, nj = i1 - i0 + 1, j1 - j0 + 1
    n = _supersampling(lattice)
    h = 0.5 * slab_mm / dz                                 # slab half thickness in k units
    k0 = int(math.floor(planes[0][0] - h + 0.5))
    k1 = int(math.ceil(planes[-1][0] + h - 0.5))
    frac = np.zeros((k1 - k0 + 1, nj, ni), dtype=np.float32)
    sub0_i = i0 - 0.5 + 0.5 / n
    sub0_j = j0 - 0.5 + 0.5 / n
    # in-plane coverage, planes a chunk at a time (the counts take 8 bytes a pixel)
    chunk = max(1, COVERAGE_CHUNK_PIXELS // max(1, nj * (ni + 2)))
    for c0 in range(0, len(planes), chunk):
        counts = evenodd_coverage([polys for _, polys in planes[c0:c0 + chunk]], sub0_i, n, ni, sub0_j, nj)
        for (kc, _), cnt in zip(planes[c0:c0 + chunk], counts):
            cov = cnt.astype(np.float32) * np.float32(1.0 / (n * n))
            for K in range(int(math.floor(kc - h + 0.5)), int(math.ceil(kc + h - 0.5)) + 1):
                w = min(K + 0.5, kc + h) - max(K - 0.5, kc - h)
                if w > 1e-9:
                    frac[K - k0] += np.float32(w) * cov
    mask = frac >= 0.5 - 1e-6
    if not mask.any():
        return None
    return mask, (i0, j0, k0)


def plane_spacing_mm(rois: list[_Roi], normal: np.ndarray, default: float) -> float:
    """Spacing (mm) of the contour planes of a structure set: the median gap between distinct plane positions."""
    pos = np.unique(np.round(np.concatenate([c[:, :] @ normal for r in rois for c in r.contours]) / 0.01) * 0.01)
    if pos.size < 2:
        return float(default)
    gaps = np.diff(pos)
    gaps = gaps[gaps > CONTOUR_PLANE_TOL_MM]
    return float(np.median(gaps)) if gaps.size else float(default)


def read_rtstruct(path: Path, lattice: Grid, what: str = "structures", *, expected_frame_uid: str | None = None,
                  warnings: list[str] | None = None) -> list[Structure]:
    """Closed planar contours of an RTSTRUCT rasterised onto ``lattice`` (see :func:`rasterise_contours`).

    Each Structure's grid is a box of ``lattice``'s voxel lattice covering the whole structure (it may reach
    beyond ``lattice``; callers crop). ``expected_frame_uid``: the reference CT's FrameOfReferenceUID; a
    structure set in another frame is refused. Skipped contours/ROIs are appended to ``warnings``.
    """
    src = str(path)
    rois, ident, warns = read_rtstruct_contours(path, what)
    for w in warns:
        log.warning("%s", w)
    if warnings is not None:
        warnings.extend(warns)
    if expected_frame_uid:
        for roi in rois:
            if roi.frame_uid and roi.frame_uid != expected_frame_uid:
                raise InputError(f"ROI {roi.name!r} is in frame of reference {roi.frame_uid}, not the reference "
                                 f"image's {expected_frame_uid}", source=src, field="ReferencedFrameOfReferenceUID")
    if not rois:
        raise InputError("no ROI with closed planar contours", source=src, field="ROIContourSequence")
    normal = lattice.direction_matrix[:, 2]
    slab = plane_spacing_mm(rois, normal, lattice.spacing[2])
    out = []
    for roi in rois:
        res = rasterise_contours(roi.contours, lattice, slab, name=roi.name, src=src)
        if res is None:
            msg = f"{Path(src).name}: ROI {roi.name!r} covers no voxel centre of the evaluation grid (too small?)"
            log.warning("%s", msg)
            if warnings is not None:
                warnings.append(msg)
            mask, lo = np.zeros((1, 1, 1), bool), (0, 0, 0)
        else:
            mask, lo = res
        k, j, i = mask.shape
        grid = lattice.subgrid(lo, (lo[0] + i, lo[1] + j, lo[2] + k))
        out.append(Structure(roi.name, mask, grid, src, roi.color))
    log.info("%s: %d ROI(s) rasterised (contour plane spacing %.3f mm)", src, len(out), slab)
    return out


def rtstruct_identity(path: Path, what: str = "structures") -> dict:
    ds = read_dataset(path, what, header_only=True)
    ident = identity_of(ds)
    for item in getattr(ds, "ReferencedFrameOfReferenceSequence", None) or []:
        ident["FrameOfReferenceUID"] = str(getattr(item, "FrameOfReferenceUID", "") or "")
        break
    return ident


# ------------------------------------------------------------------------------- dispatch by file type

def load_image_any(path: Path, what: str = "image", series_uid: str | None = None) -> Volume:
    """A DICOM CT series folder, or an image file (NRRD, NIfTI, ...)."""
    path = Path(path)
    if path.is_dir():
        return read_ct_series(path, what, series_uid)
    if is_dicom_file(path):
        raise InputError("a single DICOM file: give the folder holding the CT series", source=str(path), field=what)
    return read_image(path, what)


def load_dose_any(path: Path, what: str = "dose", *, fractions: int | None = None,
                  plan: PlanInfo | None = None, dose_type: str | None = None, rbe: float | None = None,
                  radiation: str | None = None, require_fractions: bool = False) -> Volume:
    """An RTDOSE file or a dose image (NRRD, NIfTI, ...): the course's total dose in Gy, physical, or
    RBE-weighted when the case states an RBE (an image is physical unless ``dose_type: EFFECTIVE``).
    ``meta["fractions"]`` is the resolved count (``fractions`` for an image), ``meta["dose_kind"]`` the
    assumptions dict (DoseHeaderCheck.assumptions())."""
    path = Path(path)
    if is_dicom_file(path):
        vol = read_rtdose(path, what, fractions=fractions, plan=plan, dose_type=dose_type, rbe=rbe,
                          radiation=radiation, require_fractions=require_fractions)
        vol.meta["dose_kind"] = vol.meta["header_check"].assumptions()
        return vol
    if plan is not None:
        raise InputError("plan: is given but the dose is not an RTDOSE (the plan/dose link cannot be checked)",
                         source=str(path), field=what)
    chk = image_dose_check(str(path), fractions, dose_type=dose_type, rbe=rbe, radiation=radiation,
                           key=what.split(".dose")[0] if ".dose" in what else "course")
    vol = read_dose(path, what)
    if chk.rbe_applied:
        vol.array *= np.float32(chk.scale)
        hi = float(vol.array.max())
        if hi > MAX_PLAUSIBLE_DOSE_GY:
            raise InputError(f"maximum dose {hi:.5g} Gy after the RBE {chk.rbe:g} exceeds {MAX_PLAUSIBLE_DOSE_GY:g} Gy",
                             source=str(path), field=what)
    vol.meta.update(fractions=fractions, header_check=chk, dose_kind=chk.assumptions(),
                    notes=list(vol.meta.get("notes", [])) + list(chk.warnings))
    return vol


def image_dose_check(source: str, fractions: int | None, *, dose_type: str | None, rbe: float | None,
                     radiation: str | None, key: str = "course") -> DoseHeaderCheck:
    """The RBE rules (:func:`resolve_dose_kind`) for a dose without a DICOM header (an image file, or a Slicer
    volume that is not an RTDOSE): physical unless ``dose_type: EFFECTIVE``; ``scale`` is the RBE when it is to be
    applied (physical particle dose), else 1."""
    rbe_v, applied, rad, warns = resolve_dose_kind(None, dose_type=dose_type, rbe=rbe, radiation=radiation,
                                                   plan=None, src=source, key=key)
    kind = (dose_type or "PHYSICAL").upper()
    return DoseHeaderCheck(source, "(image file)", kind, float(rbe_v) if applied else 1.0, fractions,
                           rbe=rbe_v, rbe_applied=applied, radiation=rad, warnings=warns)


#: RTSTRUCTs are rasterised on a lattice at least this fine in-plane (mm) ...
FINE_INPLANE_MM = 1.0
#: ... and along the slices (mm), subdividing a coarser lattice (e.g. a 2.5 mm dose grid) by whole factors.
FINE_SLICE_MM = 1.25


def fine_lattice(grid: Grid) -> Grid:
    """``grid`` subdivided by whole factors so that its spacing is <= FINE_INPLANE_MM in-plane and
    <= FINE_SLICE_MM along k; the fine voxels tile the coarse ones exactly. Unchanged when already fine."""
    f = [max(1, math.ceil(grid.spacing[0] / FINE_INPLANE_MM - 1e-9)),
         max(1, math.ceil(grid.spacing[1] / FINE_INPLANE_MM - 1e-9)),
         max(1, math.ceil(grid.spacing[2] / FINE_SLICE_MM - 1e-9))]
    if f == [1, 1, 1]:
        return grid
    f = np.asarray(f)
    origin = grid.index_to_physical((-0.5 + 0.5 / f)[None, :])[0]
    return Grid(tuple(int(n) for n in np.asarray(grid.size) * f), tuple(float(v) for v in origin),
                tuple(float(s) for s in np.asarray(grid.spacing) / f), grid.direction)


def load_structures_any(path: Path, what: str = "structures", *, lattice: Grid | None = None,
                        expected_frame_uid: str | None = None, warnings: list[str] | None = None,
                        crop: bool = False) -> list[Structure]:
    """An RTSTRUCT file, a folder of masks or a Slicer .seg.nrrd.

    ``crop``: masks read from files are kept as their bounding boxes (``io.read_structures``); an RTSTRUCT's
    structures are boxes of the lattice anyway.

    An RTSTRUCT is rasterised onto ``lattice`` (the reference CT's grid in the pipeline, else the evaluation
    grid), subdivided by :func:`fine_lattice` when coarser than ~1 mm, so that small organs keep their shape
    and volume; callers resample the masks onto the evaluation grid.
    """
    path = Path(path)
    if is_dicom_file(path):
        if lattice is None:
            raise ValueError("an RTSTRUCT needs a lattice to be rasterised onto")
        return read_rtstruct(path, fine_lattice(lattice), what, expected_frame_uid=expected_frame_uid,
                             warnings=warnings)
    return read_structures(path, what, crop=crop)


# ------------------------------------------------------------------------------------- case-level checks

def series_identity(folder: Path, series_uid: str | None = None) -> dict:
    """Identity of the first CT image (of ``series_uid`` when given) in ``folder`` ({} when none): a cheap
    header read."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    for f in dicom_files(folder):
        ds = read_dataset(f, "image", header_only=True)
        if str(getattr(ds, "Modality", "")).upper() == "CT" and \
                (series_uid is None or str(getattr(ds, "SeriesInstanceUID", "")) == series_uid):
            return identity_of(ds)
    return {}


def check_case_inputs(case, reference: Volume | None, doses: list[Volume], warnings: list[str]) -> None:
    """Checks across a case's DICOM inputs (``case`` is a CaseSpec; ``doses`` in course order).

    - every DICOM input (reference CT, RTSTRUCT, RTDOSEs, RTPLANs, prior CT folders) names one patient
      (PatientID, and PatientName when both are set), and the case's ``patient.id`` when given -- unless
      ``allow_different_patients: true`` (then a warning);
    - a course registered by ``identity`` must be in the reference image's frame of reference (or, without a
      DICOM reference image, in the current dose's frame);
    - warnings of the dose readers (e.g. a FRACTION_SESSION dose multiplied, an RBE applied) are added to
      ``warnings``.
    """
    items: list[tuple[str, dict]] = []
    ref_frame = ""
    if reference is not None and reference.meta.get("dicom"):
        items.append((reference.meta.get("path", "reference.image"), reference.meta["dicom"]))
        ref_frame = reference.meta["dicom"].get("FrameOfReferenceUID", "")
    if is_dicom_file(case.reference_structures):
        items.append((str(case.reference_structures), rtstruct_identity(case.reference_structures)))
    for i, (c, d) in enumerate(zip(case.courses, doses)):
        for g in d.meta.get("groups") or [d]:   # every fraction group's dose file of the course
            warnings.extend(g.meta.get("notes", []))
            if g.meta.get("dicom"):
                items.append((str(g.meta.get("path", c.dose)), g.meta["dicom"]))
        if getattr(c, "plan", None) is not None:
            items.append((str(c.plan), read_rtplan(c.plan, f"courses[{i}].plan").identity))
        if c.image is not None and Path(c.image).is_dir():
            ident = series_identity(c.image, getattr(c, "image_series", None))
            if ident:
                items.append((str(c.image), ident))
    if case.allow_different_patients:
        ids = sorted({i.get("PatientID", "") for _, i in items if i.get("PatientID")})
        if len(ids) > 1:
            warnings.append(f"DICOM inputs name {len(ids)} patients ({', '.join(ids)}); accepted because the case "
                            "file says allow_different_patients: true")
    else:
        check_same_patient(items, case.patient, str(case.path))
    current = doses[-1].meta.get("dicom", {}).get("FrameOfReferenceUID", "") if doses else ""
    frame = ref_frame or current
    for i, (c, d) in enumerate(zip(case.courses, doses)):
        method = (c.registration or {}).get("method", "identity")
        own = d.meta.get("dicom", {}).get("FrameOfReferenceUID", "")
        for g in (d.meta.get("groups") or [])[1:]:   # the fraction groups of one course share one frame
            g_own = g.meta.get("dicom", {}).get("FrameOfReferenceUID", "")
            if own and g_own and g_own != own:
                raise InputError(f"the dose is in frame of reference {g_own} but the course's first fraction group "
                                 f"dose is in {own}: the groups of one plan share one frame",
                                 source=str(g.meta.get("path")), field="FrameOfReferenceUID")
        if method == "identity" and frame and own and own != frame:
            raise InputError(f"the dose is in frame of reference {own} but the "
                             f"{'reference image' if ref_frame else 'current dose'} is in {frame}; "
                             "registration: identity would map one onto the other without a registration",
                             source=str(c.dose), field="FrameOfReferenceUID")
