"""Draw the module icon (128 x 128 RGBA PNG): a dose colour wash (blue -> red) over a head outline with a
red violation spot. Run: python Utilities/make_icon.py  (numpy + SimpleITK, no other tools)."""

from pathlib import Path

import numpy as np
import SimpleITK as sitk

N = 128
OUT = Path(__file__).resolve().parents[1] / "ReirradiationNPC" / "Resources" / "Icons" / "ReirradiationNPC.png"


def main() -> Path:
    y, x = np.mgrid[0:N, 0:N].astype(float) + 0.5
    rgba = np.zeros((N, N, 4), dtype=float)
    # rounded dark background square
    r = 18.0
    cx = np.clip(x, r + 4, N - r - 4)
    cy = np.clip(y, r + 4, N - r - 4)
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    rgba[inside] = (0.10, 0.16, 0.26, 1.0)
    # head outline (ellipse) filled light grey
    head = ((x - 64) / 40) ** 2 + ((y - 60) / 48) ** 2 <= 1.0
    rgba[head & inside, :3] = (0.80, 0.82, 0.85)
    # dose wash: concentric levels around the nasopharynx, blue (low) to red (high)
    d = np.sqrt(((x - 64) / 30) ** 2 + ((y - 70) / 26) ** 2)
    level = np.clip(1.0 - d, 0.0, 1.0)
    stops = np.array([[0.0, 0, 0, 1], [0.33, 0, 1, 1], [0.66, 1, 1, 0], [1.0, 1, 0, 0]])
    wash = np.stack([np.interp(level, stops[:, 0], stops[:, c]) for c in (1, 2, 3)], axis=-1)
    m = head & (level > 0.05)
    alpha = 0.75
    rgba[m, :3] = (1 - alpha) * rgba[m, :3] + alpha * wash[m]
    # violation spot
    spot = (x - 80) ** 2 + (y - 52) ** 2 <= 7.5 ** 2
    rgba[spot] = (0.90, 0.10, 0.10, 1.0)
    img = sitk.GetImageFromArray(np.round(rgba * 255).astype(np.uint8), isVector=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(OUT))
    return OUT


if __name__ == "__main__":
    print(main())
