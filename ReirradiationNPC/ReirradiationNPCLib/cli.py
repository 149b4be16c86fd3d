"""The ``reirradiation-npc`` command line. Exit codes: 0 success, 2 bad input, 1 internal error; ``batch``: 3 when
some cases of the cohort failed (the others are complete)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import click

from . import SOFTWARE_NAME, __version__
from .errors import InputError

log = logging.getLogger("reirradiation_npc")


class _Progress:
    """Step list with timings on an interactive terminal (stderr); log lines otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = _interactive()
        self.t0 = self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        if self.enabled and self.tty:
            click.echo(f"  [{now - self.t0:6.1f} s] {step}", err=True)
        log.info("%s (%.2f s since start)", step, now - self.t0)
        self.last = now

    def finish(self) -> None:
        now = time.perf_counter()
        if self.enabled and self.tty:
            click.echo(f"  [{now - self.t0:6.1f} s] done", err=True)
        log.info("done in %.2f s", now - self.t0)


def _interactive() -> bool:
    """Progress lines only on an interactive terminal: never in logs, pipes or CI (``CI`` set)."""
    return sys.stderr.isatty() and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


_INTERRUPTED = [False]


def _on_ctrl_c(signum, frame):
    """Python's own Ctrl-C (KeyboardInterrupt), remembered: raised inside a callback of a C++ library (SimpleITK's
    registration iterations) it comes back wrapped in that library's own error."""
    _INTERRUPTED[0] = True
    raise KeyboardInterrupt


def _guard(fn, verbose: bool):
    import signal
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        _INTERRUPTED[0] = False
        signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        return fn()
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if _INTERRUPTED[0]:       # Ctrl-C during a C++ callback (e.g. the registration): an interruption, not a bug
            click.echo("interrupted", err=True)
            sys.exit(1)
        if verbose:
            raise
        click.echo(f"internal error: {type(exc).__name__}: {exc} (run with --verbose for details)", err=True)
        sys.exit(1)
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _scope_text(c) -> str:
    if c.scope == "per_course":
        return f"per_course:{c.course}"
    return c.scope


def format_constraints(results) -> str:
    """The constraint table. Cumulative rows show both sums (undiscounted, credited) and the basis judged."""
    rows = [("status", "organ", "structure", "metric", "scope", "basis", "value", "undiscounted", "credited",
             "worst case", "limit", "margin", "conditions", "verified", "source")]
    for c in results.constraints:
        def f(v, unit=""):
            return "-" if v is None else f"{v:.2f}{unit}"
        cum = c.scope == "cumulative"
        conds = c.conditions or []
        cond = "-" if not conds else ("met" if all(x["met"] for x in conds) else
                                      "NOT MET: " + ", ".join(x["condition"] for x in conds if not x["met"]))
        rows.append((c.status.upper() if c.status in ("fail", "warn", "condition_not_met") else c.status, c.organ,
                     c.structure or "-", c.metric, _scope_text(c), c.basis or "-", f(c.value, " " + c.unit),
                     f(c.value_undiscounted) if cum else "-", f(c.value_credited) if cum else "-", _worst_cell(c),
                     f(c.limit, " " + c.unit), f(c.margin), (cond[:60] + "...") if len(cond) > 63 else cond,
                     "yes" if c.verified else "NO", (c.source[:48] + "...") if len(c.source) > 51 else c.source))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict_lines(summary: dict) -> list[str]:
    """The closing lines of a run: what was not judged, what is outside its conditions, then the verdict."""
    from .verdict import verdict_line
    out = []
    for key, title in (("limits_exceeded", "limits exceeded"), ("conditions_not_met", "conditions not met"),
                       ("near_limit", "within tolerance of the limit (WARN)"),
                       ("target_criteria_not_met", "target coverage criteria not met"),
                       ("incomplete_because", "incomplete because")):
        items = summary.get(key) or []
        if items:
            out.append(f"{title} ({len(items)}):")
            out += [f"  - {x}" for x in items]
    out.append(f"verdict: {verdict_line(summary)}")
    if summary.get("verdict_code"):
        out.append(f"verdict_code: {summary['verdict_code']}")
    return out


