"""Stage timings (issue 15): every announced stage gets its wall time in results.json ``timings``; the progress
callable still sees every message. No time is asserted (shared CI cores): only names, order and bookkeeping."""

from __future__ import annotations

import json

import pytest
from test_case_and_cli import invoke, make_case

from ReirradiationNPCLib.timing import StageClock


def test_stage_clock_passes_messages_through_and_sums_repeated_stages(monkeypatch):
    now = iter([0.0, 1.0, 3.0, 3.5, 7.0, 10.0])
    monkeypatch.setattr("ReirradiationNPCLib.timing.time.perf_counter", lambda: next(now))
    seen = []
    clock = StageClock(seen.append)                     # t = 0
    clock("a")                                          # t = 1: a starts (nothing before it is a stage)
    clock("b")                                          # t = 3: a took 2 s
    clock("a")                                          # t = 3.5: b took 0.5 s
    clock("c")                                          # t = 7: a took 3.5 s more
    assert clock.timings() == {"a": 5.5, "b": 0.5, "c": 3.0}   # t = 10: the running stage counts up to now
    assert seen == ["a", "b", "a", "c"]


def test_results_json_holds_each_stage_time(tmp_path):
    case = make_case(tmp_path / "case")
    out = tmp_path / "out"
    r = invoke("run", case, "--output", out)
    assert r.exit_code == 0, r.output
    t = json.loads((out / "results.json").read_text())["timings"]
    stages = list(t)
    for needle in ("loading doses", "structure metrics", "constraints", "writing volumes", "writing report"):
        assert needle in stages, stages
    assert stages.index("loading doses") < stages.index("structure metrics") < stages.index("writing report")
    assert all(isinstance(v, (int, float)) and v >= 0 for v in t.values())


def _fake_scene(stage, prep, analysis, results, planning=None, progress=None):
    progress("building the Slicer scene")
    if prep == "fail":
        from ReirradiationNPCLib.errors import InputError
        raise InputError("no reference image", field="reference.image")
    (stage / "scene.mrb").write_bytes(b"PK")
    progress("writing scene.mrb")
    return {"scene.mrb": "scene"}


def test_scene_in_a_child_process_returns_its_files_and_timings_and_raises_its_errors(tmp_path, monkeypatch):
    """SceneInChildProcess (the scene beside the report, issue 15): the child's file is in the staging folder,
    its stages are recorded in the parent's clock, its InputError is raised in the parent."""
    import pytest

    from ReirradiationNPCLib import mrml_scene
    from ReirradiationNPCLib.errors import InputError
    if not mrml_scene.can_write_in_child_process():
        pytest.skip("fork: Linux only")
    monkeypatch.setattr(mrml_scene, "scene_output", _fake_scene)   # the fork copies the patched module
    seen = []
    clock = StageClock(seen.append)
    writer = mrml_scene.SceneInChildProcess()
    finish = writer.start(tmp_path, "prep", None, None, None, clock)
    clock("writing report")                                         # the parent goes on meanwhile
    assert finish() == {"scene.mrb": "scene"}
    assert (tmp_path / "scene.mrb").read_bytes() == b"PK"
    t = clock.timings()
    assert "building the Slicer scene (child process, beside the report)" in t
    assert "writing scene.mrb (child process, beside the report)" in t
    assert "writing report" in t and seen[-1] == "writing report"   # the child's messages stay in the child
    finish = writer.start(tmp_path, "fail", None, None, None, clock)
    with pytest.raises(InputError, match="no reference image"):
        finish()


def test_early_scene_process_is_sent_the_run_and_records_its_import(tmp_path, monkeypatch):
    """SceneInChildProcess(early=True) (the demo): the child is forked before the run, imports slicer-core meanwhile,
    and builds the scene from what start() sends it (pickled): same files, its stages and its import time recorded;
    close() ends an early child that was never sent a run (the run failed), leaving no process behind."""
    import os

    import pytest

    from ReirradiationNPCLib import mrml_scene
    if not mrml_scene.can_write_in_child_process():
        pytest.skip("fork: Linux only")
    monkeypatch.setattr(mrml_scene, "scene_output", _fake_scene)   # before the fork: the child has the patch
    clock = StageClock(lambda m: None)
    writer = mrml_scene.SceneInChildProcess(early=True)
    finish = writer.start(tmp_path, "prep", None, None, None, clock)
    assert finish() == {"scene.mrb": "scene"}
    assert (tmp_path / "scene.mrb").read_bytes() == b"PK"
    t = clock.timings()
    assert mrml_scene.EARLY_IMPORT_STAGE in t
    assert "writing scene.mrb (child process, beside the report)" in t
    writer.close()                                                   # already sent: nothing to end
    unused = mrml_scene.SceneInChildProcess(early=True)
    pid = unused._early.pid
    unused.close()
    with pytest.raises(ChildProcessError):                           # reaped: no such child any more
        os.waitpid(pid, os.WNOHANG)


