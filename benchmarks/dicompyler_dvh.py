"""Run by a separate interpreter that has dicompyler-core (which needs pydicom < 3): time get_dvh on every ROI.

    python dicompyler_dvh.py RS.dcm RD.dcm [--modes default,interpolated] [--resolution MM] [--segments N]
        [--repeat N] [--warm] -> JSON on stdout

Modes (each timed over every ROI of the structure set):
- ``default``: ``get_dvh(rs, rd, roi)`` -- the contour is rasterised by voxel-centre inclusion on the dose grid's
  own pixels (no sub-voxel sampling);
- ``interpolated``: dicompyler-core's sub-voxel mode, ``interpolation_resolution=(MM, MM)`` (the dose plane is
  interpolated in-plane to MM mm pixels before the contour is rasterised; needs scikit-image) and
  ``interpolation_segments_between_planes=N`` (N extra contour/dose planes between each pair of contour planes).

One timed pass = ``get_dvh`` of every ROI (dicompyler-core's API reads both files again for each ROI; that is its
way of being called). ``--warm``: one untimed pass in the default mode first (imports and first use, as
``ours_metrics.py`` warms up); then each mode is timed ``N`` times (``--repeat``): wall time
(``time.perf_counter``) and the process's CPU time (``time.process_time``, user + system of all its threads).
Used by run_benchmarks.py for the contour-based DVH baseline; imports nothing from this project.
"""

import json
import sys
import time

from dicompylercore import dicomparser, dvhcalc


def _arg(argv, name, default):
    return argv[argv.index(name) + 1] if name in argv else default


def main(argv):
    rs, rd = argv[0], argv[1]
    modes = _arg(argv, "--modes", "default,interpolated").split(",")
    res = float(_arg(argv, "--resolution", "0.5"))
    seg = int(_arg(argv, "--segments", "2"))
    repeat = int(_arg(argv, "--repeat", "1"))
    rois = dicomparser.DicomParser(rs).GetStructures()
    kwargs = {"default": {}, "interpolated": {"interpolation_resolution": (res, res),
                                              "interpolation_segments_between_planes": seg}}

    def one_pass(mode):
        rows = {}
        for num, s in rois.items():
            d = dvhcalc.get_dvh(rs, rd, num, **kwargs[mode])
            rows[s["name"]] = {"volume_cc": float(d.volume), "max_gy": float(d.max), "mean_gy": float(d.mean),
                               "min_gy": float(d.min)}
        return rows

    if "--warm" in argv:
        one_pass("default")
    out = {"resolution_mm": res, "segments_between_planes": seg}
    for mode in modes:
        wall, cpu = [], []
        for _ in range(repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            rows = one_pass(mode)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out[mode] = rows
        out[mode + "_s"] = wall[0] if repeat == 1 else sorted(wall)[len(wall) // 2]
        out[mode + "_wall_s"] = wall
        out[mode + "_cpu_s"] = cpu
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
