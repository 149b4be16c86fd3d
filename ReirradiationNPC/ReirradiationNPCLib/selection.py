"""Patient selection panel: the prognostic factors a re-irradiation decision weighs (information, never a verdict).

The case file may carry an optional ``clinical`` block (docs/case-file.md); nothing in it is defaulted — a key that is
absent is "not recorded" and its factor's ``adverse`` is ``None``. The nasopharyngeal GTV volume is taken from the GTV
structure (the sub-voxel structure volume of the analysis), the interval from the first course from the case.

Factors and thresholds (one table, :data:`FACTORS`, with its sources):

- Tian YM et al., Br J Cancer 2014 (PMC3899759), adverse prognostic factors for re-irradiation of
  locally recurrent NPC: KPS <= 70, age > 50 years, rT3-4, nasopharyngeal GTV > 30 cm3, existing late complications
  of the first course, synchronous nodal recurrence.
- Trial eligibility of the randomised trial of hyperfractionation (ClinicalTrials.gov NCT02456506; You R et al.,
  Lancet 2023;401:917-927): interval from the first treatment to relapse > 1 year; shown adverse when < 12 months.

The result never enters the verdict or the constraint rows: it is listed in ``results.json`` (``patient_selection``,
``patient_selection_summary``), in the report and in the Slicer module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import InputError

TIAN_2014 = ("Tian YM et al. Br J Cancer 2014 (PMC3899759): adverse prognostic factor for "
             "re-irradiation of locally recurrent NPC")
TRIAL_2023 = ("Trial eligibility: interval from first treatment to relapse > 1 year (ClinicalTrials.gov NCT02456506; "
              "You R et al. Lancet 2023;401:917-927)")

#: factor key -> (label, threshold text, source). Keys are the case file's ``clinical`` keys where there is one.
FACTORS = {
    "kps": ("Karnofsky performance status", "KPS <= 70", TIAN_2014),
    "age": ("Age (years)", "age > 50 years", TIAN_2014),
    "rT_stage": ("Recurrent T stage", "rT3 or rT4", TIAN_2014),
    "gtv_volume": ("Nasopharyngeal GTV volume (cc)", "GTV > 30 cc", TIAN_2014),
    "late_complications": ("Late complications of prior radiotherapy", "any existing late complication",
                           TIAN_2014),
    "nodal_recurrence": ("Synchronous nodal recurrence", "nodal recurrence present", TIAN_2014),
    "interval_first_course": ("Interval from the first course (months)", "< 12 months", TRIAL_2023),
}
KPS_MAX_ADVERSE = 70.0       # KPS <= 70 adverse (Tian 2014)
AGE_MIN_ADVERSE = 50.0       # age > 50 adverse (Tian 2014)
GTV_CC_MIN_ADVERSE = 30.0    # GTV > 30 cc adverse (Tian 2014)
ADVERSE_T_STAGES = ("rT3", "rT4")
INTERVAL_MONTHS_MIN = 12.0   # < 12 months adverse (trial eligibility: > 1 year)

STATEMENT = ("Information for patient selection (prognostic factors, trial eligibility); it never changes the "
             "dose verdict. The treating clinician decides.")

_T_RE = re.compile(r"^r?T([1-4])$", re.IGNORECASE)
_N_RE = re.compile(r"^r?N([0-3])([ab])?$", re.IGNORECASE)
CLINICAL_KEYS = ("kps", "age", "rT_stage", "rN_stage", "late_complications", "nodal_recurrence",
                 "recurrence_interval_months", "note")


@dataclass(frozen=True)
class Clinical:
    """The case file's ``clinical`` block; ``None`` = not recorded (never defaulted)."""

    kps: float | None = None
    age: float | None = None                          # years
    rT_stage: str | None = None                       # rT1..rT4 (normalised)
    rN_stage: str | None = None                       # rN0..rN3 (normalised)
    late_complications: tuple[str, ...] | None = None  # () = recorded: none
    nodal_recurrence: bool | None = None
    recurrence_interval_months: float | None = None   # end of the first course -> diagnosis of the recurrence
    note: str = ""
    recorded: tuple[str, ...] = field(default_factory=tuple)  # keys present in the case file


def _fail(src: str, key: str, msg: str):
    raise InputError(msg, source=src, field=key)