def _worst_cell(c) -> str:
    """CLI worst-case column: the row's value in its worst robustness scenario and its status there."""
    rb = getattr(c, "robustness", None)
    if not rb or rb.get("worst_value") is None:
        return "-"
    st = rb.get("status_worst", "")
    return f"{rb['worst_value']:.2f} {c.unit} ({st.upper() if st in ('fail', 'warn') else st})"


def _robust_line(results) -> str | None:
    rs = (results.summary or {}).get("robustness") or {}
    if not rs:
        return None
    if rs.get("status") == "not_evaluated":
        return f"robustness: not evaluated ({rs.get('reason', '')})"
    return f"robustness: {rs.get('status')} - {rs.get('text')}"


def print_summary(results, out_dir: Path) -> None:
    click.echo(f"{SOFTWARE_NAME} {__version__} - protocol: {results.protocol['name']} "
               f"(version {results.protocol['version']})")
    for c in results.assumptions["courses"]:
        rec = ", ".join(f"{k} {100 * v:g}%" for k, v in c["recovery_applied"].items() if v > 0) or "none"
        when = "current course" if c["is_current"] else f"{c['interval_months']:g} months before, recovery credit: {rec}"
        fx = c["fractions"] if not c.get("fraction_groups") else \
            "+".join(str(g["fractions"]) for g in c["fraction_groups"]) + f" = {c['fractions']}"
        rbe = f", {c['rbe_text']}" if c.get("rbe_text") else ""
        click.echo(f"  course {c['name']}: {fx} fractions{rbe}, {when}")
    rec = results.assumptions.get("recovery", {})
    if rec.get("model") not in (None, "none"):
        click.echo(f"  recovery: {rec.get('description')} - source: {rec.get('source') or 'none given'}")
    click.echo("")
    click.echo(format_constraints(results))
    click.echo("")
    if results.unmatched_structures:
        click.echo(f"unmatched structures (no protocol alias): {', '.join(results.unmatched_structures)}")
    for w in results.warnings:
        click.echo(f"warning: {w}")
    from .report_workflow import cli_lines  # issue 16: prescription checks, patient selection (information only)
    for line in cli_lines(results):
        click.echo(line)
    counts = results.summary.get("counts", {})
    if counts:
        click.echo("constraints: " + ", ".join(f"{n} {k.upper() if k in ('fail', 'warn') else k}"
                                               for k, n in counts.items()))
    robust = _robust_line(results)
    if robust:
        click.echo(robust)
    click.echo(f"outputs: {out_dir}")
    for line in verdict_lines(results.summary):
        click.echo(line)
    click.echo("This tool supports a decision; the treating clinician decides.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reirradiation-npc")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the final summary.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging; tracebacks for internal errors.")
@click.pass_context
def main(ctx, quiet, verbose):
    """Cumulative EQD2 for re-irradiation of recurrent nasopharyngeal carcinoma."""
    _setup_logging(quiet, verbose)
    ctx.obj = {"quiet": quiet, "verbose": verbose}


class _FiguresBesideTheRun:
    """The report's figures drawn in child processes beside the run (``report.FiguresInChildProcess``), started
    before the run so that matplotlib is imported beside it (after the engine's own imports, which the figure
    process then shares): on Linux only
    (``child_process.available``), and not with ``REIRRADIATION_NPC_NO_FORK`` set. A context manager: the figure
    process is ended on the way out whatever happened. A failed fork (OSError, e.g. ENOMEM or EAGAIN) is one
    logged line: the figures are then drawn in this process, as with ``REIRRADIATION_NPC_NO_FORK``."""

    def __enter__(self):
        from .child_process import available
        self.figures = None
        if available() and not os.environ.get("REIRRADIATION_NPC_NO_FORK"):
            from .report import FiguresInChildProcess
            try:
                self.figures = FiguresInChildProcess()
            except OSError as exc:
                log.warning("the report's figure process could not be started (%s: %s); the figures are drawn in "
                            "this process", type(exc).__name__, exc)
        return self.figures

    def __exit__(self, *exc):
        if self.figures is not None:
            self.figures.close()
        return False


