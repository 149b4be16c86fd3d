"""From a case file to the output folder: load, resample, analyse, write (atomically)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import SOFTWARE_NAME, __version__
from .analysis import (MAP_RULE, check_maps, MODEL_ASSUMPTIONS, Analysis, CourseData, DoseTerm, StructureData,
                       compute)
from .case import CaseSpec, load_case
from .errors import InputError
from .geometry import Grid, Volume, grids_overlap, resample_linear
from .io import ensure_writable_dir, read_dose, read_image, read_structures, write_volume
from .masks import coverage_map, structure_on_grid
from .dicom_rt import check_case_inputs, load_dose_any, load_image_any, load_structures_any, read_rtplan
from .sampling import crop_to_structure
from .protocol import Protocol, load_protocol
from .results import Results
from .timing import StageClock

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: an extra output writer (see write_outputs): (staging dir, prep, analysis, results, planning, progress) -> files
ExtraOutput = Callable[..., "dict[str, str]"]


@dataclass
class Prepared:
    case: CaseSpec
    protocol: Protocol
    grid: Grid
    courses: list[CourseData]
    structures: list[StructureData]
    reference_image: Volume | None
    warnings: list[str]
    registrations: dict = field(default_factory=dict)  # prior course name -> registration.RegistrationOutcome
    dose_kinds: dict = field(default_factory=dict)     # course name -> DoseHeaderCheck.assumptions() (RBE, summation)


def prepare(case: CaseSpec, progress: Progress | None = None) -> Prepared:
    """Load every input named by the case and bring it onto the evaluation grid."""
    say = progress or (lambda m: None)
    warnings: list[str] = []
    say("loading protocol")
    try:
        protocol = load_protocol(case.protocol, base=case.path.parent)
    except InputError as exc:
        if exc.source is None:  # name the case file that asked for the protocol
            raise InputError(exc.detail, source=str(case.path), field=exc.field) from None
        raise

    # structures from mask files (not an RTSTRUCT, which is rasterised on the reference CT's lattice) are read
    # beside the reference image and the doses (the readers release the GIL; 2 cores): announced and waited for
    # at "loading structures", where their errors are raised as before
    early = _read_structures_beside(case)
    ref_img = None
    if case.reference_image is not None:
        say("loading reference image")
        ref_img = load_image_any(case.reference_image, "reference.image", series_uid=case.reference_image_series)

    say("loading doses")
    doses = [load_course_doses(c, i) for i, c in enumerate(case.courses)]
    check_case_inputs(case, ref_img, doses, warnings)  # one patient; identity registration = one frame
    grid = doses[-1].grid if case.grid == "dose" else ref_img.grid

    courses = []
    registrations = {}
    for i, (c, dose) in enumerate(zip(case.courses, doses)):
        transform = None
        if not c.is_current:
            say(f"registration of {c.name} ({c.registration['method']})")
            from .registration import register_prior_course
            registrations[c.name] = outcome = register_prior_course(c, i, ref_img, dose, case.path)
            warnings.extend(f"registration of {c.name}: {n}" for n in outcome.notes
                            if "fold" in n or "not checked" in n or "experimental" in n or "deformable" in n)
            transform = None if outcome.method == "identity" else outcome.transform
        if transform is None and not grids_overlap(dose.grid, grid):
            raise InputError("dose grid does not overlap the evaluation grid "
                             f"({'current dose' if case.grid == 'dose' else 'reference image'})",
                             source=str(c.dose), field=f"courses[{i}].dose")
        say(f"resampling dose of {c.name}")
        parts = dose.meta.get("groups") or [dose]   # several fraction groups: each resampled once, on its own
        terms, cov = [], None
        for j, part in enumerate(parts):
            if j and transform is None and not grids_overlap(part.grid, grid):
                raise InputError("dose grid does not overlap the evaluation grid", source=part.meta.get("path"),
                                 field=f"courses[{i}].dose[{j}]")
            arr = resample_linear(part, grid, transform)  # transform: evaluation-grid points -> prior dose's frame
            cov_j = coverage_map(part.grid, grid, transform)
            if transform is not None and cov_j is not None and not cov_j.any():
                raise InputError("after registration the dose grid does not overlap the evaluation grid (check the "
                                 "registration)", source=str(part.meta.get("path", c.dose)),
                                 field=f"courses[{i}].dose")
            cov = cov_j if j == 0 else (None if cov is None or cov_j is None else cov | cov_j)
            chk = part.meta.get("header_check")
            terms.append(DoseTerm(arr, int(part.meta["fractions"]) if len(parts) > 1 else 0,
                                  f"group {chk.fraction_group} ({Path(part.meta.get('path', '')).name})"
                                  if chk is not None and chk.fraction_group is not None else Path(
                                      part.meta.get("path", "")).name))
        if len(terms) > 1:
            c.fractions = sum(t.fractions for t in terms)
            arr = terms[0].dose.copy()
            for t in terms[1:]:
                arr += t.dose
        else:
            c.fractions = int(dose.meta.get("fractions") or c.fractions)  # resolved from the plan's fraction group
            terms = []
        courses.append(CourseData(name=c.name, dose=arr, fractions=c.fractions, interval_months=c.interval_months,
                                  is_current=c.is_current, registration=c.registration["method"],
                                  dose_file=", ".join(str(p) for p in getattr(c, "doses", None) or [c.dose]),
                                  coverage=cov, groups=terms))

    say("loading structures")
    if early is not None:
        raw = early.result()
    else:
        raw = load_structures_any(case.reference_structures, "reference.structures",  # RTSTRUCT: onto the CT lattice
                                  lattice=ref_img.grid if ref_img is not None else grid, warnings=warnings,
                                  expected_frame_uid=(ref_img.meta.get("dicom") or {}).get("FrameOfReferenceUID")
                                  if ref_img is not None else None, crop=True)   # masks kept as boxes
    structures = []
    for s in raw:
        organ = protocol.match(s.name)
        on = structure_on_grid(s, grid)
        if on is None:
            warnings.append(f"structure {s.name!r} covers no voxel of the evaluation grid (empty, outside it, or "
                            "smaller than a voxel): it takes no part in the alpha/beta and recovery maps; its "
                            "metrics come from its own mask")
            mask, box = np.zeros((0, 0, 0), bool), (slice(0, 0),) * 3
        else:
            mask, box = on
            own_cc = float(s.mask.sum()) * s.grid.voxel_volume_cc
            eval_cc = float(mask.sum()) * grid.voxel_volume_cc
            is_body = organ is not None and organ.role == "body"
            if own_cc > 0 and not is_body and _clipped(box, grid) and eval_cc < 0.97 * own_cc:
                warnings.append(f"structure {s.name!r}: about {100 * (1 - eval_cc / own_cc):.0f}% of its volume "
                                "lies outside the evaluation grid; the dose there is read as 0 Gy (use grid: image or "
                                "a larger dose grid)")
        if s.parent is not None:   # read as its bounding box (io.read_structures(..., crop=True)): cropped once
            src_mask, src_grid = s.mask, s.grid
        else:                      # an RTSTRUCT's rasterised box, not always tight
            src_mask, src_grid = crop_to_structure(s.mask, s.grid)
        structures.append(StructureData(s.name, mask, box, organ, source_mask=src_mask, source_grid=src_grid,
                                        source_parent=s.parent))
    for i, c in enumerate(case.courses):
        if c.name in registrations and getattr(c, "structures", None) is not None:
            say(f"registration QA of {c.name}: prior structures")
            from .registration import prior_structure_dice
            outcome = registrations[c.name]
            lattice = outcome.moving_image.grid if outcome.moving_image is not None else doses[i].grid
            prior_raw = load_structures_any(c.structures, f"courses[{i}].structures", lattice=lattice,
                                            warnings=warnings, expected_frame_uid=(
                                                (outcome.moving_image or doses[i]).meta.get("dicom") or {}
                                            ).get("FrameOfReferenceUID"))
            outcome.dice = prior_structure_dice(outcome, prior_raw, structures, grid, protocol)
    kinds = {}
    for c, d in zip(case.courses, doses):
        if d.meta.get("groups"):   # several fraction groups: one entry per group, in the plan's group order
            first = d.meta["dose_kind"]
            kinds[c.name] = {"fraction_groups": [g.meta["dose_kind"] for g in d.meta["groups"]],
                             **{k: first.get(k) for k in ("rbe", "rbe_rule", "rbe_applied", "radiation")}}
        elif d.meta.get("dose_kind"):
            kinds[c.name] = d.meta["dose_kind"]
    return Prepared(case, protocol, grid, courses, structures, ref_img, warnings, registrations, kinds)


def _read_structures_beside(case: CaseSpec):
    """A future of the case's structures when they are mask files (a folder or a .seg.nrrd), read in a thread of
    their own (kept as boxes, ``io.read_structures(..., crop=True)``); None for an RTSTRUCT (it needs the reference
    CT's lattice first)."""
    from .dicom_rt import is_dicom_file
    path = case.reference_structures
    if path is None or is_dicom_file(Path(path)):
        return None
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="structures")
    try:
        return pool.submit(load_structures_any, path, "reference.structures", crop=True)
    finally:
        pool.shutdown(wait=False)   # the thread ends when the reading does


