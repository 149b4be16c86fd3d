"""Planning aids computed after the cumulative analysis: target margins, target checks, re-irradiation type,
violation segments, headroom and remaining-dose maps. Called by :mod:`.pipeline` (compute after
``analysis.compute``; files written inside the staged ``write_outputs``).

Outputs (docs/outputs.md): ``margins.seg.nrrd`` (GTV/CTV/PTV, on the margin grid), ``violations.seg.nrrd`` (one
segment per ``fail``/``warn`` dose constraint, red/amber), ``headroom.nrrd`` (Gy EQD2, NaN where no limit) and
``remaining_dose.nrrd`` (physical Gy of the current course, -1 where no point-type limit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import budget, margins, targets
from .analysis import Analysis
from .geometry import Grid, Volume
from .io import Structure, write_segmentation
from .masks import structure_on_grid
from .sampling import crop_to_structure

log = logging.getLogger(__name__)

#: Target colours (RGB 0-1). No red or amber: those mean fail / warn in violation segments.
MARGIN_COLORS = {"GTV": (0.85, 0.10, 0.55), "CTV": (0.10, 0.70, 0.45), "PTV": (0.20, 0.55, 0.95)}


@dataclass
class Planning:
    margins: margins.Margins | None = None
    target_checks: list[dict] = field(default_factory=list)
    reirradiation_type: dict | None = None
    violations: list[budget.Violation] = field(default_factory=list)
    headroom: np.ndarray | None = None
    remaining: budget.RemainingDose | None = None
    warnings: list[str] = field(default_factory=list)
    reference_image: Volume | None = None     # the reference CT (its DICOM identity, if any, for RTSTRUCT)
    protocol: object = None                   # the protocol (the verdict is refreshed with the target checks)


def compute(prep, analysis: Analysis, progress: Callable[[str], None] | None = None) -> Planning:
    """All planning aids for a prepared case (``pipeline.Prepared``) and its analysis."""
    say = progress or (lambda m: None)
    protocol, grid, courses, structures = prep.protocol, prep.grid, prep.courses, prep.structures
    plan = Planning(reference_image=prep.reference_image, protocol=protocol)

    eval_targets: list[targets.Target] = []
    if protocol.margins is not None:
        say("target margins")
        inputs = margins.gather_inputs(structures, prep.reference_image, grid)
        plan.margins, w = margins.build(protocol.margins, inputs, protocol)
        plan.warnings += w
        if plan.margins is not None:
            m = plan.margins
            sub = m.subgrid
            for key, arr in (("GTV", m.gtv), ("CTV", m.ctv), ("PTV", m.ptv)):
                on = structure_on_grid(Structure(m.names[key], arr, sub, "margins"), grid)
                if on is None:
                    plan.warnings.append(f"margins: {m.names[key]} has no voxel on the evaluation grid")
                    continue
                # metrics are sampled sub-voxel from the margin mask itself (one volume per target everywhere)
                src_mask, src_grid = crop_to_structure(arr, sub)
                eval_targets.append(targets.Target(m.names[key], "margins", on[0], on[1], src_mask, src_grid))
    # a single GTV structure is already checked as the margins' "GTV" segment: do not list it twice
    gtv_alone = (set(plan.margins.report["gtv_structures"]) if plan.margins is not None
                 and len(plan.margins.report["gtv_structures"]) == 1 else set())
    for s in structures:
        if s.name in gtv_alone:
            continue
        if s.organ is not None and s.organ.role == "target" and s.mask.size and s.mask.any():
            eval_targets.append(targets.Target(s.name, "structures", s.mask, s.box, s.source_mask, s.source_grid))

    if protocol.prescription is not None:
        say("target checks")
        rx = protocol.prescription
        plan.target_checks = targets.check_targets(eval_targets, courses, rx, grid)
        if rx.fractions is not None and rx.fractions != courses[-1].fractions:
            plan.warnings.append(f"the protocol prescribes {rx.dose_gy:g} Gy in {rx.fractions} fractions but the "
                                 f"current course has {courses[-1].fractions} fractions; target coverage is judged "
                                 f"against the prescription's nominal EQD2 ({rx.reference_eqd2_gy:.2f} Gy)")
    else:
        plan.warnings.append("target checks not evaluated: the protocol has no prescription block")

    if protocol.reirradiation_type is not None:
        say("ESTRO-EORTC category")
        ptv = _ptv(eval_targets, grid)
        plan.reirradiation_type = targets.reirradiation_type(courses, protocol.reirradiation_type, grid,
                                                             structures, analysis.constraints, ptv=ptv)
        plan.warnings += plan.reirradiation_type.get("notes", [])
    else:
        plan.reirradiation_type = targets.reirradiation_rule_missing()

    say("violation, headroom and remaining-dose maps")
    plan.violations = budget.violations(analysis.constraints, structures, courses, protocol, grid)
    for v in plan.violations:
        if v.volume_cc == 0:
            plan.warnings.append(f"violation {v.name!r}: no evaluation-grid voxel above the threshold (the metric "
                                 "exceeds it only between voxel centres); the segment is empty")
    if any(budget.map_limits(s)[0] for s in structures if s.mask.size):
        plan.headroom = budget.headroom_map(structures, courses, protocol, grid.shape)
    if any(any(budget.map_limits(s)) for s in structures if s.mask.size):
        plan.remaining = budget.remaining_dose(structures, courses, protocol, grid.shape, analysis.constraints)
        for item in plan.remaining.not_represented:
            failing = [f"{x['metric']} ({x['status']})" for x in item["limits"] if x["status"] in ("fail", "warn")]
            if failing:
                plan.warnings.append(
                    f"remaining dose: {item['structure']} has limits a voxel map cannot represent "
                    f"({', '.join(failing)}); " + ("its voxels are marked -2 (not represented), not free dose"
                                                   if item["marked_on_map"] else "the map's values in it follow its "
                                                   "point-type limits only and do not satisfy these"))
    return plan


def _ptv(eval_targets: list[targets.Target], grid: Grid) -> targets.Target | None:
    """The PTV for the re-irradiation type: the margins' PTV, else the union of target structures named PTV*."""
    for t in eval_targets:
        if t.origin == "margins" and t.name.startswith("PTV"):
            return t
    ptvs = [t for t in eval_targets if t.origin == "structures" and t.name.strip().casefold().startswith("ptv")]
    if not ptvs:
        return None
    box = margins.union_box([t.box for t in ptvs])
    mask = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
    for t in ptvs:
        margins.paste(t.mask, t.box, box, out=mask)
    return targets.Target(" + ".join(t.name for t in ptvs), "structures", mask, box)


