"""report.html: written by `run`, self-contained, the same numbers as results.json; progress and --quiet."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ReirradiationNPCLib import cli
from ReirradiationNPCLib.dvh_curves import cumulative_dvh
from ReirradiationNPCLib.report import DISCLAIMER, render_html


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


@pytest.fixture(scope="module")
def run_out(synthetic_case, tmp_path_factory, monkeypatch_module):
    """One `run` of the synthetic case with progress forced on (as on a terminal)."""
    monkeypatch_module.setattr(cli, "_interactive", lambda: True)
    out = tmp_path_factory.mktemp("report") / "out"
    res = _runner().invoke(cli.main, ["run", str(synthetic_case), "--output", str(out)])
    assert res.exit_code == 0, (res.output, res.stderr, res.exception)
    return out, res


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _report(out: Path) -> str:
    return (out / "report.html").read_text(encoding="utf-8")


def test_report_written_and_self_contained(run_out):
    out, _ = run_out
    text = _report(out)
    assert text.startswith("<!DOCTYPE html>")
    refs = re.findall(r'\b(?:src|href)\s*=\s*["\']([^"\']*)["\']', text, flags=re.I)
    assert refs, "the report embeds its figures"
    assert all(r.startswith("data:image/png;base64,") or r.startswith("#") for r in refs), refs
    assert not re.search(r"<link\b|<script\b|@import|url\(", text, flags=re.I)
    # the three figures (DVH, slices, 3D) are embedded, not placeholders
    assert text.count("data:image/png;base64,") == 3
    results = json.loads((out / "results.json").read_text())
    assert "report.html" in results["outputs"]


def test_verdict_line_counts_from_results(run_out):
    out, _ = run_out
    text = _report(out)
    results = json.loads((out / "results.json").read_text())
    n_fail = sum(1 for c in results["constraints"] if c["status"] == "fail")
    # the synthetic demo protocol on the demo case (organs near tolerance after the first course): brainstem, chiasm,
    # both temporal lobes D0.03cc, left temporal lobe V40Gy, left carotid
    assert n_fail == 6
    m = re.search(r'<div id="verdict"[^>]*>(.*?)</div>', text, flags=re.S)
    assert m
    verdict = html.unescape(re.sub(r"<[^>]+>", " ", m.group(1)))
    assert "LIMITS EXCEEDED" in verdict and "6 failure(s)" in verdict
    assert results["summary"]["verdict_code"] == "limits_exceeded"
    assert f'data-verdict-code="{results["summary"]["verdict_code"]}"' in text
    assert f"{results['summary']['unverified_limits_used']} unverified limit(s) used" in verdict
    # the order of the sections is the one of the brief
    order = ["identification", "summary", "courses", "protocol", "constraints", "dvh", "slices", "view3d",
             "assumptions", "disclaimer"]
    pos = [text.index(f'<section id="{s}"') for s in order]
    assert pos == sorted(pos)


def test_every_constraint_row_matches_results_json(run_out):
    out, _ = run_out
    text = _report(out)
    results = json.loads((out / "results.json").read_text())
    rows = re.findall(r'<tr class="st-([a-z_]+)" data-row="(\d+)"[^>]*>(.*?)</tr>', text, flags=re.S)
    assert len(rows) == len(results["constraints"]) > 10
    for status, n, body in rows:
        c = results["constraints"][int(n)]
        cells = [html.unescape(re.sub(r"<[^>]+>", "", td)) for td in re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)]
        assert status == c["status"]
        scope = c["scope"] + (f" ({c['course']})" if c["scope"] == "per_course" else "")
        assert cells[1] == c["organ"] and cells[3] == c["metric"] and cells[4] == scope
        assert cells[5] == (c["basis"] or "\u2013")

        def v(x):
            return "\u2013" if x is None else f"{x:.2f} {c['unit']}"
        expect_limit = "no limit" if c["limit"] is None else f"{c['limit']:.2f} {c['unit']}"
        assert cells[6] == v(c["value"])
        if c["scope"] == "cumulative":   # both sums on every cumulative row, the judged one is its basis's
            assert cells[7] == v(c["value_undiscounted"]) and cells[8] == v(c["value_credited"])
            assert c["value"] == c["value_" + c["basis"]]
        assert cells[9] == expect_limit
        if c["margin"] is not None:
            assert cells[10] == f"{c['margin']:.2f} {c['unit']}"
        assert cells[14] == ("yes" if c["verified"] else "NO")
        assert cells[15].startswith(c["source"])
    # a hand-checkable row: the cord's cumulative limit is Nieder's 67.75 Gy EQD2, verified
    cord = [r for r in results["constraints"] if r["organ"] == "spinal_cord" and r["scope"] == "cumulative"][0]
    assert cord["limit"] == 67.75 and cord["verified"] is True
    assert "67.75 Gy" in text


def test_disclaimer_and_assumptions(run_out):
    out, _ = run_out
    text = _report(out)
    results = json.loads((out / "results.json").read_text())
    assert html.escape(DISCLAIMER, quote=True) in text
    assert "clinician decides" in text
    assumptions = results["assumptions"]["model"]
    assert assumptions
    for a in assumptions:
        assert html.escape(a, quote=True) in text
    # courses: fractions and the recovery credit actually applied (33 fx, 30 months -> 50% on the cord)
    assert "<td>33</td>" in text and "<td>54</td>" in text
    assert "spinal_cord: 50%" in text


def test_progress_on_a_terminal_and_quiet(run_out, tmp_path, monkeypatch):
    _, res = run_out
    steps = [ln for ln in res.stderr.splitlines() if re.match(r"\s+\[\s*\d+\.\d s\] ", ln)]
    assert any("writing report" in s for s in steps) and steps[-1].endswith("done")
    # --quiet: no step lines even on a terminal; a fast failing case shows it (progress starts before the error)
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    case = tmp_path / "case.yaml"
    case.write_text("reference: {structures: nowhere}\nprotocol: npc-reirradiation\n"
                    "courses:\n  - {name: c1, dose: missing.nrrd, fractions: 30}\n")
    loud = _runner().invoke(cli.main, ["run", str(case), "--output", str(tmp_path / "o1")])
    quiet = _runner().invoke(cli.main, ["--quiet", "run", str(case), "--output", str(tmp_path / "o2")])
    assert loud.exit_code == quiet.exit_code == 2
    assert "loading protocol" in loud.stderr
    assert "loading" not in quiet.stderr and quiet.stderr.strip().startswith("error:")
    # not a terminal (logs, CI): quiet without --quiet
    monkeypatch.setattr(cli, "_interactive", lambda: False)
    piped = _runner().invoke(cli.main, ["run", str(case), "--output", str(tmp_path / "o3")])
    assert "loading protocol" not in piped.stderr


def test_report_from_results_alone_degrades_gracefully():
    """No arrays: placeholders instead of figures; unknown optional sections shown when present."""
    res = {
        "software": {"name": "ReirradiationNPC", "version": "0"},
        "protocol": {"name": "P", "version": "1", "synthetic": False},
        "case": {"file": "/x/case.yaml", "patient": {"id": "ID<1>"}, "date": "2026-01-01"},
        "assumptions": {"courses": [], "model": ["LQ model."]},
        "constraints": [{"organ": "brainstem", "structure": "BS", "metric": "Dmax", "scope": "cumulative",
                         "value": 49.994, "limit": 54.0, "unit": "Gy", "status": "pass", "margin": 4.006,
                         "source": "S", "verified": True}],
        "summary": {"counts": {"pass": 1, "fail": 0}, "unverified_limits_used": 0},
        "registration": {"course1": {"method": "rigid", "tre_mm": 1.25}},
    }
    text = render_html(res)
    # a results.json without a verdict code (older engine) is never shown as an all-clear
    assert "ALL LIMITS MET" not in text and "ALL EVALUATED LIMITS MET" not in text
    assert "NOT JUDGED BY VERDICT CODE" in text
    res["summary"]["verdict_code"] = "all_limits_met"
    assert "ALL LIMITS MET" in render_html(res)
    assert "ID&lt;1&gt;" in text and "ID<1>" not in text  # escaped
    assert '<section id="registration">' in text and "1.25" in text
    assert '<section id="targets">' not in text  # absent -> not shown
    assert text.count('class="placeholder"') == 3
    assert ">49.99 Gy<" in text and ">4.01 Gy<" in text


def test_display_dvh_curve_hand_values():
    # 4 samples of 0.5 cc at 0.05, 1.0, 1.0 and 2.55 Gy: V(>=0) = 2 cc, V(>=0.1) = 1.5, V(>=1.1) = 0.5,
    # V(>=2.5) = 0.5, V(>=2.6) = 0
    c = cumulative_dvh(np.array([0.05, 1.0, 1.0, 2.55]), 0.5, bin_gy=0.1)
    at = {round(d, 6): v for d, v in zip(c.dose_gy, c.volume_cc)}
    assert at[0.0] == 2.0 and at[0.1] == 1.5 and at[1.0] == 1.5 and at[1.1] == 0.5
    assert at[2.5] == 0.5 and at[2.6] == 0.0
    assert c.total_cc == 2.0 and c.volume_percent[0] == 100.0


def test_focus_is_the_worst_violation_and_its_hottest_voxel():
    from ReirradiationNPCLib.analysis import StructureData
    from ReirradiationNPCLib.report_figures import choose_focus

    cum = np.zeros((10, 10, 10), np.float32)
    cum[2, 3, 4] = 58.0          # hottest voxel of A
    cum[7, 7, 7] = 130.0         # hottest voxel of B
    a_mask = np.zeros((4, 4, 4), bool)
    a_mask[:] = True             # A occupies [0:4, 1:5, 2:6]
    b_mask = np.ones((3, 3, 3), bool)  # B occupies [6:9, 6:9, 6:9]
    structs = [StructureData("A", a_mask, (slice(0, 4), slice(1, 5), slice(2, 6)), None),
               StructureData("B", b_mask, (slice(6, 9), slice(6, 9), slice(6, 9)), None)]
    cons = [  # A exceeds its limit by 16% (58 vs 50), B by 8% (130 vs 120): A is the worst violation
        {"organ": "a", "structure": "A", "metric": "D0.03cc", "scope": "cumulative", "value": 58.0, "limit": 50.0,
         "unit": "Gy", "status": "fail", "margin": -8.0},
        {"organ": "b", "structure": "B", "metric": "D0.03cc", "scope": "cumulative", "value": 130.0, "limit": 120.0,
         "unit": "Gy", "status": "fail", "margin": -10.0},
        {"organ": "b", "structure": "B", "metric": "Dmean", "scope": "cumulative", "value": 10.0, "limit": 100.0,
         "unit": "Gy", "status": "pass", "margin": 90.0}]
    f = choose_focus({"constraints": cons, "assumptions": {"courses": [{"name": "c1"}]}}, structs, cum, {})
    assert f.structure == "A" and f.index == (2, 3, 4) and f.failing and f.threshold_gy == 50.0
    # nothing fails: the constraint closest to its limit (B D0.03cc: 10% margin left) is shown instead
    cons[0].update(status="pass", margin=40.0, value=10.0)
    cons[1].update(status="pass", margin=12.0, value=108.0)
    f = choose_focus({"constraints": cons, "assumptions": {"courses": [{"name": "c1"}]}}, structs, cum, {})
    assert f.structure == "B" and f.index == (7, 7, 7) and not f.failing


def test_voxel_faces_of_one_voxel_in_mm():
    from ReirradiationNPCLib.geometry import Grid
    from ReirradiationNPCLib.report_figures import boundary_faces

    grid = Grid((5, 5, 5), (10.0, 20.0, 30.0), (1.0, 2.0, 3.0))
    mask = np.ones((1, 1, 1), bool)
    verts, normals = boundary_faces(mask, (slice(2, 3), slice(1, 2), slice(3, 4)), grid)
    assert verts.shape == (6, 4, 3) and normals.shape == (6, 3)
    # voxel (k, j, i) = (2, 1, 3): centre (10 + 3, 20 + 2, 30 + 6) mm, half sizes (0.5, 1, 1.5) mm
    pts = verts.reshape(-1, 3)
    assert np.allclose(pts.min(axis=0), [12.5, 21.0, 34.5]) and np.allclose(pts.max(axis=0), [13.5, 23.0, 37.5])
    # two voxels side by side share no face: 10 faces
    verts, _ = boundary_faces(np.ones((1, 1, 2), bool), (slice(0, 1), slice(0, 1), slice(0, 2)), grid)
    assert len(verts) == 10