def load_course_doses(c, i: int) -> Volume:
    """The dose of course ``c`` (index ``i``) as read and checked (dicom_rt.check_rtdose_header: summation type,
    fraction group, RBE); ``meta["fractions"]`` is the resolved fraction count, ``meta["dose_kind"]`` what the
    results' course assumptions record.

    A plan with several fraction groups needs one FRACTION / FRACTION_SESSION dose per group (``dose:`` a list);
    every group must be given exactly once. The returned volume is then the first group's, and
    ``meta["groups"]`` holds every group's volume in the plan's group order (each one EQD2 term with its own
    ``meta["fractions"]``; pipeline.prepare resamples each)."""
    plan = read_rtplan(c.plan, f"courses[{i}].plan") if c.plan else None
    paths = getattr(c, "doses", None) or [c.dose]
    vols = []
    for j, path in enumerate(paths):
        key = f"courses[{i}].dose" if len(paths) == 1 else f"courses[{i}].dose[{j}]"
        vols.append(load_dose_any(path, key, fractions=getattr(c, "fractions_stated", c.fractions)
                                  if len(paths) == 1 else None, plan=plan, dose_type=getattr(c, "dose_type", None),
                                  rbe=getattr(c, "rbe", None), radiation=getattr(c, "radiation", None),
                                  require_fractions=True))
    if plan is not None and (len(plan.fraction_groups) > 1 or len(vols) > 1):
        named = [v.meta["header_check"].fraction_group if v.meta.get("header_check") else None for v in vols]
        want = plan.group_numbers or list(range(1, len(plan.fraction_groups) + 1))
        for v, g in zip(vols, named):
            if g is None:
                raise InputError(f"the plan has {len(plan.fraction_groups)} fraction groups: each dose of the course "
                                 "must be a FRACTION or FRACTION_SESSION dose naming its group",
                                 source=v.meta.get("path", str(c.dose)), field="DoseSummationType")
        dup = sorted({g for g in named if named.count(g) > 1})
        missing = [g for g in want if g not in named]
        if dup or missing:
            what = (f"fraction group {dup[0]} is given twice" if dup else
                    f"fraction group(s) {', '.join(map(str, missing))} of the plan have no dose")
            raise InputError(f"{what}: list one FRACTION dose per fraction group of {Path(plan.path).name} "
                             f"({', '.join(f'group {g}: {n} fx' for g, n in zip(want, plan.fraction_groups))})",
                             source=str(c.dose), field=f"courses[{i}].dose")
        if len(vols) > 1:
            order = {g: k for k, g in enumerate(want)}
            vols = sorted(vols, key=lambda v: order[v.meta["header_check"].fraction_group])
            kinds = {(v.meta["header_check"].rbe, v.meta["header_check"].rbe_applied) for v in vols}
            if len(kinds) > 1:  # one course, one RBE rule
                raise InputError("the fraction groups' doses differ in RBE handling (DoseType or radiation): one "
                                 "course takes one dose_type / rbe", source=str(c.dose), field=f"courses[{i}].dose")
            first = vols[0]
            first.meta["groups"] = vols
            return first
    vol = vols[0]
    if vol.meta.get("fractions") is None:
        vol.meta["fractions"] = c.fractions
    return vol