def test_early_scene_process_without_slicer_core_says_why_and_does_not_break_the_run(tmp_path, monkeypatch):
    """slicer-core installed but not importable: the early child ends at once without reading its inbox; sending
    it the run must not raise (it did: BrokenPipeError, an internal error), and the writer says why no scene."""
    import time

    import pytest

    from ReirradiationNPCLib import mrml_headless, mrml_scene
    if not mrml_scene.can_write_in_child_process():
        pytest.skip("fork: Linux only")
    monkeypatch.setattr(mrml_headless, "unavailable_reason", lambda *a, **k: "slicer-core broken here")
    writer = mrml_scene.SceneInChildProcess(early=True)
    time.sleep(1.0)                                                  # the child has ended, its inbox closed
    finish = writer.start(tmp_path, "prep", None, None, None, StageClock(lambda m: None))
    assert finish() == {}
    assert writer.unavailable == "slicer-core broken here"
    assert not (tmp_path / "scene.mrb").exists()


def _slow_no_slicer_core(*a, **k):
    import time
    time.sleep(1.0)
    return "slicer-core broken here"


def test_early_scene_process_without_slicer_core_leaves_no_file(tmp_path, monkeypatch):
    """The run sent to the early scene process before it found slicer-core unusable (it then ends without reading):
    the pickled run (~60 MB for the demo) is removed when the process is collected (it stayed in /tmp)."""
    import os
    import tempfile

    import pytest

    from ReirradiationNPCLib import mrml_headless, mrml_scene
    if not mrml_scene.can_write_in_child_process():
        pytest.skip("fork: Linux only")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(mrml_headless, "unavailable_reason", _slow_no_slicer_core)
    writer = mrml_scene.SceneInChildProcess(early=True)
    finish = writer.start(tmp_path, "prep", None, None, None, StageClock(lambda m: None))
    assert len(os.listdir(temp)) == 1                               # sent while it still imports
    assert finish() == {}
    assert writer.unavailable == "slicer-core broken here"
    assert os.listdir(temp) == []


def _dies_while_building(stage, prep, analysis, results, planning=None, progress=None):
    import os

    from ReirradiationNPCLib import mrml_headless
    mrml_headless._cache_dir()           # as mrml_headless.start does
    os._exit(1)                          # e.g. a crash in VTK


@pytest.mark.parametrize("parent_cache", [False, True], ids=["command", "parent with a scene of its own"])
def test_a_scene_process_that_dies_leaves_no_cache_folder(tmp_path, monkeypatch, parent_cache):
    """The scene's child process dies while building (its cleanup does not run): the run fails with one message,
    and the child's Slicer cache folder is removed by the parent (it stayed in /tmp). A parent's own cache folder
    (a process that built a scene before: tests), which the forked child finds in its copy of memory, stays the
    parent's."""
    import os
    import tempfile

    import pytest

    from ReirradiationNPCLib import mrml_headless, mrml_scene
    if not mrml_scene.can_write_in_child_process():
        pytest.skip("fork: Linux only")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(mrml_headless, "_CACHE_DIR", [])
    mine = [os.path.basename(mrml_headless._cache_dir())] if parent_cache else []   # the parent's own
    monkeypatch.setattr(mrml_headless, "unavailable_reason", lambda *a, **k: None)
    monkeypatch.setattr(mrml_scene, "scene_output", _dies_while_building)
    finish = mrml_scene.SceneInChildProcess().start(tmp_path, "prep", None, None, None, StageClock(lambda m: None))
    with pytest.raises(RuntimeError, match="scene.mrb could not be written: the child process ended without a result"):
        finish()
    assert os.listdir(temp) == mine
    mrml_headless.remove_cache_dir()
    assert os.listdir(temp) == []


def test_timings_start_with_reading_and_hashing_the_inputs(tmp_path):
    """The case file is read and every input hashed (provenance) before the first computing stage: that time is
    a stage too (large DICOM inputs take a while to hash)."""
    case = make_case(tmp_path / "case")
    out = tmp_path / "out"
    r = invoke("run", case, "--output", out)
    assert r.exit_code == 0, r.output
    stages = list(json.loads((out / "results.json").read_text())["timings"])
    assert stages[0] == "reading the case file and hashing its inputs (provenance)", stages
    assert stages.index(stages[0]) < stages.index("loading doses")