def _scene_outputs(scene: bool) -> list:
    """The Slicer scene writer as an extra output of the run (called here, at the edge: the pipeline never imports
    the MRML layer). A missing slicer-core is reported before any work."""
    if not scene:
        return []
    from .mrml_scene import SceneInChildProcess, can_write_in_child_process, check_available, scene_output
    check_available()
    # on Linux the scene is built in a child process beside the report (the two overlap on 2 cores; issue 15)
    return [SceneInChildProcess() if can_write_in_child_process() else scene_output]


@main.command()
@click.argument("case", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace outputs in a non-empty output directory.")
@click.option("--scene", is_flag=True, help="Also write scene.mrb, a 3D Slicer scene bundle for review "
                                            "(needs the optional slicer-core package: pip install '.[slicer]').")
@click.option("--dicom-courses", is_flag=True, help="Also write each course's EQD2 as an RTDOSE (eqd2_<course>.dcm) "
                                                    "when the reference image is a DICOM CT series.")
@click.pass_context
def run(ctx, case, output, overwrite, scene, dicom_courses):
    """Run the analysis described by the CASE file (YAML or JSON)."""
    from .pipeline import run_case  # before the fork: the figure process shares the engine's imports (numpy, ...)
    prog = _Progress(not ctx.obj["quiet"])
    with _FiguresBesideTheRun() as figures:
        results = _guard(lambda: run_case(case, output, overwrite=overwrite, progress=prog,
                                          dicom_courses=dicom_courses, extra_outputs=_scene_outputs(scene),
                                          figures=figures),
                         ctx.obj["verbose"])
    prog.finish()
    print_summary(results, output)


@main.command()
@click.argument("cases", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="CASE_OR_FOLDER...")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Cohort folder: DIR/<case>/ per case (as run writes it), cohort.csv/.parquet, cohort.html.")
@click.option("--protocol", "protocol_override", default=None, metavar="NAME_OR_PATH",
              help="Evaluate every case against this protocol instead of each case file's own.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Address of a running Dask scheduler (e.g. tcp://10.0.0.5:8786); default: a local cluster.")
@click.option("--workers", type=int, default=None,
              help="Worker processes of the local cluster (default: the CPU count, at most one per case).")
@click.option("--scene", is_flag=True, help="Also write scene.mrb for each case (needs slicer-core).")
@click.option("--resume", is_flag=True, help="Keep every case whose inputs, protocol and software are unchanged "
                                             "(hashes in its results.json); compute the others.")
@click.option("--overwrite", is_flag=True, help="Recompute every case into a non-empty cohort folder.")
@click.pass_context
def batch(ctx, cases, output, protocol_override, scheduler, workers, scene, resume, overwrite):
    """Run a cohort of cases on Dask (one task per case); see docs/cohort.md.

    CASE_OR_FOLDER: case files, case folders (holding case.yaml) or folders of case folders. Exit codes: 0 every
    case complete, 3 some case(s) failed (listed; the others are complete), 2 bad input (nothing run), 1 internal
    error.
    """
    from .batch import run_batch

    quiet = ctx.obj["quiet"]
    res = _guard(lambda: run_batch(cases, output, protocol=protocol_override, scheduler=scheduler, workers=workers,
                                   scene=scene, resume=resume, overwrite=overwrite,
                                   progress=not quiet and _interactive(),
                                   echo=lambda text, nl=True: click.echo(text, err=True, nl=nl)),
                 ctx.obj["verbose"])
    n_res = sum(1 for o in res.outcomes if o.state == "resumed")
    n_comp = sum(1 for o in res.outcomes if o.state == "computed")
    for w in res.warnings:
        click.echo(f"warning: {w}")
    for o in res.outcomes:
        if o.state == "failed":
            click.echo(f"FAILED {o.item.name}: {o.error}")
    click.echo(f"cohort: {len(res.outcomes)} case(s): {n_comp} computed, {n_res} unchanged (resume), "
               f"{len(res.failed)} failed - {res.elapsed_s:.1f} s"
               + (f" on {res.n_workers} Dask worker(s)" if res.n_workers else ""))
    click.echo(f"tables: {output / 'cohort.csv'}, {output / 'cohort_summary.csv'}; figures: {output / 'cohort.html'}")
    if res.failed:
        click.echo(f"exit code 3: {len(res.failed)} case(s) failed (see cohort_summary.csv)")
    sys.exit(res.exit_code)


@main.command()
@click.option("--output", "-o", default=Path("reirradiation-npc-demo"), show_default=True,
              type=click.Path(path_type=Path), help="Folder for the synthetic case (case/) and results (results/).")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo in that folder.")
@click.option("--dicom", is_flag=True, help="Generate the synthetic case as DICOM RT (CT, RTPLAN, RTDOSE, RTSTRUCT, "
                                            "REG) and run it through the DICOM path.")
@click.pass_context
def demo(ctx, output, overwrite, dicom):
    """Generate the synthetic NPC case and run it (no data needed)."""
    from . import pipeline  # noqa: F401 - before the fork: the figure process shares the engine's imports
    with _FiguresBesideTheRun() as figures:
        _demo(ctx, output, overwrite, dicom, figures)


def _demo(ctx, output, overwrite, dicom, figures):
    from .io import ensure_writable_dir
    from .pipeline import run_case
    from .synthetic import generate
    from .timing import StageClock

    prog = _Progress(not ctx.obj["quiet"])
    clock = StageClock(prog)  # results.json timings: the case generation too

    def go():
        ensure_writable_dir(output, overwrite)
        clock("generating the synthetic NPC case")
        if dicom:
            from .synthetic_dicom import generate_dicom
            case_path = generate_dicom(output / "case")
        else:
            case_path = generate(output / "case")
        return run_case(case_path, output / "results", overwrite=True, progress=clock, extra_outputs=writers,
                        figures=figures)

    from .mrml_headless import unavailable_reason
    from .mrml_scene import SceneInChildProcess, can_write_in_child_process
    # the demo writes scene.mrb whenever slicer-core is installed; on Linux the child process that builds the scene
    # beside the report imports it (and says so if it cannot), so the demo does not wait for that import
    child = can_write_in_child_process()
    no_scene = unavailable_reason(import_check=not child)
    # on Linux the scene's child process is forked now, to import slicer-core beside the case generation and
    # the registration (the demo's parent never imports it)
    writers = [] if no_scene else ([SceneInChildProcess(early=True)] if child else _scene_outputs(True))
    try:
        results = _guard(go, ctx.obj["verbose"])
    finally:
        for w in writers:
            close = getattr(w, "close", None)
            if callable(close):
                close()
    prog.finish()
    click.echo("SYNTHETIC DEMO - not a patient, not for clinical use.")
    no_scene = no_scene or next((w.unavailable for w in writers if getattr(w, "unavailable", None)), None)
    if no_scene:
        click.echo(f"scene.mrb not written: {no_scene}")
    print_summary(results, output / "results")


@main.group()
def protocol():
    """Inspect protocol files."""


@protocol.command("show")
@click.argument("name_or_path", required=False)
@click.pass_context
def protocol_show(ctx, name_or_path):
    """Show a protocol (shipped name or file path); without argument, list the shipped protocols."""
    from .protocol import load_protocol, shipped_protocols

    def go():
        if not name_or_path:
            click.echo("shipped protocols:")
            for n in shipped_protocols():
                p = load_protocol(n)
                click.echo(f"  {n}: {p.name} (version {p.version})")
            return
        p = load_protocol(name_or_path, base=Path.cwd())
        click.echo(f"{p.name} - version {p.version}{' - SYNTHETIC' if p.synthetic else ''}")
        click.echo(f"file: {p.path}")
        if p.description:
            click.echo(p.description)
        click.echo(f"default alpha/beta: {p.default_alpha_beta:g} Gy ({p.default_alpha_beta_source})")
        click.echo(f"recovery: {p.recovery.describe()}" + (f" - source: {p.recovery.source}" if p.recovery.source else ""))
        click.echo("")
        rows = [("organ", "role", "a/b Gy", "metric", "scope", "limit", "verified", "source")]
        for o in p.organs.values():
            if not o.constraints:
                rows.append((o.key, o.role, f"{o.alpha_beta:g}", "-", "-", "-", "-", "-"))
            for c in o.constraints:
                lim = "no limit" if c.limit is None else f"{c.limit:g} {c.unit}"
                scope = f"{c.scope} ({c.basis})" if c.basis else c.scope
                if c.conditions:
                    lim += f" if {c.conditions.describe(c.metric.name)}"
                rows.append((o.key, o.role, f"{o.alpha_beta:g}", c.metric.name, scope, lim,
                             "yes" if c.verified else "NO", c.source))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1])
        for label, block in (("margins", p.margins), ("prescription", p.prescription),
                             ("re-irradiation type", p.reirradiation_type)):
            if block is not None:
                click.echo(f"{label}: {block.describe()} - verified: {'yes' if block.verified else 'NO'} - "
                           f"source: {block.source}")

    _guard(go, ctx.obj["verbose"])


