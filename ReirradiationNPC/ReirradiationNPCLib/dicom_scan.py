"""``reirradiation-npc scan DIR``: what DICOM RT is in a folder, and a case-file skeleton built from it.

Only headers are read (no pixel data). Files that are not DICOM are ignored; DICOM files that cannot be parsed
are listed as unreadable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .dicom_rt import dicom_files, identity_of, read_dataset
from .errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Item:
    kind: str                     # CT, RTPLAN, RTDOSE, RTSTRUCT, REG, other
    path: Path                    # a file; for CT the folder of the series' first file
    ident: dict
    info: dict = field(default_factory=dict)


@dataclass
class ScanResult:
    root: Path
    items: list[Item]
    unreadable: list[tuple[Path, str]]

    def patients(self) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = {}
        for it in self.items:
            out.setdefault(it.ident.get("PatientID", ""), []).append(it)
        return out


def scan(root: Path) -> ScanResult:
    """Read the headers of every DICOM file under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("not a folder", source=str(root), field="DIR")
    series: dict[str, Item] = {}
    items: list[Item] = []
    bad: list[tuple[Path, str]] = []
    for f in dicom_files(root):
        try:
            ds = read_dataset(f, "scan", header_only=True)
        except InputError as exc:
            bad.append((f, exc.detail))
            continue
        ident = identity_of(ds)
        mod = ident["Modality"].upper()
        if mod == "CT":
            uid = ident["SeriesInstanceUID"]
            it = series.get(uid)
            if it is None:
                it = series[uid] = Item("CT", f.parent, ident, {"slices": 0, "folders": set()})
                items.append(it)
            it.info["slices"] += 1
            it.info["folders"].add(f.parent)
        elif mod == "RTPLAN":
            groups = [int(getattr(g, "NumberOfFractionsPlanned", 0) or 0)
                      for g in (getattr(ds, "FractionGroupSequence", None) or [])]
            items.append(Item("RTPLAN", f, ident, {"label": str(getattr(ds, "RTPlanLabel", "") or ""),
                                                   "fractions": groups, "date": str(getattr(ds, "RTPlanDate", "") or "")}))
        elif mod == "RTDOSE":
            refs = [str(getattr(r, "ReferencedSOPInstanceUID", "")) for r in
                    (getattr(ds, "ReferencedRTPlanSequence", None) or [])]
            items.append(Item("RTDOSE", f, ident, {
                "units": str(getattr(ds, "DoseUnits", "") or ""), "type": str(getattr(ds, "DoseType", "") or ""),
                "summation": str(getattr(ds, "DoseSummationType", "") or ""), "plans": refs,
                "frames": int(getattr(ds, "NumberOfFrames", 1) or 1)}))
        elif mod == "RTSTRUCT":
            frame = ""
            for r in getattr(ds, "ReferencedFrameOfReferenceSequence", None) or []:
                frame = str(getattr(r, "FrameOfReferenceUID", "") or "")
                break
            ident["FrameOfReferenceUID"] = frame
            names = [str(getattr(r, "ROIName", "")) for r in (getattr(ds, "StructureSetROISequence", None) or [])]
            items.append(Item("RTSTRUCT", f, ident, {"label": str(getattr(ds, "StructureSetLabel", "") or ""),
                                                     "rois": names}))
        elif mod == "REG":
            frames = [str(getattr(r, "FrameOfReferenceUID", "") or "") for r in
                      (getattr(ds, "RegistrationSequence", None) or [])]
            deformable = hasattr(ds, "DeformableRegistrationSequence")
            if deformable:
                frames = [str(getattr(r, "SourceFrameOfReferenceUID", "") or "") for r in
                          ds.DeformableRegistrationSequence] + [ident["FrameOfReferenceUID"]]
            items.append(Item("REG", f, ident, {"frames": [x for x in frames if x], "deformable": deformable}))
        else:
            items.append(Item("other", f, ident, {"modality": mod}))
    for it in items:
        if it.kind == "CT":
            folders = it.info.pop("folders")
            it.info["folders"] = sorted(str(p) for p in folders)
            it.path = Path(os.path.commonpath([str(p) for p in folders]))
    return ScanResult(root, items, bad)


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root)) or "."
    except ValueError:
        return str(p)