def add_to_results(results, plan: Planning) -> None:
    """Put the planning aids into the results tree (numbers only; files are listed by ``write``)."""
    results.margins = plan.margins.report if plan.margins is not None else None
    results.target_checks = plan.target_checks
    results.reirradiation_type = plan.reirradiation_type
    results.violations = [v.summary() for v in plan.violations]
    results.remaining_dose = plan.remaining.summary() if plan.remaining is not None else None
    results.warnings.extend(w for w in plan.warnings if w not in results.warnings)
    if plan.protocol is not None:
        from .verdict import update_results
        update_results(results, plan.protocol)  # the verdict now knows the target checks


def write(plan: Planning, grid: Grid, stage: Path, files: dict[str, str]) -> None:
    """Write the planning outputs into ``stage`` and list them in ``files`` (name -> description)."""
    if plan.margins is not None:
        m = plan.margins
        write_segmentation([(m.names[k], arr, MARGIN_COLORS[k]) for k, arr in
                            (("GTV", m.gtv), ("CTV", m.ctv), ("PTV", m.ptv))], m.subgrid, stage / "margins.seg.nrrd")
        files["margins.seg.nrrd"] = (f"Target volumes from the protocol's margins ({m.names['CTV']}, "
                                     f"{m.names['PTV']}), on the {m.report['grid']['source']} grid; verified: "
                                     f"{str(m.report['recipe']['verified']).lower()}")
        ref = plan.reference_image
        if ref is not None and ref.meta.get("dicom") and m.grid.same_as(ref.grid, tol_mm=1e-4):
            from .dicom_export import write_rtstruct  # pydicom only when DICOM is written
            full = []
            for key in ("GTV", "CTV", "PTV"):
                a = np.zeros(m.grid.shape, dtype=bool)
                a[m.box] = getattr(m, key.lower())
                full.append(a)
            write_rtstruct(full, [m.names[k] for k in ("GTV", "CTV", "PTV")],
                           [MARGIN_COLORS[k] for k in ("GTV", "CTV", "PTV")], ref, stage / "margins_rtstruct.dcm",
                           label="MARGINS", series_description="Target margins (protocol recipe)",
                           interpreted_types=["GTV", "CTV", "PTV"])
            del full
            files["margins_rtstruct.dcm"] = ("The margins' GTV/CTV/PTV as a DICOM RTSTRUCT on the reference CT "
                                             f"(contours along voxel edges); verified: "
                                             f"{str(m.report['recipe']['verified']).lower()}")
    if plan.violations:
        box = margins.union_box([v.box for v in plan.violations])
        sub = grid.subgrid(tuple(b.start for b in box[::-1]), tuple(b.stop for b in box[::-1]))
        segs = [(v.name, margins.paste(v.mask, v.box, box), v.color) for v in plan.violations]
        write_segmentation(segs, sub, stage / "violations.seg.nrrd")
        files["violations.seg.nrrd"] = ("One segment per fail (red) / warn (amber) constraint: the organ's "
                                        "voxels whose EQD2 exceeds the limit (warn: the warning threshold); "
                                        "for V<x>Gy limits the voxels receiving at least x Gy")
    if plan.headroom is not None:
        _write_float(plan.headroom, grid, stage / "headroom.nrrd",
                     "Headroom (Gy EQD2) = limit - organ EQD2 (organ alpha/beta and credit) for the point-type limits "
                     "(Dmax, D<=0.1cc; cumulative and current scope), smallest over the limits and organs; negative "
                     "where violated; NaN elsewhere (Dmean and V limits are not represented)", {})
        files["headroom.nrrd"] = ("Headroom (Gy EQD2) to the point-type limits (the remaining-dose limit set); NaN "
                                  "where no such limit")
    if plan.remaining is not None:
        r = plan.remaining
        nrep = [f"{x['structure']} " + ",".join(l["metric"] for l in x["limits"]) for x in r.not_represented]
        _write_float(r.array, grid, stage / "remaining_dose.nrrd",
                     f"NOT A PLAN DOSE. Remaining physical dose limit (Gy) per voxel of the current course in "
                     f"{r.fractions} fractions under every point-type limit; {budget.UNCONSTRAINED:g} = no limit; "
                     f"{budget.NOT_REPRESENTED:g} = organ whose limits a voxel map cannot represent (not free dose); "
                     f"0 = no dose allowed",
                     {"unconstrained_value": f"{budget.UNCONSTRAINED:g}",
                      "not_represented_value": f"{budget.NOT_REPRESENTED:g}", "fractions": str(r.fractions),
                      "not_represented_limits": "; ".join(nrep) or "none", "quantity": "remaining dose limit"})
        files["remaining_dose.nrrd"] = (f"NOT A PLAN DOSE: remaining physical dose limit (Gy) of the current course "
                                        f"({r.fractions} fractions); {budget.UNCONSTRAINED:g} where no limit applies, "
                                        f"{budget.NOT_REPRESENTED:g} on organs whose limits are not representable")
        regions = _remaining_regions(plan, grid)
        if regions:
            from .geometry import bounding_box
            rbox = bounding_box(np.logical_or.reduce([m for _, m, _ in regions]))
            rsub = grid.subgrid(tuple(b.start for b in rbox[::-1]), tuple(b.stop for b in rbox[::-1]))
            write_segmentation([(n, m[rbox], c) for n, m, c in regions], rsub,
                               stage / "remaining_dose_regions.seg.nrrd")
            files["remaining_dose_regions.seg.nrrd"] = (
                "Regions of the remaining-dose limit: 'LIMIT APPLIES' (0 there = no dose allowed) and 'NOT "
                "REPRESENTED: <structures>' (organs with limits such as Dmean or V<x>Gy that the map cannot hold)")
        ref = plan.reference_image
        if ref is not None and ref.meta.get("dicom"):
            from .dicom_export import write_rtdose, write_rtstruct  # pydicom only when DICOM is written
            # RTDOSE pixels cannot be negative: the markers are 0 there; WHERE the map applies is the RTSTRUCT beside
            write_rtdose(Volume(np.maximum(r.array, 0.0), grid), dict(ref.meta["dicom"]), stage / REMAINING_DCM,
                         series_description="NOT A PLAN DOSE: remaining-dose LIMIT (Gy)",
                         dose_comment=f"UPPER BOUND per voxel, {r.fractions} fx; not a dose; see RTSTRUCT",
                         image_comments=(
                             f"NOT A PLAN DOSE. Per voxel the largest physical dose (Gy) the current course in "
                             f"{r.fractions} fractions may deliver under the point-type limits (Dmax, D<=0.1cc). "
                             f"0 means no dose allowed ONLY inside the ROIs 'LIMIT APPLIES' of {REMAINING_RTSTRUCT}; "
                             "outside them 0 means no limit (or, in ROIs 'NOT REPRESENTED', limits such as Dmean or "
                             "V<x>Gy that a voxel map cannot hold). Use as an objective, never as a dose to sum."),
                         dose_type="PHYSICAL", summation="PLAN", series_number=950)
            files[REMAINING_DCM] = (f"NOT A PLAN DOSE: the remaining-dose limit (Gy, {r.fractions} fractions) as "
                                    f"DICOM RTDOSE; 0 also outside limited organs: read it inside the ROIs of "
                                    f"{REMAINING_RTSTRUCT} only")
            if regions:
                write_rtstruct([m for _, m, _ in regions], [n for n, _, _ in regions], [c for _, _, c in regions],
                               ref, stage / REMAINING_RTSTRUCT, grid=grid, label="REMAINING",
                               series_description="Where the remaining-dose limit applies / not represented",
                               interpreted_types=["CONTROL"] * len(regions))
                files[REMAINING_RTSTRUCT] = ("Regions of the remaining-dose limit: 'LIMIT APPLIES' (voxels under a "
                                             "point-type limit: 0 there = no dose allowed) and 'NOT REPRESENTED: "
                                             "<structures>' (organs whose limits a voxel map cannot hold)")


