"""``reirradiation-npc review``: the pure helpers (worst voxel by hand, defensive table rows, folder checks) and the
real thing — the trame-slicer server as a subprocess on a free local port, driven by Debian's headless chromium
through Playwright, asserting what a person sees (table rows, violation red, slice views that move on a click) and
that the results folder is unchanged.

Set REIRRADIATION_REVIEW_SCREENSHOT=path to also save the page screenshot (docs/images/review.png is made that way).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from analytic import cli_env, run_cli
from browser_support import (CHROMIUM, CHROMIUM_ARGS, checksums as _checksums, free_port as _free_port,
                             missing as _missing, png as _png, red_pixels as _red_pixels,
                             stable_shot as _stable_shot, stop_server as _stop_server)
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.review_results import (isodose_levels, load_run, recorded_input, sort_wash_choices,
                                                table_rows, verdict_line, violation_segments, wash_choice,
                                                wash_kind_of_file, worst_point)



# ----------------------------------------------------------------------------------------------- pure helpers

def test_worst_point_picks_the_highest_voxel_inside_the_mask_on_another_grid():
    # dose grid: 1 mm voxels, origin 0; mask grid: 2 mm voxels, origin (10, 20, 30) mm (RAS)
    dose = np.zeros((40, 40, 40))
    dose[35, 25, 15] = 99.0          # outside the mask: must be ignored
    dose[31, 21, 11] = 7.0           # RAS (11, 21, 31): inside mask voxel i=0..., see below
    dose[33, 23, 13] = 8.0           # RAS (13, 23, 33): inside
    mask = np.zeros((3, 3, 3), bool)  # mask voxel (i, j, k) centre at (10 + 2i, 20 + 2j, 30 + 2k); covers 9..15 mm
    mask[:2, :2, :2] = True           # covers RAS x 9..13, y 19..23, z 29..33 (centres 10,12 / 20,22 / 30,32)
    m2r = np.diag([2.0, 2.0, 2.0, 1.0])
    m2r[:3, 3] = (10, 20, 30)
    ras, value = worst_point(mask, m2r, dose, np.eye(4))
    # (13, 23, 33) is on the mask's outer boundary (13 = 12 + 1): nearest mask voxel i = round(1.5) = 2 -> outside
    assert value == 7.0
    np.testing.assert_allclose(ras, (11.0, 21.0, 31.0))


def test_worst_point_none_when_the_mask_misses_the_dose_grid():
    m2r = np.eye(4)
    m2r[:3, 3] = (100, 100, 100)
    assert worst_point(np.ones((2, 2, 2), bool), m2r, np.ones((5, 5, 5)), np.eye(4)) is None
    assert worst_point(np.zeros((2, 2, 2), bool), np.eye(4), np.ones((5, 5, 5)), np.eye(4)) is None


def test_table_rows_read_missing_fields_defensively():
    rows = table_rows({"constraints": [
        {"structure": "Brainstem", "metric": "D0.03cc", "scope": "cumulative", "status": "fail", "value": 52.9,
         "limit": 50.0, "unit": "Gy", "basis": "undiscounted", "verified": False, "source": "paper"},
        {"organ": "cord", "status": "pass"},
        "not a row",
        {"structure": "Cord", "scope": "per_course", "course": "course1", "value": 3, "unit": "cc"}]})
    assert [r["index"] for r in rows] == [0, 1, 3]
    assert rows[0]["value"] == "52.90 Gy" and rows[0]["limit"] == "50.00 Gy" and rows[0]["basis"] == "undiscounted"
    assert rows[0]["verified"] == "no"
    assert rows[1]["structure"] == "cord" and rows[1]["value"] == "—" and rows[1]["basis"] == "—"
    assert rows[1]["verified"] == "—"
    assert rows[2]["scope"] == "per_course (course1)" and rows[2]["value"] == "3 cc"


def test_verdict_line_shows_the_code_when_present():
    assert verdict_line({"summary": {"verdict": "3 limit(s) exceeded", "verdict_code": "limits_exceeded"}}) == \
        "[limits_exceeded] 3 limit(s) exceeded"
    assert verdict_line({"summary": {"verdict": "x"}}) == "x"


def test_load_run_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(InputError, match="no results.json"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="cannot be read as JSON"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(InputError, match="not a results.json"):
        load_run(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        load_run(tmp_path / "missing")


def test_cli_review_without_the_extra_names_it_and_exits_2(tmp_path):
    """trame-slicer made unimportable in the CLI process: one line naming the pip extra, exit code 2."""
    (tmp_path / "results.json").write_text('{"constraints": [], "summary": {"verdict": "x"}}', encoding="utf-8")
    code = ("import sys; sys.modules['trame_slicer'] = None; sys.modules['trame'] = None; "
            "from ReirradiationNPCLib.cli import main; main()")
    res = subprocess.run([sys.executable, "-c", code, "review", str(tmp_path)], capture_output=True, text=True,
                         env=cli_env(), timeout=120)
    assert res.returncode == 2, res.stderr
    assert 'pip install "reirradiation-npc[review]"' in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_review_on_a_port_in_use_exits_2_with_one_line(tmp_path):
    """Another program listens on the port: one line naming it and --port, exit 2, before any heavy import (it was
    an internal error, exit 1, after the scene had loaded)."""
    import socket
    (tmp_path / "results.json").write_text('{"constraints": [], "summary": {"verdict": "x"}}', encoding="utf-8")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = run_cli("review", tmp_path, "--port", port)
    assert res.returncode == 2, res.stderr
    assert f"127.0.0.1:{port}" in res.stderr and "--port" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_review_on_a_folder_that_is_not_a_run_exits_2_with_one_line(tmp_path):
    res = run_cli("review", tmp_path)
    assert res.returncode == 2
    assert "not the output of `reirradiation-npc run`" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ real browser test














# ------------------------------------------------------------------------------------- pure helpers (wash maps)

def test_wash_kinds_of_the_run_output_files():
    assert wash_kind_of_file("cumulative_eqd2.nrrd") == ("cumulative_eqd2", None)
    assert wash_kind_of_file("eqd2_course1.nrrd") == ("course_eqd2", "course1")
    assert wash_kind_of_file("eqd2_re_rt_2024.nrrd") == ("course_eqd2", "re_rt_2024")
    assert wash_kind_of_file("headroom.nrrd") == ("headroom", None)
    assert wash_kind_of_file("remaining_dose.nrrd") == ("remaining_dose", None)
    for other in ("cumulative_eqd2_ab2.nrrd", "cumulative_eqd2_ab2_credit50.nrrd", "cumulative_eqd2_worst.nrrd",
                  "alpha_beta.nrrd", "violations.seg.nrrd", "margins.seg.nrrd", "eqd2_.nrrd", "results.json"):
        assert wash_kind_of_file(other) is None, other


def test_wash_choices_order_and_labels_say_what_is_not_a_dose():
    shuffled = [wash_choice("remaining_dose"), wash_choice("course_dose", "c2"), wash_choice("headroom"),
                wash_choice("course_eqd2", "c1"), wash_choice("cumulative_eqd2"), wash_choice("course_eqd2", "c2"),
                wash_choice("course_dose", "c1")]
    keys = [c.key for c in sort_wash_choices(shuffled)]
    # kinds in the selector's order; courses keep the order they came in
    assert keys == ["cumulative_eqd2", "course_eqd2:c1", "course_eqd2:c2", "course_dose:c2", "course_dose:c1",
                    "headroom", "remaining_dose"]
    assert "NOT a dose" in wash_choice("headroom").label and not wash_choice("headroom").is_dose
    assert "NOT a plan dose" in wash_choice("remaining_dose").label
    assert "Physical" in wash_choice("course_dose", "c1").label and "c1" in wash_choice("course_dose", "c1").label
    with pytest.raises(ValueError):
        wash_choice("alpha_beta")


def test_isodose_levels_are_the_distinct_cumulative_gy_limits():
    results = {"constraints": [
        {"scope": "cumulative", "unit": "Gy", "limit": 54.0}, {"scope": "cumulative", "unit": "Gy", "limit": 54},
        {"scope": "cumulative", "unit": "Gy", "limit": 67.75}, {"scope": "per_course", "unit": "Gy", "limit": 49.0},
        {"scope": "cumulative", "unit": "cc", "limit": 1.0}, {"scope": "cumulative", "unit": "Gy", "limit": None},
        {"scope": "cumulative", "unit": "Gy", "limit": 0.0}, {"scope": "current", "unit": "Gy", "limit": 30.0},
        "not a row"]}
    assert isodose_levels(results) == [54.0, 67.75]


def test_violation_segments_and_recorded_inputs():
    results = {"violations": [{"segment": "Brainstem D0.03cc > 50 Gy", "structure": "Brainstem"},
                              {"segment": "Lobe_Temporal_L V40Gy > 1 cc", "structure": "Lobe_Temporal_L"},
                              {"segment": "Lobe_Temporal_L D0.03cc > 60 Gy", "structure": "Lobe_Temporal_L"}],
               "provenance": {"inputs": {"reference.image": {"path": "/data/ct", "sha256": "ab"}}}}
    assert violation_segments(results, "Lobe_Temporal_L") == ["Lobe_Temporal_L V40Gy > 1 cc",
                                                              "Lobe_Temporal_L D0.03cc > 60 Gy"]
    assert violation_segments(results, "SpinalCord") == []
    assert recorded_input(results, "reference.image") == (Path("/data/ct"), "ab")
    assert recorded_input(results, "reference.structures") is None
    assert recorded_input({}, "reference.image") is None


# ------------------------------------------------------------------------------------------ real browser tests

def _quadrants(page):
    """(slice views, 3D view) locators: trame-slicer's layout items; the 3D view is the one without a slice slider."""
    items = page.locator(".layout-grid-item")
    three_d = page.locator(".layout-grid-item", has_not=page.locator(".slice-slider-gutter"))
    return items, three_d


