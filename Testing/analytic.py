"""Helpers for analytic test cases: small NRRD grids, box structures, hand formulas, running the CLI.

The hand formulas here are written out independently of the engine (plain numpy, float64):
    EQD2 = D (D / n + ab) / (2 + ab)     (each voxel's own dose per fraction)
Arrays are indexed (k, j, i) = (z, y, x); physical coordinates are LPS mm; identity direction.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

ROOT = Path(__file__).resolve().parents[1]


def coords(size, origin, spacing):
    """Physical x, y, z (mm) of every voxel centre of an axis-aligned grid, each shaped (k, j, i)."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in (size[2], size[1], size[0])), indexing="ij")
    return origin[0] + spacing[0] * i, origin[1] + spacing[1] * j, origin[2] + spacing[2] * k


def write_image(path: Path, array: np.ndarray, origin, spacing, units: str | None = None) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    if units:
        img.SetMetaData("units", units)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def read_array(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def box(shape, ks, js, is_) -> np.ndarray:
    """Bool mask of shape (k, j, i) with the index box [k0:k1, j0:j1, i0:i1] set."""
    m = np.zeros(shape, dtype=bool)
    m[ks[0]:ks[1], js[0]:js[1], is_[0]:is_[1]] = True
    return m


def eqd2_hand(dose, n, ab):
    """EQD2 (Gy) of physical dose ``dose`` (Gy) in ``n`` fractions, float64."""
    d = np.asarray(dose, dtype=np.float64)
    return d * (d / n + ab) / (2.0 + ab)


def step_credit(months: float, table) -> float:
    """Recovery credit of a step table [(min_months, fraction), ...] (ascending)."""
    r = 0.0
    for m, f in table:
        if months >= m:
            r = f
    return r


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "ReirradiationNPC") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``reirradiation-npc ARGS`` as a real process (``python -m ReirradiationNPCLib.cli``). The timeout is a
    guard against a hung process, not a speed check (the demo takes about 2 min on the shared 2 cores under load)."""
    return subprocess.run([sys.executable, "-m", "ReirradiationNPCLib.cli", *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), timeout=timeout)
