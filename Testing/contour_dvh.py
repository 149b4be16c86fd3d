"""An independent contour-based DVH reader for tests (issue 17): it shares no code with the engine.

Reads an RTSTRUCT's planar contours and an RTDOSE with pydicom only. Each contour plane stands for a slab of the
CT slice thickness; inside the slab, points on a fine lattice (``step_mm`` in-plane, ``z_sub`` planes through the
slab) are kept where they are inside the plane's contours by the even-odd rule (holes and islands), and the dose
is interpolated trilinearly from the RTDOSE grid (0 outside it). Every point stands for the same volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom


@dataclass
class DoseGrid:
    array: np.ndarray        # Gy, (k, j, i)
    origin: np.ndarray       # mm, centre of voxel (0, 0, 0)
    row_dir: np.ndarray      # direction of increasing i (column index)
    col_dir: np.ndarray      # direction of increasing j (row index)
    normal: np.ndarray
    spacing_ij: tuple[float, float]
    z_offsets: np.ndarray    # mm along the normal, per frame


def read_dose(path: Path) -> DoseGrid:
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    if arr.ndim == 2:
        arr = arr[None]
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    r, c = iop[:3], iop[3:]
    off = np.array([float(v) for v in ds.GridFrameOffsetVector])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    n = np.cross(r, c)
    if off[0] != 0.0:      # absolute offsets (old files): relative to the first frame
        off = off - off[0]
    ps = [float(v) for v in ds.PixelSpacing]   # row spacing (between rows = along col_dir), column spacing
    return DoseGrid(arr, ipp, r, c, n, (ps[1], ps[0]), off)


def trilinear(g: DoseGrid, pts: np.ndarray) -> np.ndarray:
    """Dose (Gy) at (N, 3) points in mm; 0 outside the grid."""
    d = pts - g.origin
    fi = d @ g.row_dir / g.spacing_ij[0]
    fj = d @ g.col_dir / g.spacing_ij[1]
    zn = d @ g.normal
    nk, nj, ni = g.array.shape
    order = np.argsort(g.z_offsets)
    fk = np.interp(zn, g.z_offsets[order], order.astype(float), left=-1.0, right=nk) if nk > 1 else zn * 0.0
    inside = (fi >= 0) & (fi <= ni - 1) & (fj >= 0) & (fj <= nj - 1) & (fk >= 0) & (fk <= nk - 1)
    out = np.zeros(len(pts))
    fi, fj, fk = fi[inside], fj[inside], fk[inside]
    i0 = np.minimum(np.floor(fi).astype(int), max(ni - 2, 0))
    j0 = np.minimum(np.floor(fj).astype(int), max(nj - 2, 0))
    k0 = np.minimum(np.floor(fk).astype(int), max(nk - 2, 0))
    ti, tj, tk = fi - i0, fj - j0, fk - k0
    i1, j1, k1 = np.minimum(i0 + 1, ni - 1), np.minimum(j0 + 1, nj - 1), np.minimum(k0 + 1, nk - 1)
    a = g.array
    val = 0.0
    for kk, wk in ((k0, 1 - tk), (k1, tk)):
        for jj, wj in ((j0, 1 - tj), (j1, tj)):
            for ii, wi in ((i0, 1 - ti), (i1, ti)):
                val = val + a[kk, jj, ii] * wk * wj * wi
    out[inside] = val
    return out


def read_contours(path: Path) -> dict[str, dict[float, list[np.ndarray]]]:
    """ROI name -> {plane z (mm, rounded to 0.001): [(N, 3) polygons]}."""
    ds = pydicom.dcmread(str(path))
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    out: dict[str, dict[float, list[np.ndarray]]] = {}
    for rc in ds.ROIContourSequence:
        planes: dict[float, list[np.ndarray]] = {}
        for c in getattr(rc, "ContourSequence", None) or []:
            pts = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
            planes.setdefault(round(float(pts[0, 2]), 3), []).append(pts)
        out[names[int(rc.ReferencedROINumber)]] = planes
    return out


def inside_even_odd(polys: list[np.ndarray], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) bool: lattice points inside the polygons by the even-odd rule (scanlines)."""
    x1 = np.concatenate([p[:, 0] for p in polys])
    y1 = np.concatenate([p[:, 1] for p in polys])
    x2 = np.concatenate([np.roll(p[:, 0], -1) for p in polys])
    y2 = np.concatenate([np.roll(p[:, 1], -1) for p in polys])
    ny = len(ys)
    # crossings of every row with every edge (half-open in y: a vertex is counted once)
    Y = ys[:, None]
    cross = ((y1[None] <= Y) & (Y < y2[None])) | ((y2[None] <= Y) & (Y < y1[None]))
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x1[None] + (Y - y1[None]) * (x2 - x1)[None] / (y2 - y1)[None]
    rows, cols = np.nonzero(cross)
    span = float(xs.max() - xs.min()) + float(np.abs(xc[rows, cols]).max() if rows.size else 0.0) + 10.0
    big = 4.0 * span + 1e3
    keys = np.sort(rows * big + xc[rows, cols])
    q = (np.arange(ny)[:, None] * big + xs[None, :]).ravel()
    start = np.searchsorted(keys, (np.arange(ny) * big - big / 2))
    count = np.searchsorted(keys, q).reshape(ny, len(xs)) - start[:, None]
    return (count % 2) == 1


@dataclass
class DVH:
    volume_cc: float
    mean: float
    d_cc: callable
    doses: np.ndarray


def structure_dvh(planes: dict[float, list[np.ndarray]], slice_mm: float, dose: DoseGrid, step_mm: float = 0.25,
                  z_sub: int = 4, max_points_per_plane: int = 400_000) -> DVH:
    doses = []
    n_pts = 0
    largest = max((np.ptp(np.concatenate(p)[:, 0]) * np.ptp(np.concatenate(p)[:, 1]) for p in planes.values()),
                  default=0.0)
    step = step_mm
    while largest / (step * step) > max_points_per_plane:   # large organs (the body): a coarser lattice
        step *= 2
    point_cc = step * step * slice_mm / z_sub / 1000.0
    for z, polys in sorted(planes.items()):
        allp = np.concatenate(polys)
        lo, hi = allp[:, :2].min(axis=0), allp[:, :2].max(axis=0)
        xs = np.arange(lo[0] + step / 2, hi[0], step)
        ys = np.arange(lo[1] + step / 2, hi[1], step)
        if xs.size == 0 or ys.size == 0:
            continue
        inside = inside_even_odd(polys, xs, ys)
        jj, ii = np.nonzero(inside)
        if jj.size == 0:
            continue
        for m in range(z_sub):
            zz = z - slice_mm / 2 + (m + 0.5) * slice_mm / z_sub
            pts = np.column_stack([xs[ii], ys[jj], np.full(ii.size, zz)])
            doses.append(trilinear(dose, pts))
        n_pts += ii.size * z_sub
    d = np.sort(np.concatenate(doses))[::-1] if doses else np.zeros(0)

    def d_cc(x_cc: float) -> float | None:
        n = int(np.ceil(x_cc / point_cc - 1e-9))
        return float(d[n - 1]) if 0 < n <= d.size else None

    return DVH(volume_cc=n_pts * (point_cc or 0.0), mean=float(d.mean()) if d.size else float("nan"), d_cc=d_cc,
               doses=d)


def ct_slice_spacing(ct_dir: Path) -> float:
    zs = sorted(float(pydicom.dcmread(str(f), stop_before_pixels=True).ImagePositionPatient[2])
                for f in Path(ct_dir).iterdir() if f.is_file())
    return float(np.median(np.diff(zs)))