@protocol.command("template")
@click.option("--from", "from_", default="npc-reirradiation", show_default=True,
              help="Shipped protocol name or protocol file whose organs and rows the template lists.")
@click.pass_context
def protocol_template(ctx, from_):
    """Write a protocol template to stdout: every organ and row with empty limit, basis, source and verified
    fields and comments saying what to transcribe (reirradiation-npc protocol template > my-centre.yaml)."""
    from .protocol_tools import template_text
    click.echo(_guard(lambda: template_text(from_, base=Path.cwd()), ctx.obj["verbose"]), nl=False)


@protocol.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@click.pass_context
def protocol_validate(ctx, file):
    """Check a protocol file and print its provenance summary. Exit 2 (one line) for a schema error, a limit
    without a source, a cumulative limit without a recovery basis or a recovery credit without a source."""
    from .protocol_tools import format_validation, validate, validation_error

    def go():
        report = validate(str(file), base=Path.cwd())
        err = validation_error(report)
        if err is not None:
            raise err
        return report

    click.echo(format_validation(_guard(go, ctx.obj["verbose"])))


@protocol.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
@click.pass_context
def protocol_diff(ctx, a, b, as_json):
    """Rows added, removed and changed (limit, basis, conditions, source, verified) from protocol A to B (shipped
    names or files), with changed organ alpha/beta and protocol blocks."""
    import json as _json

    from .protocol_tools import diff, format_diff
    d = _guard(lambda: diff(a, b, base=Path.cwd()), ctx.obj["verbose"])
    click.echo(_json.dumps(d, indent=2, default=list) if as_json else format_diff(d))


