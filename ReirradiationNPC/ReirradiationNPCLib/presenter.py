"""What the Slicer panel does, without Qt: the course list (order, naming, editing), course transforms (setting,
clearing), the dose selector's choices, the checks before a run (DICOM provenance of each dose), display toggles,
registration review with manual adjustment, and the run state (running, cancel). The widget
(``ReirradiationNPC.py``) only binds widgets to this and to the parameter node; the tests drive it headless on
slicer-core.

State lives in a parameter object with the parameter node's field names (the module's
``ReirradiationNPCParameterNode`` in Slicer; :class:`PanelState` in tests). Lists are written back whole (one
parameter write per change, as the parameter node wrapper needs). Scene work goes through the MRML adapter modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import mrml, mrml_provenance, mrml_review, mrml_scene
from .case import dose_kind_field, parse_dose_kind
from .errors import InputError

#: automatic course names: "course<position>" (1 = oldest); renumbered when the list changes. Other names are the
#: user's and are never changed.
AUTO_NAME = re.compile(r"^course\d+$")
RESERVED_NAMES = ("cumulative",)
REGISTRATION_METHODS = ("rigid", "deformable", "existing transform")


@dataclass
class Course:
    """A course as the panel holds it (the fields of the module's ``ReirradiationNPCCourse``)."""

    name: str = ""
    dose: object = None
    fractions: int = 0
    intervalMonths: float = 0.0
    ct: object = None
    transform: object = None
    #: RBE statements, as the case-file keys dose_type / rbe / radiation ("" / 0.0 = not stated)
    doseType: str = ""            # "" | PHYSICAL | EFFECTIVE
    rbe: float = 0.0              # 0 = not stated; else 1-5
    radiation: str = ""           # "" | photon | electron | proton | ion


@dataclass
class PanelState:
    """The parameter node's fields the presenter uses (a plain stand-in for tests)."""

    courses: list = field(default_factory=list)
    selectedCourse: int = 0
    registrationMethod: str = "rigid"
    segmentation: object = None
    analysisName: str = "Reirradiation analysis"
    showMargins: bool = True
    showViolations: bool = True
    showHeadroom: bool = False
    showRemainingDose: bool = False
    cumulativeEQD2: object = None
    overlays: object = None
    constraintsTable: object = None
    dvhChart: object = None
    status: str = ""


class Cancelled(Exception):
    """The user cancelled a running computation."""


@dataclass
class RunState:
    """One long action at a time; cancel is a request checked between steps (at each progress message)."""

    running: str = ""          # "" idle, else the action ("register", "compute", "export")
    cancel_requested: bool = False
    message: str = ""

    def begin(self, action: str) -> None:
        if self.running:
            raise RuntimeError(f"{self.running} is still running")
        self.running, self.cancel_requested, self.message = action, False, ""

    def progress(self, message: str) -> None:
        """Progress callback for the engine: records the message, raises Cancelled when cancel was asked."""
        self.message = message
        if self.cancel_requested:
            raise Cancelled(f"cancelled during: {message}")

    def cancel(self) -> None:
        if self.running:
            self.cancel_requested = True

    def end(self) -> None:
        self.running, self.cancel_requested = "", False


@dataclass
class DoseChoice:
    node: object
    label: str
    checked: bool              # a DICOM RTDOSE (SlicerRT's dose volume attribute); else "unchecked"


@dataclass
class Preflight:
    """Result of the checks before a run: courses as engine inputs, doses to be confirmed by the user (no DICOM
    header to check), and notes for the results."""

    inputs: list
    confirm: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    provenance: list = field(default_factory=list)


class Presenter:
    def __init__(self, params, course_factory=Course, scene=None, dicom_database=None):
        self.p = params
        self.course_factory = course_factory
        self.scene = scene
        self.database = dicom_database
        self.run = RunState()
        self.last = None   # (prep, analysis, results, planning, outputs) of the last computation, for exports
        self.exported_files: list = []   # files written by the last RTDOSE export

    # ------------------------------------------------------------------------------------------ course list

    def _scene(self):
        return mrml.scene_or_default(self.scene)

    def _write(self, courses: list) -> None:
        self.p.courses = courses

    @staticmethod
    def _renumber(courses: list) -> None:
        taken = {c.name for c in courses if not AUTO_NAME.match(c.name or "")}
        for i, c in enumerate(courses):
            if not c.name or AUTO_NAME.match(c.name):
                name = f"course{i + 1}"
                k = i + 1
                while name in taken:  # a user name "course3" elsewhere is never duplicated
                    k += 1
                    name = f"course{k}"
                c.name = name
                taken.add(name)

    def add_course(self) -> int:
        """Append a course. Courses are in time order, oldest first; the last one is the current course. The first
        course added is ``course1``, the next ``course2`` (then current): names follow the order. Returns its index."""
        courses = list(self.p.courses)
        c = self.course_factory()
        c.name = ""
        courses.append(c)
        self._renumber(courses)
        self._write(courses)
        self.p.selectedCourse = len(courses) - 1
        return len(courses) - 1

    def remove_course(self, index: int | None = None) -> None:
        courses = list(self.p.courses)
        index = self.p.selectedCourse if index is None else index
        if not 0 <= index < len(courses):
            return
        mrml_review.end_review(courses[index].ct)
        del courses[index]
        self._renumber(courses)
        self._write(courses)
        self.p.selectedCourse = max(0, min(index, len(courses) - 1))

    def move_course(self, index: int, delta: int) -> int:
        """Move a course earlier (-1) or later (+1) in time; automatic names follow the new order."""
        courses = list(self.p.courses)
        j = index + delta
        if not (0 <= index < len(courses) and 0 <= j < len(courses)):
            return index
        courses[index], courses[j] = courses[j], courses[index]
        self._renumber(courses)
        self._write(courses)
        self.p.selectedCourse = j
        return j

    def rename_course(self, index: int, name: str) -> None:
        name = (name or "").strip()
        courses = list(self.p.courses)
        others = [c.name for i, c in enumerate(courses) if i != index]
        if not name or name in RESERVED_NAMES or name in others or not re.match(r"^[A-Za-z0-9_.-]+$", name):
            raise InputError(f"course name {name!r} is empty, reserved, used twice or has characters other than "
                             "letters, digits, '_', '.', '-'", field="courses.name")
        courses[index].name = name
        self._write(courses)

    def course_labels(self) -> list[str]:
        n = len(self.p.courses)
        return [f"{c.name}  ({'current' if i == n - 1 else 'prior'})" for i, c in enumerate(self.p.courses)]

    def set_course_fields(self, index: int, **values) -> None:
        """Set dose, fractions, intervalMonths, ct, doseType, rbe or radiation of a course (names: the course's
        fields). Each RBE statement is checked on its own here (the case-file rule, ``case.parse_dose_kind``) and
        together with the others before computing (:meth:`preflight`)."""
        courses = list(self.p.courses)
        for k, v in values.items():
            if k not in ("dose", "fractions", "intervalMonths", "ct", "doseType", "rbe", "radiation"):
                raise KeyError(k)
            if k in ("doseType", "rbe", "radiation"):
                dose_kind_field({"doseType": "dose_type"}.get(k, k), _stated(v), courses[index].name,
                                f"courses[{index}]")
            setattr(courses[index], k, v)
        self._write(courses)

    def dose_kind_statements(self, index: int) -> tuple:
        """(dose_type, rbe, radiation) of a course as the case-file keys (None = not stated), checked together
        by ``case.parse_dose_kind`` (InputError naming the course and ``courses[i].<key>``)."""
        c = self.p.courses[index]
        return parse_dose_kind(_stated(getattr(c, "doseType", "")), _stated(getattr(c, "rbe", 0.0)),
                               _stated(getattr(c, "radiation", "")), c.name, f"courses[{index}]")

    def is_current(self, index: int) -> bool:
        return index == len(self.p.courses) - 1

    # ----------------------------------------------------------------------------------------- transforms

    def set_transform(self, index: int, transform_node) -> None:
        """Set or clear (None) a course's transform. The course's dose is read through it at compute time; the
        dose node is never put under it. Clearing also takes the prior CT out of a registration review."""
        courses = list(self.p.courses)
        c = courses[index]
        if transform_node is None or c.transform is not transform_node:
            mrml_review.end_review(c.ct)
        c.transform = transform_node
        self._write(courses)

    def course_inputs(self, multipliers: dict | None = None, kinds: dict | None = None) -> list:
        """The courses as the MRML adapter's inputs (nothing in the scene is changed)."""
        out = []
        n = len(self.p.courses)
        for i, c in enumerate(self.p.courses):
            current = i == n - 1
            out.append(mrml.CourseInput(c.name, c.dose, int(c.fractions),
                                        None if current else float(c.intervalMonths),
                                        transform_node=None if current else c.transform,
                                        multiplier=(multipliers or {}).get(c.name, 1.0),
                                        dose_kind=(kinds or {}).get(c.name)))
        return out

    # ---------------------------------------------------------------------------------------- dose choices

    def dose_choices(self) -> list[DoseChoice]:
        """Scalar volumes offered as a course dose: SlicerRT dose volumes first; then the other scalar volumes
        marked "unchecked"; this module's own outputs (EQD2, maps) and labelmaps never."""
        scene = self._scene()
        doses, others = [], []
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(mrml.ROLE_ATTRIBUTE) in (
                    "cumulative_eqd2", "course_eqd2", "alpha_beta", "headroom", "remaining_dose", "course_dose"):
                continue
            if mrml_provenance.is_dose_volume(node):
                doses.append(DoseChoice(node, node.GetName(), True))
            else:
                others.append(DoseChoice(node, f"{node.GetName()}  [unchecked: not an RTDOSE]", False))
        return doses + others

    # ------------------------------------------------------------------------------------------- preflight

    def preflight(self) -> Preflight:
        """The DICOM path's dose checks for every course: the RTDOSE header and plan read through the DICOM
        database (InputError for a dose that is not a course's total physical dose in Gy, or fractions that
        disagree with the plan); doses that cannot be checked are listed in ``confirm`` for the user."""
        confirm, notes, provenance, multipliers, kinds = [], [], [], {}, {}
        for i, c in enumerate(self.p.courses):
            if c.dose is None:
                raise InputError("no dose volume selected", source=c.name, field=f"courses[{i}].dose")
            dose_type, rbe, radiation = self.dose_kind_statements(i)
            prov = mrml_provenance.dose_provenance(c.dose, int(c.fractions) or None, self.database,
                                                   self._scene(), dose_type=dose_type, rbe=rbe, radiation=radiation,
                                                   key=f"courses[{i}]")
            provenance.append(prov)
            multipliers[c.name] = prov.multiplier
            kinds[c.name] = prov.dose_kind
            notes += prov.notes
            if not prov.checked:
                confirm.append(f"{c.name}: {prov.unchecked_reason()}")
        return Preflight(self.course_inputs(multipliers, kinds), confirm, notes, provenance)

    @staticmethod
    def unchecked_warnings(pre: Preflight) -> list[str]:
        """Warnings for the results when the user confirmed unchecked doses."""
        return [f"{msg} (the user confirmed it is the course's total physical dose in Gy)" for msg in pre.confirm]

    # ---------------------------------------------------------------------------------------- registration

    def register(self, index: int | None = None, progress=None) -> str:
        """Register the course's CT to the current CT (method ``rigid`` or ``deformable``) and set the resulting
        transform on the course; returns the QA line. ``existing transform`` is not a method to run: select the
        transform node on the course instead. Cancel is checked at each registration stage."""
        p = self.p
        index = p.selectedCourse if index is None else index
        if self.is_current(index):
            raise InputError("select a prior course: the current course is the reference", field="courses")
        if p.registrationMethod not in ("rigid", "deformable"):
            raise InputError("registration method 'existing transform': select the course's transform node (e.g. "
                             "a DICOM REG loaded by SlicerRT), or choose rigid or deformable to register",
                             field="registration.method")
        c, cur = p.courses[index], p.courses[-1]
        self.run.begin("register")
        try:
            def say(message):
                self.run.progress(message)
                if progress is not None:
                    progress(message)
            node, summary = mrml.register_ct_nodes(c.name, p.registrationMethod, cur.ct, c.ct, say, self._scene())
        finally:
            self.run.end()
        self.set_transform(index, node)
        return summary

    # --------------------------------------------------------------------------------------------- compute

    def compute(self, protocol, confirm=None, progress=None):
        """Run the analysis on the panel's courses and create the result nodes (replacing this analysis' previous
        ones). ``confirm(list of messages) -> bool`` is asked when some doses cannot be checked (no DICOM header);
        without a confirmation nothing is computed. ``progress(message)`` is called at each step; a cancel request
        (``self.run.cancel()``) stops the run at the next step with :class:`Cancelled`, before any node is made."""
        p = self.p
        if p.segmentation is None:
            raise InputError("select the segmentation (structures)", field="structures")
        pre = self.preflight()
        if pre.confirm and not (confirm is not None and confirm(list(pre.confirm))):
            raise InputError("not computed: doses without a DICOM header to check were not confirmed ("
                             + "; ".join(pre.confirm) + ")", field="courses.dose")
        self.run.begin("compute")
        try:
            def say(message):
                self.run.progress(message)
                if progress is not None:
                    progress(message)
            prep = mrml.prepare_from_nodes(pre.inputs, p.segmentation, protocol,
                                           reference_image_node=p.courses[-1].ct, progress=say)
            prep.warnings.extend(self.unchecked_warnings(pre) + pre.notes)
            analysis, results, planning = mrml.run_engine(prep, say)
            say("creating result nodes")
            out = mrml.create_output_nodes(prep, analysis, results, p.analysisName or "Reirradiation analysis",
                                           self._scene(), progress, planning=planning,
                                           reference_node=p.courses[-1].dose)
            say("creating check maps")
            # the same check maps as ``run --scene`` (one alpha/beta and credit each), in the analysis folder
            out.check_maps = mrml_scene.add_check_maps(prep, analysis, out, self._scene())
        finally:
            self.run.end()
        p.cumulativeEQD2, p.overlays = out.cumulative, out.overlays
        p.constraintsTable, p.dvhChart = out.constraints_table, out.dvh_chart
        p.status = status_text(results.summary, unchecked=len(pre.confirm))
        self.last = (prep, analysis, results, planning, out)
        return out

    # --------------------------------------------------------------------------------------------- exports

    def _require_result(self):
        if self.last is None:
            raise InputError("compute the analysis first (exports write what was computed in this session)",
                             field="results")
        return self.last

    def save_report(self, folder: Path) -> Path:
        """report.html of the last computation, the same renderer as the command line, into ``folder``; an
        existing report.html there is never overwritten (choose another folder)."""
        from .report import write_report
        prep, analysis, results, planning, _out = self._require_result()
        folder = Path(folder)
        if (folder / "report.html").exists():
            raise InputError("report.html already exists there; choose an empty folder", source=str(folder),
                             field="report")
        folder.mkdir(parents=True, exist_ok=True)
        write_report(results, folder, analysis=analysis, prepared=prep, planning=planning, pdf=False)
        return folder / "report.html"

    def export_rtdose_file(self, folder: Path, reference_identity: dict) -> Path:
        """The cumulative EQD2 as an RTDOSE file (DoseType EFFECTIVE) with the patient, study and frame of
        reference of ``reference_identity`` (the current CT's DICOM identity, read through the DICOM database):
        this project's writer, used when SlicerRT's DICOM export is not available. Never overwrites a file.

        The check maps (``cumulative_eqd2_ab<x>*.dcm``, one α/β each, as ``run`` writes them) go into the same
        folder; every file written is in ``self.exported_files`` (the cumulative one first). Returns the
        cumulative map's path."""
        import shutil
        import tempfile

        from .analysis import check_maps
        from .dicom_export import write_check_rtdose, write_eqd2_rtdose
        prep, analysis, _results, _planning, _out = self._require_result()
        if not reference_identity or not reference_identity.get("StudyInstanceUID"):
            raise InputError("export as RTDOSE needs the current CT loaded from DICOM (its patient and study)",
                             field="courses.ct")
        if prep.reference_image is None:
            raise InputError("export as RTDOSE needs the current course's CT", field="courses.ct")
        prep.reference_image.meta["dicom"] = dict(reference_identity)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".rtdose-", dir=folder))
        try:
            write_eqd2_rtdose(prep, analysis, stage)
            names = ["cumulative_eqd2.dcm"]
            maps = analysis.check_maps if analysis.check_maps is not None else check_maps(
                prep.courses, prep.structures, prep.protocol)[0]
            for n, m in enumerate(maps):   # one grid in memory at a time; series numbers as ``run`` uses
                arr = m.compute(prep.courses)
                names.append(write_check_rtdose(arr, prep, m, stage, series_number=910 + n))
                del arr
            written = []
            for name in names:
                target = next_free_path(folder / name)
                shutil.move(str(stage / name), str(target))
                written.append(target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self.exported_files = written
        return written[0]

    # --------------------------------------------------------------------------------------------- buttons

    def button_states(self) -> dict:
        p = self.p
        busy = bool(self.run.running)
        n = len(p.courses)
        sel = p.selectedCourse if 0 <= p.selectedCourse < n else -1
        prior = 0 <= sel < n - 1
        method = p.registrationMethod
        return {
            "add": not busy, "remove": not busy and sel >= 0,
            "up": not busy and sel > 0, "down": not busy and 0 <= sel < n - 1,
            "register": (not busy and prior and method in ("rigid", "deformable")
                         and p.courses[sel].ct is not None and p.courses[-1].ct is not None),
            "review": not busy and prior and p.courses[sel].ct is not None and p.courses[-1].ct is not None,
            "compute": not busy and n > 0 and p.segmentation is not None and all(c.dose is not None
                                                                                 for c in p.courses),
            "cancel": busy, "export": not busy and p.cumulativeEQD2 is not None,
            "report": not busy and p.cumulativeEQD2 is not None,
        }

    # --------------------------------------------------------------------------------------------- display

    def foreground_volume(self, roles: dict | None = None):
        """The volume for the slice views' foreground layer: headroom when ticked, else remaining dose when ticked,
        else the cumulative EQD2. ``roles``: the analysis folder's nodes by role (mrml.find_output_nodes)."""
        roles = roles or {}
        if self.p.showHeadroom and roles.get("headroom"):
            return roles["headroom"][0]
        if self.p.showRemainingDose and roles.get("remaining_dose"):
            return roles["remaining_dose"][0]
        return self.p.cumulativeEQD2

    def apply_display(self) -> object:
        """Apply the toggles: margins and violations segments, and the foreground slice layer. Returns the
        foreground volume node."""
        p = self.p
        if p.overlays is not None and p.overlays.GetDisplayNode() is not None:
            seg, display = p.overlays.GetSegmentation(), p.overlays.GetDisplayNode()
            for i in range(seg.GetNumberOfSegments()):
                kind = mrml.segment_tag(seg.GetNthSegment(i), "ReirradiationNPC.Kind")
                show = p.showMargins if kind == "margin" else p.showViolations
                display.SetSegmentVisibility(seg.GetNthSegmentID(i), bool(show))
        roles = {}
        if p.cumulativeEQD2 is not None:
            sh = mrml.subject_hierarchy(self._scene())
            item = sh.GetItemByDataNode(p.cumulativeEQD2)
            if item:
                roles = mrml.find_output_nodes(sh.GetItemParent(item), self._scene())
        node = self.foreground_volume(roles)
        if node is not None:
            mrml_review.set_foreground(self._scene(), node)
        return node

    # ----------------------------------------------------------------------------------- registration review

    def review(self, index: int | None = None) -> None:
        index = self.p.selectedCourse if index is None else index
        if self.is_current(index):
            raise InputError("select a prior course: the current course is the reference", field="courses")
        c, cur = self.p.courses[index], self.p.courses[-1]
        mrml_review.show_fused(cur.ct, c.ct, c.transform, self._scene())

    def adjust(self, index: int, tx=0.0, ty=0.0, tz=0.0, rx=0.0, ry=0.0, rz=0.0):
        """Manual 6-DOF adjustment of the course's (linear) transform about the current CT's centre; live."""
        c, cur = self.p.courses[index], self.p.courses[-1]
        center = mrml_review.volume_center_ras(cur.ct) if cur.ct is not None else (0.0, 0.0, 0.0)
        return mrml_review.adjust(c.transform, tx, ty, tz, rx, ry, rz, center)


def _stated(value):
    """A panel field as a case-file value: "" / 0 (the widgets' "not stated") -> None; text stripped."""
    if value is None or value == "" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                       and value == 0):
        return None
    return value.strip() if isinstance(value, str) else value