def _num(value, src: str, key: str, lo: float, hi: float, whole: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(src, key, f"must be a number, got {value!r}")
    if not lo <= value <= hi:
        _fail(src, key, f"must be within {lo:g}-{hi:g}, got {value!r}")
    if whole and value != int(value):
        _fail(src, key, f"must be a whole number, got {value!r}")
    return float(value)


def parse_clinical(raw, src: str, key: str = "clinical") -> Clinical | None:
    """Validate the optional ``clinical`` block; ``None`` when absent. Errors name the file and the field."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        _fail(src, key, f"must be a mapping (e.g. {{kps: 70, age: 55, rT_stage: rT3}}), got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(CLINICAL_KEYS))
    if unknown:
        _fail(src, f"{key}.{unknown[0]}", f"unknown key (allowed: {', '.join(CLINICAL_KEYS)})")
    vals: dict = {}
    if raw.get("kps") is not None:
        vals["kps"] = _num(raw["kps"], src, f"{key}.kps", 0, 100, whole=True)
    if raw.get("age") is not None:
        vals["age"] = _num(raw["age"], src, f"{key}.age", 0, 120)
    if raw.get("rT_stage") is not None:
        m = _T_RE.match(str(raw["rT_stage"]).strip()) if isinstance(raw["rT_stage"], str) else None
        if not m:
            _fail(src, f"{key}.rT_stage", f"must be rT1, rT2, rT3 or rT4, got {raw['rT_stage']!r}")
        vals["rT_stage"] = f"rT{m.group(1)}"
    if raw.get("rN_stage") is not None:
        m = _N_RE.match(str(raw["rN_stage"]).strip()) if isinstance(raw["rN_stage"], str) else None
        if not m:
            _fail(src, f"{key}.rN_stage", f"must be rN0, rN1, rN2 or rN3, got {raw['rN_stage']!r}")
        vals["rN_stage"] = f"rN{m.group(1)}{(m.group(2) or '').lower()}"
    if raw.get("late_complications") is not None:
        lc = raw["late_complications"]
        if not isinstance(lc, list) or any(not isinstance(x, str) or not x.strip() for x in lc):
            _fail(src, f"{key}.late_complications",
                  f"must be a list of texts (e.g. [trismus]; [] for none), got {lc!r}")
        vals["late_complications"] = tuple(x.strip() for x in lc)
    if raw.get("nodal_recurrence") is not None:
        if not isinstance(raw["nodal_recurrence"], bool):
            _fail(src, f"{key}.nodal_recurrence", f"must be true or false, got {raw['nodal_recurrence']!r}")
        vals["nodal_recurrence"] = raw["nodal_recurrence"]
        n = vals.get("rN_stage")
        if n is not None and (n != "rN0") != vals["nodal_recurrence"]:
            _fail(src, f"{key}.nodal_recurrence", f"{vals['nodal_recurrence']!r} contradicts rN_stage {n}")
    if raw.get("recurrence_interval_months") is not None:
        vals["recurrence_interval_months"] = _num(raw["recurrence_interval_months"], src,
                                                  f"{key}.recurrence_interval_months", 0, 1200)
    if raw.get("note") is not None:
        vals["note"] = str(raw["note"])
    return Clinical(recorded=tuple(k for k in CLINICAL_KEYS if raw.get(k) is not None), **vals)


# ------------------------------------------------------------------------------------------- factors

def _row(factor: str, value, adverse: bool | None, unit: str = "", note: str = "", **extra) -> dict:
    label, threshold, source = FACTORS[factor]
    row = {"factor": factor, "label": label, "value": value, "unit": unit, "adverse": adverse,
           "threshold": threshold, "source": source, "note": note}
    row.update(extra)
    return row


def gtv_structure(structures, protocol) -> tuple[object | None, list[str]]:
    """The nasopharyngeal GTV among ``structures`` (objects with ``name``, ``organ``, ``volume_cc`` or a dict).

    Candidates, in order: the protocol's margin recipe GTV names (``margins.gtv``), else structures matched to a
    target organ whose name starts with ``GTV`` and is not nodal (``GTVn...``). The first candidate present with a
    volume is used; the others are returned for the note.
    """
    def name(s):
        return s["name"] if isinstance(s, dict) else s.name

    by_name = {name(s).strip().casefold(): s for s in structures}
    margins = getattr(protocol, "margins", None)
    found = []
    if margins is not None:
        for g in margins.gtv:
            s = by_name.get(g.strip().casefold())
            if s is not None and s not in found:
                found.append(s)
    else:
        for s in structures:
            n = name(s).strip().casefold()
            role = s.get("role") if isinstance(s, dict) else getattr(s, "role", None)
            if role == "target" and n.startswith("gtv") and not n.startswith("gtvn"):
                found.append(s)
    if not found:
        return None, []
    return found[0], [name(s) for s in found[1:]]


def patient_selection(clinical: Clinical | None, structures, protocol, courses) -> list[dict]:
    """The selection factors: a list of ``{factor, label, value, unit, adverse, threshold, source, note}``.

    ``structures``: the analysis' structure results (``name``, ``role``, ``volume_cc``: sub-voxel volume, cc);
    ``courses``: the case's courses, oldest first (``interval_months`` of prior courses; the last is current).
    ``adverse`` is True/False, or None when the factor is not recorded.
    """
    c = clinical or Clinical()
    rows = []
    not_rec = "not recorded (case file: clinical.{})"
    rows.append(_row("kps", None if c.kps is None else int(c.kps),
                     None if c.kps is None else c.kps <= KPS_MAX_ADVERSE,
                     note="" if c.kps is not None else not_rec.format("kps")))
    rows.append(_row("age", c.age, None if c.age is None else c.age > AGE_MIN_ADVERSE, unit="years",
                     note="" if c.age is not None else not_rec.format("age")))
    rows.append(_row("rT_stage", c.rT_stage, None if c.rT_stage is None else c.rT_stage in ADVERSE_T_STAGES,
                     note="" if c.rT_stage is not None else not_rec.format("rT_stage")))

    gtv, others = gtv_structure(structures, protocol)
    if gtv is None:
        rows.append(_row("gtv_volume", None, None, unit="cc",
                         note="no GTV structure found (names: the protocol's margins.gtv list)"))
    else:
        vol = gtv["volume_cc"] if isinstance(gtv, dict) else gtv.volume_cc
        gname = gtv["name"] if isinstance(gtv, dict) else gtv.name
        note = f"structure {gname} (sub-voxel structure volume)"
        if others:
            note += f"; also present, not used: {', '.join(others)}"
        ok = vol is not None and math.isfinite(vol) and vol > 0
        rows.append(_row("gtv_volume", float(vol) if ok else None, (vol > GTV_CC_MIN_ADVERSE) if ok else None,
                         unit="cc", note=note if ok else f"structure {gname} has no volume", structure=gname))

    if c.late_complications is None:
        rows.append(_row("late_complications", None, None, note=not_rec.format("late_complications")))
    else:
        rows.append(_row("late_complications", list(c.late_complications), len(c.late_complications) > 0,
                         note="" if c.late_complications else "recorded: none"))

    if c.nodal_recurrence is not None:
        rows.append(_row("nodal_recurrence", c.nodal_recurrence, c.nodal_recurrence))
    elif c.rN_stage is not None:
        rows.append(_row("nodal_recurrence", c.rN_stage != "rN0", c.rN_stage != "rN0",
                         note=f"from rN_stage {c.rN_stage}"))
    else:
        rows.append(_row("nodal_recurrence", None, None,
                         note="not recorded (case file: clinical.nodal_recurrence or clinical.rN_stage)"))

    priors = [x for x in courses if not getattr(x, "is_current", False)]
    if c.recurrence_interval_months is not None:
        m = c.recurrence_interval_months
        rows.append(_row("interval_first_course", m, m < INTERVAL_MONTHS_MIN, unit="months",
                         note="end of the first course to the recurrence (clinical.recurrence_interval_months)"))
    elif priors and priors[0].interval_months is not None:
        m = float(priors[0].interval_months)
        note = (f"end of course {priors[0].name} to the start of the current course (courses[0].interval_months)")
        if m >= INTERVAL_MONTHS_MIN:
            note += ("; the interval to relapse is shorter than this: record clinical.recurrence_interval_months "
                     "to judge the factor")
        rows.append(_row("interval_first_course", m, m < INTERVAL_MONTHS_MIN, unit="months", note=note))
    else:
        rows.append(_row("interval_first_course", None, None, unit="months",
                         note="no prior course in the case and clinical.recurrence_interval_months not recorded"))
    return rows


def summarize(rows: list[dict]) -> dict:
    """Counts of adverse, not adverse and not recorded factors, with the statement that it is information only."""
    return {"adverse_count": sum(1 for r in rows if r["adverse"] is True),
            "not_adverse_count": sum(1 for r in rows if r["adverse"] is False),
            "not_recorded_count": sum(1 for r in rows if r["adverse"] is None),
            "factors": len(rows),
            "adverse_factors": [r["factor"] for r in rows if r["adverse"] is True],
            "statement": STATEMENT}


def format_value(row: dict) -> str:
    """A factor's value as text (for the report, the CLI and the Slicer module)."""
    v = row.get("value")
    if v is None:
        return "not recorded"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ", ".join(v) if v else "none"
    if isinstance(v, float):
        txt = f"{v:.1f}" if row.get("unit") in ("cc", "months") else f"{v:g}"
        return f"{txt} {row['unit']}" if row.get("unit") and row["unit"] != "years" else txt
    return str(v)


def panel_rows(results) -> list[dict]:
    """Display rows for the Slicer module (plain text): Factor, Value, Adverse, Threshold, Source.

    ``results``: a ``Results`` or the ``results.json`` dictionary; an empty list when it has no patient selection.
    """
    rows = results.get("patient_selection") if isinstance(results, dict) else getattr(results, "patient_selection",
                                                                                        None)
    out = []
    for r in rows or []:
        adv = r.get("adverse")
        out.append({"Factor": r.get("label", r.get("factor")), "Value": format_value(r),
                    "Adverse": "not recorded" if adv is None else ("ADVERSE" if adv else "no"),
                    "Threshold": r.get("threshold", ""), "Source": r.get("source", ""), "Note": r.get("note", "")})
    return out


def add_to_results(results, case, protocol) -> None:
    """Fill ``results.patient_selection`` and ``results.patient_selection_summary`` (never the verdict)."""
    rows = patient_selection(getattr(case, "clinical", None), results.structures, protocol,
                             getattr(case, "courses", []))
    results.patient_selection = rows
    results.patient_selection_summary = summarize(rows)
