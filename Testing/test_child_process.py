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
