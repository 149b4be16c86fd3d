#!/usr/bin/env python3
"""Robustness analysis (issue 13) against the nominal analysis on the clinical-size case, in the same run.

    /work/venv/bin/python benchmarks/robustness_benchmark.py [--keep DIR] [--doc docs/benchmarks-robustness.md]
        [--image-grid]

The case is the one of ``run_benchmarks.py`` (CT 512 x 512 x 150, 20 structures, two courses on 2.5 mm dose grids;
its protocol is the synthetic demo protocol, whose robustness block gives CNS alpha/beta 1.5-3 Gy, temporal lobes
2-3 Gy, recovery from none to the credit, 3 mm registration uncertainty, 26 directions). Timed in-process, best of
3: ``analysis.compute`` (the nominal analysis: alpha/beta map, EQD2 maps, sub-voxel metrics of 20 structures,
constraints) and ``robustness.compute`` (every row's scenarios, the worst-case map and its violation regions), wall
time and CPU time of this process. Target: robustness <= 50 % of the nominal analysis. ``--image-grid`` repeats it
with the evaluation grid = the CT grid (512 x 512 x 150) for the worst-case map's time and memory there.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ReirradiationNPC"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_benchmarks as rb  # noqa: E402
from ReirradiationNPCLib import robustness  # noqa: E402
from ReirradiationNPCLib.analysis import compute  # noqa: E402
from ReirradiationNPCLib.case import load_case  # noqa: E402
from ReirradiationNPCLib.pipeline import prepare  # noqa: E402


def timed(fn, repeat=3):
    best_w, best_c, res = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        best_w = min(best_w, time.perf_counter() - t0)
        best_c = min(best_c, time.process_time() - c0)
    return best_w, best_c, res


def bench(case_path: Path, say) -> dict:
    prep = prepare(load_case(case_path))
    say(f"prepared {case_path.name}: evaluation grid {prep.grid.size}")
    tw_a, tc_a, analysis = timed(lambda: compute(prep.grid, prep.courses, prep.structures, prep.protocol))
    say(f"nominal analysis {tw_a:.2f} s (CPU {tc_a:.2f} s)")
    tw_r, tc_r, rob = timed(lambda: robustness.compute(prep, analysis))
    say(f"robustness {tw_r:.2f} s (CPU {tc_r:.2f} s)")
    rows = [r for r in rob.rows if r]
    return {"grid": prep.grid.size, "nominal_s": tw_a, "nominal_cpu": tc_a, "robust_s": tw_r, "robust_cpu": tc_r,
            "rows": len(rows), "scenarios": sum(r["scenarios"] for r in rows),
            "samples": sum(s.n for s in analysis.samples.values()), "status": rob.summary.get("status"),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}


def bench_run(folder: Path, case_path: Path, say) -> dict:
    """The whole ``run`` (load, resample, analysis, planning aids, robustness, all outputs, report) with the
    protocol's robustness block and without it (same case otherwise), in-process, best of 2."""
    from ReirradiationNPCLib.pipeline import run_case
    proto = yaml.safe_load((folder / "protocol.yaml").read_text())
    proto.pop("robustness", None)
    (folder / "protocol_no_robustness.yaml").write_text(yaml.safe_dump(proto, sort_keys=False))
    data = yaml.safe_load(case_path.read_text())
    data["protocol"] = "protocol_no_robustness.yaml"
    plain = folder / "case_no_robustness.yaml"
    plain.write_text(yaml.safe_dump(data, sort_keys=False))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, cp in (("without", plain), ("with", case_path)):
            w, c, _ = timed(lambda: run_case(cp, Path(tmp) / label, overwrite=True), repeat=2)
            out[label] = (w, c)
            say(f"whole run {label} robustness: {w:.1f} s (CPU {c:.1f} s)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, help="build (or reuse) the case in this folder")
    ap.add_argument("--doc", type=Path, help="write the results as Markdown here")
    ap.add_argument("--image-grid", action="store_true", help="also with the CT grid as evaluation grid")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load0 = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    def say(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="reirradiation-robust-bench-"))
    case = rb.make_case(folder, say)
    results = [("evaluation grid = current dose grid", bench(case["identity"], say))]
    whole = bench_run(folder, case["identity"], say)
    if args.image_grid:
        data = yaml.safe_load(case["identity"].read_text())
        data["grid"] = "image"
        p = folder / "case_image_grid.yaml"
        p.write_text(yaml.safe_dump(data, sort_keys=False))
        results.append(("evaluation grid = CT grid 512x512x150", bench(p, say)))
    mach = rb.machine()
    mach["load average (1, 5, 15 min) at the start"] = load0
    lines = ["# Benchmark: robustness analysis", "",
             "Measured by `benchmarks/robustness_benchmark.py` (case of `run_benchmarks.py`: CT 512×512×150, 20 "
             "structures, 70 Gy/33 fx prior and 65 Gy/54 fx current on 2.5 mm dose grids; synthetic demo protocol "
             "with its robustness block: CNS α/β 1.5–3 Gy, temporal lobes 2–3 Gy, recovery from none to the "
             "credit, 3 mm registration uncertainty, 26 directions). Both timings in the same run, best of 3, "
             "in-process. Target: the robustness analysis adds at most 50 % to the nominal analysis "
             "(`analysis.compute`).", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in mach.items()]
    lines += ["- the machine is shared by several sessions on 2 cores: wall times move with their load; the CPU "
              "time of this process is the steadier figure", "",
              "## Results", "",
              "| case | nominal analysis (s) | robustness (s) | ratio wall | ratio CPU | rows | scenarios (sum) | "
              "samples | robust status | peak RSS (GiB) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for label, r in results:
        lines.append(f"| {label} {tuple(r['grid'])} | {r['nominal_s']:.2f} (CPU {r['nominal_cpu']:.2f}) | "
                     f"{r['robust_s']:.2f} (CPU {r['robust_cpu']:.2f}) | {r['robust_s'] / r['nominal_s']:.2f}× | "
                     f"{r['robust_cpu'] / r['nominal_cpu']:.2f}× | {r['rows']} | {r['scenarios']} | "
                     f"{r['samples'] / 1e6:.2f} M | {r['status']} | {r['peak_gib']:.2f} |")
    (w0, c0), (w1, c1) = whole["without"], whole["with"]
    lines += ["", "Whole `run` (identity registration; load, resample, analysis, planning aids, outputs, report), with "
                  "and without the protocol's robustness block, best of 2:", "",
              "| run | wall (s) | CPU (s) |", "| --- | ---: | ---: |",
              f"| without robustness | {w0:.1f} | {c0:.1f} |", f"| with robustness | {w1:.1f} | {c1:.1f} |",
              f"| added by robustness | {w1 - w0:+.1f} ({100 * (w1 - w0) / w0:+.0f} %) | {c1 - c0:+.1f} "
              f"({100 * (c1 - c0) / c0:+.0f} %) |"]
    first = results[0][1]
    ok = first["robust_s"] / first["nominal_s"] <= 0.5
    ok_cpu = first["robust_cpu"] / first["nominal_cpu"] <= 0.5
    ok_run = (c1 - c0) / c0 <= 0.5
    lines += ["", "## Target: robustness adds at most 50 % to the nominal analysis", "",
              f"- against the whole `run` (what a user runs and waits for): +{100 * (c1 - c0) / c0:.0f} % CPU, "
              f"+{100 * (w1 - w0) / w0:.0f} % wall — **{'met' if ok_run else 'MISSED'}**",
              f"- against `analysis.compute` alone (the EQD2 maps and the nominal metrics, without loading, "
              f"resampling, planning aids, outputs): {first['robust_cpu'] / first['nominal_cpu']:.2f}× CPU, "
              f"{first['robust_s'] / first['nominal_s']:.2f}× wall — "
              f"**{'met' if ok and ok_cpu else 'MISSED'}** (target 0.5×)",
              "",
              "Why the second is missed: the nominal metrics need one interpolation of each course's dose at the "
              "structures' 1 M sub-voxel samples (SimpleITK, multithreaded) and one sort per course; the scenarios "
              "need each prior dose at the same samples for 26 shifts (separable interpolation with shared axis "
              "stages, numpy), 2 alpha/beta ends x 2 sides, and the metric per scenario (near-maximum metrics on the "
              "few samples that can reach the top; all samples for Dmean and V<x>Gy). Pruning the samples before "
              "interpolating, with gradient (Lipschitz) bounds, was tried and kept 25-50 % of the samples (bounds too "
              "loose in curved dose): no gain. A compiled interpolation kernel or tighter bounds would be the next "
              "step.",
              f"Benchmark wall time {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.doc:
        args.doc.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
