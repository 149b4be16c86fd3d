"""``reirradiation-npc review`` side panels: the DVH of the selected organ with its limits and the registration
check. Pure parts by hand (a linear dose field, hand-made results rows); on the demo, the curves read back against
results.json; then the real page in headless chromium (the DVH drawn with its failed limit in red, the basis
stated, the prior CT blended over the current CT with its QA figures), the results folder unchanged.

Set REIRRADIATION_REVIEW_PANELS_SCREENSHOT=path to save the page with both panels open.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from analytic import cli_env, run_cli
from browser_support import (CHROMIUM, CHROMIUM_ARGS, checksums as _checksums, free_port as _free_port,
                             missing as _missing, png as _png, red_pixels as _red_pixels,
                             stable_shot as _stable_shot, stop_server as _stop_server,
                             wait_http_200 as _wait_http_200)
from ReirradiationNPCLib.dvh_curves import DVHCurve
from ReirradiationNPCLib.geometry import Grid
from ReirradiationNPCLib.review_panels import (curve_source, dose_at_volume, dvh_svg, limit_marks, organ_curve,
                                              registration_summary, sampling_factors, volume_at_dose)

# ------------------------------------------------------------------------------------------------- by hand


def _linear_dose():
    """Dose grid 12 x 3 x 3 voxels of 1 mm, origin 0: dose = x + 0.05 Gy (x in mm), exact under trilinear
    interpolation (the 0.05 keeps every sample off a 0.1 Gy bin edge)."""
    grid = Grid((12, 3, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x = np.arange(12, dtype=float)
    dose = np.broadcast_to(x + 0.05, (3, 3, 12)).copy()
    return dose, grid


def test_organ_curve_on_a_linear_dose_by_hand():
    dose, dgrid = _linear_dose()
    # organ: voxels x = 2..7 mm (6 voxels of 1 mm^3 = 0.006 cc) at y = z = 1, on its own 6 x 1 x 1 grid
    mask = np.ones((1, 1, 6), bool)
    mgrid = Grid((6, 1, 1), (2.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    # one sample per voxel: doses 2.05 .. 7.05 Gy, 0.001 cc each
    c = organ_curve(mask, mgrid, dose, dgrid, factors=(1, 1, 1))
    assert c.total_cc == pytest.approx(0.006)
    assert volume_at_dose(c, 5.0) == pytest.approx(0.003)     # 5.05, 6.05, 7.05 Gy
    assert volume_at_dose(c, 2.0) == pytest.approx(0.006)
    assert volume_at_dose(c, 7.1) == pytest.approx(0.0)
    assert dose_at_volume(c, 0.001) == pytest.approx(7.0)     # one sample at 7.05: bin edge 7.0
    assert dose_at_volume(c, 0.003) == pytest.approx(5.0)
    # two sub-voxels along x: samples at x = 1.75, 2.25, ..., 7.25 -> doses 1.8 .. 7.3 Gy, 0.0005 cc each
    c2 = organ_curve(mask, mgrid, dose, dgrid, factors=(2, 1, 1))
    assert c2.total_cc == pytest.approx(0.006)
    assert volume_at_dose(c2, 5.0) == pytest.approx(5 * 0.0005)  # 5.3, 5.8, 6.3, 6.8, 7.3 Gy
    assert dose_at_volume(c2, 0.0005) == pytest.approx(7.3)
    # the mask padded with empty voxels gives the same curve (it is cropped to the organ)
    padded = np.zeros((3, 3, 10), bool)
    padded[1, 1, 2:8] = True
    c3 = organ_curve(padded, Grid((10, 3, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), dose, dgrid, factors=(1, 1, 1))
    np.testing.assert_allclose(c3.volume_cc, c.volume_cc)


def _results():
    """Hand-made results.json in the shape the run writes (docs/outputs.md)."""
    return {
        "structures": [
            {"name": "SpinalCord", "volume_cc": 10.0, "alpha_beta": 2.0,
             "sampling": {"subdivision_ijk": [2, 2, 4]},
             "check_on_file": {"nrrd": "cumulative_eqd2_ab2_credit50.nrrd", "alpha_beta": 2.0,
                               "recovery_credit": {"course1": 0.5},
                               "undiscounted": {"nrrd": "cumulative_eqd2_ab2.nrrd", "dicom": None}}},
            {"name": "Brainstem", "volume_cc": 16.0,
             "check_on_file": {"nrrd": "cumulative_eqd2_ab2.nrrd", "alpha_beta": 2.0, "recovery_credit": {},
                               "undiscounted": None}},
            {"name": "Lobe_Temporal_L", "volume_cc": 50.0},
        ],
        "constraints": [
            {"structure": "Brainstem", "metric": "D0.03cc", "scope": "cumulative", "basis": "undiscounted",
             "status": "fail", "value": 62.9, "limit": 50.0, "unit": "Gy"},
            {"structure": "SpinalCord", "metric": "D0.03cc", "scope": "cumulative", "basis": "undiscounted",
             "status": "pass", "value": 36.3, "limit": 67.75, "unit": "Gy"},
            {"structure": "SpinalCord", "metric": "D0.03cc", "scope": "per_course", "course": "course1",
             "status": "pass", "value": 35.7, "limit": 49.0, "unit": "Gy"},
            {"structure": "Lobe_Temporal_L", "metric": "V40Gy", "scope": "cumulative", "status": "fail",
             "value": 4.0, "limit": 2.0, "unit": "%"},
            {"structure": "Lobe_Temporal_L", "metric": "Dmean", "scope": "cumulative", "status": "warn",
             "value": 29.0, "limit": 30.0, "unit": "Gy"},
            {"structure": "Lobe_Temporal_L", "metric": "D1%", "scope": "cumulative", "status": "pass",
             "value": 55.0, "limit": 60.0, "unit": "Gy"},
            {"structure": "Lobe_Temporal_L", "metric": "Dmax", "scope": "cumulative", "status": "no_limit",
             "value": 70.0, "limit": None, "unit": "Gy"},
        ],
        "registration": {
            "course1": {"method": "deformable", "mattes_mi_before": 0.3172, "mattes_mi_after": 0.8949,
                        "rotation_deg": 2.0073, "translation_mm": [3.0, 4.0, 0.0],
                        "max_bspline_displacement_mm": 4.26,
                        "jacobian_determinant": {"min": 0.81, "max": 1.23, "folded_voxels": 0},
                        "dice": {"Parotid_L": {"current": "Parotid_L", "dice": 0.912}},
                        "time_s": 14.2, "notes": ["check the mandible"],
                        "registered_prior_ct": "prior_ct_course1_registered.nrrd"},
            "course0": {"method": "identity", "mattes_mi_before": None, "mattes_mi_after": None},
        },
    }


def test_curve_source_follows_the_rows_basis():
    r = _results()
    undisc = curve_source(r, "SpinalCord", "undiscounted")
    assert (undisc.basis, undisc.file) == ("undiscounted", "cumulative_eqd2_ab2.nrrd")
    assert "undiscounted" in undisc.text and "alpha/beta 2 Gy" in undisc.text
    cred = curve_source(r, "SpinalCord", "credited")
    assert (cred.basis, cred.file) == ("credited", "cumulative_eqd2_ab2_credit50.nrrd")
    assert "course1 50%" in cred.text
    # no credit on the organ: undiscounted and credited sums are one map
    bs = curve_source(r, "Brainstem", "undiscounted")
    assert (bs.basis, bs.file) == ("undiscounted", "cumulative_eqd2_ab2.nrrd")
    # no check map named (older results): the display map, said plainly
    old = curve_source(r, "Lobe_Temporal_L", "undiscounted")
    assert (old.basis, old.file) == ("display", "cumulative_eqd2.nrrd") and "DISPLAY" in old.text
    assert sampling_factors(r, "SpinalCord") == (2, 2, 4) and sampling_factors(r, "Brainstem") is None


def test_limit_marks_place_each_limit_on_the_curve():
    r = _results()
    marks, skipped = limit_marks(r, "SpinalCord")
    assert len(marks) == 1 and len(skipped) == 1 and "per_course course1" in skipped[0]
    m = marks[0]
    assert (m.kind, m.limit_gy, m.limit_cc, m.value_gy, m.value_cc) == ("dose", 67.75, 0.03, 36.3, 0.03)
    assert m.color == "#2ca02c" and m.basis == "undiscounted"
    marks, skipped = limit_marks(r, "Lobe_Temporal_L")
    assert skipped == ["Dmax cumulative: no_limit (no limit)"]
    v, mean, d1 = marks
    # V40Gy <= 2 % of 50 cc = 1 cc; judged 4 % = 2 cc; at 40 Gy
    assert (v.kind, v.limit_gy, v.limit_cc, v.value_gy, v.value_cc) == ("volume", 40.0, 1.0, 40.0, 2.0)
    assert v.color == "#d62728" and v.label == "V40Gy <= 2 %: 4.00 % (fail)"
    # Dmean: a line at the limit, no point of the curve; the judged value on the dose axis
    assert (mean.limit_gy, mean.limit_cc, mean.value_gy, mean.value_cc) == (30.0, None, 29.0, 0.0)
    assert mean.color == "#e69500"
    # D1% of 50 cc = 0.5 cc
    assert (d1.limit_gy, d1.limit_cc) == (60.0, 0.5)


def test_dvh_svg_draws_the_curve_and_the_failed_limit_in_red():
    curve = DVHCurve(np.array([0.0, 10.0, 20.0, 30.0]), np.array([2.0, 2.0, 1.0, 0.0]), 2.0)
    marks, _ = limit_marks(_results(), "Brainstem")
    svg = dvh_svg(curve, marks, "Brainstem: cumulative EQD2 DVH")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="dvh-curve"') == 1 and svg.count('class="dvh-limit status-fail"') == 1
    # plot box x from 52 to 460 - 12 = 448 px; x range 0 .. 1.05 x 62.9 Gy (the judged value is the largest x)
    xmax = 62.9 * 1.05
    x50 = 52 + (448 - 52) * 50.0 / xmax
    assert f'x1="{x50:.1f}"' in svg and 'stroke="#d62728"' in svg
    # curve: 4 points; (10 Gy, 2 cc) at x = 52 + 396 * 10 / xmax, y = top of the plot box (24) + 190 * (1 - 2 / ymax)
    ymax = 2.0 * 1.05
    pt = f"{52 + 396 * 10 / xmax:.1f},{24 + 190 * (1 - 2.0 / ymax):.1f}"
    assert pt in svg
    assert "no curve" in dvh_svg(None, marks, "x", note="no segment")


def test_registration_summary_lists_the_qa_figures():
    regs = registration_summary(_results())
    assert [r.course for r in regs] == ["course1", "course0"]
    figs = dict(regs[0].figures[:-1])
    assert figs["method"] == "deformable"
    assert figs["Mattes MI before -> after"] == "0.317 -> 0.895 nats (higher = better aligned)"
    assert figs["rotation"] == "2.01 deg"
    assert figs["translation (LPS)"] == "(3.0, 4.0, 0.0) mm, |t| 5.0 mm"
    assert figs["Jacobian determinant"] == "min 0.81, max 1.23, folded_voxels 0"
    assert figs["Dice (prior structures mapped)"] == "Parotid_L 0.91"
    assert regs[0].figures[-1] == ("note", "check the mandible")
    assert regs[0].registered_ct == "prior_ct_course1_registered.nrrd"
    assert regs[1].registered_ct is None and dict(regs[1].figures)["Mattes MI before -> after"] == "— -> — nats"
    assert registration_summary({"registration": []}) == []


# ------------------------------------------------------------- the wash and the registration check (no browser)

class _State(dict):
    """trame's server state as the panels use it: attributes and items, None for a name never set."""

    def __getattr__(self, name):
        return self.get(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __getitem__(self, name):
        return self.get(name)

    def change(self, *names):
        return lambda f: f


class _View:
    def __init__(self, fg, opacity):
        self.fg, self.opacity = fg, opacity

    def get_foreground_volume_id(self):
        return self.fg

    def set_foreground_volume_id(self, fg):
        self.fg = fg

    def get_foreground_opacity(self):
        return self.opacity

    def set_foreground_opacity(self, opacity):
        self.opacity = opacity

    def schedule_render(self):
        pass


class _Node:
    def __init__(self, node_id):
        self.node_id = node_id

    def GetID(self):  # noqa: N802 - MRML's name
        return self.node_id

    def GetDisplayNode(self):  # noqa: N802
        return None

    def GetImageData(self):  # noqa: N802
        return None


def test_a_wash_chosen_during_the_registration_check_comes_back_when_the_check_is_off(tmp_path):
    """Three slice views show wash A at opacities 0.5, 0.4, 0.3. The registration check puts the prior CT over them
    (opacity 0.7); choosing wash B meanwhile leaves the prior CT shown (ReviewPanels.wash_held says so) and "off"
    then shows B, not A, at the wash opacity of the page (0.6); with the check off, choosing A shows A at once and
    wash_held says False."""
    from types import SimpleNamespace

    from ReirradiationNPCLib.mrml_web_panels import ReviewPanels
    from ReirradiationNPCLib.mrml_web_review import ReviewApp
    from ReirradiationNPCLib.review_panels import CourseRegistration
    from ReirradiationNPCLib.review_results import wash_choice

    views = [_View("wash_a", 0.5), _View("wash_a", 0.4), _View("wash_a", 0.3)]
    vm = SimpleNamespace(get_slice_views=lambda: views, get_views=lambda: views)
    app = object.__new__(ReviewApp)   # the review app without trame: its set_wash on these views
    app.run = SimpleNamespace(results={}, folder=tmp_path)
    app.server = SimpleNamespace(state=_State())
    app.slicer_app = SimpleNamespace(view_manager=vm)
    app.ct, app.cumulative, app.wash_key = _Node("ct"), _Node("wash_a"), "a"
    app.wash = {"a": (wash_choice("cumulative_eqd2"), _Node("wash_a")),
                "b": (wash_choice("course_dose", "course1"), _Node("wash_b"))}
    panels = ReviewPanels(app)
    app.review_panels = panels
    panels.registrations = {"course1": CourseRegistration("course1", "rigid", "prior.nrrd", [])}
    panels._prior_nodes["course1"] = _Node("prior")   # as if loaded from prior.nrrd

    panels._on_registration(reg_course="course1", reg_blend=0.7)
    assert [(v.fg, v.opacity) for v in views] == [("prior", 0.7)] * 3
    app.server.state.update(wash_key="b", wash_opacity=0.6)
    app.set_wash("b")
    assert app.wash_key == "b"
    assert [(v.fg, v.opacity) for v in views] == [("prior", 0.7)] * 3   # the check keeps the foreground
    panels._on_registration(reg_course="off")
    assert [(v.fg, v.opacity) for v in views] == [("wash_b", 0.6)] * 3
    assert panels.wash_held("wash_a") is False
    assert [v.fg for v in views] == ["wash_b"] * 3
    app.set_wash("a")
    assert [v.fg for v in views] == ["wash_a"] * 3
    # during the check: held, the views unchanged; off puts back the held wash at each view's saved opacity
    app.server.state.update(wash_key=None, wash_opacity=None)   # a page without the wash controls
    views[1].opacity = 0.2
    panels._on_registration(reg_course="course1", reg_blend=0.7)
    assert panels.wash_held("wash_b") is True
    assert [v.fg for v in views] == ["prior"] * 3
    panels._on_registration(reg_course="off")
    assert [(v.fg, v.opacity) for v in views] == [("wash_b", 0.6), ("wash_b", 0.2), ("wash_b", 0.6)]


# ------------------------------------------------------------------------------------------- on the demo



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``reirradiation-npc demo``: the synthetic case with rigid registration of the prior CT (a registered prior CT
    and its QA figures), scene.mrb when slicer-core is installed."""
    out = tmp_path_factory.mktemp("panels") / "demo"
    res = run_cli("demo", "-o", out, timeout=600)
    assert res.returncode == 0, res.stderr
    return out


def test_demo_curves_read_back_the_tables_values(demo):
    """Each organ's curve (its check map inside its contour, the engine's sampling) gives back results.json's
    D0.03cc, Dmean and V<x>Gy within one 0.1 Gy bin plus 0.6 % (EQD2 interpolated on the map vs computed per
    sample by the engine); the cord's undiscounted curve is the plain sum, its credited one the credited sum."""
    from ReirradiationNPCLib.io import read_dose, read_structures
    results = json.loads((demo / "results" / "results.json").read_text(encoding="utf-8"))
    structures = {s.name: s for s in read_structures(demo / "case" / "structures")}
    checked = 0
    for row in results["constraints"]:
        if row.get("scope") != "cumulative" or row["structure"] not in structures:
            continue
        name = row["structure"]
        entry = [s for s in results["structures"] if s["name"] == name][0]
        for basis in ("undiscounted", "credited"):
            src = curve_source(results, name, basis)
            metrics = entry["cumulative_undiscounted"] if src.basis == "undiscounted" else entry["metrics"]["cumulative"]
            dose = read_dose(demo / "results" / src.file)
            s = structures[name]
            curve = organ_curve(s.mask, s.grid, dose.array, dose.grid, sampling_factors(results, name))
            assert curve.total_cc == pytest.approx(entry["volume_cc"], rel=1e-6)
            d = dose_at_volume(curve, 0.03)
            assert abs(d - metrics["D0.03cc"]) <= 0.1 + 0.006 * metrics["D0.03cc"], (name, basis, d)
            # mean dose = area under the cumulative DVH / volume (bins of 0.1 Gy: within one bin)
            mean = float(np.sum(curve.volume_cc[1:]) * 0.1 / curve.total_cc)
            assert abs(mean - metrics["Dmean"]) <= 0.1 + 0.006 * metrics["Dmean"], (name, basis, mean)
            if row["metric"].startswith("V"):
                x = float(row["metric"][1:-2])
                assert volume_at_dose(curve, x) == pytest.approx(metrics[row["metric"]], rel=0.02, abs=0.02)
            checked += 1
    assert checked >= 20
    cord = [s for s in results["structures"] if s["name"] == "SpinalCord"][0]
    assert cord["cumulative_undiscounted"]["D0.03cc"] > 1.5 * cord["metrics"]["cumulative"]["D0.03cc"]












