"""Writing DICOM: RTDOSE (EQD2 maps), RTSTRUCT (engine-made structures), and -- for the synthetic case -- CT
series, RTPLAN and Spatial Registration objects. Plain pydicom (works with pydicom 2.4 and 3.x).

Everything written on a reference CT copies that CT's patient and study identity and frame of reference and
gets new UIDs. Doses are in Gy.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from . import SOFTWARE_NAME, __version__
from .dicom_rt import (CT_IMAGE_STORAGE, PATIENT_KEYS, RT_DOSE_STORAGE, RT_PLAN_STORAGE, RT_STRUCT_STORAGE,
                       SPATIAL_REGISTRATION_STORAGE, STUDY_KEYS, course_rbe_words)
from .geometry import Grid, Volume

log = logging.getLogger(__name__)

_PYDICOM3 = int(pydicom.__version__.split(".")[0]) >= 3
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
UINT32_MAX = 2 ** 32 - 1


def new_uid() -> str:
    return generate_uid()


def _ds_str(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS)."""
    for digits in (12, 11, 10, 9, 8):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot format {value!r} as DS")


def _dataset(sop_class: str, modality: str, identity: dict, *, series_description: str,
             series_uid: str | None = None, sop_uid: str | None = None) -> FileDataset:
    """A dataset with file meta, patient and study copied from ``identity``, and a new (or given) series."""
    sop_uid = sop_uid or new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    now = _dt.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    for k in PATIENT_KEYS + STUDY_KEYS:
        setattr(ds, k, str(identity.get(k, "") or ""))
    if not ds.StudyInstanceUID:
        ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = series_uid or new_uid()
    ds.SeriesNumber = int(identity.get("_SeriesNumber", 900))
    ds.SeriesDescription = series_description[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer = SOFTWARE_NAME
    ds.ManufacturerModelName = SOFTWARE_NAME
    ds.SoftwareVersions = __version__
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime
    ds.OperatorsName = ""
    return ds


def save(ds: FileDataset, path: Path) -> None:
    """Write as DICOM Part 10 (explicit VR little endian)."""
    path = Path(path)
    if _PYDICOM3:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.4
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.save_as(str(path), write_like_original=False)


def _plane_geometry(ds: Dataset, grid: Grid) -> tuple[np.ndarray, float]:
    """Set orientation/position/spacing of ``grid`` on ``ds``; return the k axis and its sign along the normal."""
    d = grid.direction_matrix
    r, c, kdir = d[:, 0], d[:, 1], d[:, 2]
    normal = np.cross(r, c)
    sign = float(np.sign(normal @ kdir)) or 1.0
    if abs(abs(normal @ kdir) - 1.0) > 1e-4:
        raise ValueError("the grid's k axis is not perpendicular to its i and j axes")
    ds.ImageOrientationPatient = [_ds_str(v) for v in np.concatenate([r, c])]
    ds.ImagePositionPatient = [_ds_str(v) for v in grid.origin]
    ds.PixelSpacing = [_ds_str(grid.spacing[1]), _ds_str(grid.spacing[0])]
    return kdir, sign


def _set_ds_raw(ds: Dataset, tag: int, values: np.ndarray) -> None:
    """Set a long DS multi-value (e.g. ContourData) as an already encoded element: each value with 4 decimals
    (0.1 micrometre; at most 16 characters for |v| < 1e10), without pydicom's per-value validation."""
    v = np.round(np.asarray(values, dtype=float), 4)
    v[v == 0] = 0.0  # no "-0.0"
    text = "\\".join(f"{x:.4f}".rstrip("0").rstrip(".") for x in v.tolist())
    if len(text) % 2:
        text += " "
    raw = text.encode("ascii")
    ds[tag] = RawDataElement(pydicom.tag.Tag(tag), "DS", len(raw), raw, 0, False, True)


def dose_scaling(max_gy: float) -> tuple[str, float]:
    """DoseGridScaling (as written, <= 16 characters, and its value) so that max_gy fits in uint32."""
    if max_gy <= 0:
        return "1", 1.0
    s = max_gy / (UINT32_MAX * 0.999)
    text = _ds_str(s)
    value = float(text)
    while max_gy / value > UINT32_MAX:  # rounding of the text went down: nudge up
        value *= 1.0 + 1e-9
        text = _ds_str(value)
        value = float(text)
    return text, value


def write_rtdose(dose: Volume, reference: dict, path: Path, *, series_description: str, dose_comment: str = "",
                 dose_type: str = "PHYSICAL", summation: str = "PLAN",
                 referenced_plan_uids: list[str] | None = None, image_comments: str = "",
                 series_number: int | None = None) -> str:
    """Write ``dose`` (Gy, on its own grid) as an RTDOSE in ``reference``'s patient, study and frame of reference.

    ``reference``: identity dict of the current CT (``Volume.meta["dicom"]`` from ``read_ct_series``).
    Pixels are uint32 with DoseGridScaling = max / (2^32 - 1) (rounded up to a 16-character decimal);
    GridFrameOffsetVector is relative (first value 0). Returns the new SOPInstanceUID.
    """
    arr = np.asarray(dose.array)
    if not np.isfinite(arr).all() or arr.min() < 0:
        raise ValueError("dose must be finite and non-negative")
    if series_number is not None:
        reference = dict(reference, _SeriesNumber=series_number)
    ds = _dataset(RT_DOSE_STORAGE, "RTDOSE", reference, series_description=series_description)
    if image_comments:
        ds.ImageComments = image_comments[:10240]  # General Image module (LT): the full description
    ds.FrameOfReferenceUID = reference.get("FrameOfReferenceUID") or new_uid()
    ds.PositionReferenceIndicator = ""
    grid = dose.grid
    kdir, sign = _plane_geometry(ds, grid)
    nk, nj, ni = arr.shape
    ds.SliceThickness = _ds_str(grid.spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = nj, ni
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.NumberOfFrames = nk
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [_ds_str(sign * k * grid.spacing[2]) for k in range(nk)]
    ds.DoseUnits = "GY"
    ds.DoseType = dose_type
    ds.DoseSummationType = summation
    if dose_comment:
        ds.DoseComment = dose_comment[:64]
    text, scale = dose_scaling(float(arr.max()))
    ds.DoseGridScaling = text
    pix = np.empty(arr.shape, dtype="<u4")
    for k in range(nk):  # frame by frame: no full-grid float64 copy
        pix[k] = np.clip(np.rint(arr[k].astype(np.float64) / scale), 0, UINT32_MAX)
    ds.add_new(0x7FE00010, "OW", pix.tobytes())
    if referenced_plan_uids:
        ds.ReferencedRTPlanSequence = _references(referenced_plan_uids, RT_PLAN_STORAGE)
    save(ds, path)
    log.info("wrote RTDOSE %s (max %.3f Gy, scaling %s)", path, float(arr.max()), text)
    return ds.SOPInstanceUID


# ------------------------------------------------------------------------------------------ RTSTRUCT

def mask_to_polygons(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed boundary polygons of a 2D bool mask (j, i), as (N, 2) arrays of (i, j) voxel-index coordinates.

    The polygons follow the voxel edges (a voxel's square spans index +- 0.5), counter-clockwise around the
    inside, so that by the even-odd rule they enclose exactly the mask's voxels. Diagonally touching voxels are
    kept apart (4-connected inside). Collinear vertices are dropped. Vectorised (pointer jumping), no loop over
    voxels.
    """
    m = np.pad(np.asarray(mask2d, bool), 1)
    J, I = m.shape                    # padded; voxel (j, i) of the padded mask spans corners (i-.5..i+.5)
    inside = m[1:-1, 1:-1]
    jj, ii = np.nonzero(inside)
    if jj.size == 0:
        return []
    jj, ii = jj + 1, ii + 1
    # corner (a, b) = point (i - 0.5 + a', ...) ; we use corner index a = i (left edge) or i + 1 (right edge)
    starts, ends = [], []
    # bottom neighbour (j-1) outside: (i, j) -> (i+1, j)   [corner coords, corner (a,b) at (a-.5, b-.5)]
    sel = ~m[jj - 1, ii]
    starts.append(np.stack([ii[sel], jj[sel]], 1)); ends.append(np.stack([ii[sel] + 1, jj[sel]], 1))
    sel = ~m[jj, ii + 1]   # right neighbour: (i+1, j) -> (i+1, j+1)
    starts.append(np.stack([ii[sel] + 1, jj[sel]], 1)); ends.append(np.stack([ii[sel] + 1, jj[sel] + 1], 1))
    sel = ~m[jj + 1, ii]   # top neighbour: (i+1, j+1) -> (i, j+1)
    starts.append(np.stack([ii[sel] + 1, jj[sel] + 1], 1)); ends.append(np.stack([ii[sel], jj[sel] + 1], 1))
    sel = ~m[jj, ii - 1]   # left neighbour: (i, j+1) -> (i, j)
    starts.append(np.stack([ii[sel], jj[sel] + 1], 1)); ends.append(np.stack([ii[sel], jj[sel]], 1))
    s = np.concatenate(starts)
    e = np.concatenate(ends)
    n = s.shape[0]
    W = I + 2
    sid = s[:, 1] * W + s[:, 0]
    eid = e[:, 1] * W + e[:, 0]
    order = np.argsort(sid, kind="stable")
    sid_sorted = sid[order]
    first = np.searchsorted(sid_sorted, eid, side="left")
    count = np.searchsorted(sid_sorted, eid, side="right") - first
    nxt = order[first]
    two = np.flatnonzero(count == 2)
    if two.size:                     # saddle: take the outgoing edge that turns left (keeps to this voxel)
        din = e[two] - s[two]
        left = np.stack([-din[:, 1], din[:, 0]], 1)
        c1, c2 = order[first[two]], order[first[two] + 1]
        d1 = e[c1] - s[c1]
        nxt[two] = np.where(np.all(d1 == left, axis=1), c1, c2)
    # cycles of the successor permutation: label each by its smallest member (pointer jumping)
    lab = np.arange(n)
    p = nxt.copy()
    steps = int(np.ceil(np.log2(max(n, 2)))) + 1
    for _ in range(steps):
        lab = np.minimum(lab, lab[p])
        p = p[p]
    # rank inside each cycle: break the cycle before its smallest member and rank by distance to the tail
    tail = nxt == lab                      # the edge whose successor is the cycle's label (its smallest member)
    p = np.where(tail, np.arange(n), nxt)
    dist = np.where(tail, 0, 1)
    for _ in range(steps):           # list ranking: the tail points to itself with distance 0
        dist = dist + dist[p]
        p = p[p]
    seq = np.lexsort((-dist, lab))         # within a cycle: from the head (largest distance) to the tail
    out = []
    labs = lab[seq]
    bounds = np.flatnonzero(np.diff(labs)) + 1
    for chunk in np.split(seq, bounds):
        pts = s[chunk].astype(float)
        dprev = pts - np.roll(pts, 1, axis=0)
        dnext = np.roll(pts, -1, axis=0) - pts
        keep = np.abs(dprev[:, 0] * dnext[:, 1] - dprev[:, 1] * dnext[:, 0]) > 0
        pts = pts[keep]
        out.append(pts - np.array([1.5, 1.5]))   # padded corner index -> voxel index coordinates
    return out


def _resample_mask(mask: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    import SimpleITK as sitk
    if grid.same_as(target, tol_mm=1e-4):
        return np.asarray(mask, bool)
    img = sitk.GetImageFromArray(np.asarray(mask, np.float32))
    grid.apply_to(img)
    out = sitk.Resample(img, target.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out) >= 0.5


def write_rtstruct(masks: list[np.ndarray], names: list[str], colors: list[tuple[float, float, float]],
                   ct_reference: Volume, path: Path, *, grid: Grid | None = None, label: str = "ENGINE",
                   series_description: str = "", interpreted_types: list[str] | None = None) -> str:
    """Write bool masks as an RTSTRUCT on the CT ``ct_reference`` (a Volume from ``read_ct_series``).

    ``masks`` are on ``grid`` (default: the CT's grid); other grids are resampled onto the CT first (linear,
    >= 0.5) so that every contour lies on a CT slice and refers to it. Contours follow voxel edges (see
    :func:`mask_to_polygons`): re-rasterised at voxel centres they give back the same voxels. Colours are RGB
    0-1. Returns the new SOPInstanceUID.
    """
    if not (len(masks) == len(names) == len(colors)):
        raise ValueError("masks, names and colors must have the same length")
    ref = ct_reference.meta.get("dicom") or {}
    sop_uids = ref.get("SOPInstanceUIDs") or []
    ct_grid = ct_reference.grid
    ds = _dataset(RT_STRUCT_STORAGE, "RTSTRUCT", ref,
                  series_description=series_description or f"{SOFTWARE_NAME} structures")
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = label[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.ContentDate, ds.ContentTime
    frame = ref.get("FrameOfReferenceUID") or new_uid()
    ct_class = ref.get("SOPClassUID") or CT_IMAGE_STORAGE

    def image_ref(k: int) -> Dataset:
        it = Dataset()
        it.ReferencedSOPClassUID = ct_class
        it.ReferencedSOPInstanceUID = sop_uids[k]
        return it

    rfor = Dataset()
    rfor.FrameOfReferenceUID = frame
    if sop_uids:
        series = Dataset()
        series.SeriesInstanceUID = ref.get("SeriesInstanceUID", "")
        series.ContourImageSequence = Sequence([image_ref(k) for k in range(len(sop_uids))])
        study = Dataset()
        study.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
        study.ReferencedSOPInstanceUID = ds.StudyInstanceUID
        study.RTReferencedSeriesSequence = Sequence([series])
        rfor.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([rfor])
    roi_items, contour_items, obs_items = [], [], []
    for n, (mask, name, color) in enumerate(zip(masks, names, colors), start=1):
        m = _resample_mask(mask, grid or ct_grid, ct_grid)
        roi = Dataset()
        roi.ROINumber = n
        roi.ReferencedFrameOfReferenceUID = frame
        roi.ROIName = name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(roi)
        rc = Dataset()
        rc.ROIDisplayColor = [int(round(255 * min(max(float(v), 0.0), 1.0))) for v in color]
        rc.ReferencedROINumber = n
        conts = []
        for k in np.flatnonzero(m.any(axis=(1, 2))):
            for poly in mask_to_polygons(m[k]):
                ijk = np.column_stack([poly, np.full(len(poly), float(k))])
                xyz = ct_grid.index_to_physical(ijk)
                c = Dataset()
                c.set_original_encoding(False, True, "iso8859")  # lets pydicom write the raw ContourData as is
                if sop_uids:
                    c.ContourImageSequence = Sequence([image_ref(int(k))])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(xyz)
                _set_ds_raw(c, 0x30060050, xyz.ravel())   # ContourData
                conts.append(c)
        if conts:
            rc.ContourSequence = Sequence(conts)
        else:
            log.warning("structure %r is empty on the CT; written without contours", name)
        contour_items.append(rc)
        obs = Dataset()
        obs.ObservationNumber = n
        obs.ReferencedROINumber = n
        obs.RTROIInterpretedType = (interpreted_types[n - 1] if interpreted_types else "CONTROL")
        obs.ROIInterpreter = ""
        obs_items.append(obs)
    ds.StructureSetROISequence = Sequence(roi_items)
    ds.ROIContourSequence = Sequence(contour_items)
    ds.RTROIObservationsSequence = Sequence(obs_items)
    ds.ApprovalStatus = "UNAPPROVED"
    save(ds, path)
    log.info("wrote RTSTRUCT %s (%d ROIs)", path, len(masks))
    return ds.SOPInstanceUID


# ------------------------------------------------------------------------------ CT, RTPLAN, REG (synthetic)

def write_ct_series(ct: Volume, folder: Path, identity: dict, *, series_description: str,
                    rescale_intercept: int = -1024) -> list[str]:
    """Write ``ct`` (HU, integer values) as a CT series, one file per slice (unsigned pixels with the given
    RescaleIntercept). ``identity`` holds patient/study keys, FrameOfReferenceUID and SeriesInstanceUID.
    Returns the slices' SOPInstanceUIDs in k order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.rint(np.asarray(ct.array, dtype=np.float64))
    stored = np.clip(hu - rescale_intercept, 0, 65535).astype("<u2")
    grid = ct.grid
    series_uid = identity.get("SeriesInstanceUID") or new_uid()
    uids = []
    for k in range(grid.size[2]):
        ds = _dataset(CT_IMAGE_STORAGE, "CT", identity, series_description=series_description, series_uid=series_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = identity["FrameOfReferenceUID"]
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        _plane_geometry(ds, grid)
        ds.ImagePositionPatient = [_ds_str(v) for v in grid.index_to_physical(np.array([[0.0, 0.0, k]]))[0]]
        ds.SliceThickness = _ds_str(grid.spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = grid.size[1], grid.size[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept = str(int(rescale_intercept))
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.add_new(0x7FE00010, "OW", stored[k].tobytes())
        save(ds, folder / f"CT_{k + 1:04d}.dcm")
        uids.append(ds.SOPInstanceUID)
    return uids


def write_rtplan(path: Path, identity: dict, *, fractions: int, label: str, prescription_gy: float,
                 series_description: str) -> str:
    """A minimal RTPLAN (no beams) holding the fraction group and prescription: for the synthetic case."""
    ds = _dataset(RT_PLAN_STORAGE, "RTPLAN", identity, series_description=series_description)
    ds.FrameOfReferenceUID = identity["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.RTPlanLabel = label[:16]
    ds.RTPlanName = label[:64]
    ds.RTPlanDate, ds.RTPlanTime = ds.ContentDate, ds.ContentTime
    ds.RTPlanGeometry = "PATIENT"
    ds.ApprovalStatus = "UNAPPROVED"
    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = int(fractions)
    fg.NumberOfBeams = 0
    fg.NumberOfBrachyApplicationSetups = 0
    ds.FractionGroupSequence = Sequence([fg])
    dr = Dataset()
    dr.DoseReferenceNumber = 1
    dr.DoseReferenceStructureType = "SITE"
    dr.DoseReferenceType = "TARGET"
    dr.DoseReferenceDescription = "Prescription"
    dr.TargetPrescriptionDose = _ds_str(prescription_gy)
    ds.DoseReferenceSequence = Sequence([dr])
    save(ds, path)
    return ds.SOPInstanceUID


def _references(uids, sop_class_uid: str) -> Sequence:
    """A sequence of (Referenced SOP Class UID, Referenced SOP Instance UID) items."""
    refs = []
    for uid in uids:
        r = Dataset()
        r.ReferencedSOPClassUID = sop_class_uid
        r.ReferencedSOPInstanceUID = uid
        refs.append(r)
    return Sequence(refs)


def _ct_references(uids) -> Sequence:
    return _references(uids, CT_IMAGE_STORAGE)


def write_spatial_registration(path: Path, identity: dict, *, fixed_frame_uid: str, moving_frame_uid: str,
                               moving_to_fixed: np.ndarray, series_description: str,
                               fixed_series: tuple[str, list[str]] | None = None,
                               moving_series: tuple[str, list[str]] | None = None) -> str:
    """A rigid Spatial Registration (REG) object.

    Convention (DICOM PS3.3 C.20.2): the REG's FrameOfReferenceUID is ``fixed_frame_uid``; RegistrationSequence
    item 1 is the fixed frame with the identity matrix; item 2 is ``moving_frame_uid`` with
    ``moving_to_fixed`` (4x4, row-major in FrameOfReferenceTransformationMatrix), which maps a point given in the
    moving frame (LPS mm) to the fixed frame: p_fixed = M @ [p_moving, 1].
    ``*_series``: (SeriesInstanceUID, SOPInstanceUIDs of the CT) for the referenced-image sequences.
    """
    m = np.asarray(moving_to_fixed, dtype=float)
    if m.shape != (4, 4) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError("moving_to_fixed must be a 4x4 affine matrix")
    ds = _dataset(SPATIAL_REGISTRATION_STORAGE, "REG", identity, series_description=series_description)
    ds.FrameOfReferenceUID = fixed_frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ContentLabel = "RIGID"
    ds.ContentDescription = series_description[:64]
    ds.ContentCreatorName = SOFTWARE_NAME

    def item(frame: str, matrix: np.ndarray, series) -> Dataset:
        it = Dataset()
        it.FrameOfReferenceUID = frame
        if series:
            it.ReferencedImageSequence = _ct_references(series[1])
        mx = Dataset()
        mx.FrameOfReferenceTransformationMatrixType = "RIGID"
        mx.FrameOfReferenceTransformationMatrix = [_ds_str(v) for v in matrix.ravel()]
        mreg = Dataset()
        mreg.MatrixSequence = Sequence([mx])
        mreg.RegistrationTypeCodeSequence = Sequence([])  # Type 2: left empty (method not coded)
        it.MatrixRegistrationSequence = Sequence([mreg])
        return it

    ds.RegistrationSequence = Sequence([item(fixed_frame_uid, np.eye(4), fixed_series),
                                        item(moving_frame_uid, m, moving_series)])
    others = []
    for series in (fixed_series, moving_series):
        if series:
            s = Dataset()
            s.SeriesInstanceUID = series[0]
            s.ReferencedInstanceSequence = _ct_references(series[1])
            others.append(s)
    if others:
        ds.ReferencedSeriesSequence = Sequence(others)
    save(ds, path)
    return ds.SOPInstanceUID


# ------------------------------------------------------------------------------ pipeline outputs

def eqd2_series_description(protocol, what: str = "Cumulative EQD2") -> str:
    """SeriesDescription (<= 64 characters) naming the EQD2 and the alpha/beta rule."""
    return f"{what} (Gy) LQ a/b per organ, else {protocol.default_alpha_beta:g} Gy"[:64]


def write_eqd2_rtdose(prep, analysis, stage: Path, *, per_course: bool = False) -> dict[str, str]:
    """Write the cumulative EQD2 (and, if asked, each course's EQD2) as RTDOSE files into ``stage``.

    ``prep``: pipeline.Prepared whose reference image is a DICOM CT (patient, study and frame of reference are
    copied from it). DoseType EFFECTIVE; DoseSummationType MULTI_PLAN for the cumulative of several courses,
    PLAN for one course; the plans named by the courses are referenced. Returns {file name: description}.
    """
    from .dicom_rt import read_dataset, read_rtplan, is_dicom_file
    ref = dict(prep.reference_image.meta["dicom"])
    ref["_SeriesNumber"] = 901
    plan_uids: dict[str, list[str]] = {}
    for i, c in enumerate(prep.case.courses):
        uids = []
        if getattr(c, "plan", None) is not None:
            uids.append(read_rtplan(c.plan, f"courses[{i}].plan").sop_instance_uid)
        if is_dicom_file(c.dose):
            ds = read_dataset(c.dose, f"courses[{i}].dose", header_only=True)
            uids += [str(getattr(it, "ReferencedSOPInstanceUID", "")) for it in
                     (getattr(ds, "ReferencedRTPlanSequence", None) or [])]
        plan_uids[c.name] = sorted({u for u in uids if u})
    from .analysis import MAP_RULE
    from .dicom_rt import rbe_tag, rbe_words
    rule = f"LQ EQD2, display map: {MAP_RULE}; default a/b {prep.protocol.default_alpha_beta:g} Gy"
    files = {}
    all_plans = sorted({u for v in plan_uids.values() for u in v})
    name = "cumulative_eqd2.dcm"
    tags = course_rbe_tags(prep)
    write_rtdose(Volume(analysis.cumulative, prep.grid), ref, stage / name,
                 series_description=f"Cumulative EQD2 (Gy) DISPLAY: max over organ a/b {tags}",
                 dose_comment=f"VIEW ONLY: max organs' a/b+credit; {tags}",
                 image_comments=(f"Display map for viewing. {rule}. {course_rbe_words(prep)}. Organ DVHs: use the "
                                 "check map named in results.json structures[].check_on_file (one a/b per map)."),
                 dose_type="EFFECTIVE", summation="MULTI_PLAN" if len(prep.courses) > 1 else "PLAN",
                 referenced_plan_uids=all_plans)
    files[name] = (f"Cumulative EQD2 (Gy) as DICOM RTDOSE (DoseType EFFECTIVE) on the reference CT's frame, for "
                   f"viewing; {rule}; organ DVHs: the check maps (cumulative_eqd2_ab*.dcm)")
    if per_course:
        for c in prep.courses:
            name = f"eqd2_{c.name}.dcm"
            ref["_SeriesNumber"] += 1
            kind = prep.dose_kinds.get(c.name)
            write_rtdose(Volume(analysis.course_eqd2[c.name], prep.grid), ref, stage / name,
                         series_description=eqd2_series_description(prep.protocol, f"EQD2 {c.name} {rbe_tag(kind)}"),
                         dose_comment=f"EQD2 {rbe_tag(kind)}, {c.fractions_text} fx, no credit: {c.name}",
                         image_comments=f"EQD2 (Gy) of course {c.name}, {c.fractions_text} fractions, no recovery "
                                        f"credit; {rbe_words(kind)}; {rule}",
                         dose_type="EFFECTIVE", summation="PLAN", referenced_plan_uids=plan_uids.get(c.name))
            files[name] = f"EQD2 (Gy) of course {c.name} as DICOM RTDOSE; {rule}"
    return files


def course_rbe_tags(prep) -> str:
    """Every course's RBE for a 64-character DICOM field: ``RBE 1.1/1`` (oldest first), ``RBE 1`` when all are 1."""
    vals = []
    for c in prep.courses:
        kind = prep.dose_kinds.get(c.name) or {}
        vals.append(f"{kind['rbe']:g}" if kind.get("rbe") is not None else "1")
    return "RBE " + ("/".join(vals) if any(v != "1" for v in vals) else "1")


def write_check_rtdose(arr: np.ndarray, prep, check_map, stage: Path, series_number: int) -> str:
    """One check map (:class:`.analysis.CheckMap`: one α/β over the whole grid) as ``<stem>.dcm``; returns the name."""
    ref = dict(prep.reference_image.meta["dicom"])
    name = f"{check_map.stem}.dcm"
    write_rtdose(Volume(arr, prep.grid), ref, stage / name,
                 series_description=(f"EQD2 CHECK a/b {check_map.alpha_beta:g} Gy "
                                     + ("credited" if check_map.credited else "undiscounted")
                                     + f" {course_rbe_tags(prep)}"),
                 dose_comment=check_map.dose_comment(),
                 image_comments=f"{check_map.description()}. {course_rbe_words(prep)}",
                 dose_type="EFFECTIVE", summation="MULTI_PLAN" if len(prep.courses) > 1 else "PLAN",
                 series_number=series_number)
    return name