def _date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else (d or "no date")


def format_scan(res: ScanResult) -> str:
    """A human-readable listing: patients, studies, CT series, plans (fractions), doses, structure sets."""
    lines = [f"DICOM under {res.root}:"]
    plans_by_uid = {it.ident["SOPInstanceUID"]: it for it in res.items if it.kind == "RTPLAN"}
    pats = res.patients()
    if not pats:
        lines.append("  no DICOM objects found")
    for pid, items in pats.items():
        name = next((i.ident["PatientName"] for i in items if i.ident.get("PatientName")), "")
        lines.append(f"patient {pid or '(no PatientID)'}  {name}")
        studies: dict[str, list[Item]] = {}
        for it in items:
            studies.setdefault(it.ident.get("StudyInstanceUID", ""), []).append(it)
        for suid, sitems in sorted(studies.items(), key=lambda kv: kv[1][0].ident.get("StudyDate", "")):
            first = sitems[0].ident
            lines.append(f"  study {_date(first.get('StudyDate', ''))}  {first.get('StudyDescription', '')!r}  "
                         f"uid {suid}")
            for it in sitems:
                rel = _rel(it.path, res.root)
                frame = it.ident.get("FrameOfReferenceUID", "")
                if it.kind == "CT":
                    lines.append(f"    CT series   {rel}/  {it.info['slices']} slices  "
                                 f"{it.ident.get('SeriesDescription', '')!r}  frame {frame}")
                elif it.kind == "RTPLAN":
                    fx = it.info["fractions"]
                    fxs = (f"{fx[0]} fractions" if len(fx) == 1 else
                           f"{len(fx)} fraction groups ({', '.join(map(str, fx))} fractions)")
                    lines.append(f"    plan        {rel}  {it.info['label']!r}  {fxs}  frame {frame}")
                elif it.kind == "RTDOSE":
                    ref = ", ".join(repr(plans_by_uid[u].info["label"]) if u in plans_by_uid else "(plan not found)"
                                    for u in it.info["plans"]) or "no plan named"
                    lines.append(f"    dose        {rel}  {it.info['summation']} {it.info['type']} "
                                 f"{it.info['units']}  {it.info['frames']} frames  plan: {ref}  frame {frame}")
                elif it.kind == "RTSTRUCT":
                    rois = it.info["rois"]
                    shown = ", ".join(rois[:12]) + (f", ... ({len(rois)} in all)" if len(rois) > 12 else "")
                    lines.append(f"    structures  {rel}  {it.info['label']!r}  {len(rois)} ROIs: {shown}  "
                                 f"frame {frame}")
                elif it.kind == "REG":
                    kind = "deformable" if it.info["deformable"] else "rigid/affine"
                    lines.append(f"    registration {rel}  {kind}  frames {' -> '.join(it.info['frames'])}")
                else:
                    lines.append(f"    other       {rel}  {it.info['modality']}")
    for f, why in res.unreadable:
        lines.append(f"unreadable: {_rel(f, res.root)}: {why}")
    return "\n".join(lines)