@main.command()
@click.option("--dose", "dose_path", required=True, type=click.Path(path_type=Path),
              help="Dose file (physical Gy): NRRD/NIfTI or DICOM RTDOSE.")
@click.option("--structures", "structures_path", required=True, type=click.Path(path_type=Path),
              help="Folder of masks, Slicer .seg.nrrd, one mask file or a DICOM RTSTRUCT.")
@click.option("--fractions", type=int, default=None, help="Number of fractions (with --alpha-beta: report EQD2).")
@click.option("--alpha-beta", "alpha_beta", type=float, default=None,
              help="alpha/beta in Gy (with --fractions: report EQD2).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="RTPLAN of an RTDOSE (needed for DoseSummationType FRACTION / FRACTION_SESSION: the fraction "
                   "group's fractions; --fractions must agree).")
@click.option("--metric", "extra", multiple=True,
              help="Add a metric to the default set (repeatable), e.g. D0.1cc, D50%, V30Gy, V30Gy%.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Write FILE.json or FILE.csv (otherwise a table on stdout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.pass_context
def metrics(ctx, dose_path, structures_path, fractions, alpha_beta, extra, output, overwrite, plan_path):
    """Dose metrics of structures on one dose (sub-voxel sampling).

    Default set: volume, Dmax, Dmin, Dmean, D0.03cc, D2cc, D95%, D5%. Doses in Gy (EQD2 when --fractions and
    --alpha-beta are given), V<x>Gy in cc.
    """
    from . import structure_metrics as sm
    from .dicom_rt import load_dose_any, read_rtplan

    def go():
        sm.check_fractionation(fractions, alpha_beta)
        names = sm.metric_names(extra)
        fmt = sm.check_output(output, overwrite) if output is not None else None
        plan = read_rtplan(plan_path, "--plan") if plan_path is not None else None
        dose = load_dose_any(dose_path, "--dose", fractions=fractions, plan=plan)
        warnings: list[str] = []
        chk = dose.meta.get("header_check")
        if chk is not None and not chk.whole_course:  # one fraction group of several: not the course
            warnings.append(f"{dose_path.name} is fraction group {chk.fraction_group} of a plan with "
                            f"{chk.plan_fraction_groups} fraction groups: these metrics are of that group alone "
                            f"({chk.fractions} fractions), not of the course (a case file with one RTDOSE per group "
                            "gives the course: reirradiation-npc run)")
        structures = sm.load_structures(structures_path, dose.grid, warnings)
        result = sm.compute(dose, structures, names, fractions, alpha_beta)
        result["warnings"] = warnings + result["warnings"]
        if output is not None:
            text = sm.to_json(result) if fmt == "json" else sm.to_csv(result, names)
            sm.write_text_atomic(output, text)
        return result, names

    result, names = _guard(go, ctx.obj["verbose"])
    for w in result["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if output is None:
        click.echo(sm_table(result, names))
    else:
        click.echo(f"{len(result['structures'])} structure(s), {result['quantity']}: wrote {output}")


def sm_table(result, names) -> str:
    from .structure_metrics import format_table
    return format_table(result, names)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--write-case", "write_case", type=click.Path(path_type=Path), default=None,
              help="Write an editable case-file skeleton here (never overwrites an existing file).")
@click.pass_context
def scan(ctx, folder, write_case):
    """List the patients, studies, CT series, plans, doses, structure sets and registrations under FOLDER."""
    from .dicom_scan import format_scan, scan as scan_folder, write_case_skeleton

    def go():
        if write_case is not None and Path(write_case).exists():
            raise InputError("exists already (it is never overwritten)", source=str(write_case), field="--write-case")
        res = scan_folder(folder)
        click.echo(format_scan(res))
        if write_case is not None:
            click.echo(f"case skeleton written: {write_case_skeleton(res, write_case)} (edit it before running)")

    _guard(go, ctx.obj["verbose"])


def _check_port(host: str, port: int) -> None:
    """InputError when ``host``:``port`` cannot be listened on (in use, or not an address of this machine). The
    same socket options as the servers (address reuse), so a port only in TIME_WAIT passes."""
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"cannot listen on {host}:{port} ({reason}); give another --port or --host",
                         field="--port") from None


@main.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--port", type=int, default=8080, show_default=True, help="TCP port of the review server.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind (127.0.0.1: this machine only; 0.0.0.0 opens it to the network).")
@click.option("--per-viewer", is_flag=True,
              help="Give each browser its own review server (its own camera, slices and selection; about 20 s "
                   "and 0.8 GB per viewer). Without it every browser shares one set of views.")
@click.option("--max-viewers", type=click.IntRange(1, 32), default=4, show_default=True,
              help="With --per-viewer: how many viewers' servers may run at once.")
@click.option("--idle-stop", type=click.IntRange(min=0), default=None, metavar="SECONDS",
              help="Stop the server when no browser has been connected for this many seconds (0: never). "
                   "Default: never; with --per-viewer, each viewer's server after 120 s (its slot is then free).")
@click.pass_context
def review(ctx, results_dir, port, host, per_viewer, max_viewers, idle_stop):
    """Serve a run's results (scene.mrb, else NRRD outputs and results.json) in the browser, read-only
    (needs the 'review' extra: trame-slicer). Ctrl-C stops."""
    from .review_results import load_run

    def go():
        load_run(results_dir)  # a clear message for a folder that is not a run's output, before any heavy import
        _check_port(host, port)  # a port in use: one line now, not an internal error after the scene has loaded
        try:
            from .mrml_web_review import check_available, serve
        except ImportError as exc:
            raise InputError(f"review needs the 'review' extra ({exc}); install it with "
                             'pip install "reirradiation-npc[review]"', field="review") from None
        check_available()
        if per_viewer:
            from .review_launcher import VIEWER_IDLE_STOP_S, serve_per_viewer
            serve_per_viewer(results_dir, port=port, host=host, max_viewers=max_viewers, echo=click.echo,
                             idle_stop_s=VIEWER_IDLE_STOP_S if idle_stop is None else idle_stop)
            return
        serve(results_dir, port=port, host=host, echo=click.echo, idle_stop_s=idle_stop or 0)

    _guard(go, ctx.obj["verbose"])


if __name__ == "__main__":  # pragma: no cover
    main()
