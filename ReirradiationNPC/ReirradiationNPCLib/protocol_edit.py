"""Editing one value of a protocol file (the Slicer module's editable protocol table).

An edit never touches the shipped file: the first edit writes a copy (its name marked "edited"), later edits change
that copy. Every edited file is validated by the protocol loader before it replaces the previous one, so a bad value
(negative α/β, a limit on a row marked verified being removed, ...) is refused with the loader's message and nothing
is written. Comments of the original YAML are not kept in the copy.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from .errors import InputError
from .protocol import Protocol, parse_metric, parse_protocol

#: fields a physicist can edit in the table: organ α/β (Gy), and per constraint the limit, verified flag and source
FIELDS = ("alpha_beta", "limit", "verified", "source")
_LIMIT_KEYS = ("limit_gy", "limit_cc", "limit_percent")


def _number(text: str, what: str, src: str) -> float:
    try:
        return float(str(text).split()[0])
    except (ValueError, IndexError):
        raise InputError(f"{what} must be a number, got {text!r}", source=src, field=what) from None


def _flag(text: str, what: str, src: str) -> bool:
    t = str(text).strip().casefold()
    if t in ("yes", "true", "1", "y"):
        return True
    if t in ("no", "false", "0", "n"):
        return False
    raise InputError(f"{what} must be yes or no, got {text!r}", source=src, field=what)


def edit_protocol(src: Path, dst: Path, organ: str, field: str, value: str, constraint: int | None = None
                  ) -> Protocol:
    """Write ``dst``: the protocol ``src`` with one value changed, validated; returns the loaded result.

    ``field``: ``alpha_beta`` (Gy) of ``organ``, or ``limit`` (Gy / cc / % as the metric says; empty or ``-`` for
    no limit), ``verified`` (yes/no) or ``source`` of the organ's ``constraint``-th constraint.
    """
    src, dst = Path(src), Path(dst)
    data = yaml.safe_load(src.read_text(encoding="utf-8"))
    organs = data.get("organs") if isinstance(data, dict) else None
    if not isinstance(organs, dict) or organ not in organs:
        raise InputError(f"no organ {organ!r} in the protocol", source=str(src), field="organs")
    o = organs[organ]
    key = f"organs.{organ}"
    if field == "alpha_beta":
        o["alpha_beta"] = _number(value, f"{key}.alpha_beta", str(src))
    elif field in ("limit", "verified", "source"):
        cons = o.get("constraints") or []
        if constraint is None or not 0 <= constraint < len(cons):
            raise InputError(f"organ {organ!r} has no constraint number {constraint}", source=str(src),
                             field=f"{key}.constraints")
        c = cons[constraint]
        ck = f"{key}.constraints[{constraint}]"
        if field == "limit":
            lk = next((k for k in _LIMIT_KEYS if k in c), None)
            if lk is None:
                lk = "limit_cc" if parse_metric(c["metric"]).is_volume else "limit_gy"
            text = str(value).strip()
            c[lk] = None if text in ("", "-") else _number(text, f"{ck}.{lk}", str(src))
        elif field == "verified":
            c["verified"] = _flag(value, f"{ck}.verified", str(src))
        else:
            c["source"] = str(value).strip()
    else:
        raise InputError(f"field {field!r} cannot be edited (editable: {', '.join(FIELDS)})", source=str(src),
                         field=field)
    if src.resolve() != dst.resolve() and "(edited)" not in str(data.get("name", "")):
        data["name"] = f"{data.get('name', src.stem)} (edited)"
    text = (f"# Edited copy of {src.name} (ReirradiationNPC protocol table). Check every change against its source.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    protocol = parse_protocol(yaml.safe_load(text), str(dst))  # refuses a bad value before anything is written
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".protocol-", suffix=".yaml", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return protocol
