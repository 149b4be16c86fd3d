"""Provenance of a run: hashes of every input file, of the protocol and of the engine itself.

Written into results.json under ``provenance`` (see docs/outputs.md) so that a result can be traced to the exact
bytes it was computed from, and so that ``reirradiation-npc batch --resume`` can tell an up-to-date case from one
whose inputs, protocol or software changed (docs/cohort.md).

Hashes are SHA-256 of file bytes (read in 1 MiB blocks: a 100 MB DICOM series hashes in well under a second). A
folder (a DICOM series, a folder of masks) hashes its sorted relative file names together with each file's bytes,
so renaming, adding or removing a file changes the hash too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import SOFTWARE_NAME, __version__

HASH_RULE = ("sha256 of file bytes; a folder: sha256 over its sorted relative file paths (POSIX) and each file's "
             "bytes; engine: sha256 over the engine's Python sources (except the cohort driver batch.py, "
             "cohort_tables.py) and shipped protocols")
_BLOCK = 1 << 20
#: modules that drive many cases but never change one case's results: left out of the engine hash so that editing
#: the cohort driver does not invalidate every stored case (``batch --resume``)
_NOT_RESULTS = ("batch.py", "cohort_tables.py")
_engine_hash: str | None = None


def _update_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    _update_file(h, Path(path))
    return h.hexdigest()


def path_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or of a folder (sorted relative paths + contents); None if it does not exist."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
        rel = f.relative_to(path).as_posix().encode("utf-8")
        h.update(len(rel).to_bytes(8, "little") + rel)
        sub = hashlib.sha256()
        _update_file(sub, f)
        h.update(sub.digest())
    return h.hexdigest()


def engine_sha256() -> str:
    """SHA-256 over this engine's Python sources and shipped protocol files (computed once per process).

    The version string alone is not enough to decide that a stored result is still what this software computes:
    a development build keeps its version number while its code changes.
    """
    global _engine_hash
    if _engine_hash is None:
        here = Path(__file__).resolve().parent
        files = sorted(f for f in here.glob("*.py") if f.name not in _NOT_RESULTS)
        try:
            from .protocol import protocols_dir
            files += sorted(p for p in protocols_dir().iterdir() if p.suffix in (".yaml", ".yml", ".json"))
        except Exception:  # noqa: BLE001 - a broken install is reported by the run itself
            pass
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode("utf-8") + b"\0")
            _update_file(h, f)
        _engine_hash = h.hexdigest()
    return _engine_hash


def case_input_paths(case) -> dict[str, Path]:
    """Every file or folder a case reads, keyed by the case-file field that names it (``case`` = the case file)."""
    out: dict[str, Path] = {"case": Path(case.path)}
    if case.reference_image is not None:
        out["reference.image"] = Path(case.reference_image)
    out["reference.structures"] = Path(case.reference_structures)
    for i, c in enumerate(case.courses):
        k = f"courses[{i}]"
        doses = list(getattr(c, "doses", None) or [c.dose])
        if len(doses) > 1:   # one RTDOSE per fraction group: every file is an input
            for j, d in enumerate(doses):
                out[f"{k}.dose[{j}]"] = Path(d)
        else:
            out[f"{k}.dose"] = Path(c.dose)
        for attr in ("image", "plan", "structures"):
            v = getattr(c, attr, None)
            if v is not None:
                out[f"{k}.{attr}"] = Path(v)
        t = (c.registration or {}).get("transform")
        if t:
            out[f"{k}.registration.transform"] = Path(t)
    return out


def software() -> dict:
    return {"name": SOFTWARE_NAME, "version": __version__, "engine_sha256": engine_sha256()}


def compute(case, protocol_path: Path | str | None, protocol_override: bool = False) -> dict:
    """The ``provenance`` block of results.json for ``case`` (a :class:`.case.CaseSpec`) and the protocol file
    actually used (resolved path)."""
    inputs = {}
    for label, p in case_input_paths(case).items():
        inputs[label] = {"path": str(p), "sha256": path_sha256(p)}
    combined = hashlib.sha256()
    for label in sorted(inputs):
        combined.update(f"{label}={inputs[label]['sha256']}\n".encode("utf-8"))
    protocol = dict(compute_protocol(protocol_path), override=bool(protocol_override))
    return {"inputs": inputs, "inputs_sha256": combined.hexdigest(), "protocol": protocol,
            "software": software(), "hash_rule": HASH_RULE}


def compute_protocol(protocol_path: Path | str | None) -> dict:
    """``{"file", "sha256"}`` of the protocol file actually used (resolved path; None when not yet known)."""
    if protocol_path is None:
        return {"file": None, "sha256": None}
    return {"file": str(protocol_path), "sha256": path_sha256(Path(protocol_path))}


def differences(recorded: dict | None, expected: dict) -> list[str]:
    """Why a stored provenance block does not match the expected one (empty list: unchanged)."""
    if not recorded:
        return ["no provenance recorded"]
    why = []
    rin, ein = recorded.get("inputs") or {}, expected.get("inputs") or {}
    for label in sorted(set(rin) | set(ein)):
        a, b = (rin.get(label) or {}), (ein.get(label) or {})
        if a.get("sha256") != b.get("sha256") or a.get("sha256") is None:
            why.append(f"input {label} changed")
    rp, ep = recorded.get("protocol") or {}, expected.get("protocol") or {}
    if rp.get("sha256") != ep.get("sha256") or rp.get("sha256") is None:
        why.append("protocol changed")
    rs, es = recorded.get("software") or {}, expected.get("software") or {}
    for k in ("name", "version", "engine_sha256"):
        if rs.get(k) != es.get(k):
            why.append(f"software {k.replace('_', ' ')} changed")
    return why
