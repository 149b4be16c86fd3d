"""``reirradiation-npc review --per-viewer``'s launcher (review_launcher.py) without a browser and without trame:
each viewer's "review server" is a small stand-in script (standard library) that answers HTTP 200 on its port, so
the launcher's own behaviour is what is tested: SIGTERM stops it as Ctrl-C does, with every viewer it started.
The real servers and browsers: Testing/test_review.py (test_per_viewer_...)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from analytic import cli_env
from ReirradiationNPCLib.stop_signals import sigterm_as_ctrl_c

#: the stand-in for ``reirradiation-npc review DIR --port P --host H [--idle-stop S]``: serves HTTP 200 until SIGINT
#: (exit 0), or exits 0 after S seconds without a request (as the real server without a browser); with
#: FAKE_VIEWER_MODE=fail it writes 30 lines to stderr (some coloured as VTK's warnings) and exits with code 2
FAKE_VIEWER = r'''
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
idle = float(args[args.index("--idle-stop") + 1]) if "--idle-stop" in args else 0.0
if os.environ.get("FAKE_VIEWER_MODE") == "fail":
    for i in range(1, 30):
        sys.stderr.write(("\x1b[33mline %d\x1b[0m\n" if i % 2 else "line %d\n") % i)
    sys.stderr.write("error: cannot load the scene (test)\n")
    sys.exit(2)
last = [time.monotonic()]


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        last[0] = time.monotonic()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


httpd = HTTPServer(("127.0.0.1", port), H)
if idle > 0:
    def watch():
        while time.monotonic() - last[0] < idle:
            time.sleep(0.1)
        httpd.shutdown()
    threading.Thread(target=watch, daemon=True).start()
try:
    httpd.serve_forever(poll_interval=0.1)
except KeyboardInterrupt:
    pass
'''

#: the launcher with the stand-in viewer: python -c LAUNCHER RESULTS_DIR PORT MAX_VIEWERS VIEWER_SCRIPT IDLE_S
LAUNCHER = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "from ReirradiationNPCLib.review_launcher import serve_per_viewer; "
            "serve_per_viewer(sys.argv[1], port=int(sys.argv[2]), max_viewers=int(sys.argv[3]), "
            "command=[sys.executable, sys.argv[4]], idle_stop_s=int(sys.argv[5]))")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _get(url: str):
    """(status, Location header, body) of a GET, redirects not followed."""
    try:
        with _OPENER.open(url, timeout=10) as r:
            return r.status, r.headers.get("Location"), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location"), exc.read().decode("utf-8", "replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_launcher(tmp_path, viewer_script: str, max_viewers: int = 2, idle_stop_s: int = 0, mode: str = ""):
    script = tmp_path / "fake_viewer.py"
    script.write_text(viewer_script, encoding="utf-8")
    port = _free_port()
    log = tempfile.TemporaryFile()
    env = dict(cli_env(), FAKE_VIEWER_MODE=mode)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), str(port), str(max_viewers),
                             str(script), str(idle_stop_s)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not _port_open(port):
        assert proc.poll() is None, "the launcher exited early"
        assert time.monotonic() < deadline, "the launcher does not listen"
        time.sleep(0.2)
    return proc, port, log


def _output(log) -> str:
    log.seek(0)
    return log.read().decode("utf-8", "replace")


def _open_viewer(port: int, timeout: float = 60.0):
    """Visit the launcher's / as a browser would: (viewer path, the viewer's own port once it answers)."""
    status, location, _ = _get(f"http://127.0.0.1:{port}/")
    assert status == 303 and location.startswith("/viewer/"), (status, location)
    deadline = time.monotonic() + timeout
    while True:
        status, where, body = _get(f"http://127.0.0.1:{port}{location}")
        if status == 302:
            return location, int(where.rsplit(":", 1)[1].strip("/"))
        assert status == 200 and "Starting your own review view" in body, (status, body)
        assert time.monotonic() < deadline, "the viewer did not become ready"
        time.sleep(0.3)


def _kill_group(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def test_sigterm_inside_the_block_is_a_ctrl_c_and_the_previous_handler_comes_back():
    """One SIGTERM handler for the review server and the launcher: inside the block SIGTERM raises
    KeyboardInterrupt; after it (left normally or by the interrupt) the handler before is in place again."""
    seen = []

    def before(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigterm_as_ctrl_c():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)   # the handler runs at the next bytecode; never reached
        assert signal.getsignal(signal.SIGTERM) is before
        with sigterm_as_ctrl_c():
            assert signal.getsignal(signal.SIGTERM) is not before
        assert signal.getsignal(signal.SIGTERM) is before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_launcher_stops_on_sigterm_with_every_viewer_it_started(tmp_path):
    """Two viewers started (each answers on its own port); SIGTERM to the launcher: exit code 0, its closing line
    counts 2 servers started and stopped, and both viewers' ports are closed."""
    proc, port, log = _start_launcher(tmp_path, FAKE_VIEWER, max_viewers=2)
    try:
        ports = [_open_viewer(port)[1] for _ in range(2)]
        assert len(set(ports)) == 2 and all(_port_open(p) for p in ports)
        out = _stopped(proc, log, signal.SIGTERM)
    finally:
        _kill_group(proc)
    assert "review stopped (2 viewer server(s) started and stopped)" in out, out
    assert not any(_port_open(p) for p in ports), "a viewer is still running"


