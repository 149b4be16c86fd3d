"""Protocol tooling for the physicist who transcribes a guideline: template, validate, diff.

Everything here goes through :func:`.protocol.load_protocol` (the one loader and validator); the raw YAML is read
only to write the template back out with comments and to see whether a key was written explicitly (a limit's
recovery ``basis`` has a loader default, but a transcribed limit must state it).

- :func:`template_text`: every organ and metric row of a protocol with empty limit / basis / source / verified fields
  and comments saying what to transcribe; once filled it loads back (``reirradiation-npc protocol template``).
- :func:`validate`: schema check plus a provenance summary (rows verified, unverified, without a limit); a limit
  without a source, a cumulative limit without a stated recovery basis, or a recovery credit without a source are
  errors (``reirradiation-npc protocol validate``: exit 2, one line naming the row).
- :func:`diff`: rows added, removed and changed (limit, basis, conditions, source, verified, ...) between two
  protocols, plus changed organ alpha/beta and blocks (``reirradiation-npc protocol diff``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml

from .errors import InputError
from .protocol import Constraint, Protocol, load_protocol, resolve_protocol

_ROW_FIELD_RE = re.compile(r"^organs\.([^.\[]+)\.constraints\[(\d+)\]")
_CONSTRAINT_FIELDS = {f.name for f in dataclasses.fields(Constraint)}


# ------------------------------------------------------------------------------------------------ helpers

def _raw(path: Path):
    """The file's data as plain YAML/JSON (no schema: the loader has checked it already)."""
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)


def row_label(organ: str, metric: str, scope: str) -> str:
    """How a row is named in messages: ``spinal_cord D0.03cc cumulative``."""
    return f"{organ} {metric} {scope}"


def _raw_row(raw, organ: str, index: int) -> dict | None:
    try:
        row = raw["organs"][organ]["constraints"][index]
    except (KeyError, IndexError, TypeError):
        return None
    return row if isinstance(row, dict) else None


def load_checked(name_or_path: str, base: Path | None = None) -> tuple[Protocol, Path, object]:
    """Load and validate a protocol; a loader error inside a constraint row also names the row (organ metric
    scope). Returns (protocol, path, raw data)."""
    path = resolve_protocol(name_or_path, base)
    try:
        protocol = load_protocol(str(path))
    except InputError as exc:
        m = _ROW_FIELD_RE.match(exc.field or "")
        if m:
            try:
                row = _raw_row(_raw(path), m.group(1), int(m.group(2)))
            except (OSError, ValueError, yaml.YAMLError):
                row = None
            if row is not None:
                label = row_label(m.group(1), str(row.get("metric", "?")), str(row.get("scope", "?")))
                raise InputError(f"{exc.detail} (row: {label})", source=exc.source, field=exc.field) from None
        raise
    return protocol, path, _raw(path)


def _rows(protocol: Protocol):
    """(key, organ key, index, constraint) for every constraint row; duplicate labels get ``#2``, ``#3``."""
    seen: dict[str, int] = {}
    for o in protocol.organs.values():
        for i, c in enumerate(o.constraints):
            label = row_label(o.key, c.metric.name, c.scope)
            seen[label] = seen.get(label, 0) + 1
            key = label if seen[label] == 1 else f"{label} #{seen[label]}"
            yield key, o.key, i, c


def _row_values(c: Constraint) -> dict:
    """The comparable fields of a row (every field of the loaded row but its metric and scope, which key it)."""
    d = {}
    for f in dataclasses.fields(c):
        if f.name in ("metric", "scope"):
            continue
        v = getattr(c, f.name)
        if dataclasses.is_dataclass(v):
            v = {k: x for k, x in dataclasses.asdict(v).items() if x not in (None, "", ())} or None
        d[f.name] = v
    return d


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


# ----------------------------------------------------------------------------------------------- validate

