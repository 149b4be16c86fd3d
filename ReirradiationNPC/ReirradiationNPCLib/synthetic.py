"""A deterministic synthetic NPC re-irradiation case (a head-and-neck phantom, two courses).

Everything is analytic shapes in LPS millimetres (x: patient left, y: posterior, z: superior), so tests can
reason about it. Nothing large is committed: the case is generated in seconds.

- Current planning CT (HU) with External, Brainstem, SpinalCord, OpticChiasm, OpticNrv_L/R, Lobe_Temporal_L/R,
  A_Carotid_L/R, Cochlea_L/R, Parotid_L/R and a recurrent GTVp at the skull base.
- Prior course: NPC IMRT as planned against RTOG 0615-style constraints: 70 Gy in 33 fractions to the primary,
  59.4 Gy to the high-risk nodal regions, 54 Gy to the lower neck, cord max ~45 Gy, brainstem max ~54 Gy,
  temporal-lobe hot spots 60-70 Gy, with a realistic fall-off, on a 3 mm grid, written twice: in the prior CT's frame (``dose_course1_prior_frame.nrrd``, used by ``case.yaml`` with
  ``registration: rigid`` of ``ct_prior.nrrd``, as the demo runs it) and in the current CT's frame
  (``dose_course1.nrrd``, used by ``case_identity.yaml`` with ``registration: identity``).
- Current course: 65 Gy in 54 twice-daily fractions to the recurrence plus margin, on a 2.5 mm grid.
- The prior course's CT, rendered with a known rigid offset from the current CT (``KNOWN_PRIOR_OFFSET``), for
  registration work.

SYNTHETIC DATA: not a patient, not for clinical use.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from .geometry import Grid, Volume, bounding_box
from .io import write_volume
from .protocol import protocols_dir

SEED = 20211
PRIOR_FRACTIONS = 33
PRIOR_DOSE_GY = 70.0
CURRENT_FRACTIONS = 54
CURRENT_DOSE_GY = 65.0
INTERVAL_MONTHS = 30
#: rigid offset of the prior CT: a point p of the current CT's frame lies at R p + t in the prior CT's frame.
KNOWN_PRIOR_OFFSET = {"rotation_deg_about_z": 2.0, "translation_mm": (6.0, -4.0, 7.5)}

CT_GRID = Grid((160, 160, 100), (-119.25, -119.25, -150.0), (1.5, 1.5, 2.5))
CURRENT_DOSE_GRID = Grid((66, 70, 90), (-81.0, -86.0, -148.75), (2.5, 2.5, 2.5))
PRIOR_DOSE_GRID = Grid((60, 56, 72), (-88.5, -81.0, -148.5), (3.0, 3.0, 3.0))


@dataclass(frozen=True)
class Ellipsoid:
    c: tuple[float, float, float]
    r: tuple[float, float, float]

    def level(self, x, y, z):
        """Normalised radius: < 1 inside."""
        return np.sqrt(((x - self.c[0]) / self.r[0]) ** 2 + ((y - self.c[1]) / self.r[1]) ** 2
                       + ((z - self.c[2]) / self.r[2]) ** 2)

    def approx_distance(self, x, y, z):
        """Approximate signed distance (mm), exact on the surface normal for a sphere."""
        return (self.level(x, y, z) - 1.0) * min(self.r)

    def inside(self, x, y, z):
        return self.level(x, y, z) <= 1.0

    def box_mm(self):
        """Axis-aligned box (lo, hi) in mm that holds every point inside."""
        return tuple(c - r for c, r in zip(self.c, self.r)), tuple(c + r for c, r in zip(self.c, self.r))


@dataclass(frozen=True)
class Cylinder:
    """A capsule-free segment cylinder from p0 to p1 with radius r."""
    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r: float

    def inside(self, x, y, z):
        p0 = np.asarray(self.p0)
        d = np.asarray(self.p1) - p0
        L2 = float(d @ d)
        t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / L2
        px, py, pz = p0[0] + t * d[0], p0[1] + t * d[1], p0[2] + t * d[2]
        dist2 = (x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2
        return (t >= 0) & (t <= 1) & (dist2 <= self.r ** 2)

    def box_mm(self):
        """Axis-aligned box (lo, hi) in mm that holds every point inside."""
        return (tuple(min(a, b) - self.r for a, b in zip(self.p0, self.p1)),
                tuple(max(a, b) + self.r for a, b in zip(self.p0, self.p1)))

    def approx_distance(self, x, y, z):
        """Signed distance (mm) to the capsule around the segment (exact outside the flat ends' rim)."""
        p0 = np.asarray(self.p0)
        d = np.asarray(self.p1) - p0
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / float(d @ d), 0.0, 1.0)
        px, py, pz = p0[0] + t * d[0], p0[1] + t * d[1], p0[2] + t * d[2]
        return np.sqrt((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) - self.r


GTV = Ellipsoid((6.0, -8.0, 16.0), (14.0, 12.0, 13.0))
STRUCTURES = {
    "Brainstem": Ellipsoid((0.0, 30.0, 30.0), (13.0, 12.0, 25.0)),
    "SpinalCord": Cylinder((0.0, 36.0, -140.0), (0.0, 36.0, 5.0), 5.0),  # inside both dose grids
    "OpticChiasm": Ellipsoid((0.0, -12.0, 46.0), (7.0, 4.0, 2.5)),
    "OpticNrv_L": Cylinder((6.0, -14.0, 46.0), (17.0, -50.0, 44.0), 2.5),
    "OpticNrv_R": Cylinder((-6.0, -14.0, 46.0), (-17.0, -50.0, 44.0), 2.5),
    "Lobe_Temporal_L": Ellipsoid((44.0, 5.0, 36.0), (17.0, 33.0, 20.0)),
    "Lobe_Temporal_R": Ellipsoid((-44.0, 5.0, 36.0), (17.0, 33.0, 20.0)),
    "A_Carotid_L": Cylinder((22.0, 8.0, -90.0), (20.0, 4.0, 30.0), 3.5),
    "A_Carotid_R": Cylinder((-22.0, 8.0, -90.0), (-20.0, 4.0, 30.0), 3.5),
    "Cochlea_L": Ellipsoid((37.0, 24.0, 20.0), (3.2, 3.2, 3.2)),
    "Cochlea_R": Ellipsoid((-37.0, 24.0, 20.0), (3.2, 3.2, 3.2)),
    "Parotid_L": Ellipsoid((48.0, 15.0, -20.0), (14.0, 18.0, 22.0)),
    "Parotid_R": Ellipsoid((-48.0, 15.0, -20.0), (14.0, 18.0, 22.0)),
    "GTVp": GTV,
}
HEAD = Ellipsoid((0.0, 2.0, 28.0), (76.0, 92.0, 82.0))
NECK = (0.0, 8.0, 58.0, 64.0)  # centre x, y and semi-axes of the neck's elliptic cylinder (z < 10)
AIRWAY = Ellipsoid((0.0, -24.0, -5.0), (9.0, 18.0, 16.0))
VERTEBRA = Cylinder((0.0, 38.0, -150.0), (0.0, 38.0, 0.0), 15.0)
CANAL = Cylinder((0.0, 36.0, -150.0), (0.0, 36.0, 6.0), 7.5)

# Prior course: NPC IMRT as planned against RTOG 0615-style first-course constraints. Dose levels (Gy, 33 fractions):
# 70 Gy to the primary (nasopharynx and skull base), 59.4 Gy to the high-risk nodal regions (retropharyngeal and
# bilateral upper neck), 54 Gy to the lower neck; organs at risk spared down to their first-course constraint with a
# steep IMRT gradient (PRIOR_SPARING): cord max ~45 Gy, brainstem max ~54 Gy, optic chiasm/nerves ~50 Gy; the
# temporal lobes next to the skull base keep hot spots of 60-70 Gy (their usual compromise).
PRIOR_LEVELS = [  # (targets, physical dose Gy)
    ([Ellipsoid((0.0, -2.0, 12.0), (34.0, 24.0, 32.0))], 70.0),
    ([Ellipsoid((30.0, 12.0, -40.0), (22.0, 22.0, 42.0)), Ellipsoid((-30.0, 12.0, -40.0), (22.0, 22.0, 42.0)),
      Ellipsoid((0.0, 14.0, -10.0), (20.0, 10.0, 22.0)),    # retropharyngeal nodes
      Ellipsoid((16.0, 32.0, -45.0), (9.0, 12.0, 40.0)),    # posterior neck (levels II-Va) beside the cord
      Ellipsoid((-16.0, 32.0, -45.0), (9.0, 12.0, 40.0))], 59.4),
    ([Ellipsoid((28.0, 14.0, -100.0), (20.0, 20.0, 30.0)), Ellipsoid((-28.0, 14.0, -100.0), (20.0, 20.0, 30.0))],
     54.0),
]
#: organ -> (dose the first-course plan held it to (Gy, physical), IMRT gradient away from it (Gy per mm))
PRIOR_SPARING = {"SpinalCord": (45.0, 2.0), "Brainstem": (52.0, 2.0), "OpticChiasm": (50.0, 2.0),
                 "OpticNrv_L": (50.0, 2.0), "OpticNrv_R": (50.0, 2.0), "Lobe_Temporal_L": (66.0, 2.0),
                 "Lobe_Temporal_R": (66.0, 2.0)}
# the current plan covers the PTV (GTV + 5 mm CTV + 3 mm PTV in the demo protocol): 50 % isodose 5.5 mm outside it,
# 2.5 mm penumbra (PTV D98% above 95 % of the prescription, as an accepted clinical plan)
CURRENT_TARGET = Ellipsoid(GTV.c, tuple(a + 13.5 for a in GTV.r))
CURRENT_NORMALISATION = 1.03  # hot spot ~103 %, as a clinical plan normalised to PTV coverage


def _coords(grid: Grid, transform=None):
    """Physical coordinates (mm) of every voxel centre, each shaped (k, j, i)."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid.shape), indexing="ij")
    pts = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    xyz = grid.index_to_physical(pts)
    if transform is not None:
        xyz = transform(xyz)
    return tuple(xyz[:, a].reshape(grid.shape) for a in range(3))


def _axes(grid: Grid):
    """Physical coordinates (mm) of the voxel centres of an axis-aligned grid (identity direction) as three arrays
    that broadcast to the grid's (k, j, i) shape: x (1, 1, i), y (1, j, 1), z (k, 1, 1). The same numbers as
    :func:`_coords` (origin + index x spacing), without a 3D array per axis: every shape below evaluated on them
    does its per-axis arithmetic once per row instead of once per voxel."""
    if not np.allclose(grid.direction_matrix, np.eye(3), atol=0.0):
        return _coords(grid)
    o, sp = grid.origin, grid.spacing
    ni, nj, nk = grid.size
    return ((o[0] + np.arange(ni, dtype=np.float64) * sp[0]).reshape(1, 1, ni),
            (o[1] + np.arange(nj, dtype=np.float64) * sp[1]).reshape(1, nj, 1),
            (o[2] + np.arange(nk, dtype=np.float64) * sp[2]).reshape(nk, 1, 1))


def _prior_frame_points(q):
    """Current-frame points (N, 3) of the anatomy shown at prior-frame points ``q``: R^T (q - t)."""
    R, t = prior_frame_transform()
    return (q - t) @ R


def _prior_frame_axes(grid: Grid):
    """:func:`_coords` of ``grid`` through :func:`_prior_frame_points`, as broadcastable arrays: the known offset
    rotates about z only, so x and y depend on (j, i) alone (computed on one slice) and z on k alone (one
    column). Checked against the full computation in Testing/test_synthetic.py."""
    ni, nj, nk = grid.size
    x, y, _ = _coords(grid.subgrid((0, 0, 0), (ni, nj, 1)), transform=_prior_frame_points)
    _, _, z = _coords(grid.subgrid((0, 0, 0), (1, 1, nk)), transform=_prior_frame_points)
    return x.reshape(1, nj, ni), y.reshape(1, nj, ni), z.reshape(nk, 1, 1)


def _inside(shape, x, y, z, grid_shape, margin_mm: float = 5.0) -> np.ndarray:
    """``shape.inside(x, y, z)`` as a full bool array of ``grid_shape``, evaluated only on the index box whose
    coordinates come within ``margin_mm`` of the shape's box (False elsewhere, where no point can be inside).
    ``x, y, z`` broadcast to ``grid_shape`` (see _axes); each voxel gets exactly the arithmetic it would get over
    the whole grid, so the result is the same array."""
    lo, hi = shape.box_mm()
    near = np.ones((1, 1, 1), dtype=bool)
    for a, v in enumerate((x, y, z)):
        near = near & (v >= lo[a] - margin_mm) & (v <= hi[a] + margin_mm)
    out = np.zeros(grid_shape, dtype=bool)
    box = bounding_box(np.broadcast_to(near, grid_shape))
    if box is None:
        return out

    def crop(v):
        return v[tuple(b if v.shape[d] > 1 else slice(None) for d, b in enumerate(box))]

    out[box] = shape.inside(crop(x), crop(y), crop(z))
    return out


def _erfc_arr(x):
    # Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7), vectorised
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    r = poly * np.exp(-z * z)
    return np.where(x >= 0, r, 2.0 - r)


def _dose(x, y, z, targets, prescription, sigma_mm, bath_fraction, bath_mm, shift_mm=0.0):
    dist = np.min([t.approx_distance(x, y, z) for t in targets], axis=0)
    core = 0.5 * _erfc_arr((dist - shift_mm) / (sigma_mm * math.sqrt(2.0)))
    bath = bath_fraction * np.exp(-np.maximum(dist, 0.0) / bath_mm)
    return (prescription * np.maximum(core, bath)).astype(np.float32)


def _body(x, y, z, head_level=None):
    """Body mask; ``head_level``: HEAD.level(x, y, z) when the caller has it already."""
    head = (HEAD.level(x, y, z) if head_level is None else head_level) <= 1.0
    head = head & (z > -10.0)
    neck = ((((x - NECK[0]) / NECK[2]) ** 2 + ((y - NECK[1]) / NECK[3]) ** 2) <= 1.0) & (z <= 10.0)
    return head | neck


def phantom_ct(grid: Grid, transform=None, seed: int = SEED, coords=None) -> np.ndarray:
    """The phantom CT (HU, float32) on ``grid``; ``transform`` maps the grid's points (N, 3) to the current frame
    (the anatomy shown); ``coords``: the (x, y, z) arrays already mapped (full or broadcastable, see _axes)."""
    if coords is not None:
        x, y, z = coords
    else:
        x, y, z = _coords(grid, transform) if transform is not None else _axes(grid)
    rng = np.random.default_rng(seed)
    ct = np.full(grid.shape, -1000.0, dtype=np.float32)
    head_level = HEAD.level(x, y, z)
    body = np.broadcast_to(_body(x, y, z, head_level), grid.shape)
    ct[body] = 40.0
    brain = (head_level <= 0.92) & (z > 12.0)
    skull = (head_level <= 1.0) & ~brain & (z > 12.0)
    ct[skull & body] = 900.0
    ct[brain] = 32.0
    ct[_inside(VERTEBRA, x, y, z, grid.shape) & ~_inside(CANAL, x, y, z, grid.shape)] = 650.0
    ct[_inside(AIRWAY, x, y, z, grid.shape)] = -1000.0
    ct += rng.normal(0.0, 8.0, size=grid.shape).astype(np.float32) * body
    return ct


def prior_frame_transform():
    """Map current-CT points to prior-CT points (the known offset)."""
    a = math.radians(KNOWN_PRIOR_OFFSET["rotation_deg_about_z"])
    R = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    t = np.asarray(KNOWN_PRIOR_OFFSET["translation_mm"])
    return R, t


def prior_dose(in_prior_frame: bool = False) -> np.ndarray:
    """Prior course physical dose (Gy, float32) on ``PRIOR_DOSE_GRID``: in the current CT's frame (already
    registered) or, with ``in_prior_frame``, in the prior CT's frame (the grid placed there)."""
    if in_prior_frame:
        x, y, z = _prior_frame_axes(PRIOR_DOSE_GRID)
    else:
        x, y, z = _axes(PRIOR_DOSE_GRID)
    return prior_dose_at(x, y, z)


