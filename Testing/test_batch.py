"""`reirradiation-npc batch` (issue 14): a cohort on Dask, one task per case, tables from results.json, resume.

The cohort is small: two good synthetic cases (the pre-registered synthetic case, and the same with a shorter
interval, which changes the spinal cord's recovery credit), a case whose dose file is missing and a folder without
a case file. Every good case's cumulative map must equal what `run` writes for it (same function, same numbers).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from analytic import run_cli

pytest.importorskip("distributed", reason="batch needs the cohort extra: pip install '.[cohort]'")

from ReirradiationNPCLib import provenance  # noqa: E402
from ReirradiationNPCLib.batch import EXIT_SOME_FAILED, discover, failure_key, up_to_date  # noqa: E402
from ReirradiationNPCLib.cohort_tables import constraint_rows, organ_counts  # noqa: E402
from ReirradiationNPCLib.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _case_dict(synthetic_case: Path) -> dict:
    """The pre-registered synthetic case with absolute paths (so case files can live anywhere)."""
    base = synthetic_case.parent
    d = yaml.safe_load(synthetic_case.read_text())
    d["reference"] = {"image": str(base / "ct.nrrd"), "structures": str(base / "structures")}
    d["protocol"] = str(base / "synthetic-demo.yaml")
    for c in d["courses"]:
        c["dose"] = str(base / c["dose"])
    return d


def write_cohort(root: Path, synthetic_case: Path) -> Path:
    cohort = root / "cohort"
    for name in ("A", "B", "C", "D"):
        (cohort / name).mkdir(parents=True)
    a = _case_dict(synthetic_case)
    (cohort / "A" / "case.yaml").write_text(yaml.safe_dump(a, sort_keys=False))
    b = _case_dict(synthetic_case)
    b["patient"]["id"] = "SYNTHETIC-NPC-B"
    b["courses"][0]["interval_months"] = 8  # 25 % spinal cord credit instead of 50 % (synthetic-demo protocol)
    (cohort / "B" / "case.yaml").write_text(yaml.safe_dump(b, sort_keys=False))
    c = _case_dict(synthetic_case)
    c["courses"][0]["dose"] = "no_such_dose.nrrd"
    (cohort / "C" / "case.yaml").write_text(yaml.safe_dump(c, sort_keys=False))
    (cohort / "D" / "notes.txt").write_text("no case file here\n")
    return cohort


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory, synthetic_case):
    root = tmp_path_factory.mktemp("cohort")
    cohort = write_cohort(root, synthetic_case)
    out = root / "out"
    t0 = time.perf_counter()
    proc = run_cli("batch", cohort, "--output", out, "--workers", "2", timeout=900)
    return cohort, out, proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, cohort_run):
    """`run` on the good cases, in this process (the function the CLI's run calls)."""
    from ReirradiationNPCLib.pipeline import run_case
    cohort = cohort_run[0]
    root = tmp_path_factory.mktemp("reference")
    for name in ("A", "B"):
        run_case(cohort / name / "case.yaml", root / name)
    return root


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_batch_exit_code_and_failed_cases_listed(cohort_run):
    cohort, out, proc, _ = cohort_run
    assert proc.returncode == EXIT_SOME_FAILED == 3, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "FAILED C:" in proc.stdout and "no_such_dose.nrrd" in proc.stdout
    assert "FAILED D:" in proc.stdout and "no case file" in proc.stdout
    # quiet in logs: no Dask INFO lines, no progress line when not on a terminal
    assert "distributed.scheduler" not in proc.stderr and "cases:" not in proc.stderr


def test_good_cases_identical_to_run(cohort_run, reference_runs):
    _, out, _, _ = cohort_run
    for name in ("A", "B"):
        got, ref = out / name, reference_runs / name
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
        for f in ("cumulative_eqd2.nrrd", "eqd2_course1.nrrd", "eqd2_course2.nrrd"):
            np.testing.assert_allclose(arr(got / f), arr(ref / f), rtol=0, atol=1e-4)
        rg, rr = (json.loads((d / "results.json").read_text()) for d in (got, ref))
        assert [c["value"] for c in rg["constraints"]] == [c["value"] for c in rr["constraints"]]
        assert rg["provenance"]["inputs_sha256"] == rr["provenance"]["inputs_sha256"]
    # the two cases differ (shorter interval: less spinal cord credit), so the cohort did not mix them up
    a = arr(out / "A" / "cumulative_eqd2.nrrd")
    b = arr(out / "B" / "cumulative_eqd2.nrrd")
    assert np.abs(a - b).max() > 1.0


def test_cohort_csv_one_row_per_good_case_and_constraint(cohort_run):
    _, out, _, _ = cohort_run
    rows = read_csv(out / "cohort.csv")
    for name in ("A", "B"):
        res = json.loads((out / name / "results.json").read_text())
        mine = [r for r in rows if r["case"] == name]
        assert len(mine) == len(res["constraints"]) > 0
        for r, c in zip(mine, res["constraints"]):
            assert (r["organ"], r["metric"], r["scope"], r["status"]) == (c["organ"], c["metric"], c["scope"],
                                                                          c["status"])
            assert (float(r["value"]) if r["value"] else None) == c["value"]
            assert r["verified"] == ("true" if c["verified"] else "false")
            assert r["patient_id"] == res["case"]["patient"]["id"]
    assert {r["case"] for r in rows} == {"A", "B"}
    import pyarrow.parquet as pq
    table = pq.read_table(out / "cohort.parquet")
    assert table.num_rows == len(rows)
    assert table.schema.field("value").type == "double" and table.schema.field("verified").type == "bool"


def test_summary_table(cohort_run):
    _, out, _, _ = cohort_run
    rows = {r["case"]: r for r in read_csv(out / "cohort_summary.csv")}
    assert set(rows) == {"A", "B", "C", "D"}
    assert rows["A"]["state"] == rows["B"]["state"] == "computed"
    assert rows["C"]["state"] == rows["D"]["state"] == "failed"
    assert "courses[0].dose" in rows["C"]["error"] and "no_such_dose.nrrd" in rows["C"]["error"]
    assert "\n" not in rows["C"]["error"]
    assert rows["C"]["patient_id"] == "SYNTHETIC-NPC-001"  # read from the broken case's file
    assert rows["B"]["patient_id"] == "SYNTHETIC-NPC-B"
    res = json.loads((out / "A" / "results.json").read_text())
    assert rows["A"]["inputs_sha256"] == res["provenance"]["inputs_sha256"]
    assert rows["A"]["software_version"] == res["software"]["version"]
    assert rows["A"]["protocol_sha256"] == provenance.file_sha256(Path(res["protocol"]["file"]))
    assert float(rows["A"]["run_seconds"]) > 0
    assert rows["A"]["registration"].startswith("course1: identity")
    assert not (out / "C").exists() or not (out / "C" / "results.json").exists()  # nothing half-written


def test_cohort_html_is_self_contained(cohort_run):
    _, out, _, _ = cohort_run
    text = (out / "cohort.html").read_text()
    assert "data:image/png;base64," in text and "<script" not in text and "src='http" not in text
    assert "brainstem" in text and "2 failed" in text


def test_resume_recomputes_nothing_and_sees_changes_by_hash(cohort_run, tmp_path, synthetic_case):
    cohort, out, _, _ = cohort_run
    before = {n: (out / n / "results.json").stat().st_mtime_ns for n in ("A", "B")}
    proc = run_cli("batch", cohort, "--output", out, "--resume", timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the broken cases are still broken
    assert "0 computed, 2 unchanged (resume), 2 failed" in proc.stdout
    assert "Dask dashboard" not in proc.stderr  # nothing to compute: no cluster started
    assert {n: (out / n / "results.json").stat().st_mtime_ns for n in ("A", "B")} == before
    rows = {r["case"]: r for r in read_csv(out / "cohort_summary.csv")}
    assert rows["A"]["state"] == "resumed" and rows["A"]["resume_reason"].startswith("inputs, protocol")
    # a case that failed on bad input is not retried while its inputs are unchanged; its error is kept
    assert rows["C"]["state"] == "failed" and "no_such_dose.nrrd" in rows["C"]["error"]
    assert "not retried" in rows["C"]["resume_reason"]
    assert len([r for r in read_csv(out / "cohort.csv") if r["case"] == "A"]) > 0

    # without --resume a non-empty cohort folder is refused (outputs are never overwritten unasked)
    proc = run_cli("batch", cohort / "A", "--output", out)
    assert proc.returncode == 2 and "--resume" in proc.stderr

    # a changed input is seen by its hash, not by its date: only that case is recomputed
    case_b = cohort / "B" / "case.yaml"
    case_b.write_text(case_b.read_text() + "# reviewed\n")
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    ok, why = up_to_date(discover([cohort / "B"], copy)[0], copy / "B", None, False)
    assert not ok and why == "input case changed"
    ok, why = up_to_date(discover([cohort / "A"], copy)[0], copy / "A", None, False)
    assert ok
    ok, why = up_to_date(discover([cohort / "A"], copy)[0], copy / "A", "npc-reirradiation", False)
    assert not ok and "protocol changed" in why
    # once the missing dose file is there, the failed case's key changes: --resume retries it
    shutil.copytree(cohort / "C", tmp_path / "C")
    item = discover([tmp_path / "C"], tmp_path / "o")[0]
    k0 = failure_key(item, None)
    assert k0 == failure_key(item, None)
    shutil.copyfile(synthetic_case.parent / "dose_course1.nrrd", tmp_path / "C" / "no_such_dose.nrrd")
    assert failure_key(item, None) != k0


def test_scheduler_address_with_separately_started_scheduler_and_worker(cohort_run, tmp_path):
    """`dask scheduler` and `dask worker` started as their own processes (as on a cluster), then `--scheduler`."""
    cohort = cohort_run[0]
    dask_cli = Path(sys.executable).with_name("dask")
    if not dask_cli.exists():
        pytest.skip("the dask command is not installed beside this Python")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "ReirradiationNPC"))
    sched_file = tmp_path / "scheduler.json"
    procs = []
    try:
        procs.append(subprocess.Popen([str(dask_cli), "scheduler", "--scheduler-file", str(sched_file),
                                       "--port", "0", "--dashboard-address", ":0", "--host", "127.0.0.1"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert sched_file.exists(), "the scheduler did not start within 60 s"
        time.sleep(0.3)  # the file is written in one go; give it a moment anyway
        address = json.loads(sched_file.read_text())["address"]
        procs.append(subprocess.Popen([str(dask_cli), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--no-dashboard", "--host", "127.0.0.1"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        out = tmp_path / "out"
        proc = run_cli("batch", cohort / "A", cohort / "C", "--output", out, "--scheduler", address,
                       timeout=600)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "1 computed" in proc.stdout and "on 1 Dask worker" in proc.stdout
        assert (out / "A" / "cumulative_eqd2.nrrd").is_file()
        np.testing.assert_allclose(arr(out / "A" / "cumulative_eqd2.nrrd"),
                                   arr(cohort_run[1] / "A" / "cumulative_eqd2.nrrd"), rtol=0, atol=1e-4)
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def test_unreachable_scheduler_is_a_clear_input_error(cohort_run, tmp_path):
    cohort = cohort_run[0]
    proc = run_cli("batch", cohort / "A", "--output", tmp_path / "o", "--scheduler", "tcp://127.0.0.1:9")
    assert proc.returncode == 2 and "cannot connect to the Dask scheduler" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ no cluster

def test_discover_names_cases_uniquely_and_reports_folders_without_case(tmp_path):
    for sub in ("p1", "p2", "x/nested"):
        (tmp_path / "cohort" / sub).mkdir(parents=True)
    case = {"reference": {"structures": "s"}, "protocol": "npc-reirradiation", "courses": []}
    (tmp_path / "cohort" / "p1" / "case.yaml").write_text(yaml.safe_dump(case))
    (tmp_path / "cohort" / "p2" / "plan_a.yaml").write_text(yaml.safe_dump(case))
    (tmp_path / "cohort" / "p2" / "protocol.yaml").write_text("name: x\norgans: {}\n")  # not a case
    (tmp_path / "cohort" / "loose.json").write_text(json.dumps(case))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "p1.yaml").write_text(yaml.safe_dump(case))
    items = discover([tmp_path / "cohort", tmp_path / "other" / "p1.yaml", tmp_path / "cohort" / "p1"],
                     tmp_path / "cohort" / "out")
    assert [(i.name, i.case_file.name if i.case_file else None, i.error is not None) for i in items] == [
        ("loose", "loose.json", False), ("p1", "case.yaml", False), ("plan_a", "plan_a.yaml", False),
        ("x", None, True), ("p1-2", "p1.yaml", False)]
    with pytest.raises(InputError, match="not found"):
        discover([tmp_path / "nope"], tmp_path / "o")
    with pytest.raises(InputError, match="output folder"):
        discover([tmp_path / "cohort"], tmp_path / "cohort")


def test_folder_hash_sees_contents_and_names(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "a.nrrd").write_bytes(b"1")
    (d / "b.nrrd").write_bytes(b"2")
    h0 = provenance.path_sha256(d)
    (d / "b.nrrd").write_bytes(b"3")
    h1 = provenance.path_sha256(d)
    (d / "b.nrrd").rename(d / "c.nrrd")
    h2 = provenance.path_sha256(d)
    assert len({h0, h1, h2}) == 3
    (d / "c.nrrd").rename(d / "b.nrrd")
    assert provenance.path_sha256(d) == h1
    import hashlib
    assert provenance.path_sha256(d / "a.nrrd") == hashlib.sha256(b"1").hexdigest()
    assert provenance.path_sha256(tmp_path / "missing") is None


def test_provenance_differences():
    rec = {"inputs": {"case": {"sha256": "1"}}, "protocol": {"sha256": "p"},
           "software": {"name": "n", "version": "1", "engine_sha256": "e"}}
    assert provenance.differences(rec, json.loads(json.dumps(rec))) == []
    exp = json.loads(json.dumps(rec))
    exp["inputs"]["case"]["sha256"] = "2"
    exp["software"]["version"] = "2"
    assert provenance.differences(rec, exp) == ["input case changed", "software version changed"]
    assert provenance.differences(None, rec) == ["no provenance recorded"]


def test_constraint_rows_read_new_fields_defensively_and_robustness_columns():
    res = {"case": {"patient": {"id": "P1"}}, "constraints": [
        {"organ": "brainstem", "structure": "BS", "metric": "D0.03cc", "scope": "cumulative", "value": 55.0,
         "limit": 54.0, "unit": "Gy", "status": "fail", "verified": True, "basis": "credited",
         "value_undiscounted": 60.0, "value_credited": 55.0,
         "conditions": [{"condition": "x", "required": 1, "actual": 1, "met": True}],
         "robustness": {"worst_value": 57.0, "best_value": 53.0, "worst_scenario": "shift +3 mm x",
                        "status_worst": "fail", "scenarios": [1, 2, 3]}},
        {"organ": "brainstem", "structure": "BS", "metric": "D0.03cc", "scope": "current", "value": None,
         "limit": 30.0, "unit": "Gy", "status": "not_evaluated", "verified": False}]}
    rows = constraint_rows("c1", res)
    assert rows[0]["basis"] == "credited" and rows[0]["value_credited"] == 55.0 and rows[0]["conditions_met"]
    assert rows[0]["robust_worst_value"] == 57.0 and rows[0]["robust_scenarios"] == 3
    assert rows[1]["basis"] is None and rows[1]["conditions_met"] is None and "robust_worst_value" not in rows[1]
    rows2 = constraint_rows("c2", {"constraints": [dict(res["constraints"][0], status="pass")]})
    assert organ_counts(rows + rows2) == {"brainstem": {"cases": 2, "failing": 1, "conditions_not_met": 0,
                                                        "incomplete": 0}}
    assert organ_counts(rows2 + [dict(rows[1], case="c3")]) == {
        "brainstem": {"cases": 2, "failing": 0, "conditions_not_met": 0, "incomplete": 1}}


def test_missing_dask_names_the_extra(monkeypatch, tmp_path, synthetic_case):
    import builtins
    real = builtins.__import__

    def no_dask(name, *a, **k):
        if name.split(".")[0] in ("dask", "distributed"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    from ReirradiationNPCLib.batch import run_batch
    with pytest.raises(InputError, match=r"reirradiation-npc\[cohort\]"):
        run_batch([synthetic_case], tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written
