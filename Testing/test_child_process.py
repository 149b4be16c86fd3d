"""child_process.Child (issue 15: work beside other work) and the report's figures drawn in child processes.

The figures drawn beside the run (report.FiguresInChildProcess, used by `run` and `demo` on Linux) must be the very
PNGs drawn in-process (report.make_figures, used inside Slicer and where fork is absent); a failing figure process
must not cost the report its figures. No time is asserted."""

from __future__ import annotations

import json
import os
import re

import pytest

from ReirradiationNPCLib import child_process, report
from ReirradiationNPCLib.child_process import Child, ChildError
from ReirradiationNPCLib.errors import InputError

pytestmark = pytest.mark.skipif(not child_process.available(), reason="fork: Linux only")


def _square(x):
    return x * x


def _raise_input_error():
    raise InputError("no such structure", source="case.yaml", field="structures")


def _die():
    os._exit(3)


def _echo(inbox, tag):
    return (tag, inbox())


def test_child_returns_its_value_and_raises_its_errors():
    assert Child(_square, 7).result() == 49
    with pytest.raises(ChildError, match="InputError: .*no such structure") as err:
        Child(_raise_input_error).result()
    assert err.value.input_error and err.value.kind == "InputError"
    with pytest.raises(ChildError, match="ended without a result") as err:
        Child(_die).result()
    assert err.value.kind == "died" and not err.value.input_error


def test_inbox_gets_what_is_sent_later_or_none():
    import numpy as np
    c = Child(_echo, "a", inbox=True)
    arr = np.arange(300_000, dtype=np.float32)      # 1.2 MB: more than a pipe holds; send does not wait
    c.send({"arr": arr})
    tag, got = c.result()
    assert tag == "a" and np.array_equal(got["arr"], arr)
    c = Child(_echo, "b", inbox=True)
    c.close_inbox()                                  # nothing will come: the child gets None
    assert c.result() == ("b", None)
    c = Child(_echo, "c", inbox=True)
    c.kill()                                         # ended and reaped without waiting
    c.kill()


def _read_two(inbox):
    first = inbox()
    # a process forked after the first read reads the next ones (the forking process reads no more)
    second, after = Child(lambda: (inbox(), inbox())).result()
    return first, second, after


def test_inbox_objects_come_in_order_and_a_forked_reader_gets_the_next():
    c = Child(_read_two, inbox=True)
    c.send("one", last=False)
    c.send({"two": 2})                              # last: the inbox is closed, nothing after it
    assert c.result() == ("one", {"two": 2}, None)


def _sleep():
    import time
    time.sleep(30)


def test_a_child_over_its_time_is_killed():
    c = Child(_sleep)
    with pytest.raises(ChildError, match="did not finish within 0.2 s"):
        c.result(timeout=0.2)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _gone(pid: int, within: float = 10.0) -> bool:
    """Whether ``pid`` has ended within ``within`` seconds (SIGKILL is delivered asynchronously)."""
    import time
    end = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _fork_a_drawer_then_wait(inbox, pid_file):
    """A child that starts a child of its own (as the figure process does) and reads nothing."""
    import time
    from pathlib import Path
    grandchild = Child(_sleep)
    Path(pid_file).write_text(str(grandchild.pid))
    time.sleep(30)


@pytest.fixture()
def own_temp(tmp_path, monkeypatch):
    """The temporary folder of Child.send, empty: what is left in it after a child ended is ours."""
    import tempfile
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _started(tmp_path):
    """A child with a grandchild, sent an object it never reads: (child, grandchild's pid)."""
    import time
    pid_file = tmp_path / "grandchild.pid"
    c = Child(_fork_a_drawer_then_wait, str(pid_file), inbox=True)
    c.send({"never": "read"}, last=False)
    end = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < end, "the child did not start its own child"
        time.sleep(0.02)
    return c, int(pid_file.read_text())


