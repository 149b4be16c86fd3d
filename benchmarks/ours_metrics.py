"""Run by run_benchmarks.py in a fresh interpreter: time this project's ``metrics`` of every ROI of an RTSTRUCT on an
RTDOSE, warm, as ``dicompyler_dvh.py`` times dicompyler-core.

    python ours_metrics.py RS.dcm RD.dcm [--repeat N] [--threads T] [--metrics Dmax,Dmean,...] -> JSON on stdout

One call = what ``reirradiation-npc metrics --dose RD.dcm --structures RS.dcm`` computes, without the command's
start-up and output: read the RTDOSE, read the RTSTRUCT and rasterise every ROI on its sub-voxel lattice, sample
each structure, interpolate the dose at every sample, and the metrics. One call warms up (imports, first use),
then ``N`` calls are timed: wall time (``time.perf_counter``) and the process's CPU time (``time.process_time``:
user + system of all its threads). ``--threads``: structures evaluated at a time (``structure_metrics.THREADS``).
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ReirradiationNPC"))   # this checkout's engine first


def _arg(argv, name, default):
    return argv[argv.index(name) + 1] if name in argv else default


def main(argv):
    from ReirradiationNPCLib import structure_metrics as sm
    from ReirradiationNPCLib.dicom_rt import load_dose_any
    rs, rd = Path(argv[0]), Path(argv[1])
    repeat = int(_arg(argv, "--repeat", "3"))
    names = _arg(argv, "--metrics", "Dmax,Dmean,Dmin,D0.03cc,D2cc,D95%").split(",")
    if "--threads" in argv and hasattr(sm, "THREADS"):
        sm.THREADS = int(_arg(argv, "--threads", str(sm.THREADS)))

    def once():
        warnings = []
        dose = load_dose_any(rd, "--dose")
        structs = sm.load_structures(rs, dose.grid, warnings)
        return sm.compute(dose, structs, names)

    res = once()                                       # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        res = once()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rows = {r["name"]: {"volume_cc": r["volume_cc"], "metrics": r["metrics"],
                        "samples": r["sampling"].get("samples", 0)} for r in res["structures"]}
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "threads": getattr(sm, "THREADS", 1), "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