REMAINING_DCM = "remaining_dose_limit_not_a_plan.dcm"
REMAINING_RTSTRUCT = "remaining_dose_regions_rtstruct.dcm"


def _remaining_regions(plan: Planning, grid: Grid) -> list[tuple[str, np.ndarray, tuple[float, float, float]]]:
    """Full-grid masks of the remaining-dose regions: where the limit applies (voxels under a point-type limit,
    where 0 means no dose allowed) and the organs with limits the map does not represent (marked -2, or showing
    only their point-type budget): they overlap where an organ has both kinds."""
    r = plan.remaining
    out = []
    applies = r.array >= 0
    if applies.any():
        out.append(("LIMIT APPLIES (0 = no dose allowed)", applies, (0.2, 0.8, 0.2)))
    if r.not_represented_masks:
        nrep = np.zeros(grid.shape, dtype=bool)
        for _, m, box in r.not_represented_masks:
            nrep[box] |= m
        if nrep.any():
            names = ", ".join(n for n, _, _ in r.not_represented_masks)
            out.append((f"NOT REPRESENTED: {names}"[:64], nrep, (0.6, 0.6, 0.6)))
    return out


def _write_float(arr: np.ndarray, grid: Grid, path: Path, description: str, extra: dict[str, str]) -> None:
    img = Volume(arr.astype(np.float32, copy=False), grid).to_sitk()
    img.SetMetaData("description", description)
    img.SetMetaData("units", "Gy")
    for k, v in extra.items():
        img.SetMetaData(k, v)
    from .io import COMPRESSION_LEVEL, should_compress
    sitk.WriteImage(img, str(path), useCompression=should_compress(arr), compressionLevel=COMPRESSION_LEVEL)
