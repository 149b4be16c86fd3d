"""Cohort runs on Dask: many cases, one table, resumable (``reirradiation-npc batch``; docs/cohort.md).

One Dask task per case: the task calls :func:`.pipeline.run_case` (the same function ``run`` calls: registration,
analysis, every output) and writes the case's outputs into ``DIR/<case name>/`` exactly as ``run`` does. A task
returns a few numbers and one line of error text, never arrays; the cohort tables are then built from the per-case
``results.json`` files (:mod:`.cohort_tables`).

- Cluster: a ``LocalCluster`` (one worker process per case at a time, ``threads_per_worker=1``) by default, or any
  running Dask scheduler by address (``--scheduler tcp://host:8786``). Never a home-made process pool.
- A worker process runs one case at a time (a process-wide lock in :func:`run_one`): the engine draws its report
  with matplotlib's pyplot, which is not thread-safe, and one case at a time bounds a worker's memory.
- A bad case never stops the cohort: its one-line error goes to the summary table; the exit code says that some
  cases failed (:data:`EXIT_SOME_FAILED`).
- ``--resume``: a case whose stored ``results.json`` ``provenance`` (input file hashes, protocol hash, software
  version and engine hash: :mod:`.provenance`) matches what the run would use is not recomputed.

Dask is an optional dependency (``pip install 'reirradiation-npc[cohort]'``); it is imported only here, lazily.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)

#: Exit code of ``batch`` when at least one case failed (every other case is complete). 0: all complete;
#: 2: bad command input (nothing run); 1: internal error of the batch itself.
EXIT_SOME_FAILED = 3
CASE_FILE_NAMES = ("case.yaml", "case.yml", "case.json")
COHORT_FILES = ("cohort.csv", "cohort.parquet", "cohort_summary.csv", "cohort_summary.parquet", "cohort.html",
                "cohort_errors.txt", ".cohort-resume.json")
EXTRA_HINT = "pip install 'reirradiation-npc[cohort]'"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_ONE_CASE = threading.Lock()  # one case at a time in a worker process (see module docstring)


# ------------------------------------------------------------------------------------------------ discovery

@dataclass
class CaseItem:
    """One case of the cohort: its output folder name and case file (None when a folder holds no case file)."""

    name: str
    case_file: Path | None
    error: str | None = None        # discovery error (no case file): the case is reported failed, not run


def _looks_like_case(path: Path) -> bool:
    """A YAML/JSON file whose top level has ``reference`` and ``courses`` (a protocol file has neither)."""
    if path.suffix.lower() not in (".yaml", ".yml", ".json") or path.stat().st_size > 1_000_000:
        return False
    try:
        import yaml
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - not parseable: not recognisable as a case file
        return False
    return isinstance(data, dict) and "courses" in data and "reference" in data


def _own_case_file(folder: Path) -> Path | None:
    for n in CASE_FILE_NAMES:
        if (folder / n).is_file():
            return folder / n
    return None


def _inside(path: Path, other: Path) -> bool:
    try:
        path.resolve().relative_to(other.resolve())
        return True
    except ValueError:
        return False


def discover(args, output: Path) -> list[CaseItem]:
    """The cases named on the command line, in a stable order.

    Each argument is a case file, a case folder (holding ``case.yaml``/``case.yml``/``case.json``), or a cohort
    folder: then its loose case files (YAML/JSON with ``reference`` and ``courses``) and each subfolder are cases;
    a subfolder with ``case.yaml`` (or exactly one case file) is a case, one with none is reported as a failed case
    ("no case file"). The output folder is never searched. A case is named after its folder when its file is
    ``case.yaml`` (else after the file's stem); names are made file-system safe and unique (``-2``, ``-3``...).
    """
    output = Path(output)
    found: list[tuple[str, Path | None, str | None]] = []
    seen: set[Path] = set()

    def add(case_file: Path | None, folder: Path | None = None, error: str | None = None):
        if case_file is not None:
            key = case_file.resolve()
            if key in seen:
                return
            seen.add(key)
            base = case_file.parent.name if case_file.name in CASE_FILE_NAMES else case_file.stem
        else:
            base = folder.name
        found.append((base, case_file, error))

    for a in args:
        a = Path(a)
        if a.is_file():
            add(a)
            continue
        if not a.is_dir():
            raise InputError("not found (a case file or a folder of cases is expected)", source=str(a))
        if _inside(a, output):
            raise InputError("is the output folder (or inside it)", source=str(a))
        own = _own_case_file(a)
        if own is not None:
            add(own)
            continue
        n_before = len(found)
        for f in sorted(p for p in a.iterdir() if p.is_file()):
            if _looks_like_case(f):
                add(f)
        for sub in sorted(p for p in a.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _inside(output, sub) or _inside(sub, output):
                continue  # the output folder (or the folder holding it) is never a case
            own = _own_case_file(sub)
            if own is not None:
                add(own)
                continue
            loose = [f for f in sorted(sub.iterdir()) if f.is_file() and _looks_like_case(f)]
            if loose:
                for f in loose:
                    add(f)
            else:
                add(None, folder=sub, error=f"{sub}: no case file (expected {' / '.join(CASE_FILE_NAMES)})")
        if len(found) == n_before:
            raise InputError("holds no case file and no case folder", source=str(a))
    if not found:
        raise InputError("no case given", field="CASE_OR_FOLDER")
    items, used = [], {n.lower() for n in COHORT_FILES}
    for base, case_file, error in found:
        name = _SAFE.sub("_", base).strip("._") or "case"
        cand, k = name, 2
        while cand.lower() in used:
            cand, k = f"{name}-{k}", k + 1
        used.add(cand.lower())
        items.append(CaseItem(cand, case_file, error))
    return items


# ------------------------------------------------------------------------------------------------ resume

def resolve_protocol_override(name_or_path: str | None) -> str | None:
    """Check the cohort's protocol (loading it fully: a bad protocol stops the batch before any work) and return
    what the workers get: a shipped protocol's name, or an absolute file path."""
    if name_or_path is None:
        return None
    from .protocol import load_protocol, resolve_protocol
    path = resolve_protocol(name_or_path, base=Path.cwd())
    load_protocol(str(path))
    as_path = Path(name_or_path)
    if as_path.suffix.lower() in (".yaml", ".yml", ".json") or as_path.exists():
        return str(path.resolve())
    return str(name_or_path)


def expected_provenance(case_file: Path, protocol: str | None) -> dict:
    """The provenance a run of ``case_file`` would record now (raises InputError when the case cannot load)."""
    import dataclasses

    from . import provenance
    from .case import load_case
    from .protocol import resolve_protocol
    case = load_case(Path(case_file))
    if protocol is not None:
        case = dataclasses.replace(case, protocol=protocol)
    path = resolve_protocol(case.protocol, base=case.path.parent)
    return provenance.compute(case, path, protocol_override=protocol is not None)


RESUME_STATE = ".cohort-resume.json"


def failure_key(item: CaseItem, protocol: str | None) -> str | None:
    """A hash of everything a bad-input failure depends on: the provenance the run would record (inputs, protocol,
    engine), or, when the case file itself cannot be loaded, its bytes and the engine hash."""
    import hashlib

    from . import provenance
    if item.case_file is None:
        return None
    try:
        prov = expected_provenance(item.case_file, protocol)
        text = json.dumps({k: prov[k] for k in ("inputs_sha256", "protocol", "software")}, sort_keys=True)
    except InputError:
        text = json.dumps({"case": provenance.path_sha256(item.case_file), "protocol": protocol,
                           "software": provenance.software()}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_resume_state(output: Path) -> dict:
    try:
        data = json.loads((Path(output) / RESUME_STATE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_resume_state(output: Path, outcomes: list[CaseOutcome], protocol: str | None) -> None:
    """Remember the cases that failed on bad input, with the hash of what they were run from (``--resume`` does not
    retry them while it is unchanged). Internal errors and lost tasks are always retried."""
    state = {}
    for o in outcomes:
        if o.state == "failed" and o.input_error:
            key = failure_key(o.item, protocol)
            if key is not None:
                state[o.item.name] = {"key": key, "error": o.error}
    path = Path(output) / RESUME_STATE
    if state:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"failed_on_input": state}, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    elif path.exists():
        path.unlink()


def up_to_date(item: CaseItem, out_dir: Path, protocol: str | None, scene: bool) -> tuple[bool, str]:
    """Whether the stored outputs of ``item`` in ``out_dir`` are complete and were computed from the same inputs,
    protocol and software; the reason when not."""
    from . import provenance
    res_file = Path(out_dir) / "results.json"
    if item.case_file is None:
        return False, "no case file"
    if not res_file.is_file():
        return False, "no results.json"
    try:
        res = json.loads(res_file.read_text(encoding="utf-8"))
        expected = expected_provenance(item.case_file, protocol)
    except (OSError, ValueError, InputError) as exc:
        return False, str(exc)
    why = provenance.differences(res.get("provenance"), expected)
    if why:
        return False, "; ".join(why)
    missing = [f for f in (res.get("outputs") or {}) if not (Path(out_dir) / f).exists()]
    if missing:
        return False, f"output {missing[0]} missing"
    if scene and "scene.mrb" not in (res.get("outputs") or {}):
        return False, "scene.mrb asked for and not written before"
    return True, "inputs, protocol and software unchanged"


# ------------------------------------------------------------------------------------------------ the task

def run_one(case_file: str, out_dir: str, protocol: str | None, scene: bool, overwrite: bool) -> dict:
    """The Dask task: run one case with :func:`.pipeline.run_case` into ``out_dir``.

    Returns a small dict (``ok``, ``error`` one line, ``seconds``, ``worker``, ``traceback`` for internal errors);
    never raises for a bad case, never returns arrays.
    """
    import socket
    with _ONE_CASE:
        t0 = time.perf_counter()
        out = {"ok": False, "error": None, "traceback": None, "worker": f"{socket.gethostname()}:{os.getpid()}"}
        try:
            from .pipeline import run_case
            extra = []
            if scene:  # the Slicer scene writer, passed in from the edge as `run --scene` does
                from .mrml_scene import check_available, scene_output
                check_available()
                extra = [scene_output]
            run_case(Path(case_file), Path(out_dir), overwrite=overwrite, protocol=protocol, extra_outputs=extra)
            out["ok"] = True
        except InputError as exc:
            out["error"] = str(exc)
            out["input_error"] = True
        except Exception as exc:  # noqa: BLE001 - a bad case never stops the cohort
            out["error"] = _one_line(f"internal error: {type(exc).__name__}: {exc}")
            out["traceback"] = traceback.format_exc()
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class CaseOutcome:
    item: CaseItem
    state: str                      # computed | resumed | failed
    error: str | None = None
    seconds: float | None = None    # this run's compute time (None when resumed or not run)
    worker: str | None = None
    traceback: str | None = None
    resume_reason: str | None = None
    input_error: bool = False       # failed on bad input (InputError): deterministic while the inputs are unchanged


@dataclass
class CohortResult:
    output: Path
    outcomes: list[CaseOutcome]
    files: dict = field(default_factory=dict)
    dashboard: str | None = None
    scheduler: str | None = None
    n_workers: int = 0
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.state == "failed"]

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0


def _import_dask():
    try:
        import distributed  # noqa: F401
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise InputError(f"batch runs on Dask, which is not installed ({exc}); install the cohort extra: "
                         f"{EXTRA_HINT}", field="batch") from None
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # quiet in logs: the scheduler's and nanny's INFO lines (start, connections, shutdown) are not ours
        logging.getLogger("distributed").setLevel(logging.ERROR)
    return Client, LocalCluster


def _engine_probe():
    """Run on every worker: can it import the engine, and which build is it?"""
    def probe():
        try:
            from ReirradiationNPCLib import __version__
            from ReirradiationNPCLib.provenance import engine_sha256
            return {"version": __version__, "engine_sha256": engine_sha256()}
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"}
    return probe


def _check_workers(client, warnings: list[str], timeout_s: float) -> int:
    from . import __version__, provenance
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except Exception:  # noqa: BLE001 - dask raises TimeoutError (builtin or its own) depending on version
        raise InputError(f"no Dask worker connected within {timeout_s:g} s (start one: dask worker ADDRESS "
                         "--nthreads 1)", field="--scheduler") from None
    engines = client.run(_engine_probe())
    for worker, info in sorted(engines.items()):
        if "error" in info:
            raise InputError(f"Dask worker {worker} cannot import the engine ({info['error']}); install "
                             f"reirradiation-npc in the workers' environment ({EXTRA_HINT})", field="--scheduler")
        if info.get("engine_sha256") != provenance.engine_sha256() or info.get("version") != __version__:
            warnings.append(f"Dask worker {worker} runs another engine build (version {info.get('version')}) than "
                            "this command; each case's results.json records the build that computed it")
    return len(engines)


class _Display:
    """Progress on an interactive terminal (one rewritten line on stderr); quiet in logs (one INFO line per case)."""

    def __init__(self, total: int, tty: bool, echo):
        self.total, self.echo = total, echo
        self.tty = tty
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.width = 0

    def update(self, done: int, failed: int, running: int, case_s: list, slots: int, force: bool = False) -> None:
        """``case_s``: run times (s) of the cases computed so far in this run; ``slots``: cases run at once."""
        now = time.perf_counter()
        if not self.tty or (not force and now - self.last < 1.0):
            return
        self.last = now
        elapsed = now - self.t0
        left = self.total - done - failed
        if not left:
            eta = "finishing"
        elif not case_s:
            eta = "estimate after the first case"
        else:  # the mean case time, per round of `slots` cases at once (failed cases end early: not counted)
            rounds = -(-left // max(1, slots))
            eta = f"~{_hms(sum(case_s) / len(case_s) * rounds)} left"
        line = (f"cases: {done}/{self.total} done, {failed} failed, {running} running - elapsed {_hms(elapsed)}, "
                f"{eta}")
        self.echo("\r" + line.ljust(self.width), nl=False)
        self.width = len(line)

    def case(self, outcome: CaseOutcome) -> None:
        if outcome.state == "failed":
            log.info("case %s failed: %s", outcome.item.name, outcome.error)
        else:
            log.info("case %s %s in %.1f s", outcome.item.name, outcome.state, outcome.seconds or 0.0)

    def close(self) -> None:
        if self.tty and self.width:
            self.echo("")


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:d}:{s % 60:02d}"


def run_batch(inputs, output: Path, protocol: str | None = None, scheduler: str | None = None,
              workers: int | None = None, scene: bool = False, resume: bool = False, overwrite: bool = False,
              progress: bool = True, echo=None, cluster_kwargs: dict | None = None,
              worker_timeout_s: float = 60.0) -> CohortResult:
    """Run a cohort (see the module docstring and docs/cohort.md). ``progress``: draw the progress line (the CLI
    passes True only on an interactive terminal); ``echo(text, nl=True)`` prints to the user (stderr);
    ``cluster_kwargs`` go to ``LocalCluster``."""
    t0 = time.perf_counter()
    echo = echo or (lambda text, nl=True: None)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InputError("exists and is not a directory", source=str(output), field="--output")
    if output.is_dir() and any(output.iterdir()) and not (resume or overwrite):
        raise InputError("output directory is not empty (use --resume to complete an earlier cohort run, or "
                         "--overwrite to recompute every case)", source=str(output), field="--output")
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other", field="--resume")
    if workers is not None and workers < 1:
        raise InputError(f"must be >= 1, got {workers}", field="--workers")
    if scene:
        from .mrml_scene import check_available
        check_available()
    items = discover(inputs, output)
    proto = resolve_protocol_override(protocol)
    Client, LocalCluster = _import_dask()
    output.mkdir(parents=True, exist_ok=True)

    result = CohortResult(output=output, outcomes=[])
    if scheduler and workers is not None:
        result.warnings.append("--workers sizes the local cluster only; with --scheduler the cluster's own workers "
                               "run the cases")
    outcomes: dict[str, CaseOutcome] = {}
    todo: list[CaseItem] = []
    failed_before = (_read_resume_state(output).get("failed_on_input") or {}) if resume else {}
    for it in items:
        if it.error is not None:
            outcomes[it.name] = CaseOutcome(it, "failed", error=it.error)
            continue
        if resume:
            ok, why = up_to_date(it, output / it.name, proto, scene)
            if ok:
                outcomes[it.name] = CaseOutcome(it, "resumed", resume_reason=why)
                continue
            before = failed_before.get(it.name) or {}
            if before.get("key") and before.get("key") == failure_key(it, proto):
                outcomes[it.name] = CaseOutcome(it, "failed", error=before.get("error"), input_error=True,
                                                resume_reason="failed before on bad input; inputs, protocol and "
                                                              "software unchanged: not retried")
                continue
            log.info("case %s is recomputed: %s", it.name, why)
        todo.append(it)

    display = _Display(len(items), progress, echo)
    if todo:
        client = cluster = None
        try:
            if scheduler:
                try:
                    client = Client(scheduler, timeout="20s")
                except Exception as exc:  # noqa: BLE001 - OSError / TimeoutError / ValueError by version
                    raise InputError(f"cannot connect to the Dask scheduler at {scheduler}: {_one_line(exc)}",
                                     field="--scheduler") from None
            else:
                n = max(1, min(workers or (os.cpu_count() or 1), len(todo)))
                kw = {"n_workers": n, "threads_per_worker": 1, "processes": True,
                      "silence_logs": logging.ERROR, "dashboard_address": ":0"}
                kw.update(cluster_kwargs or {})
                import dask
                env = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}).items()
                       if k != "MALLOC_TRIM_THRESHOLD_"}
                # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers by default: glibc then hands freed
                # memory back at once and every large numpy array is page-faulted anew, which made a case ~45 %
                # slower (benchmarks.md). A worker runs one case at a time and its memory is bounded by that case.
                with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
                    cluster = LocalCluster(**kw)
                client = Client(cluster)
            result.scheduler = client.scheduler.address
            result.n_workers = _check_workers(client, result.warnings, worker_timeout_s)
            result.dashboard = _dashboard(client)
            if result.dashboard:
                echo(f"Dask dashboard: {result.dashboard}")
            for w in result.warnings:
                echo(f"warning: {w}")
            futures = {}
            run_id = uuid.uuid4().hex[:12]  # keys unique per run: two cohorts on one scheduler never share a task
            for it in todo:
                fut = client.submit(run_one, str(it.case_file.resolve()), str((output / it.name).resolve()),
                                    proto, scene, bool(resume or overwrite), key=f"reirradiation-case-{it.name}-{run_id}",
                                    pure=False)
                futures[fut] = it
            _wait(client, futures, outcomes, display, len(items))
        finally:
            display.close()
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()

    result.outcomes = [outcomes[it.name] for it in items]
    _write_resume_state(output, result.outcomes, proto)
    from .cohort_tables import write_all
    result.files = write_all(result, output)
    result.elapsed_s = time.perf_counter() - t0
    return result


