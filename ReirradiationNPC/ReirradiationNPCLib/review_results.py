"""What ``reirradiation-npc review`` shows, read from a run's output folder without Slicer or trame: the verdict,
the constraint table rows, and the worst voxel of an organ (pure numpy; the MRML/trame side is mrml_web_review.py).

Rows are read defensively (``.get``): fields such as ``basis`` and ``summary.verdict_code`` are added by other parts
of the engine and may be absent in older results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InputError

RESULTS_FILE = "results.json"
SCENE_FILE = "scene.mrb"  # same name as mrml_scene.SCENE_FILE (not imported: that module needs slicer)


@dataclass
class RunOutput:
    """A run's output folder as the review reads it (nothing is written)."""
    folder: Path
    results: dict
    scene: Optional[Path]  # scene.mrb when present
    nrrd: list = field(default_factory=list)  # NRRD outputs (used when there is no scene.mrb)


def load_run(folder) -> RunOutput:
    """Validate ``folder`` as the output of ``reirradiation-npc run`` and read its results.json.

    Raises InputError (one line, naming the folder/file) when it is not a run's output."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (give the output folder of `reirradiation-npc run`)",
                         field="RESULTS_DIR")
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {RESULTS_FILE} here; this is not the output of `reirradiation-npc run`",
                         field="RESULTS_DIR")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read as JSON ({exc})", field="RESULTS_DIR") from None
    if not isinstance(results, dict) or not isinstance(results.get("constraints"), list) \
            or not isinstance(results.get("summary"), dict):
        raise InputError(f"{path}: no 'constraints' list or 'summary'; not a results.json of `reirradiation-npc run`",
                         field="RESULTS_DIR")
    scene = folder / SCENE_FILE
    return RunOutput(folder, results, scene if scene.is_file() else None, sorted(folder.glob("*.nrrd")))


def verdict_line(results: dict) -> str:
    """The verdict with its code, e.g. ``[limits_exceeded] 3 limit(s) exceeded; ...``."""
    summary = results.get("summary") or {}
    code = summary.get("verdict_code")
    text = str(summary.get("verdict") or "no verdict in results.json")
    return f"[{code}] {text}" if code else text


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}{(' ' + unit) if unit else ''}"
    return f"{value}{(' ' + unit) if unit and isinstance(value, int) else ''}"


def table_rows(results: dict) -> list:
    """Constraint rows as plain display strings (index = position in results.json ``constraints``)."""
    rows = []
    for i, c in enumerate(results.get("constraints") or []):
        if not isinstance(c, dict):
            continue
        unit = str(c.get("unit") or "")
        scope = c.get("scope") or ""
        if scope == "per_course" and c.get("course"):
            scope = f"per_course ({c.get('course')})"
        verified = c.get("verified")
        rows.append({
            "index": i,
            "structure": str(c.get("structure") or c.get("organ") or "?"),
            "metric": str(c.get("metric") or ""),
            "scope": str(scope),
            "status": str(c.get("status") or "?"),
            "value": _fmt(c.get("value"), unit),
            "limit": _fmt(c.get("limit"), unit),
            "basis": str(c.get("basis") or "—"),
            "verified": "yes" if verified is True else ("no" if verified is False else "—"),
            "source": str(c.get("source") or "—"),
        })
    return rows


def worst_point(mask: np.ndarray, mask_ijk_to_ras: np.ndarray, dose: np.ndarray, dose_ras_to_ijk: np.ndarray):
    """The RAS position (mm) and value (Gy) of the highest ``dose`` voxel whose centre lies inside ``mask``.

    ``mask`` and ``dose`` are indexed [k, j, i]; the matrices are 4x4 (IJK->RAS of the mask, RAS->IJK of the dose).
    A dose voxel is inside when its centre falls (nearest voxel) on a true mask voxel; the value is the voxel's own,
    not interpolated, so it can sit slightly below the sub-voxel Dmax of the results table.
    Returns (ras (3,), value) or None when no dose voxel centre falls inside the mask."""
    kji = np.argwhere(mask)
    if kji.size == 0:
        return None
    m2r = np.asarray(mask_ijk_to_ras, float)
    r2d = np.asarray(dose_ras_to_ijk, float)
    # bounding box of the mask (voxel corners) in dose IJK
    lo, hi = kji.min(axis=0)[::-1] - 0.5, kji.max(axis=0)[::-1] + 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    dc = corners @ (r2d @ m2r).T
    shape_ijk = np.array(dose.shape[::-1])
    start = np.clip(np.floor(dc[:, :3].min(axis=0)).astype(np.int64), 0, shape_ijk)
    stop = np.clip(np.ceil(dc[:, :3].max(axis=0)).astype(np.int64) + 1, 0, shape_ijk)
    if np.any(stop <= start):
        return None
    ii, jj, kk = np.meshgrid(*[np.arange(a, b) for a, b in zip(start, stop)], indexing="ij")
    dijk = np.c_[ii.ravel(), jj.ravel(), kk.ravel()]
    d2m = np.linalg.inv(m2r) @ np.linalg.inv(r2d)
    mijk = np.rint(np.c_[dijk.astype(float), np.ones(len(dijk))] @ d2m.T)[:, :3].astype(np.int64)
    inside = np.all((mijk >= 0) & (mijk < np.array(mask.shape[::-1])), axis=1)
    dijk, mijk = dijk[inside], mijk[inside]
    keep = mask[mijk[:, 2], mijk[:, 1], mijk[:, 0]].astype(bool)
    if not keep.any():
        return None
    dijk = dijk[keep]
    values = dose[dijk[:, 2], dijk[:, 1], dijk[:, 0]]
    best = int(np.argmax(values))
    ras = np.linalg.inv(r2d) @ np.r_[dijk[best].astype(float), 1.0]
    return ras[:3].copy(), float(values[best])


# ----------------------------------------------------------------------------------------- what the wash shows

#: the maps the colour wash can show, in the selector's order (kind, label). "dose" kinds are doses in Gy; headroom
#: and remaining dose are limits derived from the protocol, not doses of a plan, and are labelled so.
WASH_KINDS = ("cumulative_eqd2", "course_eqd2", "course_dose", "headroom", "remaining_dose")


@dataclass(frozen=True)
class WashChoice:
    """One entry of the wash selector. ``key`` is unique (kind, or kind:course)."""
    key: str
    kind: str
    course: Optional[str]
    label: str
    is_dose: bool


def wash_choice(kind: str, course: Optional[str] = None) -> WashChoice:
    """The selector entry of a map ``kind`` (one of :data:`WASH_KINDS`), with its label."""
    if kind == "cumulative_eqd2":
        label, is_dose = "Cumulative EQD2 (Gy) — display map", True
    elif kind == "course_eqd2":
        label, is_dose = f"EQD2 of {course} (Gy, no recovery credit)", True
    elif kind == "course_dose":
        label, is_dose = f"Physical dose of {course} (Gy, evaluation grid)", True
    elif kind == "headroom":
        label, is_dose = "Headroom to the tightest point limit (Gy EQD2) — NOT a dose", False
    elif kind == "remaining_dose":
        label, is_dose = "Remaining dose limit of the current course (Gy physical) — NOT a plan dose", False
    else:
        raise ValueError(f"unknown wash map kind {kind!r}")
    return WashChoice(f"{kind}:{course}" if course else kind, kind, course, label, is_dose)


def wash_kind_of_file(name: str):
    """(kind, course) of a NRRD output of ``run`` by its file name (docs/outputs.md), None for other files.

    ``cumulative_eqd2.nrrd`` -> ("cumulative_eqd2", None); ``eqd2_<course>.nrrd`` -> ("course_eqd2", course);
    ``headroom.nrrd``, ``remaining_dose.nrrd``. The check maps (``cumulative_eqd2_ab*``), the robustness
    worst-case map and the α/β map are not wash choices. The physical course doses are not written as NRRD
    outputs (they are in scene.mrb only)."""
    if not name.endswith(".nrrd") or name.endswith(".seg.nrrd"):
        return None
    stem = name[: -len(".nrrd")]
    if stem == "cumulative_eqd2":
        return "cumulative_eqd2", None
    if stem in ("headroom", "remaining_dose"):
        return stem, None
    if stem.startswith("eqd2_") and len(stem) > len("eqd2_"):
        return "course_eqd2", stem[len("eqd2_"):]
    return None


def sort_wash_choices(choices: list) -> list:
    """Selector order: cumulative, each course's EQD2, each course's physical dose, headroom, remaining dose; courses
    in the order they were given (stable)."""
    return sorted(choices, key=lambda c: WASH_KINDS.index(c.kind))


def isodose_levels(results: dict) -> list:
    """The run's isodose levels from results.json (Gy, lowest first): ``analysis.isodose_levels`` of its
    constraint rows, the same rule as the scene's isodose lines."""
    from .analysis import isodose_levels as levels_of
    rows = results.get("constraints") or []
    return levels_of([c for c in rows if isinstance(c, dict)])


def violation_segments(results: dict, structure: str) -> list:
    """Names of the violation segments (results.json ``violations[].segment``) of ``structure``."""
    return [str(v.get("segment")) for v in results.get("violations") or []
            if isinstance(v, dict) and v.get("structure") == structure and v.get("segment")]


def recorded_input(results: dict, key: str):
    """(path, sha256) of an input recorded in results.json ``provenance.inputs[key]`` (e.g. ``reference.image``),
    None when the run did not record it."""
    entry = ((results.get("provenance") or {}).get("inputs") or {}).get(key)
    if not isinstance(entry, dict) or not entry.get("path"):
        return None
    return Path(str(entry["path"])), entry.get("sha256")