def prior_dose_at(x, y, z) -> np.ndarray:
    """Prior course physical dose (Gy, float32) at points given in the current CT's frame (mm, arrays of one
    shape); 0 outside the body. Also used by the clinical-size benchmark on its own grids."""
    # the 50 % isodose of each level 6 mm outside its PTV (PTV surface ~95 %), 4 mm penumbra
    dose = np.max([_dose(x, y, z, targets, level, sigma_mm=4.0, bath_fraction=0.45, bath_mm=30.0, shift_mm=6.0)
                   for targets, level in PRIOR_LEVELS], axis=0)
    for name, (cap, gradient) in PRIOR_SPARING.items():  # inverse-planned sparing: capped near each organ
        allowed = cap + gradient * np.maximum(STRUCTURES[name].approx_distance(x, y, z), 0.0)
        # a smooth minimum (1 Gy rounding): a planned dose has no kink where the sparing starts
        k = 1.0
        low = np.minimum(dose, allowed)
        dose = (low - k * np.log1p(np.exp(-np.abs(dose - allowed) / k))).astype(np.float32)
    dose *= _body(x, y, z)
    return dose


def current_dose() -> np.ndarray:
    """Current course physical dose (Gy, float32) on ``CURRENT_DOSE_GRID`` (current CT's frame)."""
    x, y, z = _axes(CURRENT_DOSE_GRID)
    dose = _dose(x, y, z, [CURRENT_TARGET], CURRENT_DOSE_GY * CURRENT_NORMALISATION, sigma_mm=2.5,
                 bath_fraction=0.45, bath_mm=14.0)
    dose *= _body(x, y, z)
    return dose


