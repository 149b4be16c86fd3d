"""The results tree: one dataclass tree, serialised to results.json and read by every consumer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class ConstraintResult:
    organ: str
    structure: str | None
    metric: str
    scope: str                  # cumulative | current | per_course
    value: float | None         # Gy (D metrics, EQD2) or cc / % (V metrics): the judged value
    limit: float | None
    unit: str                   # Gy | cc | %
    status: str                 # pass | warn | fail | condition_not_met | no_limit | not_evaluated
    source: str
    verified: bool
    priority: int | None = None
    margin: float | None = None  # limit - value (positive = room left), same unit
    alpha_beta: float | None = None
    recovery_credit: dict[str, float] = field(default_factory=dict)  # prior course -> credit (cumulative rows)
    note: str = ""
    #: cumulative rows: "undiscounted" | "credited", the sum the limit is judged on (``value`` is that one)
    basis: str | None = None
    value_undiscounted: float | None = None   # cumulative rows: plain sum of the courses' EQD2
    value_credited: float | None = None       # cumulative rows: sum with the protocol's recovery credit
    #: the limit's conditions on this case: {"condition", "required", "actual", "met"}
    conditions: list[dict] = field(default_factory=list)
    course: str | None = None                 # per_course rows (and current rows): the course judged
    # worst/best value over the robustness scenarios (robustness.py): worst_value, best_value, worst_scenario,
    # status_worst, scenarios (+ the ranges used); None when not evaluated
    robustness: dict | None = None


@dataclass
class StructureResult:
    name: str
    organ: str | None
    role: str | None
    alpha_beta: float           # α/β (Gy) used for this structure's EQD2 metrics
    volume_cc: float
    metrics: dict[str, dict[str, float | None]]           # "cumulative" | course name -> metric -> value
    metrics_physical: dict[str, dict[str, float | None]]  # course name -> metric -> value (physical Gy)
    recovery_credit: dict[str, float] = field(default_factory=dict)
    outside_dose_grid_fraction: dict[str, float] = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)  # sub-voxel sampling used for the metrics (see sampling.py)
    #: exported map(s) on which this structure's table values are to be checked (pipeline.check_on_file):
    #: {"nrrd", "dicom", "alpha_beta", "recovery_credit", "values", "undiscounted": {"nrrd", "dicom"} | None}
    check_on_file: dict = field(default_factory=dict)
    #: metric -> value of the cumulative EQD2 WITHOUT recovery credit (plain sum; ``metrics["cumulative"]`` is credited)
    cumulative_undiscounted: dict[str, float | None] = field(default_factory=dict)


@dataclass
class CourseAssumption:
    name: str
    fractions: int
    interval_months: float | None
    is_current: bool
    registration: str
    dose_file: str
    max_dose_gy: float
    max_dose_per_fraction_gy: float
    recovery_applied: dict[str, float]  # organ -> credit r (prior courses only)


@dataclass
class Results:
    software: dict
    protocol: dict
    case: dict
    evaluation_grid: dict
    assumptions: dict
    structures: list[StructureResult]
    constraints: list[ConstraintResult]
    unmatched_structures: list[str]
    summary: dict
    warnings: list[str]
    outputs: dict = field(default_factory=dict)
    # planning aids (planning.py; docs/outputs.md): margins report (volumes cc, PTV-OAR overlap cc, GTV-organ
    # distance mm), target checks per target and scope, ESTRO-EORTC type, violation segments, remaining-dose summary
    margins: dict | None = None
    target_checks: list[dict] = field(default_factory=list)
    reirradiation_type: dict | None = None
    violations: list[dict] = field(default_factory=list)
    remaining_dose: dict | None = None
    # registration of each prior course (registration.qa_dict): method, transform matrix/translation (reference ->
    # prior frame), Mattes MI before/after, time, Jacobian determinant range and folded voxels, Dice, notes
    registration: dict = field(default_factory=dict)
    # issue 16 (selection.py, prescription.py): patient selection factors {factor, label, value, unit, adverse,
    # threshold, source, note} and their counts (information only, never the verdict); prescription and
    # fractionation checks of the current course {check, label, course, criterion, required, actual, unit, met,
    # status, source, verified, message}
    patient_selection: list[dict] = field(default_factory=list)
    patient_selection_summary: dict | None = None
    prescription_checks: list[dict] = field(default_factory=list)
    # input file, protocol and engine hashes (provenance.py): traceability and ``batch --resume``
    provenance: dict = field(default_factory=dict)
    # exported maps: "display" (the single viewing map and its rule) and "check" (one α/β per map; docs/outputs.md)
    maps: dict = field(default_factory=dict)
    # wall time (s) of each stage of the run, keyed by its progress message, in order (timing.StageClock)
    timings: dict = field(default_factory=dict)
    # worst-case violation regions (robustness.py; violations_worst.seg.nrrd)
    robustness_violations: list[dict] = field(default_factory=list)
    # published dose-response estimates (risk_estimates.py): information only, never a limit or in the verdict
    risk_estimates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return _clean(asdict(self))


def _clean(obj):
    """JSON-safe: NaN/inf become None; floats rounded to 6 decimals (µGy), enough for any clinical use."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return _clean(obj.item())
    return obj