def _changed(a: np.ndarray, b: np.ndarray, by: int = 40) -> float:
    """Fraction of pixels where a channel moved by more than ``by`` (the streamed images' quality steps up after a
    render settles: a few units everywhere)."""
    return float(np.count_nonzero(np.abs(a - b).max(axis=-1) > by)) / (a.shape[0] * a.shape[1])


def test_panels_in_a_real_browser(demo):
    missing = _missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    folder = demo / "results"
    assert (folder / "scene.mrb").is_file()
    before = _checksums(folder)
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "ReirradiationNPCLib.cli", "review", str(folder),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=cli_env(),
                            start_new_session=True)
    try:
        _wait_http_200(url, proc, timeout=180)
        with sync_playwright() as p, tempfile.TemporaryDirectory() as user_dir:
            ctx = p.chromium.launch_persistent_context(user_dir, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": 1400, "height": 1000})
            try:
                page = ctx.new_page()
                page.goto(url)
                page.wait_for_selector("tr.constraint-row", timeout=90_000)
                rows = results["constraints"]
                # a failing row: its organ's DVH with the failed limit in red and the basis stated
                i = next(k for k, c in enumerate(rows) if c["status"] == "fail" and c["metric"] == "D0.03cc")
                organ, limit = rows[i]["structure"], rows[i]["limit"]
                page.locator("tr.constraint-row").nth(i).click()
                page.wait_for_selector("#dvh svg .dvh-curve", timeout=60_000)
                basis = page.inner_text("#dvh-basis")
                assert basis.startswith(f"{organ}: cumulative EQD2, alpha/beta") and ".nrrd" in basis
                red = page.locator("#dvh .dvh-limit.status-fail line")
                assert red.count() >= 1 and red.first.get_attribute("stroke") == "#d62728"
                assert f"D0.03cc <= {limit:g} Gy" in page.text_content("#dvh svg")
                shot = _png(page.locator("#dvh").screenshot())
                r_, g_, b_ = shot[..., 0], shot[..., 1], shot[..., 2]
                assert np.count_nonzero((r_ > 180) & (g_ < 80) & (b_ < 80)) > 50, "no red limit in the DVH"
                # the cord's cumulative limit is on the undiscounted sum: that map, and the per-course rows listed
                j = next(k for k, c in enumerate(rows) if c["structure"] == "SpinalCord"
                         and c.get("scope") == "cumulative")
                page.locator("tr.constraint-row").nth(j).click()
                page.wait_for_function("() => document.querySelector('#dvh-basis').innerText"
                                       ".startsWith('SpinalCord')", timeout=60_000)
                assert "undiscounted sum" in page.inner_text("#dvh-basis")
                assert "cumulative_eqd2_ab2.nrrd" in page.inner_text("#dvh-basis")
                assert "not on this curve" in page.inner_text("#dvh-notes")

                # registration check: the prior CT over the current CT, its QA figures beside
                views = page.locator("#views")
                wash = _stable_shot(views)
                page.select_option("#reg-course", value="course1")
                page.wait_for_selector("tr.reg-figure", timeout=60_000)
                figures = page.inner_text("#reg-figures")
                reg = results["registration"]["course1"]
                assert f"{reg['mattes_mi_before']:.3f} -> {reg['mattes_mi_after']:.3f} nats" in figures
                assert f"{reg['rotation_deg']:.2f} deg" in figures and "rigid" in figures
                blended = _stable_shot(views)
                assert _changed(blended, wash) > 0.2, "the prior CT did not replace the dose wash"
                # the blend: prior CT hidden (0) vs alone (1). The two CTs are registered, so they differ only in
                # places (measured on the demo: 2 % of the views' pixels by more than 10 grey levels)
                page.locator("#reg-blend").fill("0")
                page.wait_for_function("() => document.querySelector('#reg-info').innerText"
                                       ".includes('opacity 0.00')", timeout=30_000)
                hidden = _stable_shot(views)
                page.locator("#reg-blend").fill("1")
                page.wait_for_function("() => document.querySelector('#reg-info').innerText"
                                       ".includes('opacity 1.00')", timeout=30_000)
                opaque = _stable_shot(views)
                assert _changed(opaque, hidden, by=10) > 0.005, "the blend control did not change the views"
                shot_path = os.environ.get("REIRRADIATION_REVIEW_PANELS_SCREENSHOT")
                if shot_path:
                    page.locator("#reg-blend").fill("0.5")
                    page.locator("tr.constraint-row").nth(i).click()
                    page.wait_for_function("([o]) => document.querySelector('#dvh-basis').innerText"
                                           ".startsWith(o)", arg=[organ], timeout=60_000)
                    _stable_shot(views)
                    page.screenshot(path=shot_path)
                # off: the dose wash is back as it was
                page.select_option("#reg-course", value="off")
                page.wait_for_function("() => document.querySelectorAll('tr.reg-figure').length === 0",
                                       timeout=30_000)
                back = _stable_shot(views)
                assert _changed(back, opaque) > 0.2
                if not shot_path:
                    assert _changed(back, wash) < 0.01, "the dose wash did not come back"
            finally:
                ctx.close()
    finally:
        _stop_server(proc, timeout=30)
        log.seek(0)
        output = log.read().decode("utf-8", "replace")
        log.close()
    assert "review stopped" in output, output[-2000:]
    assert proc.returncode == 0
    assert _checksums(folder) == before, "the review wrote into RESULTS_DIR"
