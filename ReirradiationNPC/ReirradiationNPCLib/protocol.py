"""Protocol files: organs, aliases, alpha/beta, recovery model and dose limits.

Protocols are data (YAML, JSON accepted) under ``Resources/Protocols/``; this module loads and validates
them in one place. Every limit carries its ``source`` and a ``verified`` flag. See ``docs/protocol-format.md``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .eqd2 import eqd2
from .errors import InputError
from .robustness_spec import RobustnessSpec, parse_robustness

ROLES = ("oar", "target", "body")
SCOPES = ("cumulative", "current")          # prescription scopes
CONSTRAINT_SCOPES = ("cumulative", "current", "per_course")
BASES = ("undiscounted", "credited")       # recovery basis of a cumulative limit (clinical facts section 3)
CONDITION_KEYS = ("min_interval_months", "max_course_eqd2_gy")
_METRIC_RE = re.compile(r"^(?:(Dmax|Dmean|Dmin)|D(\d+(?:\.\d+)?)(cc|%)|V(\d+(?:\.\d+)?)Gy)$")


@dataclass(frozen=True)
class Metric:
    """A dose-volume metric. ``kind`` is one of max, mean, min, dcc, dpct, vgy."""

    name: str
    kind: str
    param: float | None = None

    @property
    def is_volume(self) -> bool:
        return self.kind == "vgy"

    @property
    def is_point(self) -> bool:
        """Point-type (near-maximum) metrics: Dmax and D<x>cc with x <= 0.1 cc."""
        return self.kind == "max" or (self.kind == "dcc" and (self.param or 0) <= 0.1)


def judged_with_credit(row) -> bool:
    """Whether a limit (a protocol ``Constraint``, a results row or a violation) is judged on the EQD2 with the
    protocol's recovery credit: only a cumulative limit whose basis says "credited". Every other row, a cumulative
    one without a basis included, counts the prior courses in full (the conservative reading; clinical facts
    section 3). The one rule for the verdict, the maps, the budget and the robustness scenarios."""
    return getattr(row, "scope", "cumulative") == "cumulative" and getattr(row, "basis", None) == "credited"


def parse_metric(text: str) -> Metric:
    """Parse ``Dmax``, ``Dmean``, ``Dmin``, ``D<x>cc``, ``D<x>%`` or ``V<x>Gy``; raise ValueError otherwise."""
    m = _METRIC_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"unknown metric {text!r} (use Dmax, Dmean, Dmin, D<x>cc, D<x>%, V<x>Gy)")
    if m.group(1):
        return Metric(m.group(1), {"Dmax": "max", "Dmean": "mean", "Dmin": "min"}[m.group(1)])
    if m.group(2):
        x = float(m.group(2))
        if m.group(3) == "%" and not 0 <= x <= 100:
            raise ValueError(f"metric {text!r}: percentage must be within 0-100")
        return Metric(str(text).strip(), "dcc" if m.group(3) == "cc" else "dpct", x)
    return Metric(str(text).strip(), "vgy", float(m.group(4)))


@dataclass(frozen=True)
class Conditions:
    """Conditions under which a limit vouches for safety (e.g. Nieder et al. 2006 for the spinal cord).

    ``min_interval_months``: every prior course ended at least this many months before the current one.
    ``max_course_eqd2_gy``: every course, prior ones included, in its own EQD2 (organ alpha/beta, no recovery
    credit) stays at or below this value for the limit's own (dose) metric.
    """

    min_interval_months: float | None = None
    max_course_eqd2_gy: float | None = None

    def __bool__(self) -> bool:
        return self.min_interval_months is not None or self.max_course_eqd2_gy is not None

    def describe(self, metric: str = "") -> str:
        parts = []
        if self.min_interval_months is not None:
            parts.append(f"interval since each prior course >= {self.min_interval_months:g} months")
        if self.max_course_eqd2_gy is not None:
            parts.append(f"each course {metric + ' ' if metric else ''}<= {self.max_course_eqd2_gy:g} Gy EQD2 "
                         "(own EQD2, no credit)")
        return "; ".join(parts)


@dataclass(frozen=True)
class Constraint:
    metric: Metric
    scope: str                      # cumulative | current | per_course (every course, prior ones included)
    limit: float | None             # Gy for D metrics; cc or % for V metrics; None = no limit yet
    unit: str                       # Gy | cc | %
    source: str
    verified: bool
    priority: int | None = None
    note: str = ""
    #: cumulative scope only: the limit applies to the sum of the courses without recovery credit
    #: ("undiscounted", the default) or to the sum with the protocol's recovery credit ("credited"); None otherwise
    basis: str | None = None
    conditions: Conditions = field(default_factory=Conditions)


@dataclass(frozen=True)
class Organ:
    key: str
    role: str
    aliases: tuple[str, ...]
    alpha_beta: float
    alpha_beta_source: str
    constraints: tuple[Constraint, ...]
    alpha_beta_verified: bool = False    # the alpha/beta checked against a full citation?


@dataclass(frozen=True)
class RecoveryModel:
    model: str                                   # none | step
    table: tuple[tuple[float, float], ...] = ()  # (min_months, credit fraction), ascending
    organs: tuple[str, ...] = ()
    source: str = ""
    verified: bool = False          # the credit is a claim like a limit: checked against its source?

    def credit(self, organ_key: str | None, interval_months: float) -> float:
        """Recovery credit r in [0, 1) for a prior course ended ``interval_months`` before the current one."""
        if self.model == "none" or organ_key is None or organ_key not in self.organs:
            return 0.0
        r = 0.0
        for min_months, fraction in self.table:
            if interval_months >= min_months:
                r = fraction
        return r

    def describe(self) -> str:
        if self.model == "none":
            return "no recovery credit (prior courses counted in full)"
        steps = ", ".join(f">= {m:g} months: {100 * f:g}%" for m, f in self.table)
        return (f"step table ({steps}) applied to {', '.join(self.organs)} only; "
                f"{'verified' if self.verified else 'UNVERIFIED'} credit")


@dataclass(frozen=True)
class MarginRecipe:
    """Guideline target margins (mm). See docs/science.md, "Target margins"."""

    gtv: tuple[str, ...]                 # structure names (case-insensitive) united into the GTV
    ctv_mm: float                        # GTV -> CTV isotropic margin (mm)
    ptv_mm: float                        # CTV -> PTV isotropic margin (mm)
    air_hu: float | None                 # CTV voxels with CT number below this (HU) are removed; None = no air crop
    crop_to: str | None                  # body structure (name or alias) the CTV and PTV are cropped to
    avoid_organs: tuple[str, ...]        # organ keys the CTV is kept away from
    avoid_distance_mm: float             # CTV voxels closer than this (mm) to an avoided organ are removed
    source: str
    verified: bool

    def describe(self) -> str:
        crops = [f"cropped to {self.crop_to}" if self.crop_to else "no body crop",
                 f"out of air < {self.air_hu:g} HU" if self.air_hu is not None else "no air crop"]
        if self.avoid_organs:
            crops.append(f"CTV kept {self.avoid_distance_mm:g} mm from {', '.join(self.avoid_organs)}")
        return (f"CTV = GTV ({', '.join(self.gtv)}: those present, united) + {self.ctv_mm:g} mm, "
                f"PTV = CTV + {self.ptv_mm:g} mm; "
                + "; ".join(crops))


@dataclass(frozen=True)
class Fractionation:
    """Fractionation requirements of the prescription (``prescription.fractionation``), each with its provenance.

    ``min_hours_between_fractions``: fractions given on the same day (twice daily or more) at least this many hours
    apart (You R et al. Lancet 2023: >= 6 h). ``dose_per_fraction_gy``: (min, max) physical Gy per fraction of the
    current course's prescription. Checked by :mod:`.prescription` against the case's ``schedule``.
    """

    min_hours_between_fractions: float | None = None
    min_hours_source: str = ""
    min_hours_verified: bool = False
    dose_per_fraction_gy: tuple[float, float] | None = None
    dose_per_fraction_source: str = ""
    dose_per_fraction_verified: bool = False


@dataclass(frozen=True)
class Prescription:
    """Target prescription as an EQD2 range (Gy) at the target alpha/beta, with optional coverage criteria."""

    scope: str                           # which EQD2 the range applies to: current | cumulative
    alpha_beta: float                    # Gy
    eqd2_min_gy: float
    eqd2_max_gy: float
    dose_gy: float | None                # optional physical prescription of the current course (Gy)
    fractions: int | None
    v95_min_percent: float | None        # V95% (of reference EQD2) >= this % of the target volume
    d95_min_percent: float | None        # D95% >= this % of the reference EQD2
    d98_min_percent: float | None        # near-minimum D98% >= this % of the reference EQD2
    d2_max_percent: float | None         # near-maximum D2% <= this % of the reference EQD2
    source: str
    verified: bool
    fractionation: Fractionation | None = None   # fractionation requirements (schedule checks), optional

    @property
    def reference_eqd2_gy(self) -> float:
        """EQD2 (Gy) coverage is judged against: the nominal EQD2 of dose_gy/fractions, else the range minimum."""
        if self.dose_gy is not None and self.fractions is not None:
            return float(eqd2(self.dose_gy, self.fractions, self.alpha_beta))
        return self.eqd2_min_gy

    def describe(self) -> str:
        text = (f"{self.scope} course EQD2 {self.eqd2_min_gy:g}-{self.eqd2_max_gy:g} Gy at alpha/beta "
                f"{self.alpha_beta:g} Gy")
        if self.dose_gy is not None:
            text += f" (nominal {self.dose_gy:g} Gy in {self.fractions} fx = {self.reference_eqd2_gy:.2f} Gy EQD2)"
        crit = [f"{k} {v:g}%" for k, v in (("V95% >=", self.v95_min_percent), ("D95% >=", self.d95_min_percent),
                                           ("D98% >=", self.d98_min_percent), ("D2% <=", self.d2_max_percent))
                if v is not None]
        return text + ("; coverage: " + ", ".join(crit) if crit else "")

    @property
    def reference_rule(self) -> str:
        if self.dose_gy is not None and self.fractions is not None:
            return (f"nominal EQD2 of {self.dose_gy:g} Gy in {self.fractions} fractions at alpha/beta "
                    f"{self.alpha_beta:g} Gy")
        return "minimum of the prescribed EQD2 range"


@dataclass(frozen=True)
class ReirradiationTypeRule:
    """ESTRO-EORTC category rule (Andratschke et al. 2022), judged on the courses' irradiated volumes.

    A course's irradiated volume: its voxels with physical dose >= ``threshold_gy``. Type 1: the current course's
    irradiated volume overlaps a prior one. Otherwise Type 2 when the protocol's cumulative-toxicity rule says so:
    ``both_courses_dose_gy`` (a voxel receives at least this physical dose from a prior course AND from the current
    course) and/or ``cumulative_limit_rows`` (a cumulative limit row fails, warns or has an unmet condition); else
    repeat organ irradiation (an organ at risk in both irradiated volumes) or repeat irradiation.
    """

    threshold_gy: float
    source: str
    verified: bool
    both_courses_dose_gy: float | None = None
    cumulative_limit_rows: bool = False

    def describe(self) -> str:
        text = (f"irradiated volume of a course = its voxels with physical dose >= {self.threshold_gy:g} Gy; Type 1 "
                "if the current course's irradiated volume overlaps a prior course's")
        rules = []
        if self.both_courses_dose_gy is not None:
            rules.append(f"a voxel receives >= {self.both_courses_dose_gy:g} Gy physical from a prior course and "
                         "from the current course")
        if self.cumulative_limit_rows:
            rules.append("a cumulative limit row fails, warns or has an unmet condition")
        if rules:
            text += ("; otherwise Type 2 if there is a cumulative-toxicity concern (" + " or ".join(rules)
                     + "); otherwise repeat organ irradiation if an organ at risk lies in both irradiated volumes, "
                       "else repeat irradiation")
        else:
            text += "; no Type 2 rule stated: without overlap the category is not evaluated"
        return text


@dataclass(frozen=True)
class Protocol:
    name: str
    version: str
    path: str
    default_alpha_beta: float
    default_alpha_beta_source: str
    recovery: RecoveryModel
    organs: dict[str, Organ]
    synthetic: bool = False
    description: str = ""
    warn_tolerance_percent: float = 5.0
    default_alpha_beta_verified: bool = False
    margins: MarginRecipe | None = None
    prescription: Prescription | None = None
    reirradiation_type: ReirradiationTypeRule | None = None
    robustness: RobustnessSpec | None = None     # ranges of the assumptions (robustness_spec.py); None = not given

    def match(self, structure_name: str) -> Organ | None:
        """Organ whose alias (case-insensitive, surrounding blanks ignored) equals the structure name."""
        key = structure_name.strip().casefold()
        for organ in self.organs.values():
            if key in (a.strip().casefold() for a in organ.aliases):
                return organ
        return None

    def summary(self) -> dict:
        return {"name": self.name, "version": self.version, "file": self.path, "synthetic": self.synthetic,
                "default_alpha_beta": self.default_alpha_beta, "recovery": self.recovery.describe(),
                "recovery_source": self.recovery.source, "recovery_verified": self.recovery.verified}


# ----------------------------------------------------------------------------------------------- loading

def protocols_dir() -> Path:
    """The shipped ``Resources/Protocols`` folder (installed package or source tree)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "Resources" / "Protocols", here.parents[1] / "Resources" / "Protocols"):
        if cand.is_dir():
            return cand
    raise InputError("cannot find the shipped Resources/Protocols folder (broken installation)")


