"""The protocol's ``robustness:`` block: the plausible range of each assumption a verdict rests on.

Parsed here (called from :func:`.protocol.parse_protocol`) so that the protocol loader stays small; the maths that
uses these ranges is in :mod:`.robustness`. See docs/protocol-format.md and docs/science.md ("Robustness").

YAML (every value a protocol datum with its source)::

    robustness:
      alpha_beta_ranges:               # per organ: the range its alpha/beta may plausibly take (Gy)
        - organs: [brainstem, spinal_cord, optic_chiasm]
          min: 1.5
          max: 3
          source: "..."
          verified: false
      recovery: range                  # range: credit from none to the protocol's credit | fixed: the credit only
      registration_mm: 3               # default registration uncertainty of every prior course (case may override)
      registration_source: "..."
      registration_directions: 26      # 26 (6 axes + 12 face diagonals + 8 body diagonals) or 6 (axes only)
      dose_uncertainty_percent: 0      # optional dose-calculation uncertainty (+- %, every course), 0 = none
      dose_uncertainty_source: "..."

Without the block no robustness analysis is made (the results say so). An organ without a range keeps its nominal
alpha/beta in every scenario (stated in each row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

REGISTRATION_DIRECTION_SETS = (6, 26)
RECOVERY_MODES = ("range", "fixed")


@dataclass(frozen=True)
class AlphaBetaRange:
    low: float          # Gy
    high: float         # Gy
    source: str
    verified: bool

    def describe(self) -> str:
        return f"{self.low:g}-{self.high:g} Gy ({self.source}; verified: {str(self.verified).lower()})"


@dataclass(frozen=True)
class RobustnessSpec:
    alpha_beta: dict = field(default_factory=dict)     # organ key -> AlphaBetaRange
    recovery: str = "range"                            # range | fixed
    registration_mm: float = 0.0                       # default per prior course (mm)
    registration_source: str = ""
    registration_directions: int = 26
    dose_uncertainty_percent: float = 0.0
    dose_uncertainty_source: str = ""
    source: str = ""

    def summary(self) -> dict:
        return {
            "alpha_beta_ranges": {k: {"min_gy": r.low, "max_gy": r.high, "source": r.source,
                                      "verified": r.verified} for k, r in self.alpha_beta.items()},
            "recovery": ("from no credit to the protocol's credit" if self.recovery == "range"
                         else "the protocol's credit only (not varied)"),
            "registration_mm_default": self.registration_mm, "registration_source": self.registration_source,
            "registration_directions": self.registration_directions,
            "dose_uncertainty_percent": self.dose_uncertainty_percent,
            "dose_uncertainty_source": self.dose_uncertainty_source, "source": self.source}


def parse_robustness(v, raw, organs: dict) -> RobustnessSpec:
    """Validate the ``robustness:`` block. ``v`` is the protocol loader's validator (``protocol._V``: errors name
    the file and key), ``organs`` the parsed organs (key -> Organ)."""
    k = "robustness"
    r = v.mapping(raw, k, {"alpha_beta_ranges", "recovery", "registration_mm", "registration_source",
                           "registration_directions", "dose_uncertainty_percent", "dose_uncertainty_source",
                           "source", "note"})
    ranges: dict[str, AlphaBetaRange] = {}
    raw_ranges = r.get("alpha_beta_ranges") or []
    if not isinstance(raw_ranges, list):
        v.fail(f"{k}.alpha_beta_ranges", "must be a list of {organs, min, max, source, verified}")
    for i, item in enumerate(raw_ranges):
        ik = f"{k}.alpha_beta_ranges[{i}]"
        it = v.mapping(item, ik, {"organs", "min", "max", "source", "verified", "note"},
                       {"organs", "min", "max", "source", "verified"})
        lo = v.number(it["min"], f"{ik}.min", positive=True)
        hi = v.number(it["max"], f"{ik}.max", positive=True)
        if hi < lo:
            v.fail(f"{ik}.max", f"max ({hi:g}) is below min ({lo:g})")
        rng = AlphaBetaRange(lo, hi, v.string(it["source"], f"{ik}.source"), v.boolean(it["verified"],
                                                                                        f"{ik}.verified"))
        names = it["organs"]
        if not isinstance(names, list) or not names:
            v.fail(f"{ik}.organs", "must be a non-empty list of organ keys")
        for o in names:
            o = str(o)
            if o not in organs:
                v.fail(f"{ik}.organs", f"unknown organ {o!r} (not under organs:)")
            if o in ranges:
                v.fail(f"{ik}.organs", f"organ {o!r} has two alpha/beta ranges")
            ab = organs[o].alpha_beta
            if not lo - 1e-9 <= ab <= hi + 1e-9:
                v.fail(f"{ik}", f"the range {lo:g}-{hi:g} Gy does not contain organ {o!r}'s alpha/beta {ab:g} Gy")
            ranges[o] = rng
    rec = r.get("recovery", "range")
    if rec not in RECOVERY_MODES:
        v.fail(f"{k}.recovery", f"must be one of {', '.join(RECOVERY_MODES)}, got {rec!r}")
    reg = v.number(r.get("registration_mm", 0.0), f"{k}.registration_mm", minimum=0, maximum=50)
    if reg > 0 and not r.get("registration_source"):
        v.fail(f"{k}.registration_source", "missing (say where the registration uncertainty comes from)")
    dirs = r.get("registration_directions", 26)
    if dirs not in REGISTRATION_DIRECTION_SETS:
        v.fail(f"{k}.registration_directions", f"must be 6 or 26, got {dirs!r}")
    dose_pct = v.number(r.get("dose_uncertainty_percent", 0.0), f"{k}.dose_uncertainty_percent", minimum=0,
                        maximum=20)
    if dose_pct > 0 and not r.get("dose_uncertainty_source"):
        v.fail(f"{k}.dose_uncertainty_source", "missing (say where the dose-calculation uncertainty comes from)")
    return RobustnessSpec(alpha_beta=ranges, recovery=rec, registration_mm=reg,
                          registration_source=str(r.get("registration_source", "")),
                          registration_directions=int(dirs), dose_uncertainty_percent=dose_pct,
                          dose_uncertainty_source=str(r.get("dose_uncertainty_source", "")),
                          source=str(r.get("source", "")))