def write_case_skeleton(res: ScanResult, path: Path) -> Path:
    """Write an editable case file guessed from the scan (never overwrites). Returns the path."""
    path = Path(path)
    if path.exists():
        raise InputError("exists already (it is never overwritten)", source=str(path), field="--write-case")
    pats = res.patients()
    if len(pats) != 1:
        raise InputError(f"{len(pats)} patients found ({', '.join(pats) or 'none'}); scan a folder holding one "
                         "patient to write a case file", source=str(res.root), field="--write-case")
    items = next(iter(pats.values()))
    plans = sorted((i for i in items if i.kind == "RTPLAN"),
                   key=lambda i: (i.ident.get("StudyDate", ""), i.info.get("date", "")))
    if not plans:
        raise InputError("no RTPLAN found: a case needs one plan (or a dose and its fractions) per course",
                         source=str(res.root), field="--write-case")
    base = path.parent.resolve()

    def rel(p: Path) -> str:
        return os.path.relpath(Path(p).resolve(), base)

    def of_frame(kind: str, frame: str) -> list[Item]:
        return [i for i in items if i.kind == kind and i.ident.get("FrameOfReferenceUID") == frame]

    all_cts = [i for i in items if i.kind == "CT"]

    def shared(ct: Item) -> bool:  # another CT series lives in (or under) the same folder
        return any(o is not ct and Path(o.path).resolve().is_relative_to(Path(ct.path).resolve()) for o in all_cts)

    current = plans[-1]
    cur_frame = current.ident.get("FrameOfReferenceUID", "")
    cts = of_frame("CT", cur_frame)
    structs = of_frame("RTSTRUCT", cur_frame)
    out = ["# Case file skeleton written by `reirradiation-npc scan --write-case` from",
           f"#   {res.root}",
           "# CHECK EVERY LINE. Fill in the protocol and every interval_months; fractions are read from the plans.",
           f"# patient: {current.ident.get('PatientID', '')} {current.ident.get('PatientName', '')}",
           "patient:",
           f"  id: {_q(current.ident.get('PatientID', ''))}",
           f"  name: {_q(current.ident.get('PatientName', ''))}",
           "protocol: null        # REQUIRED: a shipped protocol name (reirradiation-npc protocol show) or a file",
           "grid: dose",
           "reference:"]
    if cts:
        out.append(f"  image: {_q(rel(cts[0].path))}   # CT series {cts[0].ident.get('SeriesDescription', '')!r}, "
                   f"{cts[0].info['slices']} slices" + ("  (more than one CT in this frame: check)" if len(cts) > 1 else ""))
        if shared(cts[0]):
            out.append(f"  image_series: {_q(cts[0].ident['SeriesInstanceUID'])}   # the folder holds several CT series")
    else:
        out.append("  # image: no CT series found in the current plan's frame of reference")
    if structs:
        out.append(f"  structures: {_q(rel(structs[0].path))}   # {len(structs[0].info['rois'])} ROIs"
                   + ("  (several structure sets in this frame: check)" if len(structs) > 1 else ""))
    else:
        out.append("  structures: null   # REQUIRED: no RTSTRUCT found in the current plan's frame of reference")
    out.append("courses:   # oldest first; the last one is the current course")
    regs = [i for i in items if i.kind == "REG"]
    for n, plan in enumerate(plans, start=1):
        is_cur = plan is current
        frame = plan.ident.get("FrameOfReferenceUID", "")
        doses = sorted((i for i in items if i.kind == "RTDOSE" and plan.ident["SOPInstanceUID"] in i.info["plans"]),
                       key=lambda i: i.ident.get("FrameOfReferenceUID") != frame)  # the plan's own frame first
        out.append(f"  - name: course{n}   # plan {plan.info['label']!r}, study {_date(plan.ident.get('StudyDate', ''))}")
        out.append(f"    plan: {_q(rel(plan.path))}")
        if doses:
            out.append(f"    dose: {_q(rel(doses[0].path))}" + ("   # several doses name this plan: check"
                                                                  if len(doses) > 1 else ""))
        else:
            out.append("    dose: null   # REQUIRED: no RTDOSE names this plan")
        if is_cur:
            continue
        out.append("    interval_months: null   # REQUIRED: months from the end of this course to the start of the "
                   "current one")
        prior_cts = of_frame("CT", frame)
        if prior_cts:
            out.append(f"    image: {_q(rel(prior_cts[0].path))}")
            if shared(prior_cts[0]):
                out.append(f"    image_series: {_q(prior_cts[0].ident['SeriesInstanceUID'])}")
        if frame == cur_frame:
            out.append("    registration: {method: identity}   # same frame of reference as the current plan")
        else:
            reg = next((r for r in regs if frame in r.info["frames"] and cur_frame in r.info["frames"]), None)
            if reg is not None:
                out.append(f"    registration: {{method: file, transform: {_q(rel(reg.path))}}}   "
                           "# a registration object links the two frames")
            else:
                out.append("    registration: {method: rigid}   # other frame of reference, no registration object "
                           "found")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as fh:  # "x": never overwrite, even in a race
        fh.write("\n".join(out) + "\n")
    return path


def _q(s: str) -> str:
    """A YAML scalar, quoted when needed."""
    import json
    return json.dumps(str(s))