@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_an_ended_child_leaves_no_process_and_no_file(tmp_path, own_temp, how):
    """kill() and a timeout end the child's own children too (they were left running: only the child was killed),
    and remove what it was sent and had not read (it stayed in the temporary folder)."""
    c, grandchild = _started(tmp_path)
    assert _alive(c.pid) and _alive(grandchild)
    assert len(os.listdir(own_temp)) == 1                  # the object sent, not read yet
    if how == "kill":
        c.kill()
    else:
        with pytest.raises(ChildError, match="did not finish within 0.5 s"):
            c.result(timeout=0.5)
    assert _gone(grandchild), "the child's own child still runs"
    assert not _alive(c.pid)
    assert os.listdir(own_temp) == []


def _end_without_reading(inbox):
    import time
    time.sleep(0.5)
    return "ended"


def test_what_a_child_did_not_read_is_removed_when_it_ends(own_temp):
    """A child that ends without reading its inbox (the figure process without matplotlib, the scene process
    without slicer-core): what it was sent is removed when it is reaped."""
    c = Child(_end_without_reading, inbox=True)
    c.send(list(range(1000)))
    assert len(os.listdir(own_temp)) == 1
    assert c.result() == "ended"
    assert os.listdir(own_temp) == []


@pytest.fixture(scope="module")
def computed(synthetic_case):
    """The synthetic case computed in this process: (results dict, analysis, prepared, planning)."""
    from ReirradiationNPCLib import planning as _planning
    from ReirradiationNPCLib import robustness as _robustness
    from ReirradiationNPCLib.analysis import compute
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import build_results, prepare
    prep = prepare(load_case(synthetic_case))
    analysis = compute(prep.grid, prep.courses, prep.structures, prep.protocol)
    plan = _planning.compute(prep, analysis)
    rob = _robustness.compute(prep, analysis)
    results = build_results(prep, analysis)
    _planning.add_to_results(results, plan)
    _robustness.add_to_results(results, rob)
    return results.to_dict(), analysis, prep, plan


def test_figures_in_child_processes_are_the_in_process_figures(computed):
    res, analysis, prep, plan = computed
    here = report.make_figures(res, analysis, prep, plan)
    assert all(here[n] for n in report.FIGURES), "the synthetic case has all three figures"
    figures = report.FiguresInChildProcess()
    try:
        from ReirradiationNPCLib.timing import StageClock
        clock = StageClock()
        there = figures.start(res, analysis, prep, plan, clock)()
    finally:
        figures.close()
    for n in report.FIGURES:
        assert there[n] == here[n], n                 # byte for byte
    assert there["focus"] == here["focus"]
    stages = clock.timings()
    assert "importing matplotlib (report figure process, from the start of the run)" in stages
    for n in report.FIGURES:
        assert f"drawing the report figure {n!r} (figure process, beside the outputs)" in stages


def _early_then_final(early, final, analysis, prep, plan) -> dict:
    """The figures of a figure process given ``early`` results at start_early and ``final`` ones at start."""
    figures = report.FiguresInChildProcess()
    try:
        figures.start_early(early, analysis, prep, plan)
        return figures.start(final, analysis, prep, plan)()
    finally:
        figures.close()


def test_slices_and_3d_sent_early_are_the_in_process_figures(computed, caplog):
    """run_case gives the slices and the 3D view to the figure process before the robustness scenarios
    (start_early), the DVH after (start): the same PNGs as make_figures on the final results."""
    res, analysis, prep, plan = computed
    here = report.make_figures(res, analysis, prep, plan)
    there = _early_then_final(res, res, analysis, prep, plan)
    assert all(there[n] == here[n] for n in report.FIGURES)
    assert "drawn again" not in caplog.text
    # results that change after the early figures were sent (they should not): the slices and the 3D view are
    # drawn again from the final results
    early = json.loads(json.dumps(res))
    worst = next(c for c in early["constraints"] if c.get("status") == "fail")
    worst["status"] = "pass"
    there = _early_then_final(early, res, analysis, prep, plan)
    assert "drawn again" in caplog.text
    assert all(there[n] == here[n] for n in report.FIGURES)