#: a pixel "changed" when a channel moved by more than this (0-255): the streamed views come as JPEG-like images whose
#: quality can step up once a render settles, which moves most pixels by a few units without anything shown changing
PIXEL_TOLERANCE = 40


def _changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of the pixels that changed by more than PIXEL_TOLERANCE in a channel."""
    return float(np.count_nonzero(np.any(np.abs(a - b) > PIXEL_TOLERANCE, axis=-1))) / (a.shape[0] * a.shape[1])


class Review:
    """A review server subprocess on a free local port (stopped with SIGINT, i.e. Ctrl-C, by ``stop``)."""

    def __init__(self, folder: Path, *options: str):
        self.folder = folder
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "ReirradiationNPCLib.cli", "review", str(folder),
                                      "--port", str(self.port), *options], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"review server exited early:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("no HTTP 200 from the review server")
            time.sleep(1.0)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def stop(self) -> str:
        _stop_server(self.proc, timeout=30)  # SIGINT: what Ctrl-C does
        out = self.output()
        self.log.close()
        return out


@pytest.fixture(scope="module")
def demo_results(synthetic_case, tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip(missing)
    out = tmp_path_factory.mktemp("review") / "results"
    res = run_cli("run", synthetic_case, "-o", out, "--scene", timeout=600)
    assert res.returncode == 0, res.stderr
    assert (out / "scene.mrb").is_file()
    return out


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p, tempfile.TemporaryDirectory() as user_dir:
        ctx = p.chromium.launch_persistent_context(user_dir, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                                   headless=True, viewport={"width": 1400, "height": 850})
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture(scope="module")
def server(demo_results):
    """One review server on the demo results (with scene.mrb) for the module's browser tests; on teardown it is
    stopped with Ctrl-C and must say so, exit 0, and leave the results folder byte for byte as it was."""
    before = _checksums(demo_results)
    review = Review(demo_results)
    yield review
    output = review.stop()
    assert f"http://127.0.0.1:{review.port}/" in output
    assert "review stopped" in output, output[-2000:]
    assert review.proc.returncode == 0
    assert _checksums(demo_results) == before, "the review wrote into RESULTS_DIR"


def _open(browser, url: str):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("tr.constraint-row", timeout=90_000)
    # every browser on one server shares the page state (docs/review.md): start from the initial display
    if page.locator("#clear-selection").is_visible():
        page.locator("#clear-selection").click()
        page.wait_for_function("() => document.querySelector('#selected-info').innerText.startsWith('No row')")
    page.select_option("#wash-map", "cumulative_eqd2")
    if page.locator("#isodose-toggle").count():
        page.locator("#isodose-toggle").check()
    return page


def _red_settled(locator, minimum: int = 50, timeout: float = 90.0) -> np.ndarray:
    """A settled screenshot of ``locator`` once it shows more than ``minimum`` violation-red pixels."""
    end = time.monotonic() + timeout
    shot = _png(locator.screenshot())
    while _red_pixels(shot) <= minimum and time.monotonic() < end:
        time.sleep(1.0)
        shot = _png(locator.screenshot())
    assert _red_pixels(shot) > minimum, "no violation-red pixels"
    return _stable_shot(locator)


def test_review_in_a_real_browser(server, browser):
    results = json.loads((server.folder / "results.json").read_text(encoding="utf-8"))
    page = _open(browser, server.url)
    try:
        page.select_option("#wash-map", "cumulative_eqd2")
        # the table has the run's rows, in order
        names = page.locator("tr.constraint-row td.col-structure").all_inner_texts()
        expected = [c.get("structure") or c.get("organ") for c in results["constraints"]]
        assert [n.strip() for n in names] == expected
        statuses = [s.strip() for s in page.locator("tr.constraint-row td.col-status").all_inner_texts()]
        assert statuses == [c.get("status") for c in results["constraints"]]
        assert results["summary"]["verdict"] in page.inner_text("#verdict")

        views = page.locator("#views")
        # the demo exceeds limits: violation regions drawn in red in the views (once the streamed renders arrived)
        assert "fail" in statuses
        first = _red_settled(views)

        # clicking a failing row centres the slice views on that organ's worst voxel: the pixels change
        fail_idx = statuses.index("fail")
        page.locator("tr.constraint-row").nth(fail_idx).click()
        organ = expected[fail_idx]
        page.wait_for_function(
            "([o]) => document.querySelector('#selected-info').innerText.startsWith(o + ': worst voxel')",
            arg=[organ], timeout=60_000)
        after = _stable_shot(views)
        assert _changed_fraction(first, after) > 0.01, "slice views did not move on a row click"
        shot = os.environ.get("REIRRADIATION_REVIEW_SCREENSHOT")
        if shot:  # the page as a reviewer sees it after clicking a failed row: centred, highlighted, its DVH
            page.wait_for_selector("#dvh svg .dvh-curve", timeout=60_000)
            page.screenshot(path=shot)
        info = page.inner_text("#selected-info")
        # the wash threshold above every dose hides the colour wash: the slice pixels change again
        page.locator("#wash-threshold").fill(page.locator("#wash-threshold").get_attribute("max"))
        washed_out = _stable_shot(views)
        assert _changed_fraction(after, washed_out) > 0.01, "the threshold control did not change the views"
        page.locator("#wash-threshold").fill("0.5")
        # the worst voxel value (voxel-centre rule) is at most the table's sub-voxel Dmax of that organ
        dmax = [s for s in results["structures"] if s["name"] == organ][0]["metrics"]["cumulative"]["Dmax"]
        value = float(info.split("worst voxel ")[1].split(" Gy")[0])
        assert 0 < value <= dmax + 0.01
    finally:
        page.close()


def test_wash_selector_offers_every_map_of_the_run_and_each_changes_the_views(server, browser):
    results = json.loads((server.folder / "results.json").read_text(encoding="utf-8"))
    courses = [k[len("eqd2_"):-len(".nrrd")] for k in results["outputs"] if k.startswith("eqd2_")]
    assert len(courses) == 2  # the demo: a prior course and the current one
    page = _open(browser, server.url)
    try:
        keys = page.eval_on_selector_all("#wash-map option", "os => os.map(o => o.value)")
        labels = page.eval_on_selector_all("#wash-map option", "os => os.map(o => o.textContent)")
        assert keys == (["cumulative_eqd2"] + [f"course_eqd2:{c}" for c in courses]
                        + [f"course_dose:{c}" for c in courses] + ["headroom", "remaining_dose"])
        assert "NOT a dose" in labels[keys.index("headroom")]
        assert "NOT a plan dose" in labels[keys.index("remaining_dose")]
        slices, _ = _quadrants(page)
        views = page.locator("#views")
        page.select_option("#wash-map", "cumulative_eqd2")
        page.wait_for_function("() => document.querySelector('#wash-legend').innerText.startsWith('Cumulative')")
        prev = _red_settled(views)
        for key, label in zip(keys[1:], labels[1:]):
            page.select_option("#wash-map", key)
            page.wait_for_function("([l]) => document.querySelector('#wash-legend').innerText.startsWith(l)",
                                   arg=[label.strip()], timeout=30_000)
            cur = _stable_shot(views)
            assert _changed_fraction(prev, cur) > 0.005, f"selecting {key} did not change the views"
            legend = page.inner_text("#wash-legend")
            if key == "headroom":
                assert "over the tightest point limit" in legend
                assert not page.locator("#wash-threshold").is_visible()  # no threshold on a signed map
                # green where there is room left, in the slice views
                g = cur[..., 1] - np.maximum(cur[..., 0], cur[..., 2])
                assert np.count_nonzero(g > 60) > 100, "no headroom-green pixels"
            else:
                assert page.locator("#wash-threshold").is_visible()
            prev = cur
    finally:
        page.select_option("#wash-map", "cumulative_eqd2")
        page.close()


def test_isodose_lines_toggle_off_and_on(server, browser):
    page = _open(browser, server.url)
    try:
        page.select_option("#wash-map", "cumulative_eqd2")
        views = page.locator("#views")
        toggle = page.locator("#isodose-toggle")
        toggle.check()
        on = _red_settled(views)
        toggle.uncheck()
        off = _stable_shot(views)
        assert _changed_fraction(on, off) > 0.002, "hiding the isodose lines did not change the views"
        toggle.check()
        again = _stable_shot(views)
        assert _changed_fraction(on, again) < _changed_fraction(on, off) / 4, "isodose lines did not come back"
    finally:
        page.locator("#isodose-toggle").check()
        page.close()


def _saturated_non_red(img: np.ndarray) -> int:
    """Pixels with a colour that is neither grey nor violation red (organ surfaces in the 3D view)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    spread = np.max(img, axis=-1) - np.min(img, axis=-1)
    red = (r > 170) & (g < 80) & (b < 80)
    return int(np.count_nonzero((spread > 25) & ~red))