def validate(name_or_path: str, base: Path | None = None) -> dict:
    """Schema check (the loader) and provenance summary of a protocol.

    Returns ``{file, name, version, rows, verified, unverified, without_limit, unverified_rows, no_limit_rows,
    organs_without_rows, alpha_beta_without_source, recovery, blocks, errors}``. ``errors`` lists provenance errors
    (``field: message (row: ...)``): a limit without a source, a cumulative limit without a stated recovery basis,
    a recovery credit without a source. Schema errors raise :class:`InputError` (naming the row).
    """
    protocol, path, raw = load_checked(name_or_path, base)
    errors: list[str] = []
    verified, unverified, no_limit = [], [], []
    for key, okey, i, c in _rows(protocol):
        field = f"organs.{okey}.constraints[{i}]"
        rawrow = _raw_row(raw, okey, i) or {}
        if c.limit is None:
            no_limit.append(key)
        else:
            (verified if c.verified else unverified).append(key)
            if not str(c.source).strip():
                errors.append(f"{field}.source: a limit ({c.limit:g} {c.unit}) without a source (row: {key})")
            if c.scope == "cumulative" and "basis" in _CONSTRAINT_FIELDS and rawrow.get("basis") is None:
                errors.append(f"{field}.basis: a cumulative limit without a recovery basis (undiscounted | "
                              f"credited) (row: {key})")
    rec = protocol.recovery
    if rec.model != "none" and not str(rec.source).strip():
        errors.append(f"recovery.source: a recovery credit ({rec.model}) without a source")
    blocks = {}
    for label, block in (("margins", protocol.margins), ("prescription", protocol.prescription),
                         ("reirradiation_type", protocol.reirradiation_type)):
        if block is not None:
            blocks[label] = {"verified": block.verified, "source": block.source}
    frac = getattr(protocol.prescription, "fractionation", None) if protocol.prescription is not None else None
    if frac is not None:
        if frac.min_hours_between_fractions is not None:
            blocks["fractionation.min_hours_between_fractions"] = {"verified": frac.min_hours_verified,
                                                                   "source": frac.min_hours_source}
        if frac.dose_per_fraction_gy is not None:
            blocks["fractionation.dose_per_fraction_gy"] = {"verified": frac.dose_per_fraction_verified,
                                                            "source": frac.dose_per_fraction_source}
    return {
        "file": str(path), "name": protocol.name, "version": protocol.version, "synthetic": protocol.synthetic,
        "rows": len(verified) + len(unverified) + len(no_limit), "verified": len(verified),
        "unverified": len(unverified), "without_limit": len(no_limit), "unverified_rows": unverified,
        "no_limit_rows": no_limit,
        "organs_without_rows": [o.key for o in protocol.organs.values() if not o.constraints and o.role == "oar"],
        "alpha_beta_without_source": [o.key for o in protocol.organs.values() if not o.alpha_beta_source.strip()],
        "alpha_beta_unverified": [o.key for o in protocol.organs.values()
                                  if o.role == "oar" and getattr(o, "alpha_beta_verified", None) is False],
        "recovery": {"model": rec.model, "description": rec.describe(), "source": rec.source,
                     "verified": getattr(rec, "verified", None)},
        "blocks": blocks, "errors": errors,
    }


def validation_error(report: dict) -> InputError | None:
    """One InputError (one line) for the provenance errors of a :func:`validate` report, or None."""
    errs = report["errors"]
    if not errs:
        return None
    more = f" (and {len(errs) - 1} more: " + "; ".join(errs[1:]) + ")" if len(errs) > 1 else ""
    return InputError(errs[0] + more, source=report["file"])


