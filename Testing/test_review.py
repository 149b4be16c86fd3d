"""``reirradiation-npc review``: the pure helpers (worst voxel by hand, defensive table rows, folder checks) and the
real thing — the trame-slicer server as a subprocess on a free local port, driven by Debian's headless chromium
through Playwright, asserting what a person sees (table rows, violation red, slice views that move on a click) and
that the results folder is unchanged.

Set REIRRADIATION_REVIEW_SCREENSHOT=path to also save the page screenshot (docs/images/review.png is made that way).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
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
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.review_results import load_run, table_rows, verdict_line, worst_point

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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


def test_cli_review_on_a_folder_that_is_not_a_run_exits_2_with_one_line(tmp_path):
    res = run_cli("review", tmp_path)
    assert res.returncode == 2
    assert "not the output of `reirradiation-npc run`" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ real browser test

def _missing() -> str | None:
    try:
        import trame_slicer.core  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"trame-slicer not importable ({type(exc).__name__}: {exc}); pip install '.[review]'"
    try:
        import playwright.sync_api  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"playwright not importable ({exc}); pip install '.[review]'"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} missing (apt-get install chromium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checksums(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _png(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def _red_pixels(img: np.ndarray) -> int:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(np.count_nonzero((r > 170) & (g < 80) & (b < 80)))


def _stable_shot(locator, timeout: float = 40.0) -> np.ndarray:
    """Screenshot of ``locator`` once two consecutive shots 1 s apart are identical (streamed views settled)."""
    end = time.monotonic() + timeout
    prev = _png(locator.screenshot())
    while time.monotonic() < end:
        time.sleep(1.0)
        cur = _png(locator.screenshot())
        if cur.shape == prev.shape and np.array_equal(cur, prev):
            return cur
        prev = cur
    return prev


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


def test_review_in_a_real_browser(demo_results):
    from playwright.sync_api import sync_playwright

    before = _checksums(demo_results)
    results = json.loads((demo_results / "results.json").read_text(encoding="utf-8"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "ReirradiationNPCLib.cli", "review", str(demo_results),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=cli_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "review server exited early"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no HTTP 200 from the review server"
            time.sleep(1.0)

        with sync_playwright() as p, tempfile.TemporaryDirectory() as user_dir:
            ctx = p.chromium.launch_persistent_context(user_dir, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": 1400, "height": 850})
            try:
                page = ctx.new_page()
                page.goto(url)
                page.wait_for_selector("tr.constraint-row", timeout=90_000)
                # the table has the run's rows, in order
                names = page.locator("tr.constraint-row td.col-structure").all_inner_texts()
                expected = [c.get("structure") or c.get("organ") for c in results["constraints"]]
                assert [n.strip() for n in names] == expected
                statuses = [s.strip() for s in page.locator("tr.constraint-row td.col-status").all_inner_texts()]
                assert statuses == [c.get("status") for c in results["constraints"]]
                assert results["summary"]["verdict"] in page.inner_text("#verdict")

                views = page.locator("#views")
                # the demo exceeds limits: violation regions drawn in red in the views (once the streamed
                # renders have arrived)
                assert "fail" in statuses
                end = time.monotonic() + 90
                first = _png(views.screenshot())
                while _red_pixels(first) <= 50 and time.monotonic() < end:
                    time.sleep(1.0)
                    first = _png(views.screenshot())
                assert _red_pixels(first) > 50, "no violation-red pixels in the views"
                first = _stable_shot(views)
                shot = os.environ.get("REIRRADIATION_REVIEW_SCREENSHOT")
                if shot:
                    page.screenshot(path=shot)

                # clicking a failing row centres the slice views on that organ's worst voxel: the pixels change
                fail_idx = statuses.index("fail")
                page.locator("tr.constraint-row").nth(fail_idx).click()
                organ = expected[fail_idx]
                page.wait_for_function(
                    "([o]) => document.querySelector('#selected-info').innerText.startsWith(o + ': worst voxel')",
                    arg=[organ], timeout=60_000)
                after = _stable_shot(views)
                changed = np.count_nonzero(np.any(after != first, axis=-1))
                assert changed > 0.01 * first.shape[0] * first.shape[1], "slice views did not move on a row click"
                info = page.inner_text("#selected-info")
                # the wash threshold above every dose hides the colour wash: the slice pixels change again
                page.locator("#wash-threshold").fill(page.locator("#wash-threshold").get_attribute("max"))
                washed_out = _stable_shot(views)
                assert np.count_nonzero(np.any(washed_out != after, axis=-1)) > \
                    0.01 * first.shape[0] * first.shape[1], "the threshold control did not change the views"
                # the worst voxel value (voxel-centre rule) is at most the table's sub-voxel Dmax of that organ
                dmax = [s for s in results["structures"] if s["name"] == organ][0]["metrics"]["cumulative"]["Dmax"]
                value = float(info.split("worst voxel ")[1].split(" Gy")[0])
                assert 0 < value <= dmax + 0.01
            finally:
                ctx.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.seek(0)
        output = log.read().decode("utf-8", "replace")
        log.close()
    assert f"http://127.0.0.1:{port}/" in output
    assert "review stopped" in output, output[-2000:]
    assert proc.returncode == 0
    assert _checksums(demo_results) == before, "the review wrote into RESULTS_DIR"