def _stopped(proc, log, sig) -> str:
    """Send ``sig`` to the launcher, wait for it to end with exit code 0, and return what it printed."""
    proc.send_signal(sig)
    proc.wait(timeout=60)
    out = _output(log)
    assert proc.returncode == 0, out
    return out


def _wait_closed(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _port_open(port):
        assert time.monotonic() < deadline, f"port {port} still open"
        time.sleep(0.2)


def test_a_viewer_whose_browser_left_stops_and_frees_its_slot(tmp_path):
    """--max-viewers 1, each viewer's server told to stop 2 s after its last browser (--idle-stop 2; the stand-in
    counts requests): while viewer 1 runs, a second visit of / is refused (503); once its server has stopped, its
    page says so (410), the launcher says so in one line, and a new visit of / gets viewer 2 (the slot was never
    freed: every reload of / used one up until the launcher stopped)."""
    proc, port, log = _start_launcher(tmp_path, FAKE_VIEWER, max_viewers=1, idle_stop_s=2)
    try:
        path1, port1 = _open_viewer(port)
        assert path1 == "/viewer/1"
        assert _get(f"http://127.0.0.1:{port}/")[0] == 503
        _wait_closed(port1)
        deadline = time.monotonic() + 20
        while _get(f"http://127.0.0.1:{port}{path1}")[0] != 410:
            assert time.monotonic() < deadline, "viewer 1's page does not say it stopped"
            time.sleep(0.2)
        path2, port2 = _open_viewer(port)
        assert path2 == "/viewer/2" and _port_open(port2)
        out = _stopped(proc, log, signal.SIGINT)
    finally:
        _kill_group(proc)
    assert (f"viewer 1 (port {port1}): its server stopped (no browser connected for 2 s); 0 of 1 viewers "
            "running") in out, out
    assert "review stopped (2 viewer server(s) started and stopped)" in out, out


def test_a_failed_viewer_is_named_in_one_line_with_its_last_error_lines_on_its_page(tmp_path):
    """A viewer's server writes 30 lines to stderr and exits with code 2 before answering: the launcher prints one
    line naming the viewer, its exit code and its last stderr line; the viewer's page (500) shows its last 20 lines
    (lines 11-29 and the error; colour codes removed); the slot is free again (a new visit gets viewer 2)."""
    proc, port, log = _start_launcher(tmp_path, FAKE_VIEWER, max_viewers=1, mode="fail")
    try:
        status, location, _ = _get(f"http://127.0.0.1:{port}/")
        assert (status, location) == (303, "/viewer/1")
        deadline = time.monotonic() + 30
        while True:
            status, _, body = _get(f"http://127.0.0.1:{port}/viewer/1")
            if status != 200:
                break
            assert time.monotonic() < deadline, "the failed viewer is still 'starting'"
            time.sleep(0.2)
        assert status == 500, body
        assert "its server exited (code 2) before it answered" in body
        shown = body.split("<pre id='viewer-stderr'>")[1].split("</pre>")[0].split("\n")
        assert shown == [f"line {i}" for i in range(11, 30)] + ["error: cannot load the scene (test)"]
        deadline = time.monotonic() + 20
        while _get(f"http://127.0.0.1:{port}/")[:2] != (303, "/viewer/2"):
            assert time.monotonic() < deadline, "the failed viewer's slot was not freed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    out = _output(log)
    named = [line for line in out.splitlines() if line.startswith("viewer 1 ")]
    assert named == ["viewer 1 (port %s) failed: its server exited (code 2) before it answered: error: cannot load "
                     "the scene (test); 0 of 1 viewers running" % named[0].split()[3].rstrip(")")], out
    assert "line 11" in out and "line 10\n" not in out   # the kept lines are logged (INFO) too