def format_validation(report: dict) -> str:
    """The provenance summary as text (``protocol validate``)."""
    lines = [f"{report['file']}: {report['name']} (version {report['version']})"
             f"{' - SYNTHETIC' if report['synthetic'] else ''}: schema ok",
             f"limit rows: {report['rows']}: {report['verified']} verified, {report['unverified']} unverified, "
             f"{report['without_limit']} without a limit"]
    if report["unverified_rows"]:
        lines.append("unverified limits: " + ", ".join(report["unverified_rows"]))
    if report["no_limit_rows"]:
        lines.append("rows without a limit (to transcribe): " + ", ".join(report["no_limit_rows"]))
    if report["organs_without_rows"]:
        lines.append("organs at risk without any row: " + ", ".join(report["organs_without_rows"]))
    if report["alpha_beta_without_source"]:
        lines.append("alpha/beta without a source: " + ", ".join(report["alpha_beta_without_source"]))
    if report["alpha_beta_unverified"]:
        lines.append("alpha/beta not verified (organs at risk): " + ", ".join(report["alpha_beta_unverified"]))
    r = report["recovery"]
    ver = "" if r["verified"] is None else f", verified: {_fmt(r['verified'])}"
    lines.append(f"recovery: {r['description']}{ver}; source: {r['source'] or '-'}")
    for k, b in report["blocks"].items():
        lines.append(f"{k}: verified: {_fmt(b['verified'])}; source: {b['source']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- diff

def _blocks(protocol: Protocol) -> dict:
    """Protocol-level values compared by :func:`diff` (everything but the organs and the file's identity)."""
    out = {}
    for f in dataclasses.fields(protocol):
        if f.name in ("organs", "path", "name", "version"):
            continue
        v = getattr(protocol, f.name)
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


def _flat(prefix: str, v, out: dict) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _flat(f"{prefix}.{k}", x, out)
    else:
        out[prefix] = v


def diff(a: str, b: str, base: Path | None = None) -> dict:
    """Differences from protocol ``a`` to protocol ``b`` (names or paths; both validated by the loader).

    Returns ``{a, b, added, removed, changed, organs, blocks}``: ``added`` / ``removed`` rows
    ``{row, values}``; ``changed`` rows ``{row, changes: {field: [old, new]}}`` over limit, unit, basis,
    conditions, source, verified, priority and note; ``organs``: organs added/removed and alpha/beta, role or
    alias changes; ``blocks``: other protocol values changed (recovery, margins, prescription, ...).
    """
    pa, path_a, _ = load_checked(a, base)
    pb, path_b, _ = load_checked(b, base)
    ra = {k: (o, c) for k, o, _, c in _rows(pa)}
    rb = {k: (o, c) for k, o, _, c in _rows(pb)}
    added = [{"row": k, "values": _row_values(rb[k][1])} for k in rb if k not in ra]
    removed = [{"row": k, "values": _row_values(ra[k][1])} for k in ra if k not in rb]
    changed = []
    for k in ra:
        if k in rb:
            va, vb = _row_values(ra[k][1]), _row_values(rb[k][1])
            ch = {f: [va.get(f), vb.get(f)] for f in dict.fromkeys(list(va) + list(vb)) if va.get(f) != vb.get(f)}
            if ch:
                changed.append({"row": k, "changes": ch})
    organs = []
    for key in dict.fromkeys(list(pa.organs) + list(pb.organs)):
        oa, ob = pa.organs.get(key), pb.organs.get(key)
        if oa is None or ob is None:
            organs.append({"organ": key, "change": "added" if oa is None else "removed"})
            continue
        for f in (f.name for f in dataclasses.fields(oa) if f.name not in ("key", "constraints")):
            x, y = getattr(oa, f), getattr(ob, f)
            if x != y:
                organs.append({"organ": key, "change": f, "old": list(x) if isinstance(x, tuple) else x,
                               "new": list(y) if isinstance(y, tuple) else y})
    fa, fb = {}, {}
    _flat("", _blocks(pa), fa)
    _flat("", _blocks(pb), fb)
    blocks = [{"field": k.lstrip("."), "old": fa.get(k), "new": fb.get(k)}
              for k in dict.fromkeys(list(fa) + list(fb)) if fa.get(k) != fb.get(k)]
    return {"a": {"file": str(path_a), "name": pa.name, "version": pa.version},
            "b": {"file": str(path_b), "name": pb.name, "version": pb.version},
            "added": added, "removed": removed, "changed": changed, "organs": organs, "blocks": blocks}


def format_diff(d: dict) -> str:
    lines = [f"A: {d['a']['file']} ({d['a']['name']}, version {d['a']['version']})",
             f"B: {d['b']['file']} ({d['b']['name']}, version {d['b']['version']})",
             f"rows: {len(d['added'])} added, {len(d['removed'])} removed, {len(d['changed'])} changed"]
    for r in d["added"]:
        v = r["values"]
        lines.append(f"added    {r['row']}: limit {_fmt(v.get('limit'))} {v.get('unit', '')}, basis "
                     f"{_fmt(v.get('basis'))}, conditions {_fmt(v.get('conditions'))}, verified "
                     f"{_fmt(v.get('verified'))}, source: {v.get('source')}")
    for r in d["removed"]:
        v = r["values"]
        lines.append(f"removed  {r['row']}: limit {_fmt(v.get('limit'))} {v.get('unit', '')}, verified "
                     f"{_fmt(v.get('verified'))}, source: {v.get('source')}")
    for r in d["changed"]:
        lines.append(f"changed  {r['row']}: " + "; ".join(f"{f} {_fmt(o)} -> {_fmt(n)}"
                                                          for f, (o, n) in r["changes"].items()))
    for o in d["organs"]:
        if o["change"] in ("added", "removed"):
            lines.append(f"organ    {o['organ']}: {o['change']}")
        else:
            lines.append(f"organ    {o['organ']}: {o['change']} {_fmt(o['old'])} -> {_fmt(o['new'])}")
    for b in d["blocks"]:
        lines.append(f"protocol {b['field']}: {_fmt(b['old'])} -> {_fmt(b['new'])}")
    if not (d["added"] or d["removed"] or d["changed"] or d["organs"] or d["blocks"]):
        lines.append("no differences (names and versions aside)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- template

def _y(v) -> str:
    """A YAML scalar or flow collection (JSON is valid YAML)."""
    return json.dumps(v, ensure_ascii=False)


def _block(key: str, value) -> str:
    """``key: value`` as YAML: scalars inline, mappings and lists indented (innermost collections in flow style)."""
    if not isinstance(value, (dict, list)):
        return f"{key}: {_y(value)}"
    if isinstance(value, dict):
        return f"{key}:\n" + "\n".join("  " + ln for k, v in value.items() for ln in _block(str(k), v).splitlines())
    body = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=110, default_flow_style=None)
    if len(body.rstrip().splitlines()) == 1:
        return f"{key}: {body.strip()}"
    return f"{key}:\n" + "\n".join("  " + ln for ln in body.rstrip().splitlines())


def _was(c: Constraint) -> str:
    parts = [f"limit {'none' if c.limit is None else f'{c.limit:g} {c.unit}'}"]
    basis = getattr(c, "basis", None)
    if basis:
        parts.append(f"basis {basis}")
    cond = getattr(c, "conditions", None)
    if cond is not None and dataclasses.is_dataclass(cond):
        cd = {k: x for k, x in dataclasses.asdict(cond).items() if x is not None}
        if cd:
            parts.append("conditions " + _fmt(cd))
    parts.append(f"verified {_fmt(c.verified)}")
    parts.append(f"source: {c.source}")
    return ", ".join(parts)


def template_text(name_or_path: str = "npc-reirradiation", base: Path | None = None) -> str:
    """A protocol template: the organs, aliases, alpha/beta and blocks of ``name_or_path`` with every limit row's
    limit, basis, conditions, source and verified left empty and commented. Loads once filled."""
    protocol, path, raw = load_checked(name_or_path, base)
    has_basis = "basis" in _CONSTRAINT_FIELDS
    has_conditions = "conditions" in _CONSTRAINT_FIELDS
    out = [
        f"# Protocol template written by `reirradiation-npc protocol template --from {name_or_path}`",
        f"# from {path.name}: {protocol.name} (version {protocol.version}).",
        "#",
        "# Transcribe the guideline's tables row by row (see docs/protocol-format.md, \"Transcribing the guideline\"):",
        "#  - limit_gy / limit_cc / limit_percent: the number in the table, in EQD2 Gy at the organ's alpha/beta",
        "#    (convert BED or physical doses first); leave it empty when the guideline gives no limit for the row.",
    ]
    if has_basis:
        out.append("#  - basis: `undiscounted` when the limit was derived on the plain sum of the courses (no recovery "
                   "credit),")
        out.append("#    `credited` when it applies to the sum after the protocol's recovery credit.")
    if has_conditions:
        out.append("#  - conditions: what the limit assumes, e.g. {min_interval_months: 6, max_course_eqd2_gy: 49};")
        out.append("#    leave empty when the source states none.")
    out += [
        "#  - source: author, journal, year, table or page; for a row left without a limit, say where it would come",
        "#    from (e.g. \"Ng et al. IJROBP 2021 table (not transcribed)\").",
        "#  - verified: true only once a second person has checked the number against the source; else false.",
        "# Then: `reirradiation-npc protocol validate THIS_FILE` and `reirradiation-npc protocol diff "
        f"{name_or_path} THIS_FILE`.",
        "",
    ]
    top = raw if isinstance(raw, dict) else {}
    out.append("name: " + _y(f"Institutional protocol from {path.stem} (edit this name)"))
    out.append("version: " + _y("draft"))
    for k in ("synthetic", "description", "warn_tolerance_percent", "references"):
        if k in top:
            out.append(_block(k, top[k]))
    for k, comment in (("alpha_beta", "default alpha/beta (Gy) for organs without their own"),
                       ("margins", "target margins: check them against the guideline; verified: true once checked"),
                       ("prescription", "prescription and fractionation: check against the guideline"),
                       ("reirradiation_type", "ESTRO-EORTC type rule: the dose level is the centre's choice"),
                       ("recovery", "recovery credit: `model: none` (no credit) unless the centre adopts a cited "
                                    "credit; it changes only `credited` limits")):
        if k in top:
            out.append(f"# {comment}")
            out.append(_block(k, top[k]))
    out.append("organs:")
    raw_organs = top.get("organs") or {}
    for o in protocol.organs.values():
        ro = raw_organs.get(o.key) or {}
        out.append(f"  {o.key}:")
        for k, v in ro.items():  # the organ's own keys as written (aliases, alpha/beta and its provenance, ...)
            if k != "constraints":
                out.extend("    " + ln for ln in _block(str(k), v).splitlines())
        if not o.constraints:
            if o.role == "oar":
                out.append("    # no limit row: add one if the guideline gives a limit, e.g.")
                out.append("    # constraints:")
                out.append("    #   - {metric: D0.03cc, scope: cumulative, limit_gy: , "
                           + ("basis: , " if has_basis else "") + "source: \"\", verified: }")
            continue
        out.append("    constraints:")
        for i, c in enumerate(o.constraints):
            rr = _raw_row(raw, o.key, i) or {}
            lk = next((k for k in ("limit_gy", "limit_cc", "limit_percent") if k in rr), None)
            lk = lk or ("limit_cc" if c.metric.is_volume else "limit_gy")
            unit = {"limit_gy": "Gy EQD2", "limit_cc": "cc", "limit_percent": "% of the organ"}[lk]
            out.append(f"      # {row_label(o.key, c.metric.name, c.scope)} - in {path.name}: {_was(c)}")
            out.append(f"      - metric: {_y(c.metric.name)}")
            out.append(f"        scope: {_y(c.scope)}")
            out.append(f"        {lk}:" + " " * max(1, 22 - len(lk)) + f"# {unit}; empty = no limit for this row")
            if has_basis and c.scope == "cumulative":
                out.append("        basis:                 # undiscounted | credited (required with a limit)")
            if has_conditions:
                out.append("        conditions:            # e.g. {min_interval_months: 6, max_course_eqd2_gy: 49}; "
                           "empty = none")
            out.append("        source: \"\"             # author, journal, year, table; required")
            out.append("        verified:              # true once checked against the source, else false")
            if c.priority is not None:
                out.append(f"        priority: {c.priority}")
            if rr.get("note"):
                out.append(f"        note: {_y(str(rr['note']))}")
    return "\n".join(out) + "\n"