def test_3d_view_shows_organs_and_violations_and_a_row_click_highlights_one_organ(server, browser):
    results = json.loads((server.folder / "results.json").read_text(encoding="utf-8"))
    page = _open(browser, server.url)
    try:
        _, three_d = _quadrants(page)
        assert three_d.count() == 1
        before = _red_settled(three_d.first)
        # not empty: violation red and coloured organ surfaces (semi-transparent) on the dark background
        assert _red_pixels(before) > 50
        assert _saturated_non_red(before) > 2000, "no organ surfaces in the 3D view"
        # the structure with the most violation segments: its violations stay red, the others are dimmed
        per = {}
        for v in results["violations"]:
            per[v["structure"]] = per.get(v["structure"], 0) + 1
        organ = max(per, key=per.get)
        assert len(per) > 1
        rows = [c.get("structure") for c in results["constraints"]]
        page.locator("tr.constraint-row").nth(rows.index(organ)).click()
        page.wait_for_function("([o]) => document.querySelector('#selected-info').innerText.startsWith(o + ':')",
                               arg=[organ], timeout=60_000)
        after = _stable_shot(three_d.first)
        assert _changed_fraction(before, after) > 0.005, "the 3D view did not change on a row click"
        assert 0 < _red_pixels(after) < _red_pixels(before), "the other violations were not dimmed"
    finally:
        page.close()


