"""Case files (YAML or JSON): which images, doses, structures and courses make up one analysis.

Paths are relative to the case file. Every field a dose depends on (fractions, intervals) is explicit:
nothing is defaulted silently. See ``docs/case-file.md`` for every key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import InputError
from .prescription import Schedule, parse_schedule
from .selection import Clinical, parse_clinical

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
REGISTRATION_METHODS = ("identity", "rigid", "deformable", "file")  # see registration.py


@dataclass
class CourseSpec:
    name: str
    dose: Path
    fractions: int
    interval_months: float | None     # end of this course -> start of the current one; None for the current
    image: Path | None = None
    registration: dict = field(default_factory=lambda: {"method": "identity"})
    is_current: bool = False
    plan: Path | None = None           # RTPLAN of this course (fractions read from it; RTDOSE link checked)
    image_series: str | None = None    # SeriesInstanceUID picking the CT when ``image`` holds several series
    structures: Path | None = None     # this (prior) course's own structures, in its frame (registration QA: Dice)
    schedule: Schedule | None = None   # fractions per day, gap between them, prescribed dose (prescription.py)
    #: every dose file of the course: one, or one per fraction group of ``plan`` (DoseSummationType FRACTION or
    #: FRACTION_SESSION, each an EQD2 term with its own group's fractions). ``dose`` is the first.
    doses: list[Path] = field(default_factory=list)
    fractions_stated: int | None = None  # ``fractions:`` as written (None: read from the plan / the RTDOSE)
    dose_type: str | None = None       # PHYSICAL | EFFECTIVE as stated (None: not stated)
    rbe: float | None = None           # stated RBE of a proton/ion course (None: not stated)
    radiation: str | None = None       # photon | electron | proton | ion as stated (None: not stated)
    #: registration uncertainty (mm) of this prior course for the robustness scenarios; None = protocol default
    registration_uncertainty_mm: float | None = None

    def __post_init__(self):
        if not self.doses:
            self.doses = [self.dose]


@dataclass
class CaseSpec:
    path: Path
    reference_image: Path | None
    reference_structures: Path
    grid: str                          # dose | image
    protocol: str
    courses: list[CourseSpec]
    patient: dict = field(default_factory=dict)
    allow_different_patients: bool = False   # DICOM inputs of different PatientID/name accepted when True
    reference_image_series: str | None = None  # SeriesInstanceUID when reference.image holds several CT series
    clinical: Clinical | None = None   # patient selection factors (selection.py); None = block absent

    @property
    def current(self) -> CourseSpec:
        return self.courses[-1]

    @property
    def priors(self) -> list[CourseSpec]:
        return self.courses[:-1]


def load_case(path: Path) -> CaseSpec:
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise InputError("case file not found", source=src)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot parse: {first}", source=src) from None
    return parse_case(data, path)


def _fail(src: str, key: str, msg: str):
    raise InputError(msg, source=src, field=key)


def _keys(obj, key: str, src: str, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(obj, dict):
        _fail(src, key or "(top level)", f"must be a mapping, got {type(obj).__name__}")
    unknown = sorted(set(map(str, obj)) - allowed)
    if unknown:
        _fail(src, f"{key}.{unknown[0]}" if key else unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for r in sorted(required):
        if obj.get(r) is None:
            _fail(src, f"{key}.{r}" if key else r, "missing")
    return obj


def _path(base: Path, value, src: str, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        _fail(src, key, f"must be a file path, got {value!r}")
    p = Path(value)
    return p if p.is_absolute() else base / p


def _series_uid(value, src: str, key: str) -> str | None:
    """An optional DICOM SeriesInstanceUID (digits and dots)."""
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value.strip()):
        _fail(src, key, f"must be a DICOM SeriesInstanceUID (digits and dots), got {value!r}")
    return value.strip()


def dose_kind_field(name: str, value, src: str, key: str):
    """One RBE statement of a course (``dose_type``, ``rbe`` or ``radiation``; None = not stated), normalised;
    InputError naming ``<key>.<name>`` when malformed. Used by :func:`parse_dose_kind` and the Slicer panel."""
    if value is None:
        return None
    if name == "dose_type":
        if not isinstance(value, str) or value.strip().upper() not in ("PHYSICAL", "EFFECTIVE"):
            _fail(src, f"{key}.dose_type", f"must be PHYSICAL or EFFECTIVE (RBE-weighted), got {value!r}")
        return value.strip().upper()
    if name == "rbe":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 1.0 <= value <= 5.0:
            _fail(src, f"{key}.rbe", f"must be a number from 1 to 5 (e.g. 1.1 for protons), got {value!r}")
        return float(value)
    if name == "radiation":
        if not isinstance(value, str) or value.strip().lower() not in ("photon", "electron", "proton", "ion"):
            _fail(src, f"{key}.radiation", f"must be photon, electron, proton or ion, got {value!r}")
        return value.strip().lower()
    raise KeyError(name)


def parse_dose_kind(dose_type, rbe, radiation, src: str, key: str) -> tuple[str | None, float | None, str | None]:
    """A course's RBE statements as given (case-file keys, or the Slicer panel's fields): ``dose_type`` PHYSICAL |
    EFFECTIVE, ``rbe`` a number 1-5, ``radiation`` photon | electron | proton | ion; each None when not stated.
    Returns them normalised; InputError naming ``<key>.<field>`` otherwise. The one check of both paths: an
    EFFECTIVE (RBE-weighted) dose needs its RBE; an RBE does not go with photons or electrons. How they act on a
    dose: ``dicom_rt.resolve_dose_kind``."""
    dose_type = dose_kind_field("dose_type", dose_type, src, key)
    rbe = dose_kind_field("rbe", rbe, src, key)
    radiation = dose_kind_field("radiation", radiation, src, key)
    if dose_type == "EFFECTIVE" and rbe is None:
        _fail(src, f"{key}.rbe", "missing (dose_type: EFFECTIVE is an RBE-weighted dose: state the RBE the "
                                 "planning system used; it is recorded, not applied again)")
    if rbe is not None and radiation in ("photon", "electron"):
        _fail(src, f"{key}.rbe", f"is for proton/ion courses, not radiation: {radiation}")
    return dose_type, rbe, radiation


def parse_case(data, path: Path) -> CaseSpec:
    src = str(path)
    base = path.parent
    top = _keys(data, "", src, {"reference", "grid", "protocol", "courses", "patient", "allow_different_patients",
                                "clinical"},
                {"reference", "protocol", "courses"})
    ref = _keys(top["reference"], "reference", src, {"image", "structures", "image_series"}, {"structures"})
    grid = top.get("grid", "dose")
    if grid not in ("dose", "image"):
        _fail(src, "grid", f"must be 'dose' or 'image', got {grid!r}")
    if grid == "image" and ref.get("image") is None:
        _fail(src, "reference.image", "missing (needed because grid: image)")
    if not isinstance(top["protocol"], str):
        _fail(src, "protocol", "must be a shipped protocol name or a file path")
    protocol = top["protocol"]
    courses_raw = top["courses"]
    if not isinstance(courses_raw, list) or not courses_raw:
        _fail(src, "courses", "must be a non-empty list (oldest first; the last is the current course)")
    courses = []
    for i, c in enumerate(courses_raw):
        k = f"courses[{i}]"
        c = _keys(c, k, src, {"name", "dose", "fractions", "interval_months", "image", "registration", "plan",
                              "image_series", "structures", "schedule", "dose_type", "rbe", "radiation",
                              "registration_uncertainty_mm"},
                  {"name", "dose"})
        name = c["name"]
        if not isinstance(name, str) or not _NAME_RE.match(name):
            _fail(src, f"{k}.name", f"must be letters, digits, '_', '-' or '.', got {name!r}")
        if name in ("cumulative",) or name in [x.name for x in courses]:
            _fail(src, f"{k}.name", f"{name!r} is reserved or used twice")
        plan = _path(base, c["plan"], src, f"{k}.plan") if c.get("plan") is not None else None
        dose_raw = c["dose"]
        if isinstance(dose_raw, list):
            if not dose_raw:
                _fail(src, f"{k}.dose", "an empty list (give a file, or one RTDOSE per fraction group of plan:)")
            doses = [_path(base, d, src, f"{k}.dose[{j}]") for j, d in enumerate(dose_raw)]
            if len(doses) > 1 and plan is None:
                _fail(src, f"{k}.dose", "several dose files are the fraction groups of one plan: give plan: (the "
                                        "RTPLAN naming the groups' fractions)")
            if len(set(doses)) != len(doses):
                _fail(src, f"{k}.dose", "a file is listed twice")
        else:
            doses = [_path(base, dose_raw, src, f"{k}.dose")]
        if ("fractions" not in c or c["fractions"] is None) and plan is None:
            _fail(src, f"{k}.fractions", "missing (the number of fractions of every course must be given, "
                                         "or plan: an RTPLAN to read it from)")
        n = c.get("fractions")
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n)
                              or n != int(n) or n < 1):
            _fail(src, f"{k}.fractions", f"must be a whole number >= 1, got {n!r}")
        stated = None if n is None else int(n)
        if plan is not None:  # fractions from the RTPLAN; refused when the case file disagrees
            from .dicom_rt import fractions_from_plan, read_rtplan
            info = read_rtplan(plan, f"{k}.plan")
            if len(info.fraction_groups) == 1:
                n = fractions_from_plan(info, stated, src, f"{k}.fractions")
            else:  # several fraction groups: each RTDOSE names its group (checked when the doses are read)
                total = sum(info.fraction_groups)
                if len(doses) > 1 and stated is not None and stated != total:
                    _fail(src, f"{k}.fractions", f"{stated} is not the sum of the plan's fraction groups "
                                                 f"({' + '.join(map(str, info.fraction_groups))} = {total})")
                n = stated if (stated is not None and len(doses) == 1) else total
        dose_type, rbe, radiation = parse_dose_kind(c.get("dose_type"), c.get("rbe"), c.get("radiation"), src, k)
        is_current = i == len(courses_raw) - 1
        interval = c.get("interval_months")
        if is_current:
            if interval is not None:
                _fail(src, f"{k}.interval_months", "the current (last) course takes no interval")
        else:
            if interval is None:
                _fail(src, f"{k}.interval_months",
                      "missing (months from the end of this prior course to the start of the current one)")
            if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not math.isfinite(interval) \
                    or interval < 0:
                _fail(src, f"{k}.interval_months", f"must be a number of months >= 0, got {interval!r}")
            interval = float(interval)
        reg_mm = c.get("registration_uncertainty_mm")
        if reg_mm is not None:
            if is_current:
                _fail(src, f"{k}.registration_uncertainty_mm", "the current (last) course defines the reference "
                                                               "frame: it takes no registration uncertainty")
            if isinstance(reg_mm, bool) or not isinstance(reg_mm, (int, float)) or not math.isfinite(reg_mm) \
                    or not 0 <= reg_mm <= 50:
                _fail(src, f"{k}.registration_uncertainty_mm", f"must be a number of mm in 0-50, got {reg_mm!r}")
            reg_mm = float(reg_mm)
        reg = c.get("registration", {"method": "identity"})
        from .registration import validate_options
        reg = validate_options(reg, src, f"{k}.registration", base)
        if is_current and reg["method"] != "identity":
            _fail(src, f"{k}.registration.method", "the current (last) course defines the reference frame: "
                                                   "its registration must be identity")
        courses.append(CourseSpec(name=name, dose=doses[0], doses=doses, fractions=int(n), fractions_stated=stated,
                                  dose_type=dose_type, rbe=rbe, radiation=radiation,
                                  interval_months=interval,
                                  image=_path(base, c["image"], src, f"{k}.image") if c.get("image") else None,
                                  registration=dict(reg), is_current=is_current, plan=plan,
                                  image_series=_series_uid(c.get("image_series"), src, f"{k}.image_series"),
                                  structures=_path(base, c["structures"], src, f"{k}.structures")
                                  if c.get("structures") is not None else None,
                                  schedule=parse_schedule(c.get("schedule"), src, f"{k}.schedule"),
                                  registration_uncertainty_mm=reg_mm))
    patient = top.get("patient") or {}
    if not isinstance(patient, dict):
        _fail(src, "patient", "must be a mapping (e.g. {id: ..., name: ...})")
    allow = top.get("allow_different_patients", False)
    if not isinstance(allow, bool):
        _fail(src, "allow_different_patients", f"must be true or false, got {allow!r}")
    return CaseSpec(path=path, allow_different_patients=allow, clinical=parse_clinical(top.get("clinical"), src),
                    reference_image_series=_series_uid(ref.get("image_series"), src, "reference.image_series"),
                    reference_image=_path(base, ref["image"], src, "reference.image") if ref.get("image") else None,
                    reference_structures=_path(base, ref["structures"], src, "reference.structures"),
                    grid=grid, protocol=protocol, courses=courses, patient={str(k): str(v) for k, v in patient.items()})
