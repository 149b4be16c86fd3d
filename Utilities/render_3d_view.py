"""Render the 3D review picture of a scene bundle written by ``reirradiation-npc demo`` / ``run --scene``:
organs at risk semi-transparent, GTV/CTV/PTV see-through, violations opaque red (fail) / amber (warn), seen from
anterior-left-superior, fitted to what is shown. Needs slicer-core and OpenGL (EGL/OSMesa offscreen).

Run:  reirradiation-npc demo -o /tmp/demo
      python Utilities/render_3d_view.py /tmp/demo/results/scene.mrb docs/images/slicer-3d-view.png
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ReirradiationNPC"))

from ReirradiationNPCLib import mrml, mrml_headless, mrml_render  # noqa: E402

log = logging.getLogger("render_3d_view")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="scene.mrb")
    parser.add_argument("png", type=Path, help="output PNG")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 600), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args(argv)
    app = mrml_headless.start()
    if not app.scene.ReadFromMRB(str(args.bundle.resolve()), True):
        raise SystemExit(f"could not read {args.bundle}")
    nodes = {}
    for node in app.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
        nodes[node.GetAttribute(mrml.ROLE_ATTRIBUTE)] = node
    if "structures" not in nodes or "overlays" not in nodes:
        raise SystemExit(f"{args.bundle} holds no ReirradiationNPC structures and overlays segmentations")
    path = mrml_render.save_review_png(app.app_logic, app.scene, nodes["structures"], nodes["overlays"],
                                       args.png, size=tuple(args.size))
    log.info("wrote %s", path)
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