def _dashboard(client) -> str | None:
    """The dashboard address when the scheduler actually serves one (it needs bokeh)."""
    try:
        services = client.scheduler_info().get("services", {})
        if "dashboard" in services:
            return client.dashboard_link
    except Exception:  # noqa: BLE001 - display only
        return None
    return None


def _wait(client, futures: dict, outcomes: dict, display: _Display, total: int) -> None:
    pending = dict(futures)
    keys = {f.key for f in futures}
    counts = {"done": sum(1 for o in outcomes.values() if o.state != "failed"),
              "failed": sum(1 for o in outcomes.values() if o.state == "failed")}
    running = 0
    last_poll = 0.0
    case_s: list = []
    try:
        slots = max(1, sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001 - display only
        slots = 1
    try:
        while pending:
            finished = [f for f in pending if f.done()]
            for f in finished:
                it = pending.pop(f)
                outcomes[it.name] = o = _outcome(it, f)
                counts["failed" if o.state == "failed" else "done"] += 1
                if o.state == "computed" and o.seconds:
                    case_s.append(o.seconds)
                display.case(o)
                f.release()
            now = time.perf_counter()
            if display.tty and now - last_poll >= 1.0:
                last_poll = now
                try:
                    running = sum(1 for ks in client.processing().values() for k in ks if k in keys)
                except Exception:  # noqa: BLE001 - display only
                    running = min(len(pending), len(client.nthreads()))
            display.update(counts["done"], counts["failed"], min(running, len(pending)), case_s, slots,
                           force=not pending)
            if pending:
                time.sleep(0.2)
    except KeyboardInterrupt:
        for f in pending:
            f.cancel()
        raise


def _outcome(it: CaseItem, fut) -> CaseOutcome:
    if fut.status == "finished":
        r = fut.result()
        if r.get("ok"):
            return CaseOutcome(it, "computed", seconds=r.get("seconds"), worker=r.get("worker"))
        return CaseOutcome(it, "failed", error=r.get("error"), seconds=r.get("seconds"), worker=r.get("worker"),
                           traceback=r.get("traceback"), input_error=bool(r.get("input_error")))
    try:  # the task itself failed in Dask (worker killed: memory; cannot deserialise; cancelled)
        exc = fut.exception()
        msg = f"{type(exc).__name__}: {exc}" if exc is not None else fut.status
    except Exception as exc2:  # noqa: BLE001
        msg = f"{type(exc2).__name__}: {exc2}"
    return CaseOutcome(it, "failed", error=_one_line(f"task failed on the Dask cluster: {msg}"))