def shipped_protocols() -> list[str]:
    d = protocols_dir()
    return sorted(p.stem for p in d.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def resolve_protocol(name_or_path: str, base: Path | None = None) -> Path:
    """A shipped protocol name (``npc-reirradiation``) or a path (relative to ``base``)."""
    text = str(name_or_path)
    cand = Path(text) if base is None or Path(text).is_absolute() else base / text
    if cand.suffix.lower() in (".yaml", ".yml", ".json") or cand.exists():
        if not cand.is_file():
            raise InputError(f"protocol file not found: {cand}", field="protocol")
        return cand
    d = protocols_dir()
    for ext in (".yaml", ".yml", ".json"):
        if (d / f"{text}{ext}").is_file():
            return d / f"{text}{ext}"
    raise InputError(f"unknown protocol {text!r}; shipped protocols: {', '.join(shipped_protocols())}",
                     field="protocol")


def load_protocol(name_or_path: str, base: Path | None = None) -> Protocol:
    path = resolve_protocol(name_or_path, base)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot parse: {first}", source=str(path)) from None
    return parse_protocol(data, str(path))


class _V:
    """Validation helper: errors name the file and the key path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, msg: str):
        raise InputError(msg, source=self.source, field=key)

    def mapping(self, obj, key: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if not isinstance(obj, dict):
            self.fail(key, f"must be a mapping, got {type(obj).__name__}")
        unknown = sorted(set(map(str, obj)) - allowed)
        if unknown:
            self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                      f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for r in sorted(required):
            if r not in obj or obj[r] is None:
                self.fail(f"{key}.{r}" if key else r, "missing")
        return obj

    def number(self, obj, key: str, positive: bool = False, minimum: float | None = None,
               maximum: float | None = None) -> float:
        if isinstance(obj, bool) or not isinstance(obj, (int, float)) or not math.isfinite(obj):
            self.fail(key, f"must be a number, got {obj!r}")
        if positive and obj <= 0:
            self.fail(key, f"must be > 0, got {obj!r}")
        if minimum is not None and obj < minimum:
            self.fail(key, f"must be >= {minimum:g}, got {obj!r}")
        if maximum is not None and obj > maximum:
            self.fail(key, f"must be <= {maximum:g}, got {obj!r}")
        return float(obj)

    def string(self, obj, key: str) -> str:
        if not isinstance(obj, (str, int, float)) or isinstance(obj, bool) or str(obj).strip() == "":
            self.fail(key, f"must be a non-empty text, got {obj!r}")
        return str(obj)

    def boolean(self, obj, key: str) -> bool:
        if not isinstance(obj, bool):
            self.fail(key, f"must be true or false, got {obj!r}")
        return obj


def parse_protocol(data, source: str) -> Protocol:
    v = _V(source)
    top = v.mapping(data, "", {"name", "version", "description", "synthetic", "alpha_beta", "recovery",
                               "organs", "warn_tolerance_percent", "references", "margins", "prescription",
                               "reirradiation_type", "robustness"},
                    {"name", "version", "alpha_beta", "recovery", "organs"})
    ab = v.mapping(top["alpha_beta"], "alpha_beta", {"default", "source", "verified"}, {"default"})
    default_ab = v.number(ab["default"], "alpha_beta.default", positive=True)
    organs_raw = top["organs"]
    if not isinstance(organs_raw, dict) or not organs_raw:
        v.fail("organs", "must be a non-empty mapping of organ keys")

    organs: dict[str, Organ] = {}
    seen_alias: dict[str, str] = {}
    for okey, oraw in organs_raw.items():
        okey = str(okey)
        k = f"organs.{okey}"
        o = v.mapping(oraw, k, {"role", "aliases", "alpha_beta", "alpha_beta_source", "alpha_beta_verified",
                                "constraints", "note"}, {"aliases", "alpha_beta"})
        role = o.get("role", "oar")
        if role not in ROLES:
            v.fail(f"{k}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        aliases = o["aliases"]
        if not isinstance(aliases, list) or not aliases:
            v.fail(f"{k}.aliases", "must be a non-empty list of structure names")
        aliases = [v.string(a, f"{k}.aliases") for a in aliases]
        for a in aliases + [okey]:
            cf = a.strip().casefold()
            if cf in seen_alias and seen_alias[cf] != okey:
                v.fail(f"{k}.aliases", f"alias {a!r} is also an alias of organ {seen_alias[cf]!r}")
            seen_alias[cf] = okey
        alpha_beta = v.number(o["alpha_beta"], f"{k}.alpha_beta", positive=True)
        constraints = []
        for i, craw in enumerate(o.get("constraints") or []):
            constraints.append(_parse_constraint(v, craw, f"{k}.constraints[{i}]"))
        organs[okey] = Organ(okey, role, tuple(dict.fromkeys(aliases + [okey])), alpha_beta,
                             str(o.get("alpha_beta_source", "")), tuple(constraints),
                             v.boolean(o.get("alpha_beta_verified", False), f"{k}.alpha_beta_verified"))

    rec = v.mapping(top["recovery"], "recovery", {"model", "table", "organs", "source", "verified", "note"},
                    {"model"})
    model = rec["model"]
    rec_verified = v.boolean(rec.get("verified", False), "recovery.verified")
    if model == "none":
        if rec.get("table") or rec.get("organs"):
            v.fail("recovery", "model 'none' takes no table or organs")
        recovery = RecoveryModel("none", source=str(rec.get("source", "")), verified=rec_verified)
    elif model == "step":
        table_raw = rec.get("table")
        if not isinstance(table_raw, list) or not table_raw:
            v.fail("recovery.table", "model 'step' needs a non-empty table of {min_months, fraction}")
        table = []
        for i, row in enumerate(table_raw):
            rk = f"recovery.table[{i}]"
            row = v.mapping(row, rk, {"min_months", "fraction"}, {"min_months", "fraction"})
            mm = v.number(row["min_months"], f"{rk}.min_months", minimum=0)
            fr = v.number(row["fraction"], f"{rk}.fraction", minimum=0)
            if fr >= 1:
                v.fail(f"{rk}.fraction", f"must be < 1 (a credit of 1 would forget the prior course), got {fr!r}")
            if table and mm <= table[-1][0]:
                v.fail(f"{rk}.min_months", "rows must be in increasing min_months order")
            table.append((mm, fr))
        rorgans = rec.get("organs")
        if not isinstance(rorgans, list) or not rorgans:
            v.fail("recovery.organs", "model 'step' needs the list of organs it applies to")
        for o in rorgans:
            if str(o) not in organs:
                v.fail("recovery.organs", f"unknown organ {o!r} (not under organs:)")
        recovery = RecoveryModel("step", tuple(table), tuple(str(o) for o in rorgans), str(rec.get("source", "")),
                                 rec_verified)
    else:
        v.fail("recovery.model", f"must be 'none' or 'step', got {model!r}")

    tol = top.get("warn_tolerance_percent", 5.0)
    tol = v.number(tol, "warn_tolerance_percent", minimum=0, maximum=50)
    return Protocol(name=v.string(top["name"], "name"), version=v.string(top["version"], "version"),
                    path=source, default_alpha_beta=default_ab,
                    default_alpha_beta_source=str(ab.get("source", "")), recovery=recovery, organs=organs,
                    synthetic=v.boolean(top.get("synthetic", False), "synthetic"),
                    default_alpha_beta_verified=v.boolean(ab.get("verified", False), "alpha_beta.verified"),
                    description=str(top.get("description", "")), warn_tolerance_percent=tol,
                    margins=_parse_margins(v, top["margins"], organs) if top.get("margins") is not None else None,
                    prescription=(_parse_prescription(v, top["prescription"])
                                  if top.get("prescription") is not None else None),
                    reirradiation_type=(_parse_reirradiation_type(v, top["reirradiation_type"])
                                        if top.get("reirradiation_type") is not None else None),
                    robustness=(parse_robustness(v, top["robustness"], organs)
                                if top.get("robustness") is not None else None))


def _parse_margins(v: _V, raw, organs: dict[str, Organ]) -> MarginRecipe:
    k = "margins"
    m = v.mapping(raw, k, {"gtv", "ctv_mm", "ptv_mm", "air_hu", "crop_to", "avoid", "source", "verified", "note"},
                  {"gtv", "ctv_mm", "ptv_mm", "source", "verified"})
    gtv = m["gtv"]
    if isinstance(gtv, str):
        gtv = [gtv]
    if not isinstance(gtv, list) or not gtv:
        v.fail(f"{k}.gtv", "must be a non-empty list of GTV structure names")
    gtv = tuple(v.string(g, f"{k}.gtv") for g in gtv)
    ctv = v.number(m["ctv_mm"], f"{k}.ctv_mm", minimum=0, maximum=50)
    ptv = v.number(m["ptv_mm"], f"{k}.ptv_mm", minimum=0, maximum=50)
    air = m.get("air_hu")
    air = None if air is None else v.number(air, f"{k}.air_hu", minimum=-1100, maximum=500)
    crop = m.get("crop_to")
    crop = None if crop is None else v.string(crop, f"{k}.crop_to")
    avoid_organs: tuple[str, ...] = ()
    avoid_mm = 0.0
    if m.get("avoid") is not None:
        a = v.mapping(m["avoid"], f"{k}.avoid", {"organs", "distance_mm"}, {"organs", "distance_mm"})
        if not isinstance(a["organs"], list) or not a["organs"]:
            v.fail(f"{k}.avoid.organs", "must be a non-empty list of organ keys")
        for o in a["organs"]:
            if str(o) not in organs:
                v.fail(f"{k}.avoid.organs", f"unknown organ {o!r} (not under organs:)")
        avoid_organs = tuple(str(o) for o in a["organs"])
        avoid_mm = v.number(a["distance_mm"], f"{k}.avoid.distance_mm", minimum=0, maximum=50)
    return MarginRecipe(gtv, ctv, ptv, air, crop, avoid_organs, avoid_mm, v.string(m["source"], f"{k}.source"),
                        v.boolean(m["verified"], f"{k}.verified"))


def _parse_prescription(v: _V, raw) -> Prescription:
    k = "prescription"
    p = v.mapping(raw, k, {"scope", "alpha_beta", "eqd2_gy", "dose_gy", "fractions", "coverage", "source",
                           "verified", "note", "fractionation"},
                  {"scope", "alpha_beta", "eqd2_gy", "source", "verified"})
    if p["scope"] not in SCOPES:
        v.fail(f"{k}.scope", f"must be one of {', '.join(SCOPES)}, got {p['scope']!r}")
    ab = v.number(p["alpha_beta"], f"{k}.alpha_beta", positive=True)
    rng = v.mapping(p["eqd2_gy"], f"{k}.eqd2_gy", {"min", "max"}, {"min", "max"})
    lo = v.number(rng["min"], f"{k}.eqd2_gy.min", positive=True)
    hi = v.number(rng["max"], f"{k}.eqd2_gy.max", positive=True)
    if hi < lo:
        v.fail(f"{k}.eqd2_gy", f"max ({hi:g}) is below min ({lo:g})")
    dose = p.get("dose_gy")
    n = p.get("fractions")
    if (dose is None) != (n is None):
        v.fail(f"{k}.dose_gy" if dose is None else f"{k}.fractions", "give dose_gy and fractions together")
    if dose is not None:
        dose = v.number(dose, f"{k}.dose_gy", positive=True)
        nf = v.number(n, f"{k}.fractions", minimum=1)
        if nf != int(nf):
            v.fail(f"{k}.fractions", f"must be a whole number, got {n!r}")
        n = int(nf)
    cov = {}
    if p.get("coverage") is not None:
        c = v.mapping(p["coverage"], f"{k}.coverage",
                      {"v95_min_percent", "d95_min_percent", "d98_min_percent", "d2_max_percent"})
        for key in ("v95_min_percent", "d95_min_percent", "d98_min_percent"):
            if c.get(key) is not None:
                cov[key] = v.number(c[key], f"{k}.coverage.{key}", minimum=0, maximum=100)
        if c.get("d2_max_percent") is not None:
            cov["d2_max_percent"] = v.number(c["d2_max_percent"], f"{k}.coverage.d2_max_percent", minimum=100,
                                             maximum=200)
    out = Prescription(p["scope"], ab, lo, hi, dose, n, cov.get("v95_min_percent"), cov.get("d95_min_percent"),
                       cov.get("d98_min_percent"), cov.get("d2_max_percent"), v.string(p["source"], f"{k}.source"),
                       v.boolean(p["verified"], f"{k}.verified"),
                       fractionation=(_parse_fractionation(v, p["fractionation"])
                                      if p.get("fractionation") is not None else None))
    if dose is not None and not lo - 1e-9 <= out.reference_eqd2_gy <= hi + 1e-9:
        v.fail(f"{k}.dose_gy", f"{dose:g} Gy in {n} fractions is {out.reference_eqd2_gy:.2f} Gy EQD2 (alpha/beta "
                               f"{ab:g}), outside the prescribed range {lo:g}-{hi:g} Gy")
    return out


def _parse_fractionation(v: _V, raw) -> Fractionation:
    k = "prescription.fractionation"
    f = v.mapping(raw, k, {"min_hours_between_fractions", "dose_per_fraction_gy", "note"})
    out = {}
    if f.get("min_hours_between_fractions") is not None:
        kk = f"{k}.min_hours_between_fractions"
        g = v.mapping(f["min_hours_between_fractions"], kk, {"value", "source", "verified", "note"},
                      {"value", "source", "verified"})
        out.update(min_hours_between_fractions=v.number(g["value"], f"{kk}.value", positive=True, maximum=24),
                   min_hours_source=v.string(g["source"], f"{kk}.source"),
                   min_hours_verified=v.boolean(g["verified"], f"{kk}.verified"))
    if f.get("dose_per_fraction_gy") is not None:
        kk = f"{k}.dose_per_fraction_gy"
        g = v.mapping(f["dose_per_fraction_gy"], kk, {"min", "max", "source", "verified", "note"},
                      {"min", "max", "source", "verified"})
        lo = v.number(g["min"], f"{kk}.min", positive=True, maximum=30)
        hi = v.number(g["max"], f"{kk}.max", positive=True, maximum=30)
        if hi < lo:
            v.fail(kk, f"max ({hi:g}) is below min ({lo:g})")
        out.update(dose_per_fraction_gy=(lo, hi), dose_per_fraction_source=v.string(g["source"], f"{kk}.source"),
                   dose_per_fraction_verified=v.boolean(g["verified"], f"{kk}.verified"))
    return Fractionation(**out)


def _parse_reirradiation_type(v: _V, raw) -> ReirradiationTypeRule:
    k = "reirradiation_type"
    r = v.mapping(raw, k, {"threshold_gy", "type2_rule", "source", "verified", "note"},
                  {"threshold_gy", "source", "verified"})
    both, rows = None, False
    if r.get("type2_rule") is not None:
        t = v.mapping(r["type2_rule"], f"{k}.type2_rule", {"both_courses_dose_gy", "cumulative_limit_rows"})
        if t.get("both_courses_dose_gy") is not None:
            both = v.number(t["both_courses_dose_gy"], f"{k}.type2_rule.both_courses_dose_gy", positive=True)
        rows = v.boolean(t.get("cumulative_limit_rows", False), f"{k}.type2_rule.cumulative_limit_rows")
        if both is None and not rows:
            v.fail(f"{k}.type2_rule", "give both_courses_dose_gy and/or cumulative_limit_rows: true")
    return ReirradiationTypeRule(v.number(r["threshold_gy"], f"{k}.threshold_gy", positive=True),
                                 v.string(r["source"], f"{k}.source"), v.boolean(r["verified"], f"{k}.verified"),
                                 both, rows)


def _parse_constraint(v: _V, raw, key: str) -> Constraint:
    c = v.mapping(raw, key, {"metric", "limit_gy", "limit_cc", "limit_percent", "scope", "source", "verified",
                             "priority", "note", "basis", "conditions"}, {"metric", "scope", "source", "verified"})
    try:
        metric = parse_metric(c["metric"])
    except ValueError as exc:
        v.fail(f"{key}.metric", str(exc))
    scope = c["scope"]
    if scope not in CONSTRAINT_SCOPES:
        v.fail(f"{key}.scope", f"must be one of {', '.join(CONSTRAINT_SCOPES)}, got {scope!r}")
    given = [k for k in ("limit_gy", "limit_cc", "limit_percent") if k in c]
    if len(given) > 1:
        v.fail(key, f"give one limit, not {' and '.join(given)}")
    if metric.is_volume:
        if "limit_gy" in c:
            v.fail(f"{key}.limit_gy", f"{metric.name} is a volume metric: use limit_cc or limit_percent")
        lk = given[0] if given else "limit_cc"
        unit = "cc" if lk == "limit_cc" else "%"
    else:
        if given and given[0] != "limit_gy":
            v.fail(f"{key}.{given[0]}", f"{metric.name} is a dose metric: use limit_gy")
        lk, unit = "limit_gy", "Gy"
    limit = c.get(lk)
    if limit is not None:
        limit = v.number(limit, f"{key}.{lk}", minimum=0, maximum=100 if unit == "%" else None)
    verified = v.boolean(c["verified"], f"{key}.verified")
    if limit is None and verified:
        v.fail(f"{key}.verified", "a row without a limit cannot be verified")
    priority = c.get("priority")
    if priority is not None:
        priority = int(v.number(priority, f"{key}.priority", minimum=1))
    basis = c.get("basis")
    if scope == "cumulative":
        if basis is None:
            basis = "undiscounted"  # the conservative reading when a protocol says nothing
        elif basis not in BASES:
            v.fail(f"{key}.basis", f"must be one of {', '.join(BASES)}, got {basis!r}")
    elif basis is not None:
        v.fail(f"{key}.basis", f"only a cumulative limit has a recovery basis (scope here: {scope})")
    conditions = Conditions()
    if c.get("conditions") is not None:
        ck = f"{key}.conditions"
        cond = v.mapping(c["conditions"], ck, set(CONDITION_KEYS))
        mi = cond.get("min_interval_months")
        mx = cond.get("max_course_eqd2_gy")
        if mi is not None:
            mi = v.number(mi, f"{ck}.min_interval_months", minimum=0)
        if mx is not None:
            mx = v.number(mx, f"{ck}.max_course_eqd2_gy", positive=True)
            if metric.is_volume:
                v.fail(f"{ck}.max_course_eqd2_gy", f"{metric.name} is a volume metric: a per-course EQD2 ceiling "
                                                   "needs a dose metric")
        conditions = Conditions(mi, mx)
    return Constraint(metric, scope, limit, unit, v.string(c["source"], f"{key}.source"), verified, priority,
                      str(c.get("note", "")), basis, conditions)
