"""CPU seconds per stage of ``run``, for two code trees in one benchmark (before / after a change).

Each run is a fresh process (``python -c``) with the tree's engine first on ``PYTHONPATH``; the stages are the
progress messages of ``pipeline.run_case`` (the same names as results.json ``timings``), timed with
``time.process_time`` (this process's CPU, all threads), which other programs on a shared machine disturb far less
than wall time. Runs alternate between the trees; the table gives the median of the repeats.

    python benchmarks/stage_cpu.py --case CASE.yaml --before /path/to/old/checkout --after . --repeats 3

Prints a markdown table (stage, CPU before, CPU after; whole-process CPU, wall time and peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
stages, cur = {}, [None, 0.0]
def progress(msg):
    t = time.process_time()
    if cur[0] is not None:
        stages[cur[0]] = stages.get(cur[0], 0.0) + t - cur[1]
    cur[:] = [msg, t]
from ReirradiationNPCLib.pipeline import run_case
run_case(Path(sys.argv[1]), Path(sys.argv[2]), overwrite=True, progress=progress)
progress(None)
ru = resource.getrusage(resource.RUSAGE_SELF)
print("STAGES" + json.dumps({"stages": stages, "cpu": ru.ru_utime + ru.ru_stime, "peak_gib": ru.ru_maxrss / 2**20}))
"""


def run_once(tree: Path, case: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "ReirradiationNPC"))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, str(case), str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    line = [x for x in p.stdout.splitlines() if x.startswith("STAGES")]
    if p.returncode or not line:
        raise SystemExit(f"run failed ({tree}): {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    d = json.loads(line[0][len("STAGES"):])
    d["wall"] = wall
    d["load"] = os.getloadavg()[0]
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", type=Path, required=True)
    ap.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    ap.add_argument("--after", type=Path, required=True, help="checkout of the code after the change")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the raw runs here")
    a = ap.parse_args(argv)
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for k, tree in trees.items():
                d = run_once(tree, a.case.resolve(), Path(tmp) / k)
                runs[k].append(d)
                print(f"{k} run {r + 1}: wall {d['wall']:.1f} s, CPU {d['cpu']:.2f} s, load {d['load']:.1f}",
                      file=sys.stderr, flush=True)
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))
    names = list(dict.fromkeys(n for k in trees for d in runs[k] for n in d["stages"]))

    def med(k, f):
        vals = [f(d) for d in runs[k]]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def cell(v, digits=2):
        return "" if v is None else f"{v:.{digits}f}"

    print("| stage | CPU before (s) | CPU after (s) |")
    print("| --- | ---: | ---: |")
    rows = [(n, med("before", lambda d, n=n: d["stages"].get(n)), med("after", lambda d, n=n: d["stages"].get(n)))
            for n in names]
    for n, b, f in sorted(rows, key=lambda r: -max(r[1] or 0, r[2] or 0)):
        if max(b or 0, f or 0) >= 0.02:
            print(f"| {n} | {cell(b)} | {cell(f)} |")
    for label, f, digits in (("whole process, CPU (s)", lambda d: d["cpu"], 2),
                             ("whole process, wall (s)", lambda d: d["wall"], 1),
                             ("peak memory (GiB)", lambda d: d["peak_gib"], 2),
                             ("load average at the end", lambda d: d["load"], 1)):
        print(f"| **{label}** | {cell(med('before', f), digits)} | {cell(med('after', f), digits)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