def test_review_without_scene_shows_the_ct_of_the_run_inputs(demo_results, browser, synthetic_case):
    """No scene.mrb (a run without --scene): the NRRD outputs, the CT and structures read from the run's inputs
    (unchanged: sha256), isodose lines made in memory; the folder and the inputs are not touched."""
    import shutil
    folder = demo_results.parent / "no_scene"
    shutil.copytree(demo_results, folder, ignore=shutil.ignore_patterns("scene.mrb"))
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    ct_path = Path(results["provenance"]["inputs"]["reference.image"]["path"])
    before, ct_before = _checksums(folder), hashlib.sha256(ct_path.read_bytes()).hexdigest()
    review = Review(folder)
    try:
        page = _open(browser, review.url)
        try:
            note = page.inner_text("#scene-note")
            assert "No scene.mrb" in note and f"CT underlay read from the run's input {ct_path}" in note
            keys = page.eval_on_selector_all("#wash-map option", "os => os.map(o => o.value)")
            # the physical course doses are in scene.mrb only: absent from the selector, not an error
            assert keys == ["cumulative_eqd2", "course_eqd2:course1", "course_eqd2:course2", "headroom",
                            "remaining_dose"]
            views = page.locator("#views")
            shot = _red_settled(views)
            # the CT underlay: grey pixels (bone white, soft tissue grey) beside the wash
            spread = np.max(shot, axis=-1) - np.min(shot, axis=-1)
            assert np.count_nonzero((spread < 8) & (shot[..., 0] > 60)) > 5000, "no CT underlay"
            page.locator("#isodose-toggle").uncheck()
            assert _changed_fraction(shot, _stable_shot(views)) > 0.002, "no isodose lines to hide"
            page.locator("#isodose-toggle").check()
            # the structures came with the CT: a row click centres on the organ's worst voxel
            fail_idx = [c["status"] for c in results["constraints"]].index("fail")
            organ = results["constraints"][fail_idx]["structure"]
            page.locator("tr.constraint-row").nth(fail_idx).click()
            page.wait_for_function(
                "([o]) => document.querySelector('#selected-info').innerText.startsWith(o + ': worst voxel')",
                arg=[organ], timeout=60_000)
        finally:
            page.close()
    finally:
        output = review.stop()
    assert "review stopped" in output and review.proc.returncode == 0, output[-2000:]
    assert _checksums(folder) == before, "the review wrote into RESULTS_DIR"
    assert hashlib.sha256(ct_path.read_bytes()).hexdigest() == ct_before