def prior_to_current_sitk_transform() -> sitk.Transform:
    """The known offset as an ITK transform mapping current-CT points to prior-CT points (resampling direction)."""
    R, t = prior_frame_transform()
    tr = sitk.AffineTransform(3)
    tr.SetMatrix(tuple(R.ravel()))
    tr.SetTranslation(tuple(float(v) for v in t))
    return tr


def generate(out_dir: Path) -> Path:
    """Write the synthetic case into ``out_dir`` and return the path of its case file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = CT_GRID
    x, y, z = _axes(g)  # broadcastable coordinates: the same numbers as _coords(g), far fewer operations
    write_volume(Volume(phantom_ct(g, coords=(x, y, z)).astype(np.int16), g), out_dir / "ct.nrrd",
                 description="SYNTHETIC current planning CT (HU)")
    # prior CT: voxel at prior-frame point q shows the anatomy at current-frame point R^T (q - t)
    write_volume(Volume(phantom_ct(g, seed=SEED + 1, coords=_prior_frame_axes(g)).astype(np.int16), g),
                 out_dir / "ct_prior.nrrd", description="SYNTHETIC prior-course CT (HU), known rigid offset")
    masks = out_dir / "structures"
    masks.mkdir(exist_ok=True)
    write_volume(Volume(np.broadcast_to(_body(x, y, z), g.shape).astype(np.uint8), g), masks / "External.nrrd")
    for name, shape in STRUCTURES.items():
        write_volume(Volume(_inside(shape, x, y, z, g.shape).astype(np.uint8), g), masks / f"{name}.nrrd")
    del x, y, z
    write_volume(Volume(prior_dose(), PRIOR_DOSE_GRID), out_dir / "dose_course1.nrrd", units="Gy",
                 description="SYNTHETIC prior course physical dose (Gy), 70 Gy / 33 fx, in the current CT frame")
    # the same prior dose as the planning system of the first course saw it: in the prior CT's frame
    write_volume(Volume(prior_dose(in_prior_frame=True), PRIOR_DOSE_GRID), out_dir / "dose_course1_prior_frame.nrrd",
                 units="Gy",
                 description="SYNTHETIC prior course physical dose (Gy) in the prior CT's frame (needs registration)")
    cur = current_dose()
    write_volume(Volume(cur, CURRENT_DOSE_GRID), out_dir / "dose_course2.nrrd", units="Gy",
                 description="SYNTHETIC current course physical dose (Gy), 65 Gy / 54 fx twice daily")
    shutil.copyfile(protocols_dir() / "synthetic-demo.yaml", out_dir / "synthetic-demo.yaml")
    case = {
        "patient": {"id": "SYNTHETIC-NPC-001", "name": "Synthetic^Phantom"},
        "reference": {"image": "ct.nrrd", "structures": "structures"},
        "grid": "dose",
        "protocol": "synthetic-demo.yaml",
        # patient selection factors (selection.py): SYNTHETIC values, shown in the report's selection panel
        "clinical": {"kps": 80, "age": 56, "rT_stage": "rT3", "rN_stage": "rN0", "late_complications": ["xerostomia"]},
        "courses": [
            # the prior course as its planning system saw it: its own CT and its dose in that CT's frame,
            # registered rigidly onto the current CT (not the known offset)
            {"name": "course1", "dose": "dose_course1_prior_frame.nrrd", "fractions": PRIOR_FRACTIONS,
             "interval_months": INTERVAL_MONTHS, "image": "ct_prior.nrrd", "registration": {"method": "rigid"}},
            {"name": "course2", "dose": "dose_course2.nrrd", "fractions": CURRENT_FRACTIONS,
             "schedule": {"fractions_per_day": 2, "min_hours_between_fractions": 6, "prescribed_dose_gy": 65}},
        ],
    }
    case_path = out_dir / "case.yaml"
    case_path.write_text("# SYNTHETIC NPC re-irradiation case generated by reirradiation-npc (not a patient)\n"
                         + yaml.safe_dump(case, sort_keys=False), encoding="utf-8")
    # the same case with the prior dose already in the current frame (no registration): exact, fast, for tests
    case["courses"][0] = {"name": "course1", "dose": "dose_course1.nrrd", "fractions": PRIOR_FRACTIONS,
                          "interval_months": INTERVAL_MONTHS, "registration": {"method": "identity"}}
    (out_dir / "case_identity.yaml").write_text(
        "# SYNTHETIC NPC re-irradiation case (prior dose pre-registered with the known offset; not a patient)\n"
        + yaml.safe_dump(case, sort_keys=False), encoding="utf-8")
    (out_dir / "known_prior_offset.json").write_text(json.dumps(
        {"description": "current-CT point p lies at R p + t in the prior CT (LPS mm)",
         **KNOWN_PRIOR_OFFSET}, indent=2), encoding="utf-8")
    return case_path

# The DICOM RT version of this case is written by synthetic_dicom.generate_dicom (it imports this module; this
# module does not import it, so the two never import each other).