def _descendants(pid: int) -> set[int]:
    """The running processes started by ``pid``, by its children, and so on."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                    state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if state not in ("Z", "X"):
                parent[int(entry)] = int(ppid)
    out, new = set(), {pid}
    while new:
        new = {p for p, pp in parent.items() if pp in new} - out
        out |= new
    return out


def _slow_draw(name, args):
    import time
    time.sleep(30)


def test_closing_the_figure_process_ends_its_drawing_children(computed, own_temp, monkeypatch):
    """The run fails while the figure process and its children draw (here: each drawing takes 30 s): close()
    leaves no process of them (only the figure process was killed: its children drew on) and no inputs' file."""
    import time
    res, analysis, prep, plan = computed
    monkeypatch.setattr(report, "draw_figure", _slow_draw)     # before the fork: the figure process has it
    figures = report.FiguresInChildProcess()
    pid = figures._child.pid
    try:
        figures.start(res, analysis, prep, plan)               # its figures are not waited for
        end = time.monotonic() + 120
        while len(_descendants(pid)) < 2:    # DVH and slices each drawn by a child (the 3D view by the process)
            assert time.monotonic() < end, "the figure process did not start its children"
            time.sleep(0.05)
        started = _descendants(pid)
    finally:
        figures.close()
    assert not _alive(pid)
    assert all(_gone(p) for p in started), "a child of the figure process still runs"
    assert os.listdir(own_temp) == []


def _broken_figure_process(inbox):
    inbox()
    os._exit(1)


def test_a_failed_figure_process_leaves_the_figures_to_this_process(computed, monkeypatch, caplog):
    res, analysis, prep, plan = computed
    monkeypatch.setattr(report, "_figure_process", _broken_figure_process)   # the fork copies the patched module
    figures = report.FiguresInChildProcess()
    try:
        got = figures.start(res, analysis, prep, plan)()
    finally:
        figures.close()
    assert "drawing the figures here" in caplog.text
    here = report.make_figures(res, analysis, prep, plan)
    assert all(got[n] == here[n] for n in report.FIGURES)


def test_no_room_for_the_figures_inputs_leaves_them_to_this_process(computed, monkeypatch, caplog):
    """The inputs' file cannot be written (ENOSPC): the figure process is told nothing more comes, ends, and the
    figures are drawn here (the same PNGs), with one warning line."""
    import errno
    import logging

    res, analysis, prep, plan = computed
    here = report.make_figures(res, analysis, prep, plan)
    figures = report.FiguresInChildProcess()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(child_process.tempfile, "mkstemp", full)
    caplog.set_level(logging.WARNING)
    try:
        figures.start_early(res, analysis, prep, plan)
        got = figures.start(res, analysis, prep, plan)()
    finally:
        figures.close()
    assert all(got[n] == here[n] for n in report.FIGURES)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["the report's figure process could not be given its inputs (OSError: [Errno 28] No space "
                      "left on device); drawing the figures it was not given here"], warned
    assert not _alive(figures._child.pid)


def test_run_report_is_the_same_with_and_without_figure_processes(synthetic_case, tmp_path, monkeypatch):
    """`run` draws the figures in child processes; with REIRRADIATION_NPC_NO_FORK it draws them itself: the two
    report.html differ only in the report date."""
    from test_case_and_cli import invoke
    r = invoke("run", synthetic_case, "--output", tmp_path / "fork")
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("REIRRADIATION_NPC_NO_FORK", "1")
    r = invoke("run", synthetic_case, "--output", tmp_path / "nofork")
    assert r.exit_code == 0, r.output
    date = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
    a, b = (re.sub(date, "DATE", (tmp_path / d / "report.html").read_text(encoding="utf-8")) for d in ("fork", "nofork"))
    assert a.count("data:image/png;base64,") == 3 and a == b
    ta = json.loads((tmp_path / "fork" / "results.json").read_text())["timings"]
    tb = json.loads((tmp_path / "nofork" / "results.json").read_text())["timings"]
    assert "drawing the report figure 'dvh' (figure process, beside the outputs)" in ta
    assert not any("figure process" in k for k in tb)
    assert "writing report" in ta and "writing report" in tb