def test_idle_stop_ends_a_server_no_browser_connects_to(demo_results):
    """--idle-stop 4: the server (it answers HTTP; no browser opens its page) stops by itself, exit 0, saying why;
    without the option it runs until Ctrl-C (the module's server above; trame's own default was 300 s)."""
    review = Review(demo_results, "--idle-stop", "4")
    try:
        review.proc.wait(timeout=90)
    finally:
        output = review.stop()
    assert review.proc.returncode == 0, output[-2000:]
    assert "(Ctrl-C stops; stops after 4 s without a browser)" in output, output[-2000:]
    assert "review stopped (no browser connected for 4 s)" in output, output[-2000:]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_per_viewer_gives_each_browser_its_own_server_and_camera(demo_results, browser):
    """--per-viewer: two browsers get two servers; turning the 3D camera in one leaves the other's pictures as they
    were, and so does a row click; a third viewer over --max-viewers is refused; Ctrl-C stops every server."""
    import re
    import urllib.error
    before = _checksums(demo_results)
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "ReirradiationNPCLib.cli", "review", str(demo_results),
                             "--port", str(port), "--per-viewer", "--max-viewers", "2"], stdout=log,
                            stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
    ports = []
    try:
        deadline = time.monotonic() + 120
        while not _port_open(port):
            assert proc.poll() is None, "the launcher exited early"
            assert time.monotonic() < deadline, "the launcher does not listen"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        pages = [browser.new_page(), browser.new_page()]
        for page in pages:
            page.goto(url)  # the waiting page, which moves on to the viewer's own server once it answers
        own = re.compile(rf"http://127\.0\.0\.1:(?!{port}/)\d+/.*")
        for page in pages:
            page.wait_for_url(own, timeout=240_000)
            page.wait_for_selector("tr.constraint-row", timeout=120_000)
        ports = [int(page.url.split(":")[2].split("/")[0]) for page in pages]
        assert len(set(ports)) == 2 and port not in ports
        with pytest.raises(urllib.error.HTTPError) as refused:  # a third viewer: over --max-viewers
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 503

        a, b = pages
        three_a = _quadrants(a)[1].first
        three_b = _quadrants(b)[1].first
        shot_a, shot_b = _red_settled(three_a), _red_settled(three_b)
        box = three_a.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        a.mouse.move(cx, cy)
        a.mouse.down()
        a.mouse.move(cx + box["width"] / 4, cy + box["height"] / 8, steps=12)
        a.mouse.up()
        turned = _stable_shot(three_a)
        assert _changed_fraction(shot_a, turned) > 0.02, "dragging did not turn the 3D camera"
        b_after = _stable_shot(three_b)
        assert _changed_fraction(shot_b, b_after) < 0.001, "the other viewer's 3D view moved too"
        a.locator("tr.constraint-row").nth(0).click()
        a.wait_for_function("() => document.querySelector('#selected-info').innerText.includes('worst voxel')",
                            timeout=60_000)
        assert b.inner_text("#selected-info").startswith("Click a constraint row")  # B's page: nothing selected
        for page in pages:
            page.close()
    finally:
        _stop_server(proc, timeout=90)
        log.seek(0)
        output = log.read().decode("utf-8", "replace")
        log.close()
    assert proc.returncode == 0, output[-2000:]
    assert "review stopped (2 viewer server(s) started and stopped)" in output, output[-2000:]
    assert ports and not any(_port_open(p) for p in ports), "a viewer's server is still running"
    assert _checksums(demo_results) == before, "the review wrote into RESULTS_DIR"