def next_free_path(path: Path) -> Path:
    """``path`` if no file is there, else ``<stem>-2<suffix>``, ``-3``, ...: an edit never overwrites a file
    (another saved scene may use it)."""
    path = Path(path)
    if not path.exists():
        return path
    stem = re.sub(r"-\d+$", "", path.stem)
    k = 2
    while (path.parent / f"{stem}-{k}{path.suffix}").exists():
        k += 1
    return path.parent / f"{stem}-{k}{path.suffix}"


def status_text(summary: dict, unchecked: int = 0) -> str:
    """The status line: the verdict code (issue 9's ``summary.verdict_code``, read defensively), the verdict, and
    how many doses were used unchecked."""
    code = summary.get("verdict_code")
    text = str(summary.get("verdict", ""))
    if code:
        text = f"[{code}] {text}"
    if unchecked:
        text += f" | {unchecked} dose(s) without a DICOM header check (confirmed by the user)"
    return text


def restore_protocol(path: Path, expected_sha256: str, scene, folder: Path) -> Path:
    """The protocol file a saved analysis used, as it was: ``path`` when it still holds the text of that analysis
    (SHA-256 ``expected_sha256``); otherwise (edited since, or gone) the copy saved with the analysis in the scene is
    written to a new file in ``folder`` and that file is returned. ``path`` is returned unchanged when the user has
    since chosen another protocol file, or when the scene holds no saved copy."""
    import hashlib
    path = Path(path)
    if not expected_sha256:
        return path
    saved = None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTextNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLTextNode")
        if (node.GetAttribute(mrml.ROLE_ATTRIBUTE) == "protocol"
                and node.GetAttribute("ReirradiationNPC.ProtocolSHA256") == expected_sha256):
            saved = node
    if saved is None:
        return path
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == expected_sha256:
        return path
    if saved.GetAttribute("ReirradiationNPC.ProtocolPath") != str(path):
        return path  # another protocol was chosen since: not ours to replace
    text = saved.GetText()
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != expected_sha256:
        return path  # the saved copy itself does not match: do not guess
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = next_free_path(folder / f"{path.stem}-as-analysed.yaml")
    target.write_text(text, encoding="utf-8")
    return target