@pytest.mark.parametrize("no_fork", [False, True], ids=["figure process", "in process"])
def test_without_matplotlib_the_figures_are_skipped_in_one_line(synthetic_case, tmp_path, no_fork):
    """matplotlib cannot be imported (a stub package on PYTHONPATH that raises ImportError): the run says so in one
    line on stderr (what is missing, what was skipped; no traceback), its verdict, results and exit code are those
    of a run with matplotlib, and nothing of ours is left in the temporary folder. Before: the figure process
    ended without reading its inputs, so the command drew each figure itself and logged three ImportErrors with
    their tracebacks (and the unread inputs stayed in /tmp)."""
    import subprocess
    import sys

    from analytic import cli_env
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n", encoding="utf-8")
    temp = tmp_path / "tmp"
    temp.mkdir()

    def run(out, env):
        env = dict(env, TMPDIR=str(temp))
        env.pop("REIRRADIATION_NPC_NO_FORK", None)
        if no_fork:
            env["REIRRADIATION_NPC_NO_FORK"] = "1"
        return subprocess.run([sys.executable, "-m", "ReirradiationNPCLib.cli", "run", str(synthetic_case),
                               "--output", str(out)], capture_output=True, text=True, env=env, timeout=600)

    with_mpl = run(tmp_path / "out_a", cli_env())
    env = cli_env()
    env["PYTHONPATH"] = str(tmp_path / "stub") + os.pathsep + env["PYTHONPATH"]
    without = run(tmp_path / "out_b", env)
    assert with_mpl.returncode == 0, with_mpl.stderr
    assert without.returncode == with_mpl.returncode, without.stderr
    extra = [ln for ln in without.stderr.splitlines() if ln not in with_mpl.stderr.splitlines()]
    assert len(extra) == 1, without.stderr
    assert "report figures skipped (DVH, slices, 3D view" in extra[0]
    assert "matplotlib cannot be imported (No module named 'matplotlib')" in extra[0]
    assert "Traceback" not in without.stderr and "Error" not in without.stderr.replace("ModuleNotFoundError", "")
    assert without.stdout.replace("out_b", "out_a") == with_mpl.stdout
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("out_a", "out_b"))
    for key in ("constraints", "summary", "assumptions"):
        assert a[key] == b[key], key
    html = (tmp_path / "out_b" / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," not in html and html.count('class="placeholder"') == 3
    assert os.listdir(temp) == []


def test_a_failed_fork_falls_back_to_one_process(tmp_path, monkeypatch, caplog):
    """os.fork fails (OSError ENOMEM): the demo draws its figures and builds its scene in its own process, says
    so in one warning line each, and ends as usual (exit 0, every output). Before: the figure process's failed
    fork happened outside the command's error handling, a raw traceback (exit 1)."""
    import errno
    import logging

    from click.testing import CliRunner

    from ReirradiationNPCLib.cli import main
    from ReirradiationNPCLib.mrml_headless import unavailable_reason
    forks = []

    def no_fork():
        forks.append(1)
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(os, "fork", no_fork)
    caplog.set_level(logging.WARNING)
    r = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "demo")])
    assert r.exit_code == 0 and r.exception is None, (r.output, r.exception)
    assert "Traceback" not in r.output
    assert len(forks) >= 2                                  # the figure process and the scene were asked for
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    fig = [m for m in warned if "figure process could not be started" in m]
    assert fig == ["the report's figure process could not be started (OSError: [Errno 12] Cannot allocate "
                   "memory); the figures are drawn in this process"], warned
    out = tmp_path / "demo" / "results"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 3                    # the figures, drawn here
    assert "verdict:" in r.stdout
    if unavailable_reason() is None:
        scene = [m for m in warned if "scene's process could not be started" in m]
        assert scene == ["the Slicer scene's process could not be started (OSError: [Errno 12] Cannot allocate "
                         "memory); the scene is built in this process"], warned
        assert (out / "scene.mrb").stat().st_size > 100_000
        assert "scene.mrb" in json.loads((out / "results.json").read_text())["outputs"]
    assert len(warned) == len(fig) + (1 if unavailable_reason() is None else 0), warned
