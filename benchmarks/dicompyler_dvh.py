"""Run by a separate interpreter that has dicompyler-core (which needs pydicom < 3): time get_dvh on every ROI.

    python dicompyler_dvh.py RS.dcm RD.dcm [--fine NAME ...]   -> JSON on stdout

Used by run_benchmarks.py for the contour-based DVH baseline; imports nothing from this project.
"""

import json
import sys
import time

from dicompylercore import dicomparser, dvhcalc


def main(argv):
    rs, rd = argv[0], argv[1]
    fine_names = set(argv[argv.index("--fine") + 1:]) if "--fine" in argv else set()
    rois = dicomparser.DicomParser(rs).GetStructures()
    out = {"default": {}, "fine": {}}
    t0 = time.perf_counter()
    for num, s in rois.items():
        d = dvhcalc.get_dvh(rs, rd, num)
        out["default"][s["name"]] = {"volume_cc": float(d.volume), "max_gy": float(d.max), "mean_gy": float(d.mean)}
    out["default_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for num, s in rois.items():
        if s["name"] in fine_names:
            d = dvhcalc.get_dvh(rs, rd, num, interpolation_resolution=(0.5, 0.5),
                                interpolation_segments_between_planes=2)
            out["fine"][s["name"]] = {"volume_cc": float(d.volume), "max_gy": float(d.max),
                                      "mean_gy": float(d.mean)}
    out["fine_s"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
