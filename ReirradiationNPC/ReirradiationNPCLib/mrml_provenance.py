"""Where a dose volume in the scene came from, and the RTDOSE checks of the command line applied to it.

The command line reads an RTDOSE itself and refuses what is not a course's total physical dose (DoseUnits,
DoseType, DoseSummationType) and fractions that disagree with the plan. Inside Slicer the RTDOSE has been read by
SlicerRT, which keeps only the voxels (times DoseGridScaling). This module finds the RTDOSE file again through the
DICOM database (the series UID SlicerRT puts on the volume's subject-hierarchy item), reads its header and the
referenced plan's fractions, and applies the same rules. A dose volume with no DICOM provenance (e.g. loaded from an
NRRD file) cannot be checked: it is flagged, and the module asks the user to confirm it before computing.

``database`` is anything with ctkDICOMDatabase's ``filesForSeries(seriesUID)`` and ``fileForInstance(sopUID)``
(``slicer.dicomDatabase`` in Slicer; a small stand-in in the tests). No Qt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import slicer

from . import dicom_rt
from .errors import InputError

log = logging.getLogger(__name__)

DOSE_VOLUME_ATTRIBUTE = "DicomRtImport.DoseVolume"
#: subject-hierarchy UID name of DICOM UIDs (vtkMRMLSubjectHierarchyConstants::GetDICOMUIDName())
DICOM_UID_NAME = "DICOM"
#: SlicerRT puts the referenced RTPLAN's SOPInstanceUID in this attribute of the RTDOSE series item
REFERENCED_UIDS_ATTRIBUTE = "DICOM.ReferencedInstanceUIDs"


@dataclass
class DoseProvenance:
    """What is known of a course's dose volume.

    ``kind``: ``rtdose`` (the RTDOSE header was read and passed the checks), ``dicom_unreadable`` (a DICOM series
    UID but no file in the database: unchecked), ``none`` (no DICOM provenance: unchecked).
    ``multiplier``: factor to apply to the voxels (the fractions for a per-fraction RTDOSE; else 1).
    """

    kind: str
    node_name: str
    series_uid: str = ""
    rtdose_file: str = ""
    plan_file: str = ""
    header: dict = field(default_factory=dict)
    multiplier: float = 1.0
    notes: list = field(default_factory=list)
    #: how the volume became the course dose (summation, RBE): ``dicom_rt.DoseHeaderCheck.assumptions()``
    dose_kind: dict = field(default_factory=dict)

    @property
    def checked(self) -> bool:
        return self.kind == "rtdose"

    def unchecked_reason(self) -> str:
        if self.kind == "none":
            return (f"dose {self.node_name!r} has no DICOM provenance (not an RTDOSE loaded from the DICOM database): "
                    "its DoseUnits, DoseType, DoseSummationType and the plan's fractions cannot be checked")
        if self.kind == "dicom_unreadable":
            return (f"dose {self.node_name!r}: the RTDOSE file of series {self.series_uid} is not in the DICOM "
                    "database: its header cannot be checked")
        return ""


def check_rtdose_header(ds, fractions: int | None, plan: dicom_rt.PlanInfo | None = None,
                        src: str = "RTDOSE", max_dose_gy: float | None = None, *, dose_type: str | None = None,
                        rbe: float | None = None, radiation: str | None = None, key: str = "course"
                        ) -> tuple[float, list[str]]:
    """The command line's RTDOSE header rules (``dicom_rt.check_rtdose_header``, the one header check of both
    paths) on a dataset whose voxels were already scaled by DoseGridScaling, as SlicerRT loads them. The fractions
    entered in the panel are required. Returns (factor for the voxels: the course total / the file's dose, notes
    and warnings); raises InputError for a dose that is not a course dose in Gy, or fractions that disagree with
    the plan. ``max_dose_gy``: the volume's maximum (Gy) for the plausibility checks. ``dose_type``, ``rbe``,
    ``radiation``: the panel's statements (validated by ``case.parse_dose_kind``), as the case-file keys."""
    return _checked(ds, fractions, plan, src, max_dose_gy, dose_type=dose_type, rbe=rbe, radiation=radiation,
                    key=key)[:2]


def _checked(ds, fractions, plan, src, max_dose_gy, *, dose_type=None, rbe=None, radiation=None, key="course"):
    check = dicom_rt.check_rtdose_header(ds, plan=plan, fractions=fractions, source=src, require_fractions=True,
                                         max_dose_gy=max_dose_gy, dose_type=dose_type, rbe=rbe, radiation=radiation,
                                         key=key)
    if not check.whole_course:  # one fraction group of several: the panel takes one whole-course dose per course
        raise InputError(f"DoseSummationType {check.summation} holds fraction group {check.fraction_group} of a plan "
                         f"with {check.plan_fraction_groups} fraction groups (each its own EQD2 term); the panel takes "
                         "one whole-course dose per course: run the case from the command line (reirradiation-npc "
                         "run, one RTDOSE per group under the course's dose:)", source=src, field="DoseSummationType")
    return float(check.scale), list(check.notes) + list(check.warnings), check


