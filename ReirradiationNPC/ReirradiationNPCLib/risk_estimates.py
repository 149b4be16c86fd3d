"""Published dose-response estimates (temporal-lobe injury after re-irradiated NPC): information only.

The models are data (``Resources/RiskModels/temporal-lobe-injury.yaml``, clinical facts section 7b). Each estimate is
computed from the metric its study used, on the structure's sub-voxel samples:

- ``logistic_td5_td50`` (Guan et al. 2024): D<x>cc of the summed EQD2 of all courses (no recovery credit) at the
  model's alpha/beta; P(D) = 1 / (1 + exp(-(D - TD50) / k)), k = (TD50 - TD5) / ln 19, the logistic curve through
  P(TD5) = 5 % and P(TD50) = 50 % (an estimate derived from the abstract, not the paper's fitted model).
- ``lkb`` (Lyman-Kutcher-Burman): NTCP = Phi((D - TD50) / (m TD50)) with D the study's metric (cumulative D0.1cc;
  with n = 0.04 the gEUD is close to the near-maximum dose).

The range given is the estimate at the ends of the published confidence intervals of the parameters (TD5 and
TD50 combined, TD5 < TD50): it shows how uncertain the published parameters are; it is not a confidence interval of
the risk. These numbers are never limits and never enter the verdict.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from . import dvh
from .analysis import course_dose
from .eqd2 import eqd2
from .errors import InputError

MODEL_FILE = "temporal-lobe-injury.yaml"


def models_dir() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "Resources" / "RiskModels", here.parents[1] / "Resources" / "RiskModels"):
        if cand.is_dir():
            return cand
    raise InputError("cannot find the shipped Resources/RiskModels folder (broken installation)")


def load_models() -> list[dict]:
    path = models_dir() / MODEL_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read risk models: {exc}", source=str(path)) from None
    return list(data.get("models") or [])


def logistic_td5_td50(dose_gy: float, td5: float, td50: float) -> float:
    """Probability (0-1) on the logistic curve through (TD5, 5 %) and (TD50, 50 %)."""
    k = (td50 - td5) / math.log(19.0)
    return 1.0 / (1.0 + math.exp(-(dose_gy - td50) / k))


def lkb(dose_gy: float, td50: float, m: float) -> float:
    """Lyman NTCP (0-1) = Phi((D - TD50) / (m TD50))."""
    t = (dose_gy - td50) / (m * td50)
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


def estimate(model: dict, dose_gy: float) -> tuple[float, float, float]:
    """(estimate, range low, range high), probabilities 0-1, for the model's metric value ``dose_gy``."""
    if model["kind"] == "logistic_td5_td50":
        t5, t50 = model["td5_gy"], model["td50_gy"]
        p = logistic_td5_td50(dose_gy, t5["value"], t50["value"])
        vals = [logistic_td5_td50(dose_gy, a, b) for a in t5.get("ci", [t5["value"]])
                for b in t50.get("ci", [t50["value"]]) if a < b]
    elif model["kind"] == "lkb":
        t50 = model["td50_gy"]
        p = lkb(dose_gy, t50["value"], model["m"])
        vals = [lkb(dose_gy, b, model["m"]) for b in t50.get("ci", [t50["value"]])]
    else:
        raise ValueError(model["kind"])
    vals.append(p)
    return p, min(vals), max(vals)


def compute(prep, analysis, models: list[dict] | None = None) -> list[dict]:
    """One entry per (model, structure of the model's organs); absent organs get an entry saying so."""
    models = load_models() if models is None else models
    out = []
    for model in models:
        organs = list(model.get("organs") or [])
        present = {s.organ.key: s for s in prep.structures if s.organ is not None and s.organ.key in organs}
        for okey in organs:
            base = {"model": model["id"], "name": model["name"], "endpoint": model["endpoint"], "organ": okey,
                    "metric": model["metric"], "dose": model["dose"], "source": model["source"],
                    "verified": bool(model["verified"]), "derived": model.get("derived", ""),
                    "kind": "estimate", "information_only": True,
                    "note": "published estimate, information only: never a limit, not part of the verdict"}
            s = present.get(okey)
            samples = analysis.samples.get(s.name) if s is not None else None
            if s is None or samples is None or samples.n == 0:
                out.append({**base, "structure": None, "status": "not_evaluated", "value_gy": None,
                            "estimate_percent": None, "range_percent": None,
                            "reason": "structure absent from the structure set"})
                continue
            ab = model.get("alpha_beta")
            ab_verified = bool(model.get("alpha_beta_verified"))
            if ab is None:
                ab = s.organ.alpha_beta
            total = None
            kept = getattr(analysis, "sample_doses", {}).get(s.name) or {}
            kept_fx = getattr(analysis, "sample_fractions", {}).get(s.name) or {}
            for c in prep.courses:
                phys, fx = kept.get(c.name), kept_fx.get(c.name, c.fractions)
                if phys is None or phys.size != samples.n:
                    phys, fx = course_dose(c, lambda a: samples.dose(a, prep.grid))
                e = eqd2(phys, fx, float(ab))
                total = e if total is None else total + e
            value = dvh.metrics(total, samples.sample_volume_cc, [model["metric"]])[model["metric"]]
            if value is None:
                out.append({**base, "structure": s.name, "status": "not_evaluated", "value_gy": None,
                            "estimate_percent": None, "range_percent": None, "alpha_beta_gy": ab,
                            "reason": f"{model['metric']} undefined (structure smaller than the metric's volume)"})
                continue
            p, lo, hi = estimate(model, value)
            out.append({**base, "structure": s.name, "status": "estimated", "value_gy": value,
                        "alpha_beta_gy": float(ab), "alpha_beta_verified": ab_verified,
                        "estimate_percent": 100.0 * p, "range_percent": [100.0 * lo, 100.0 * hi],
                        "range_note": "estimate at the ends of the published parameter confidence intervals "
                                      "(not a confidence interval of the risk)"})
    return out


def add_to_results(results, prep, analysis) -> None:
    try:
        results.risk_estimates = compute(prep, analysis)
    except InputError as exc:
        results.risk_estimates = []
        results.warnings.append(f"risk estimates not computed: {exc}")