def _fractions_words(c: CourseData) -> str:
    """``54 fractions`` or ``fraction groups of 23+5 fractions (one EQD2 term each)``."""
    if len(c.groups) > 1:
        return f"fraction groups of {c.fractions_text} fractions (one EQD2 term each)"
    return f"{c.fractions} fractions"


def _clipped(box, grid: Grid) -> bool:
    return any(b.start == 0 or b.stop == n for b, n in zip(box, grid.shape))


def build_results(prep: Prepared, analysis: Analysis) -> Results:
    p = prep.protocol
    alpha_beta = {o.key: {"alpha_beta_gy": o.alpha_beta, "source": o.alpha_beta_source,
                          "verified": o.alpha_beta_verified} for o in p.organs.values()}
    course_assumptions = _with_dose_kind(analysis.course_assumptions, prep.dose_kinds)
    results = Results(
        software={"name": SOFTWARE_NAME, "version": __version__},
        protocol=p.summary() | {"description": p.description},
        case={"file": str(prep.case.path), "patient": prep.case.patient,
              "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "grid": prep.case.grid},
        evaluation_grid=prep.grid.to_dict(),
        assumptions={
            "courses": course_assumptions,
            "alpha_beta": {"default_gy": p.default_alpha_beta, "default_source": p.default_alpha_beta_source,
                           "default_verified": p.default_alpha_beta_verified,
                           "per_organ": alpha_beta,
                           "map_rule": MAP_RULE},
            "recovery": {"model": p.recovery.model, "description": p.recovery.describe(),
                         "source": p.recovery.source, "verified": p.recovery.verified,
                         "convention": "prior course discounted: sum (1 - r) EQD2",
                         "basis_rule": "each cumulative limit is judged on its stated basis: 'undiscounted' (plain "
                                       "sum of the courses' EQD2; the default) or 'credited' (with this recovery "
                                       "credit); both values are reported"},
            "model": MODEL_ASSUMPTIONS,
        },
        structures=analysis.structures,
        constraints=analysis.constraints,
        unmatched_structures=analysis.unmatched,
        summary={},
        warnings=prep.warnings + analysis.warnings,
        registration=_registration_results(prep),
        maps=_maps_results(prep, analysis),
    )
    from . import prescription, selection  # issue 16: information and checks beside the verdict, never in it
    selection.add_to_results(results, prep.case, p)
    prescription.add_to_results(results, prep.case, p)
    from .verdict import update_results
    update_results(results, p)  # planning.add_to_results refreshes it once the target checks are in
    return results


def _with_dose_kind(course_assumptions: list[dict], kinds: dict) -> list[dict]:
    """Each course's assumptions plus how its dose file became a course dose (summation type, fraction group,
    RBE: ``dose``), and ``rbe`` at the top level (None = photons/electrons, physical dose)."""
    from .dicom_rt import rbe_words
    out = []
    for a in course_assumptions:
        a = dict(a)
        kind = kinds.get(a.get("name"))
        if kind is not None:
            a["dose"] = kind
            a["rbe"] = kind.get("rbe")
            a["rbe_rule"] = kind.get("rbe_rule")
        a["rbe_text"] = rbe_words(kind)   # the RBE in words, as in every other output
        out.append(a)
    return out


def _has_dicom_reference(prep: Prepared) -> bool:
    return prep.reference_image is not None and bool(prep.reference_image.meta.get("dicom"))


def _maps_results(prep: Prepared, analysis: Analysis) -> dict:
    """results.json ``maps`` and every structure's ``check_on_file`` (issue 17; docs/outputs.md)."""
    dicom = _has_dicom_reference(prep)
    maps, which = check_maps(prep.courses, prep.structures, prep.protocol)
    analysis.check_maps = maps

    def files(stem):
        return {"nrrd": f"{stem}.nrrd", "dicom": f"{stem}.dcm" if dicom else None}

    for s in analysis.structures:
        w = which.get(s.name)
        if w is None:
            continue
        cm = next(m for m in maps if m.stem == w["map"])
        s.check_on_file = dict(files(w["map"]), alpha_beta=cm.alpha_beta, recovery_credit=dict(cm.credits),
                               values="metrics.cumulative",
                               undiscounted=files(w["undiscounted_map"]) if w["undiscounted_map"] else None)
    return {"display": dict(files("cumulative_eqd2"), rule=MAP_RULE, use="viewing; per voxel conservative; organ "
                            "DVHs on it differ from the table at organ edges (read organs on their check map)"),
            "check": [dict(files(m.stem), alpha_beta=m.alpha_beta, recovery_credit=dict(m.credits),
                           credited=m.credited, structures=list(m.structures), organs=list(m.organs),
                           description=m.description()) for m in maps]}


def _registration_results(prep: Prepared) -> dict:
    from .registration import qa_dict
    out = {}
    for name, o in prep.registrations.items():
        out[name] = qa_dict(o)
        if o.method != "identity":
            out[name]["transform_file"] = f"transform_{name}.tfm"
        if o.moving_image is not None and prep.reference_image is not None:
            out[name]["registered_prior_ct"] = f"prior_ct_{name}_registered.nrrd"
    return out


def write_outputs(prep: Prepared, analysis: Analysis, results: Results, out_dir: Path, overwrite: bool,
                  progress: Progress | None = None, planning=None, dicom_courses: bool = False,
                  extra_outputs: Sequence[ExtraOutput] = (), robustness=None, figures=None) -> dict[str, str]:
    """Write every output into a staging folder, then move it into ``out_dir``; results.json goes last.

    ``planning`` (a :class:`.planning.Planning`, optional) adds margins, violation, headroom and remaining-dose files.
    ``extra_outputs``: writers called with (staging folder, prep, analysis, results, planning, progress) that write
    their files into the staging folder and return {file name: description}; the caller at the edge passes e.g.
    the Slicer scene writer (``mrml_scene.scene_output``), so this module never imports the MRML layer. A writer
    with a ``start`` method (same arguments) is started before anything is written and finished after the report
    (it returns a callable that waits and returns the {file name: description}): ``mrml_scene.SceneInChildProcess``.
    ``figures``: a ``report.FiguresInChildProcess`` started by the caller: it is given the report's figures to draw
    first, so that they are drawn while the volumes are written (else the report draws them itself).
    """
    say = progress or (lambda m: None)
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    started = []
    try:
        # what runs beside the writing is started first (2 cores): an extra output with a ``start`` (the Slicer
        # scene in a child process: start returns a callable that waits for it and returns its {file name:
        # description}), then the report's figures
        started = [writer.start(stage, prep, analysis, results, planning, progress)
                   if callable(getattr(writer, "start", None)) else None for writer in extra_outputs]
        pending_figures = None
        if figures is not None:
            say("preparing the report's figures (drawn in the figure process beside the next stages)")
            pending_figures = figures.start(results, analysis, prep, planning, progress)
        files = _write_files(prep, analysis, stage, say, planning, dicom_courses, robustness)
        say("writing report")
        from .report import write_report  # matplotlib is imported only when a report is written
        files.update(write_report(results, stage, analysis=analysis, prepared=prep, planning=planning,
                                  figures=pending_figures))
        for writer, finish in zip(extra_outputs, started):
            files.update(finish() if finish is not None else writer(stage, prep, analysis, results, planning, progress))
        started = []
        results.outputs = files
        timings = getattr(progress, "timings", None)   # a timing.StageClock: each stage's wall time (s)
        if callable(timings):
            results.timings = timings()
        (stage / "results.json").write_text(json.dumps(results.to_dict(), indent=2), encoding="utf-8")
        for name in list(files) + ["results.json"]:
            os.replace(stage / name, out_dir / name)
    except BaseException:
        for finish in started:  # let a started writer end before its staging folder is removed
            if finish is not None:
                try:
                    finish()
                except Exception:  # noqa: BLE001 - the first error is the one to raise
                    log.debug("extra output failed after an earlier error", exc_info=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return files


def _write_files(prep: Prepared, analysis: Analysis, stage: Path, say, planning, dicom_courses: bool,
                 robustness) -> dict[str, str]:
    """The volumes, check maps, registration files, worst-case, planning and DICOM outputs (not the report, not
    results.json) into ``stage``; returns {file name: description}."""
    say("writing volumes")
    g = prep.grid
    files = {}

    def vol(name, arr, desc):
        write_volume(Volume(arr.astype(np.float32, copy=False), g, name), stage / name, description=desc,
                     units="Gy" if "alpha_beta" not in name else "Gy (alpha/beta)")
        files[name] = desc
    from .dicom_rt import rbe_words
    rbe_all = _rbe_all(prep)
    vol("cumulative_eqd2.nrrd", analysis.cumulative,
        f"Cumulative EQD2 (Gy) for viewing, recovery credit applied; {MAP_RULE}; {rbe_all}")
    _write_check_maps(prep, analysis, stage, files, say)
    for c in prep.courses:
        vol(f"eqd2_{c.name}.nrrd", analysis.course_eqd2[c.name],
            f"EQD2 (Gy) of course {c.name}, {_fractions_words(c)}, no recovery credit, "
            f"{rbe_words(prep.dose_kinds.get(c.name))}; per voxel the largest over the alpha/beta of the organs "
            "covering it")
    vol("alpha_beta.nrrd", analysis.alpha_beta, "alpha/beta (Gy) that gave each voxel's cumulative_eqd2 value "
        "(the covering organ with the largest cumulative EQD2; protocol default outside organs)")
    if prep.registrations:
        say("writing registration transforms and registered prior CTs")
        from .registration import registered_image, write_transform
        for name, o in prep.registrations.items():
            if o.method != "identity":
                write_transform(o, stage / f"transform_{name}.tfm")
                files[f"transform_{name}.tfm"] = (f"ITK transform of course {name} ({o.method}): maps reference-"
                                                  "image points (LPS mm) to the prior course's frame")
            if o.moving_image is not None and prep.reference_image is not None:
                fname = f"prior_ct_{name}_registered.nrrd"
                write_volume(registered_image(o, prep.reference_image.grid), stage / fname,
                             description=f"CT of course {name} mapped onto the reference CT ({o.method})")
                files[fname] = f"CT of course {name} on the reference CT grid through its registration (HU)"
    if robustness is not None:
        say("writing the worst-case map and its violation regions")
        from .robustness import write as write_robustness
        write_robustness(robustness, g, stage, files)
    if planning is not None:
        say("writing margins, violation, headroom and remaining-dose maps")
        from .planning import write as write_planning
        write_planning(planning, g, stage, files)
    if prep.reference_image is not None and prep.reference_image.meta.get("dicom"):
        say("writing DICOM RTDOSE")
        from .dicom_export import write_eqd2_rtdose
        files.update(write_eqd2_rtdose(prep, analysis, stage, per_course=dicom_courses))
    return files


def _write_check_maps(prep: Prepared, analysis: Analysis, stage: Path, files: dict, say) -> None:
    """The check maps (one α/β over the whole grid each), computed one at a time (one float32 grid in memory),
    written as NRRD and, with a DICOM reference CT, as RTDOSE."""
    maps = getattr(analysis, "check_maps", None)
    if maps is None:
        maps, _ = check_maps(prep.courses, prep.structures, prep.protocol)
    dicom = _has_dicom_reference(prep)
    for n, m in enumerate(maps):
        say(f"writing check map {m.stem}")
        arr = m.compute(prep.courses)
        write_volume(Volume(arr, prep.grid, m.stem), stage / f"{m.stem}.nrrd", description=m.description()
                     + "; " + _rbe_all(prep), units="Gy")
        files[f"{m.stem}.nrrd"] = m.description()
        if dicom:
            from .dicom_export import write_check_rtdose
            name = write_check_rtdose(arr, prep, m, stage, series_number=910 + n)
            files[name] = m.description() + " (DICOM RTDOSE, DoseType EFFECTIVE)"
        del arr


def _rbe_all(prep: Prepared) -> str:
    """Every course's RBE in words (dicom_rt.rbe_words), for the descriptions of maps that sum the courses."""
    from .dicom_rt import course_rbe_words   # not dicom_export: that imports pydicom (0.3 s) for a sentence
    return course_rbe_words(prep)


def run_case(case_path: Path, out_dir: Path, overwrite: bool = False, progress: Progress | None = None,
             dicom_courses: bool = False, extra_outputs: Sequence[ExtraOutput] = (),
             protocol: str | None = None, figures=None) -> Results:
    """Load, compute and write a case. ``extra_outputs``: see :func:`write_outputs` (check that they can run
    before calling: nothing here knows what they need). ``protocol`` (a shipped name or an absolute path) replaces
    the case file's own protocol (``reirradiation-npc batch --protocol``: re-checking old cases against a new
    protocol). ``figures``: see :func:`write_outputs`."""
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir, overwrite)  # refuse early, before any work
    if overwrite and (out_dir / "results.json").exists():
        (out_dir / "results.json").unlink()  # a failing re-run must not leave an old results.json behind
    # records each stage's time for results.json (timings); a StageClock passed in (the demo's, which has timed
    # the case generation) keeps recording
    progress = progress if isinstance(progress, StageClock) else StageClock(progress)
    progress("reading the case file and hashing its inputs (provenance)")
    case = load_case(Path(case_path))
    if protocol is not None:
        case = dataclasses.replace(case, protocol=str(protocol))
    from . import provenance as _provenance
    prov = _provenance.compute(case, None, protocol_override=protocol is not None)  # inputs hashed before use
    prep = prepare(case, progress)
    prov["protocol"].update(_provenance.compute_protocol(prep.protocol.path))
    if dicom_courses and not (prep.reference_image is not None and prep.reference_image.meta.get("dicom")):
        raise InputError("each course's EQD2 as RTDOSE needs a DICOM CT series as reference.image",
                         source=str(case.path), field="--dicom-courses")
    analysis = compute(prep.grid, prep.courses, prep.structures, prep.protocol, progress)
    from . import planning as _planning
    plan = _planning.compute(prep, analysis, progress)
    results = build_results(prep, analysis)   # (needs neither the robustness scenarios nor the provenance)
    _planning.add_to_results(results, plan)
    if figures is not None:   # the slices and the 3D view are drawn beside the robustness scenarios
        progress("preparing the report's slices and 3D view (drawn in the figure process beside the next stages)")
        figures.start_early(results, analysis, prep, plan)
    from . import robustness as _robustness
    rob = _robustness.compute(prep, analysis, progress)
    results.provenance = prov
    _robustness.add_to_results(results, rob)
    from .risk_estimates import add_to_results as _add_risk
    _add_risk(results, prep, analysis)
    write_outputs(prep, analysis, results, out_dir, overwrite, progress, planning=plan,
                  dicom_courses=dicom_courses, extra_outputs=extra_outputs, robustness=rob, figures=figures)
    return results