def _series_uid(node, scene) -> str:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(node)
    uid = sh.GetItemUID(item, DICOM_UID_NAME) if item else ""
    return uid or ""


def _referenced_uids(node, scene) -> list[str]:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(node)
    text = sh.GetItemAttribute(item, REFERENCED_UIDS_ATTRIBUTE) if item else ""
    return [u for u in (text or "").split() if u]


def _dataset(path: str):
    import pydicom
    return pydicom.dcmread(path, stop_before_pixels=True)


def dose_provenance(node, fractions: int | None, database=None, scene=None, *, dose_type: str | None = None,
                    rbe: float | None = None, radiation: str | None = None, key: str = "course") -> DoseProvenance:
    """Read the RTDOSE header (and its plan) of ``node`` through ``database`` and check it (InputError when the
    header shows it is not a course's total dose in Gy, or the fractions disagree with the plan). ``dose_type``,
    ``rbe``, ``radiation``: the panel's RBE statements (as the case-file keys; None = not stated): an RBE-weighted
    (EFFECTIVE) RTDOSE is accepted only when stated, a physical particle dose is multiplied once by the stated RBE
    (in ``multiplier``); a volume without a DICOM header is physical unless stated EFFECTIVE."""
    scene = scene or node.GetScene() or slicer.mrmlScene
    name = node.GetName()
    uid = _series_uid(node, scene)

    def unchecked(kind, **kw):
        chk = dicom_rt.image_dose_check(name, fractions, dose_type=dose_type, rbe=rbe, radiation=radiation, key=key)
        return DoseProvenance(kind, name, multiplier=float(chk.scale), notes=list(chk.warnings),
                              dose_kind=chk.assumptions(), **kw)
    if not uid:
        return unchecked("none")
    files = list(database.filesForSeries(uid)) if database is not None else []
    rtdose = None
    for f in files:
        try:
            ds = _dataset(f)
        except Exception:  # noqa: BLE001 - an unreadable file is skipped (reported below if none is readable)
            continue
        if str(getattr(ds, "Modality", "")).upper() == "RTDOSE":
            rtdose = (f, ds)
            break
    if rtdose is None:
        return unchecked("dicom_unreadable", series_uid=uid)
    path, ds = rtdose
    plan = None
    plan_uids = _referenced_uids(node, scene) or [str(getattr(item, "ReferencedSOPInstanceUID", "")) for item in
                                                  (getattr(ds, "ReferencedRTPlanSequence", None) or [])]
    notes = []
    for plan_uid in plan_uids:
        plan_file = database.fileForInstance(plan_uid) if plan_uid else ""
        if plan_file:
            plan = dicom_rt.read_rtplan(Path(plan_file))
            break
    if plan_uids and plan is None:
        notes.append(f"{name}: the referenced plan is not in the DICOM database; fractions not checked against it")
    image = node.GetImageData()
    top = float(image.GetScalarRange()[1]) if image is not None and image.GetNumberOfPoints() else None
    multiplier, more, check = _checked(ds, fractions, plan, path, top, dose_type=dose_type, rbe=rbe,
                                       radiation=radiation, key=key)
    header = {k: str(getattr(ds, k, "")) for k in ("DoseUnits", "DoseType", "DoseSummationType", "DoseGridScaling",
                                                    "SeriesInstanceUID", "SOPInstanceUID")}
    return DoseProvenance("rtdose", name, series_uid=uid, rtdose_file=str(path),
                          plan_file=plan.path if plan is not None else "", header=header, multiplier=multiplier,
                          notes=notes + more, dose_kind=check.assumptions())


def is_dose_volume(node) -> bool:
    return node is not None and node.GetAttribute(DOSE_VOLUME_ATTRIBUTE) == "1"


def reference_identity(ct_node, database=None, scene=None) -> dict:
    """Patient, study and frame-of-reference identity of a CT loaded from DICOM (read from one of its files through
    the DICOM database: the series UID on its subject-hierarchy item, or Slicer's ``DICOM.instanceUIDs`` attribute);
    {} when the CT has no DICOM provenance."""
    if ct_node is None or database is None:
        return {}
    scene = scene or ct_node.GetScene() or slicer.mrmlScene
    files = []
    uid = _series_uid(ct_node, scene)
    if uid:
        files = list(database.filesForSeries(uid))
    if not files:
        instances = (ct_node.GetAttribute("DICOM.instanceUIDs") or "").split()
        files = [database.fileForInstance(instances[0])] if instances else []
    for f in files:
        if f:
            try:
                return dicom_rt.identity_of(_dataset(f))
            except Exception:  # noqa: BLE001 - try the next file
                continue
    return {}
