"""Registration of a prior course onto the reference (current) image, and its quality checks.

Direction convention (ITK resampling convention, used everywhere in this module): a registration's
``transform`` maps a point ``p`` of the reference image's frame (LPS mm) to the point ``T(p)`` of the prior
course's frame (the frame of its CT and of its dose). Mapping the prior dose onto the evaluation grid is then
``geometry.resample_linear(prior_dose, grid, transform)``.

Methods (case file ``registration.method``):

- ``identity``: the prior course is already in the reference frame.
- ``rigid``: Euler (3 rotations + 3 translations), Mattes mutual information, multi-resolution gradient
  descent, then normalised correlation; the reference CT is the fixed image, the prior course's CT (``image:``)
  the moving image; both first averaged to working voxels of about 2.5 mm (``working_spacing_mm``).
- ``deformable``: ``rigid`` followed by (``algorithm: demons``, default) diffeomorphic demons on the CT
  intensities (a smooth displacement field; diffeomorphic updates, so no folding) or (``algorithm: bspline``) a
  cubic B-spline free-form deformation (mean squares, L-BFGS-B), SimpleITK. Demons, validated on a textured
  phantom with a known smooth deformation (3 mm voxels, up to 4.9 mm, 3.1 mm mean in the body): 0.67 mm mean
  error, no folding, about 9 s of demons CPU time (was 12-14 s); on the untextured phantom (featureless neck,
  unobservable deformation) 2.6 mm (measured with the earlier 100 + 50 iterations). On the 512x512x150
  clinical-size case with a purely rigid truth (every displacement the demons add is error): 0.79 mm mean, 2.7 mm
  max (docs/benchmarks.md).
  The B-spline remains EXPERIMENTAL (a warning says so in the results).
- ``file``: ``transform:`` an ITK transform file (.tfm/.txt/.h5, read as mapping reference -> prior unless
  ``invert: true``) or a DICOM Spatial Registration object (rigid REG; its matrix maps the registered frame to
  the REG's own frame, PS3.3 C.20.2.1.1, and is inverted or not according to the frames of reference).

Quality checks (AAPM TG-132 style): Mattes mutual information before/after, for B-splines the Jacobian
determinant over the body and the count of folded voxels (det <= 0), Dice of prior-course structures mapped
through the transform against the current structures of the same organ.

Only numpy, SimpleITK and pydicom (REG files).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid, Volume, bounding_box

log = logging.getLogger(__name__)

METHODS = ("identity", "rigid", "deformable", "file")

#: Documented defaults of the intensity-based methods (recorded in results with every run).
RIGID_DEFAULTS = {
    "mask": "body",                   # body | none: fixed-image mask from the HU threshold (largest component)
    "body_threshold_hu": -400.0,      # HU above which a voxel is body (air is about -1000 HU)
    "initialization": "geometry",     # geometry (image centres) | moments (intensity centres of mass) | none
    "shrink_factors": [4, 2, 1],      # image pyramid, coarse to fine
    "smoothing_sigmas_mm": None,      # Gaussian smoothing per level (mm); None: [2, 1, 0.5] x largest voxel spacing
    "samples_per_level": 50000,       # random metric samples per level (inside the mask)
    "iterations": 200,                # maximum optimizer iterations per level
    "histogram_bins": 50,             # Mattes mutual information
    "metric": "correlation",          # final stage: correlation (same modality, CT-CT) | mattes
    "working_spacing_mm": 2.5,        # voxels averaged (bin shrink) to about this size before registering; 0: native
}
DEMONS_DEFAULTS = {
    "demons_shrink_factors": [2, 1],  # coarse to fine
    "demons_iterations": [20, 40],    # per level (was [100, 50]: see the note below)
    "demons_smoothing_mm": 6.0,       # Gaussian regularisation of the displacement field (sigma, mm)
}
# Demons iterations (issue 15, docs/benchmarks.md "speed-reg"): on the clinical-size case, whose truth is rigid, the
# coarse level (voxels of ~6 mm) drifts the longer it runs (100 iterations alone: 3.1 mm mean error, Jacobian
# 0.37-2.1) and the fine level then pulls part of it back; 20 coarse + 40 fine iterations gave 0.79 / 1.56 / 2.67 mm
# (mean / 95th percentile / max) against 1.35 / 2.75 / 3.52 mm for 100 + 50, at 0.6x the CPU time, and on the
# textured phantom of the tests 0.67 mm mean against 0.69 mm (known deformation up to 4.9 mm); with the same
# deformation doubled (up to 9.8 mm) 1.28 against 1.26 mm.
DEFORMABLE_DEFAULTS = {
    "algorithm": "demons",            # demons (diffeomorphic, validated) | bspline (experimental)
    "mesh_size": 6,                   # B-spline mesh elements per axis over the body's bounding box
    "bspline_iterations": 100,        # L-BFGS-B iterations per level
    "bspline_shrink_factors": [2, 1],
    "bspline_smoothing_sigmas_mm": [2.0, 1.0],
    "bspline_samples_per_level": 50000,
}
# Stages (tuned on the synthetic phantom, 2 mm and 1.5x1.5x2.5 mm voxels, rotations up to 5 deg, shifts up to
# 15 mm, and on the 512x512x150 clinical-size case): on the working images (voxels averaged to about
# working_spacing_mm), a Mattes MI pyramid, a finest-level polish (regular-step gradient descent, small steps),
# then (metric: correlation, the default) a final stage with normalised correlation, images smoothed by 1.5
# voxels: without smoothing, the aliased edges of the analytic phantom bias every metric's optimum (up to 0.87 mm
# at the head-box corners for 1 deg about z); with it the optimum is within 0.2-0.35 mm of the truth.
# Measured (issue 15, docs/benchmarks.md): clinical-size case 0.11 mm max error over the head box; 2 mm phantom
# seeds 11 and 7: 0.36 and 0.24 mm; demo-grid known transforms 0.18 and 0.42 mm. The earlier scheme (3x polish
# samples, 10 conjugate-gradient iterations, 200 000 final samples, native voxels) reached the same accuracy on
# these cases for 3-4x the CPU time.
REFINE_ITERATIONS = 40                 # polish: at most this many regular-step iterations
REFINE_STEP = 1.0                      # polish: first step (scaled units, about mm at the image's far corner)
REFINE_SIGMA_MM = None                 # polish smoothing (mm); None: the last level's
REFINE_INTERPOLATOR = sitk.sitkLinear
REFINE_OPTIMIZER = "rsgd"              # "cg": add 10 conjugate-gradient line-search iterations after the polish
CG_ITERATIONS = 10
REFINE_SAMPLES = 1                     # polish: this many times samples_per_level
FINAL_SAMPLES = 100_000                # final correlation stage: random samples in the body mask (fixed seed)
FINAL_STEP = 2.0                       # final stage: first step (scaled units, ~mm at the far corner); 0.5 stopped
                                       # short on the 2 mm phantom (seed 11: 0.52 mm)
FINAL_ITERATIONS = 100
FINAL_OPTIMIZER = "rsgd"
FINAL_SIGMA_VOXELS = 1.5              # final stage smoothing: this many times the largest working voxel spacing
FINAL_SAMPLING = "random"
BSPLINE_METRIC = "meansquares"         # same-modality CT (Mattes MI did worse on the phantom: 3.3-4.3 mm)
DEMONS_HU_MIN, DEMONS_HU_MAX = -1000.0, 1500.0   # demons intensity window (HU)
DEMONS_MAX_STEP_MM = 2.0               # largest update per demons iteration (mm)
_SEED = 20211                          # fixed: the same inputs give the same registration
_QA_SAMPLES = 200000                   # metric QA samples (regular grid, fixed seed)
_JACOBIAN_SPACING_MM = 2.0             # coarsest spacing of the Jacobian check grid


# ------------------------------------------------------------------------------------------------ options

_OPTION_KEYS = {
    "identity": set(),
    "rigid": set(RIGID_DEFAULTS),
    "deformable": set(RIGID_DEFAULTS) | set(DEFORMABLE_DEFAULTS) | set(DEMONS_DEFAULTS),
    "file": {"transform", "invert"},
}


def validate_options(reg, src: str, key: str, base: Path) -> dict:
    """Check a case file's ``registration`` mapping; return it with ``transform`` resolved against ``base``.

    Defaults are NOT filled in here (they are recorded in the results when the registration runs).
    """
    def fail(k, msg):
        raise InputError(msg, source=src, field=f"{key}.{k}" if k else key)

    if not isinstance(reg, dict):
        fail("", f"must be a mapping such as {{method: rigid}}, got {type(reg).__name__}")
    method = reg.get("method")
    if method is None:
        fail("method", f"missing (one of: {', '.join(METHODS)})")
    if method not in METHODS:
        fail("method", f"unsupported method {method!r} (this version supports: {', '.join(METHODS)})")
    allowed = _OPTION_KEYS[method] | {"method"}
    unknown = sorted(set(map(str, reg)) - allowed)
    if unknown:
        fail(unknown[0], f"unknown key for method {method} (allowed: {', '.join(sorted(allowed))})")
    out = dict(reg)

    def number(k, lo, integer=False, hi=None):
        v = reg[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo \
                or (hi is not None and v > hi) or (integer and v != int(v)):
            fail(k, f"must be a{' whole' if integer else ''} number >= {lo:g}"
                    f"{f' and <= {hi:g}' if hi is not None else ''}, got {v!r}")
        return int(v) if integer else float(v)

    def levels(k, integer):
        v = reg[k]
        if not isinstance(v, list) or not v:
            fail(k, f"must be a non-empty list of numbers, got {v!r}")
        vals = []
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 \
                    or (integer and (x != int(x) or x < 1)):
                fail(k, f"must hold {'whole numbers >= 1' if integer else 'numbers >= 0'}, got {x!r}")
            vals.append(int(x) if integer else float(x))
        return vals

    for k in reg:
        if k == "method":
            continue
        if k == "mask" and reg[k] not in ("body", "none"):
            fail(k, f"must be 'body' or 'none', got {reg[k]!r}")
        elif k == "algorithm" and reg[k] not in ("demons", "bspline"):
            fail(k, f"must be 'demons' or 'bspline', got {reg[k]!r}")
        elif k == "demons_smoothing_mm":
            out[k] = number(k, 0.5, hi=50.0)
        elif k in ("demons_shrink_factors", "demons_iterations"):
            out[k] = levels(k, True)
        elif k == "metric" and reg[k] not in ("correlation", "mattes"):
            fail(k, f"must be 'correlation' (CT to CT) or 'mattes' (mutual information only), got {reg[k]!r}")
        elif k == "initialization" and reg[k] not in ("geometry", "moments", "none"):
            fail(k, f"must be 'geometry', 'moments' or 'none', got {reg[k]!r}")
        elif k == "body_threshold_hu":
            out[k] = number(k, -1024.0)
        elif k == "working_spacing_mm":
            out[k] = number(k, 0.0, hi=10.0)
        elif k in ("iterations", "bspline_iterations"):
            out[k] = number(k, 1, integer=True, hi=10000)
        elif k in ("samples_per_level", "bspline_samples_per_level"):
            out[k] = number(k, 1000, integer=True)
        elif k == "histogram_bins":
            out[k] = number(k, 8, integer=True, hi=256)
        elif k in ("shrink_factors", "bspline_shrink_factors"):
            out[k] = levels(k, True)
        elif k in ("smoothing_sigmas_mm", "bspline_smoothing_sigmas_mm"):
            out[k] = levels(k, False)
        elif k == "mesh_size":
            v = reg[k]
            vals = v if isinstance(v, list) else [v]
            if len(vals) not in (1, 3) or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x != int(x)
                                              or not 1 <= x <= 50 for x in vals):
                fail(k, f"must be a whole number 1-50 or a list of three, got {v!r}")
            out[k] = [int(x) for x in vals] * (3 if len(vals) == 1 else 1)
        elif k == "invert":
            if not isinstance(reg[k], bool):
                fail(k, f"must be true or false, got {reg[k]!r}")
        elif k == "transform":
            v = reg[k]
            if not isinstance(v, str) or not v.strip():
                fail(k, f"must be a file path, got {v!r}")
            p = Path(v)
            out[k] = p if p.is_absolute() else Path(base) / p
    if method == "file" and "transform" not in reg:
        fail("transform", "missing (an ITK transform file .tfm/.h5 or a DICOM Spatial Registration object)")
    if ("demons_shrink_factors" in reg) != ("demons_iterations" in reg) or (
            "demons_shrink_factors" in reg and len(out["demons_shrink_factors"]) != len(out["demons_iterations"])):
        fail("demons_iterations", "give demons_shrink_factors and demons_iterations together, one value per level")
    for a, b in (("shrink_factors", "smoothing_sigmas_mm"), ("bspline_shrink_factors", "bspline_smoothing_sigmas_mm")):
        if b in reg:
            n_levels = len(out[a]) if a in reg else len((RIGID_DEFAULTS | DEFORMABLE_DEFAULTS)[a])
            if len(out[b]) != n_levels:
                fail(b, f"must have one value per level of {a} ({n_levels})")
        elif a in reg and a.startswith("bspline") and len(out[a]) != len(DEFORMABLE_DEFAULTS[b]):
            fail(b, f"missing: give one smoothing value (mm) per level of {a}")
    return out


# ------------------------------------------------------------------------------------------------ outcome

@dataclass
class RegistrationOutcome:
    """One prior course's registration: the transform (reference -> prior frame) and its QA numbers."""

    course: str
    method: str
    transform: sitk.Transform
    parameters: dict = field(default_factory=dict)
    time_s: float = 0.0
    metric_before: float | None = None      # Mattes mutual information (nats; higher = better aligned)
    metric_after: float | None = None
    linear: sitk.Transform | None = None    # the affine part (None when the transform has none we can name)
    max_deformation_mm: float | None = 0.0  # bound on |T(p) - linear(p)|; None = unknown
    jacobian: dict | None = None
    dice: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source_file: str | None = None
    moving_image: Volume | None = None      # the prior course's CT, for the registered-CT output

    def affine_matrix(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(M, b) with T_linear(p) = M p + b (mm), or None."""
        tx = self.linear
        if tx is None:
            return None
        return affine_of(tx)


def affine_of(tx: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(M, b) of a linear transform, read off by mapping the origin and the unit vectors (exact for affines)."""
    b = np.asarray(tx.TransformPoint((0.0, 0.0, 0.0)))
    M = np.stack([np.asarray(tx.TransformPoint(tuple(e))) - b for e in np.eye(3)], axis=1)
    return M, b


def _affine_transform(M: np.ndarray, b: np.ndarray) -> sitk.AffineTransform:
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in np.asarray(M).ravel()))
    tx.SetTranslation(tuple(float(v) for v in b))
    return tx


# ----------------------------------------------------------------------------------------- image helpers

def _float_image(vol: Volume) -> sitk.Image:
    img = vol.to_sitk()
    return sitk.Cast(img, sitk.sitkFloat32) if img.GetPixelID() != sitk.sitkFloat32 else img


def body_mask(image: sitk.Image, threshold_hu: float, dilate_mm: float = 5.0) -> sitk.Image:
    """UInt8 mask: largest connected component above ``threshold_hu`` (HU), holes filled, dilated by ``dilate_mm``
    (mm; per axis round(dilate_mm / spacing) voxels, at least 1 when ``dilate_mm`` > 0; 0: not dilated)."""
    if not dilate_mm >= 0:
        raise ValueError(f"body_mask: dilate_mm must be >= 0 mm, not {dilate_mm}")
    b = sitk.BinaryThreshold(image, float(threshold_hu), 1e9, 1, 0)
    cc = sitk.ConnectedComponent(b)
    largest = sitk.RelabelComponent(cc, sortByObjectSize=True) == 1
    radius = [max(1, int(round(dilate_mm / s))) if dilate_mm > 0 else 0 for s in image.GetSpacing()]
    # hole filling and dilation on the component's box padded by radius + 1 voxels (the head is ~1/10 of the CT's
    # box): the same voxels as on the whole image. Outside the box everything is background, connected to the
    # image border, and the padding holds that background layer and every voxel the dilation can reach.
    box = bounding_box(sitk.GetArrayViewFromImage(largest) > 0)
    if box is None:
        return sitk.Cast(largest, sitk.sitkUInt8)
    size = image.GetSize()
    lo = [max(0, box[2 - a].start - radius[a] - 1) for a in range(3)]
    hi = [min(size[a], box[2 - a].stop + radius[a] + 1) for a in range(3)]
    crop = sitk.RegionOfInterest(largest, [h - l for l, h in zip(lo, hi)], lo)
    crop = sitk.BinaryFillhole(crop)
    if dilate_mm > 0:
        crop = sitk.BinaryDilate(crop, radius)
    arr = np.zeros(sitk.GetArrayViewFromImage(largest).shape, np.uint8)
    arr[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = sitk.GetArrayViewFromImage(crop)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def working_image(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The image with its voxels averaged in blocks (SimpleITK BinShrink) to about ``spacing_mm`` along each axis
    (integer factor per axis: round(spacing_mm / spacing), at least 1). Averaging, not sub-sampling: each working
    voxel is the mean of the voxels it covers (partial volume, no aliasing). ``spacing_mm`` <= 0: the image itself.

    Example: a 512 x 512 x 150 CT of 0.98 x 0.98 x 2.5 mm becomes 171 x 171 x 150 voxels of 2.94 x 2.94 x 2.5 mm
    (13x fewer voxels); a CT of 2 mm or 3 mm voxels is left as it is."""
    if not spacing_mm or spacing_mm <= 0:
        return image
    factors = [max(1, int(round(float(spacing_mm) / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _mask_on(mask: sitk.Image | None, image: sitk.Image) -> sitk.Image | None:
    """``mask`` on the grid of ``image`` (nearest neighbour), or the mask itself when the grids agree."""
    if mask is None or (mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
                        and mask.GetSpacing() == image.GetSpacing()):
        return mask
    return sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _crop_to_mask(image: sitk.Image, mask: sitk.Image, pad_mm: float = 10.0):
    arr = sitk.GetArrayViewFromImage(mask)
    box = bounding_box(arr > 0)
    if box is None:
        return image, mask
    sp = image.GetSpacing()
    lo = [max(0, box[2 - a].start - int(math.ceil(pad_mm / sp[a]))) for a in range(3)]
    hi = [min(image.GetSize()[a], box[2 - a].stop + int(math.ceil(pad_mm / sp[a]))) for a in range(3)]
    size = [h - l for l, h in zip(lo, hi)]
    return sitk.RegionOfInterest(image, size, lo), sitk.RegionOfInterest(mask, size, lo)


def _sampling_percentages(fixed: sitk.Image, mask: sitk.Image | None, shrink: list[int], samples: int
                          ) -> list[float]:
    n = float(np.prod(fixed.GetSize()))
    frac = float(sitk.GetArrayViewFromImage(mask).mean()) if mask is not None else 1.0
    out = []
    for s in shrink:
        n_level = max(n / s ** 3 * max(frac, 1e-6), 1.0)
        out.append(float(min(1.0, samples / n_level)))
    return out


def mattes_mi(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, mask: sitk.Image | None,
              bins: int = 50) -> float | None:
    """Mattes mutual information (nats, >= 0; higher = better aligned) of ``moving`` through ``transform``.

    ITK's Mattes metric is the negated mutual information; this returns its negation. Deterministic: SimpleITK's
    MetricEvaluate uses every voxel of ``fixed`` inside ``mask`` (a regular sample grid with a fixed seed is
    requested, but measured, the requested fraction does not change the value). None if it cannot be evaluated
    (e.g. too few sample points map inside the moving image)."""
    R = sitk.ImageRegistrationMethod()
    R.SetMetricAsMattesMutualInformation(int(bins))
    pct = _sampling_percentages(fixed, mask, [1], _QA_SAMPLES)[0]
    if pct < 1.0:
        R.SetMetricSamplingStrategy(R.REGULAR)
        R.SetMetricSamplingPercentage(pct, _SEED)
    else:
        R.SetMetricSamplingStrategy(R.NONE)
    if mask is not None:
        # only the mask's box: the metric tests the mask at every voxel of the fixed image and evaluates every voxel
        # inside it (measured: the sampling percentage above does not change MetricEvaluate's value); the histogram
        # ranges come from the fixed image inside the mask and from the whole moving image, so the box gives the
        # same value up to the order in which ITK's threads add their sums (~1e-14 relative), in 1/4 of the time
        fixed, mask = _crop_to_mask(fixed, mask, pad_mm=0.0)
        R.SetMetricFixedMask(mask)
    R.SetInterpolator(sitk.sitkLinear)
    R.SetMetricUseMovingImageGradientFilter(False)   # a value only: no gradient images
    R.SetMetricUseFixedImageGradientFilter(False)
    if _is_linear(transform):
        R.SetInitialTransform(transform)
    else:
        # ITK's v4 metrics refuse an optimised transform holding a displacement field unless the field's grid is
        # the metric's virtual domain (the demons' field covers only the body box): give it as the fixed moving
        # initial transform, with an identity to optimise (the value is the same; it was None for demons before)
        R.SetMovingInitialTransform(transform)
        R.SetInitialTransform(sitk.Euler3DTransform())
    try:
        return -float(R.MetricEvaluate(fixed, moving))
    except RuntimeError as exc:
        log.info("metric not evaluable: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None


# --------------------------------------------------------------------------------------------- methods

def rigid(fixed: sitk.Image, moving: sitk.Image, options: dict | None = None,
          mask: sitk.Image | None = None) -> tuple[sitk.Euler3DTransform, dict]:
    """Rigid registration (fixed = reference CT, moving = prior CT, float32 HU).

    Returns the Euler3D transform mapping fixed points to moving points and the parameters used (defaults
    filled). ``mask``: a fixed-image mask (UInt8) already computed, else one is made if ``mask: body``.
    """
    p = RIGID_DEFAULTS | (options or {})
    p = {k: p[k] for k in RIGID_DEFAULTS}
    # the working images: voxels averaged to about working_spacing_mm (a clinical 0.98 x 0.98 x 2.5 mm CT has 13x
    # fewer voxels at 2.94 x 2.94 x 2.5 mm); every stage below runs on them
    fixed = working_image(fixed, p["working_spacing_mm"])
    moving = working_image(moving, p["working_spacing_mm"])
    p["working_voxel_mm"] = [float(v) for v in fixed.GetSpacing()]
    if p["smoothing_sigmas_mm"] is None:
        s_max = max(fixed.GetSpacing())
        p["smoothing_sigmas_mm"] = [s_max * 2.0 ** (1 - i) for i in range(len(p["shrink_factors"]))]
    if len(p["shrink_factors"]) != len(p["smoothing_sigmas_mm"]):
        raise InputError("shrink_factors and smoothing_sigmas_mm must have the same length", field="registration")
    if mask is None and p["mask"] == "body":
        mask = body_mask(fixed, p["body_threshold_hu"])
    mask = _mask_on(mask, fixed)
    # initial transform from the whole images: the fixed image cropped to its body box has another geometric
    # centre than the uncropped moving image (on the clinical-size case 25 mm apart, which the optimizer then
    # crawled back over hundreds of iterations)
    init_mode = p["initialization"]
    if init_mode == "none":
        init = sitk.Euler3DTransform()
    else:
        mode = (sitk.CenteredTransformInitializerFilter.GEOMETRY if init_mode == "geometry"
                else sitk.CenteredTransformInitializerFilter.MOMENTS)
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), mode)
    if mask is not None:
        fixed, mask = _crop_to_mask(fixed, mask)
    # rotations about the centre of the (cropped) fixed image; the initial transform has no rotation, so moving
    # its centre does not change where it maps points
    lo, hi = Grid.of_image(fixed).bounds_mm()
    init.SetCenter(tuple(float(v) for v in (lo + hi) / 2))
    iters: list[int] = []

    def run(initial, shrink, sigmas, samples, lr, min_step, iterations, interpolator=sitk.sitkLinear,
            optimizer="rsgd", metric="mattes", sampling="random"):
        R = sitk.ImageRegistrationMethod()
        if metric == "mattes":
            R.SetMetricAsMattesMutualInformation(int(p["histogram_bins"]))
        elif metric == "correlation":
            R.SetMetricAsCorrelation()
        else:
            R.SetMetricAsMeanSquares()
        R.SetMetricSamplingStrategy(R.RANDOM if sampling == "random" else R.REGULAR)
        R.SetMetricSamplingPercentagePerLevel(_sampling_percentages(fixed, mask, shrink, samples), _SEED)
        if mask is not None:
            R.SetMetricFixedMask(mask)
        R.SetInterpolator(interpolator)
        # image gradients at the sample points only (a gradient image of every level costs more than the samples)
        R.SetMetricUseMovingImageGradientFilter(False)
        R.SetMetricUseFixedImageGradientFilter(False)
        if optimizer == "rsgd":
            R.SetOptimizerAsRegularStepGradientDescent(learningRate=lr, minStep=min_step,
                                                       numberOfIterations=iterations, relaxationFactor=0.5,
                                                       gradientMagnitudeTolerance=1e-8)
        elif optimizer == "cg":
            R.SetOptimizerAsConjugateGradientLineSearch(learningRate=lr, numberOfIterations=iterations,
                                                        convergenceMinimumValue=1e-8, convergenceWindowSize=5,
                                                        lineSearchLowerLimit=0.0, lineSearchUpperLimit=4.0,
                                                        lineSearchEpsilon=0.01, lineSearchMaximumIterations=20,
                                                        estimateLearningRate=R.Never)
        R.SetOptimizerScalesFromPhysicalShift()  # steps in mm at the image's far corner
        R.SetShrinkFactorsPerLevel(shrink)
        R.SetSmoothingSigmasPerLevel(sigmas)
        R.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        R.SetInitialTransform(initial, inPlace=False)
        R.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: iters.append(0))
        R.AddCommand(sitk.sitkIterationEvent, lambda: iters.__setitem__(-1, iters[-1] + 1))
        res = R.Execute(fixed, moving)
        if res.GetName() == "CompositeTransform":
            res = sitk.CompositeTransform(res).GetNthTransform(0)
        return sitk.Euler3DTransform(res), R.GetOptimizerStopConditionDescription()

    # multi-resolution search (each level restarts with 2-unit steps), then a finest-level polish with small
    # steps and more samples. Tuned on the synthetic phantom: starting the fine levels with small steps stopped in
    # local optima more often (max error over the head box 1.8 mm vs 0.43 mm for this scheme, 2 mm voxels).
    tx, _ = run(init, p["shrink_factors"], p["smoothing_sigmas_mm"], p["samples_per_level"], 2.0, 1e-2,
                p["iterations"])
    polish_sigma = p["smoothing_sigmas_mm"][-1] if REFINE_SIGMA_MM is None else REFINE_SIGMA_MM
    tx, stop = run(tx, [p["shrink_factors"][-1]], [polish_sigma],
                   REFINE_SAMPLES * p["samples_per_level"], REFINE_STEP, 1e-3, min(p["iterations"], REFINE_ITERATIONS),
                   REFINE_INTERPOLATOR, "rsgd")
    if REFINE_OPTIMIZER == "cg":
        tx, stop = run(tx, [p["shrink_factors"][-1]], [polish_sigma], p["samples_per_level"], 1.0, 1e-3,
                       CG_ITERATIONS, REFINE_INTERPOLATOR, REFINE_OPTIMIZER)
    if p["metric"] == "correlation":
        # same-modality final stage: normalised correlation on the working images, smoothed by 1.5 voxels
        # (removes the aliasing bias of sharp edges; sharper than mutual information for CT to CT; insensitive to
        # a linear HU recalibration between the scans)
        final_sigma = FINAL_SIGMA_VOXELS * max(fixed.GetSpacing())
        tx, stop = run(tx, [1], [final_sigma], FINAL_SAMPLES, FINAL_STEP, 1e-3, FINAL_ITERATIONS, sitk.sitkLinear,
                       FINAL_OPTIMIZER, "correlation", FINAL_SAMPLING)
    p["stop_condition"] = stop
    p["iterations_per_level"] = iters
    return tx, p


def bspline(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, options: dict | None = None,
            mask: sitk.Image | None = None) -> tuple[sitk.BSplineTransform, dict]:
    """B-spline refinement after ``initial`` (fixed -> moving). The result ``b`` is applied first:
    p -> initial(b(p)). Returns the B-spline transform and the parameters used."""
    p = DEFORMABLE_DEFAULTS | (options or {})
    p = {k: p[k] for k in DEFORMABLE_DEFAULTS if k != "algorithm"}
    if mask is not None:
        fixed, mask = _crop_to_mask(fixed, mask)
    mesh = list(p["mesh_size"]) if isinstance(p["mesh_size"], list) else [int(p["mesh_size"])] * 3
    p["mesh_size"] = mesh
    tx = sitk.BSplineTransformInitializer(fixed, mesh, 3)
    R = sitk.ImageRegistrationMethod()
    if BSPLINE_METRIC == "meansquares":
        R.SetMetricAsMeanSquares()
    else:
        R.SetMetricAsMattesMutualInformation(50)
    R.SetMetricSamplingStrategy(R.RANDOM)
    R.SetMetricSamplingPercentagePerLevel(_sampling_percentages(fixed, mask, p["bspline_shrink_factors"],
                                                                p["bspline_samples_per_level"]), _SEED)
    if mask is not None:
        R.SetMetricFixedMask(mask)
    R.SetInterpolator(sitk.sitkLinear)
    R.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=p["bspline_iterations"],
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * p["bspline_iterations"],
                           costFunctionConvergenceFactor=1e7)
    R.SetShrinkFactorsPerLevel(p["bspline_shrink_factors"])
    R.SetSmoothingSigmasPerLevel(p["bspline_smoothing_sigmas_mm"])
    R.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    R.SetMovingInitialTransform(initial)
    R.SetInitialTransform(tx, inPlace=True)
    R.Execute(fixed, moving)
    lo, hi = Grid.of_image(fixed).bounds_mm()
    p["control_point_spacing_mm"] = [float(v) for v in (hi - lo) / np.asarray(mesh)]
    p["bspline_stop_condition"] = R.GetOptimizerStopConditionDescription()
    return tx, p


def demons(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, options: dict | None = None,
           mask: sitk.Image | None = None) -> tuple[sitk.DisplacementFieldTransform, dict]:
    """Diffeomorphic demons (Vercauteren et al., NeuroImage 2009) after ``initial`` (fixed -> moving), for
    same-modality CT. The moving image is resampled through ``initial`` onto the fixed grid (cropped to the
    mask's box), both clamped to [DEMONS_HU_MIN, DEMONS_HU_MAX] HU; coarse-to-fine levels, the field smoothed by a
    Gaussian of ``demons_smoothing_mm`` after each iteration (diffeomorphic updates: no folding). The result
    ``d`` is applied first: p -> initial(p + d(p)); outside its box d = 0. Returns the transform and parameters."""
    p = DEMONS_DEFAULTS | (options or {})
    p = {k: p[k] for k in DEMONS_DEFAULTS}
    if mask is not None:
        fixed, mask = _crop_to_mask(fixed, mask, pad_mm=15.0)
    f = sitk.Clamp(fixed, sitk.sitkFloat32, DEMONS_HU_MIN, DEMONS_HU_MAX)
    m = sitk.Clamp(sitk.Resample(moving, fixed, initial, sitk.sitkLinear, -1000.0, sitk.sitkFloat32),
                   sitk.sitkFloat32, DEMONS_HU_MIN, DEMONS_HU_MAX)
    field = None
    for shrink, iters in zip(p["demons_shrink_factors"], p["demons_iterations"]):
        fs = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f, 0.5 * shrink * max(f.GetSpacing())), [shrink] * 3) \
            if shrink > 1 else f
        ms = sitk.Resample(sitk.SmoothingRecursiveGaussian(m, 0.5 * shrink * max(f.GetSpacing())), fs) \
            if shrink > 1 else m
        flt = sitk.DiffeomorphicDemonsRegistrationFilter()
        flt.SetNumberOfIterations(int(iters))
        flt.SetSmoothDisplacementField(True)
        # ITK's field smoothing is in voxels of the level's image
        flt.SetStandardDeviations([float(p["demons_smoothing_mm"]) / sp for sp in fs.GetSpacing()])
        flt.SetUseImageSpacing(True)
        flt.SetMaximumUpdateStepLength(DEMONS_MAX_STEP_MM)
        if field is not None:
            field = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            field = flt.Execute(fs, ms, field)
        else:
            field = flt.Execute(fs, ms)
    if field.GetSize() != f.GetSize():
        field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    arr = sitk.GetArrayViewFromImage(field)
    p["max_displacement_mm"] = float(np.sqrt((np.asarray(arr) ** 2).sum(axis=-1)).max())
    p["field_spacing_mm"] = [float(v) for v in field.GetSpacing()]
    return sitk.DisplacementFieldTransform(field), p


def compose(linear: sitk.Transform, deform: sitk.Transform) -> sitk.CompositeTransform:
    """p -> linear(deform(p)) (ITK composite transforms apply the last added transform first)."""
    return sitk.CompositeTransform([linear, deform])


def bspline_max_displacement_mm(tx: sitk.BSplineTransform) -> float:
    """Upper bound of the B-spline's displacement (mm): cubic B-spline weights are >= 0 and sum to 1, so
    |u(p)| <= the largest control-point coefficient vector."""
    params = np.asarray(tx.GetParameters()).reshape(3, -1)
    return float(np.sqrt((params ** 2).sum(axis=0)).max()) if params.size else 0.0


def jacobian_check(transform: sitk.Transform, mask: sitk.Image) -> dict:
    """Jacobian determinant of ``transform`` over ``mask`` (fixed-image body), on the mask's bounding box at
    a spacing of at least 2 mm: min, max, folded voxel count (det <= 0), voxels checked, spacing (mm)."""
    arr = sitk.GetArrayViewFromImage(mask) > 0
    box = bounding_box(arr)
    if box is None:
        return {"min": None, "max": None, "folded_voxels": 0, "voxels_checked": 0}
    g = Grid.of_image(mask)
    sub = g.subgrid(tuple(b.start for b in box[::-1]), tuple(b.stop for b in box[::-1]))
    sp = np.maximum(np.asarray(sub.spacing), _JACOBIAN_SPACING_MM)
    size = [max(2, int(math.floor((n - 1) * s / t)) + 1) for n, s, t in zip(sub.size, sub.spacing, sp)]
    check = Grid(tuple(size), sub.origin, tuple(float(v) for v in sp), sub.direction)
    ref = check.reference_image()
    disp = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                             ref.GetSpacing(), ref.GetDirection())
    det = _jacobian_determinant(sitk.GetArrayFromImage(disp), check)
    m = sitk.GetArrayFromImage(sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    vals = det[m]
    if vals.size == 0:
        return {"min": None, "max": None, "folded_voxels": 0, "voxels_checked": 0}
    return {"min": float(vals.min()), "max": float(vals.max()), "folded_voxels": int((vals <= 0).sum()),
            "voxels_checked": int(vals.size), "spacing_mm": [float(v) for v in sp]}


def _jacobian_determinant(u: np.ndarray, grid: Grid) -> np.ndarray:
    """det(I + du/dx) of a displacement field ``u`` (k, j, i, 3; mm, LPS components) on ``grid``, float32.

    Derivatives by central differences (one-sided at the border) along the index axes, turned into physical
    derivatives with the grid's direction and spacing: du/dx = (du/di) diag(1/spacing) D^T.
    """
    d_idx = [np.gradient(u, axis=a) for a in (2, 1, 0)]     # du/di, du/dj, du/dk: each (k, j, i, 3)
    D = grid.direction_matrix / np.asarray(grid.spacing)     # column c: axis c direction / spacing
    # J[..., r, c] = delta_rc + sum_a du_r/d(idx_a) * dIdx_a/dx_c, with dIdx_a/dx_c = D[c, a]
    J = np.zeros(u.shape[:3] + (3, 3), dtype=np.float64)
    for a in range(3):
        J += d_idx[a][..., :, None] * D[:, a][None, None, None, None, :]
    J += np.eye(3)
    return np.linalg.det(J).astype(np.float32)


# ------------------------------------------------------------------------------------------ file method

def read_transform_file(path: Path, invert: bool, src: str, key: str) -> tuple[sitk.Transform, list[str]]:
    """An ITK transform file (reference -> prior unless ``invert``)."""
    notes = []
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError:
        raise InputError("not a readable ITK transform file (.tfm, .txt, .h5) or the file is corrupt",
                         source=str(path), field=key) from None
    if tx.GetDimension() != 3:
        raise InputError(f"expected a 3D transform, got {tx.GetDimension()}D", source=str(path), field=key)
    if invert:
        try:
            tx = tx.GetInverse()
        except RuntimeError:
            raise InputError("invert: true but this transform has no closed-form inverse", source=str(path),
                             field=key) from None
        notes.append("transform file inverted (invert: true): the file maps prior -> reference")
    return tx, notes


def _is_linear(tx: sitk.Transform) -> bool:
    if tx.GetName() == "CompositeTransform":
        c = sitk.CompositeTransform(tx)
        return all(_is_linear(c.GetNthTransform(i)) for i in range(c.GetNumberOfTransforms()))
    return tx.IsLinear()


def read_spatial_registration(path: Path, reference_frame: str, prior_frame: str, src: str, key: str
                              ) -> tuple[sitk.AffineTransform, list[str]]:
    """A rigid DICOM Spatial Registration object as a transform reference -> prior.

    Each RegistrationSequence item's matrix maps its own FrameOfReferenceUID (the registered frame) into the
    REG's FrameOfReferenceUID (PS3.3 C.20.2.1.1). ``reference_frame``/``prior_frame``: the frames of the
    reference CT and of the prior course ('' when not DICOM). The returned transform maps reference-frame
    points to prior-frame points.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = str(path)
    notes = []
    try:
        ds = pydicom.dcmread(p)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"not a readable DICOM file ({type(exc).__name__})", source=p, field=key) from None
    sop = str(getattr(ds, "SOPClassUID", ""))
    if sop == "1.2.840.10008.5.1.4.1.1.66.3":
        raise InputError("a Deformable Spatial Registration object is not supported by this version; export a rigid "
                         "REG or an ITK displacement-field transform (.h5)", source=p, field=key)
    if str(getattr(ds, "Modality", "")).upper() != "REG" or "RegistrationSequence" not in ds:
        raise InputError("not a DICOM Spatial Registration object (Modality REG with a RegistrationSequence)",
                         source=p, field=key)
    reg_frame = str(getattr(ds, "FrameOfReferenceUID", "") or "")
    items = []
    for n, it in enumerate(ds.RegistrationSequence):
        frame = str(getattr(it, "FrameOfReferenceUID", "") or "")
        seq = getattr(it, "MatrixRegistrationSequence", None)
        if not seq:
            raise InputError(f"RegistrationSequence item {n + 1} has no MatrixRegistrationSequence", source=p,
                             field="MatrixRegistrationSequence")
        M = np.eye(4)
        for mreg in seq:
            for mx in getattr(mreg, "MatrixSequence", []):
                kind = str(getattr(mx, "FrameOfReferenceTransformationMatrixType", "") or "").upper()
                vals = getattr(mx, "FrameOfReferenceTransformationMatrix", None)
                if vals is None or len(vals) != 16:
                    raise InputError(f"item {n + 1}: FrameOfReferenceTransformationMatrix must hold 16 values",
                                     source=p, field="FrameOfReferenceTransformationMatrix")
                m = np.asarray([float(v) for v in vals]).reshape(4, 4)
                if not np.all(np.isfinite(m)) or not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
                    raise InputError(f"item {n + 1}: not an affine 4x4 matrix (last row must be 0 0 0 1)",
                                     source=p, field="FrameOfReferenceTransformationMatrix")
                if kind not in ("RIGID", "RIGID_SCALE", "AFFINE"):
                    raise InputError(f"item {n + 1}: matrix type {kind or '(empty)'} not supported "
                                     "(RIGID, RIGID_SCALE, AFFINE)", source=p,
                                     field="FrameOfReferenceTransformationMatrixType")
                if kind == "RIGID":
                    R3 = m[:3, :3]
                    if not np.allclose(R3 @ R3.T, np.eye(3), atol=1e-4) or np.linalg.det(R3) < 0:
                        raise InputError(f"item {n + 1}: matrix type RIGID but the matrix is not a rotation",
                                         source=p, field="FrameOfReferenceTransformationMatrix")
                M = m @ M   # several matrices in one item are applied in sequence
        items.append((frame, M))
    if not items:
        raise InputError("RegistrationSequence is empty", source=p, field="RegistrationSequence")

    def to_reg_frame(frame: str) -> np.ndarray | None:
        for f, M in items:
            if f == frame:
                return M
        return np.eye(4) if frame and frame == reg_frame else None

    if reference_frame and prior_frame:
        A = to_reg_frame(reference_frame)   # reference -> REG frame
        B = to_reg_frame(prior_frame)       # prior -> REG frame
        if A is None or B is None:
            missing = reference_frame if A is None else prior_frame
            raise InputError(f"the registration does not name frame of reference {missing} "
                             f"({'reference image' if A is None else 'prior course'}); it holds "
                             f"{', '.join(sorted({f for f, _ in items} | {reg_frame}))}", source=p,
                             field="FrameOfReferenceUID")
        ref_to_prior = np.linalg.inv(B) @ A
        notes.append(f"DICOM REG: frames of reference checked (reference {reference_frame}, prior {prior_frame})")
    else:
        # frames unknown (NRRD inputs): the REG frame is taken as the reference frame and the one item in
        # another frame (or the one non-identity item) as the prior course's frame
        others = [(f, M) for f, M in items if f != reg_frame] or [(f, M) for f, M in items
                                                                 if not np.allclose(M, np.eye(4))]
        if len(others) != 1:
            raise InputError(f"cannot tell which of {len(items)} registered frames is the prior course's "
                             "(give DICOM images so frames of reference can be matched)", source=p,
                             field="RegistrationSequence")
        known = reference_frame or prior_frame
        if known and known not in (reg_frame, others[0][0]):
            raise InputError(f"frame of reference {known} is not in this registration", source=p,
                             field="FrameOfReferenceUID")
        if reference_frame and reference_frame == others[0][0] or prior_frame and prior_frame == reg_frame:
            ref_to_prior = others[0][1]       # the REG is written with the prior course as its frame
        else:
            ref_to_prior = np.linalg.inv(others[0][1])
        notes.append("DICOM REG: frames of reference not checked against the images (not both DICOM); the REG's "
                     "frame is taken as the reference frame" if not (reference_frame or prior_frame) else
                     "DICOM REG: frame of reference checked for one side only")
    if not np.allclose(ref_to_prior[3], [0, 0, 0, 1], atol=1e-9):
        raise InputError("registration matrices do not compose to an affine transform", source=p,
                         field="FrameOfReferenceTransformationMatrix")
    return _affine_transform(ref_to_prior[:3, :3], ref_to_prior[:3, 3]), notes


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- driver

def _frame(vol: Volume | None) -> str:
    if vol is None:
        return ""
    return str((vol.meta.get("dicom") or {}).get("FrameOfReferenceUID", "") or "")


def register_course(course: str, options: dict, reference: Volume | None, prior_image: Volume | None,
                    src: str = "", key: str = "registration", prior_dose: Volume | None = None,
                    progress=None) -> RegistrationOutcome:
    """Run or read the registration of one prior course. ``reference``: the reference CT (HU);
    ``prior_image``: the prior course's CT (HU), needed by rigid/deformable, used for QA when given.
    ``progress(message)``: called at each stage (the Slicer module shows it, and may cancel by raising)."""
    say = progress or (lambda m: None)
    method = options.get("method", "identity")
    t0 = time.perf_counter()
    fixed = moving = body = None
    thr = options.get("body_threshold_hu", RIGID_DEFAULTS["body_threshold_hu"])
    if reference is not None and prior_image is not None:
        # registration, its QA metric and the body mask on the working images (voxels averaged to about
        # working_spacing_mm; see working_image)
        ws = options.get("working_spacing_mm", RIGID_DEFAULTS["working_spacing_mm"])
        fixed = working_image(_float_image(reference), ws)
        moving = working_image(_float_image(prior_image), ws)
        body = body_mask(fixed, thr)
        if not sitk.GetArrayViewFromImage(body).any():
            body = None
    if method == "identity":
        out = RegistrationOutcome(course, method, sitk.Euler3DTransform(), linear=sitk.Euler3DTransform())
        out.notes.append("identity: the prior course is taken to be in the reference frame already")
    elif method == "file":
        path = Path(options["transform"])
        if not path.is_file():
            raise InputError("transform file not found", source=str(path), field=f"{key}.transform")
        if _is_dicom(path):
            if options.get("invert"):
                raise InputError("invert does not apply to a DICOM registration (its direction is given by its "
                                 "frames of reference)", source=src, field=f"{key}.invert")
            prior_frame = _frame(prior_image) or _frame(prior_dose)
            tx, notes = read_spatial_registration(path, _frame(reference), prior_frame, src, f"{key}.transform")
        else:
            tx, notes = read_transform_file(path, bool(options.get("invert", False)), src, f"{key}.transform")
        out = RegistrationOutcome(course, method, tx, notes=notes, source_file=str(path))
        if _is_linear(tx):
            out.linear = _affine_transform(*affine_of(tx))
        else:
            out.linear, out.max_deformation_mm = None, None
        out.parameters = {"transform": str(path), "invert": bool(options.get("invert", False))}
    elif method in ("rigid", "deformable"):
        if reference is None:
            raise InputError(f"registration method {method} needs the reference CT (reference.image)", source=src,
                             field="reference.image")
        if prior_image is None:
            raise InputError(f"registration method {method} needs this course's own CT (image:)", source=src,
                             field=key.rsplit(".", 1)[0] + ".image")
        if body is None:
            raise InputError(f"no voxel above body_threshold_hu {thr:g} HU in the reference image (is it a CT in "
                             "HU?)", source=src, field=f"{key}.body_threshold_hu")
        opts = {k: v for k, v in options.items() if k != "method"}
        mask = body if opts.get("mask", RIGID_DEFAULTS["mask"]) == "body" else None
        say(f"{course}: rigid registration")
        rig, params = rigid(fixed, moving, {k: v for k, v in opts.items() if k in RIGID_DEFAULTS}, mask)
        out = RegistrationOutcome(course, method, rig, parameters=params, linear=rig)
        if method == "deformable" and opts.get("algorithm", DEFORMABLE_DEFAULTS["algorithm"]) == "demons":
            say(f"{course}: deformable registration (demons)")
            d, dparams = demons(fixed, moving, rig, {k: v for k, v in opts.items() if k in DEMONS_DEFAULTS}, body)
            out.transform = compose(rig, d)
            out.parameters |= {"algorithm": "demons"} | dparams
            out.max_deformation_mm = dparams["max_displacement_mm"]
        elif method == "deformable":
            say(f"{course}: deformable registration (B-spline)")
            b, bparams = bspline(fixed, moving, rig, {k: v for k, v in opts.items() if k in DEFORMABLE_DEFAULTS},
                                 body)
            out.transform = compose(rig, b)
            out.parameters |= {"algorithm": "bspline"} | bparams
            out.max_deformation_mm = bspline_max_displacement_mm(b)
            out.notes.append("deformable registration with algorithm: bspline is experimental in this version: it "
                             "has not been validated against a known deformation (on the untextured phantom: mean "
                             "error 2.7 mm for a 3.1 mm deformation); review the registered prior CT before "
                             "using the mapped dose")
        if method == "deformable" and out.parameters.get("algorithm") == "demons":
            out.notes.append("deformable registration (demons): the field is driven by image edges and texture and "
                             "only smoothed across featureless regions, where the deformation is not observable; "
                             "review the registered prior CT before using the mapped dose")
    else:  # validated earlier
        raise InputError(f"unsupported method {method!r}", source=src, field=f"{key}.method")
    out.time_s = time.perf_counter() - t0
    out.moving_image = prior_image
    if fixed is not None:
        say(f"{course}: registration QA")
        out.metric_before = mattes_mi(fixed, moving, sitk.Euler3DTransform(), body)
        out.metric_after = mattes_mi(fixed, moving, out.transform, body)
    if body is not None and not _is_linear(out.transform):
        out.jacobian = jacobian_check(out.transform, body)
        if out.jacobian["folded_voxels"]:
            out.notes.append(f"the transform folds: {out.jacobian['folded_voxels']} voxel(s) of the body with "
                             "Jacobian determinant <= 0; do not use this registration without review")
    log.info("registration of %s (%s): %.1f s", course, method, out.time_s)
    return out


# ------------------------------------------------------------------------------------ mapping helpers

def target_box(src_grid: Grid, src_box, target: Grid, outcome: RegistrationOutcome | None, pad_mm=2.0):
    """Index box (k, j, i slices) of ``target`` that can map into ``src_box`` of ``src_grid`` (None: none of it),
    with ``pad_mm`` of margin (mm; one number, or one per target axis i, j, k) beyond the mapped box's corners,
    plus the deformation's largest displacement. ``outcome`` None: no transform (both grids in one frame)."""
    if outcome is not None and (outcome.linear is None or outcome.max_deformation_mm is None):
        return tuple(slice(0, n) for n in target.shape)
    lo = np.array([s.start for s in src_box][::-1], dtype=float) - 0.5
    hi = np.array([s.stop - 1 for s in src_box][::-1], dtype=float) + 0.5
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    pts = src_grid.index_to_physical(corners)
    pad = pad_mm
    if outcome is not None:
        inv = outcome.linear.GetInverse()
        pts = np.array([inv.TransformPoint(tuple(float(v) for v in q)) for q in pts])
        pad += float(outcome.max_deformation_mm or 0.0)
    idx = target.physical_to_index(pts)
    padv = pad / np.asarray(target.spacing)
    tlo = np.maximum(np.floor(idx.min(axis=0) - padv).astype(int), 0)
    thi = np.minimum(np.ceil(idx.max(axis=0) + padv).astype(int) + 1, np.asarray(target.size))
    if np.any(thi <= tlo):
        return None
    return tuple(slice(int(l), int(h)) for l, h in zip(tlo[::-1], thi[::-1]))


def map_mask(mask: np.ndarray, grid: Grid, target: Grid, outcome: RegistrationOutcome | None
             ) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """A bool mask (on ``grid``, the prior frame) onto ``target`` (reference frame) through the outcome's
    transform: linear interpolation of the mask at the mapped voxel centres, >= 0.5. (crop, k/j/i box)."""
    src_box = bounding_box(mask)
    if src_box is None:
        return None
    tbox = target_box(grid, src_box, target, outcome)
    if tbox is None:
        return None
    sub = target.subgrid(tuple(b.start for b in tbox[::-1]), tuple(b.stop for b in tbox[::-1]))
    src = sitk.GetImageFromArray(mask[src_box].astype(np.float32))
    grid.subgrid(tuple(s.start for s in src_box[::-1]), tuple(s.stop for s in src_box[::-1])).apply_to(src)
    tx = outcome.transform if outcome is not None else sitk.Transform()
    out = sitk.GetArrayFromImage(sitk.Resample(src, sub.reference_image(), tx, sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32)) >= 0.5
    inner = bounding_box(out)
    if inner is None:
        return None
    box = tuple(slice(t.start + b.start, t.start + b.stop) for t, b in zip(tbox, inner))
    return out[inner].copy(), box


def dice(a: np.ndarray, abox, b: np.ndarray, bbox) -> float:
    """Dice coefficient of two bool crops on one grid, given their (k, j, i) boxes."""
    na, nb = int(a.sum()), int(b.sum())
    if na + nb == 0:
        return float("nan")
    lo = [max(x.start, y.start) for x, y in zip(abox, bbox)]
    hi = [min(x.stop, y.stop) for x, y in zip(abox, bbox)]
    if any(h <= l for l, h in zip(lo, hi)):
        return 0.0
    sa = tuple(slice(l - x.start, h - x.start) for l, h, x in zip(lo, hi, abox))
    sb = tuple(slice(l - y.start, h - y.start) for l, h, y in zip(lo, hi, bbox))
    inter = int(np.count_nonzero(a[sa] & b[sb]))
    return 2.0 * inter / (na + nb)


def registered_image(outcome: RegistrationOutcome, target: Grid, default: float = -1000.0) -> Volume | None:
    """The prior course's CT mapped onto ``target`` (linear interpolation), int16 HU; None without a prior CT."""
    if outcome.moving_image is None:
        return None
    # the CT as it is (int16 HU): ITK interpolates in double either way, so no float32 copy of the CT is needed;
    # then rounded to int16 one slab at a time (no whole-volume float temporaries)
    out = sitk.Resample(outcome.moving_image.to_sitk(), target.reference_image(), outcome.transform, sitk.sitkLinear,
                        float(default), sitk.sitkFloat32)
    view = sitk.GetArrayViewFromImage(out)
    arr = np.empty(view.shape, np.int16)
    for k in range(0, view.shape[0], 8):
        slab = np.rint(view[k:k + 8])
        np.clip(slab, -32768, 32767, out=slab)
        arr[k:k + 8] = slab
    return Volume(arr, target, f"prior_ct_{outcome.course}_registered")


def write_transform(outcome: RegistrationOutcome, path: Path) -> None:
    """The transform as an ITK transform file (maps reference points to prior-course points)."""
    sitk.WriteTransform(outcome.transform, str(path))


def qa_dict(outcome: RegistrationOutcome) -> dict:
    """Plain numbers for the results tree."""
    d = {"method": outcome.method,
         "direction": "transform maps reference-image points (LPS mm) to the prior course's frame "
                      "(ITK resampling convention); the prior dose is sampled there with linear interpolation",
         "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in outcome.parameters.items()},
         "time_s": outcome.time_s,
         "similarity_metric": "Mattes mutual information (nats, higher = better aligned), reference CT body mask, "
                              "on the working images (voxels averaged to about working_spacing_mm)",
         "mattes_mi_before": outcome.metric_before, "mattes_mi_after": outcome.metric_after}
    aff = outcome.affine_matrix()
    if aff is not None:
        M, b = aff
        d["matrix"] = M.tolist()
        d["translation_mm"] = b.tolist()
        d["matrix_4x4"] = np.vstack([np.hstack([M, b[:, None]]), [0, 0, 0, 1]]).tolist()
        d["linear_part"] = "rigid part of a deformable registration" if outcome.method == "deformable" else "whole"
        # rotation angle of the (rigid) matrix and the displacement at the image centre are quick checks
        cosang = float(np.clip((np.trace(M) - 1.0) / 2.0, -1.0, 1.0))
        d["rotation_deg"] = math.degrees(math.acos(cosang))
    if outcome.max_deformation_mm is not None and outcome.method in ("deformable",):
        d["max_bspline_displacement_mm"] = outcome.max_deformation_mm
    if outcome.jacobian is not None:
        d["jacobian_determinant"] = outcome.jacobian
    if outcome.dice:
        d["dice"] = outcome.dice
    if outcome.source_file:
        d["source_file"] = outcome.source_file
    d["notes"] = list(outcome.notes)
    return d


# ---------------------------------------------------------------------------------- pipeline helpers

def register_prior_course(course, index: int, reference: Volume | None, dose: Volume, case_path: Path
                          ) -> RegistrationOutcome:
    """Load a prior course's CT (``image:``) when given, check frames, and register it (``course`` is a
    case.CourseSpec). The prior dose must be in the frame of the prior CT."""
    from .dicom_rt import load_image_any

    key = f"courses[{index}]"
    prior_img = None
    if course.image is not None:
        prior_img = load_image_any(course.image, f"{key}.image", series_uid=getattr(course, "image_series", None))
        f_img, f_dose = _frame(prior_img), _frame(dose)
        if course.registration["method"] != "identity" and f_img and f_dose and f_img != f_dose:
            raise InputError(f"the dose is in frame of reference {f_dose} but this course's CT (image:) is in "
                             f"{f_img}; the registration maps the reference CT onto the course's CT, so the dose "
                             "must be in the CT's frame", source=str(course.dose), field=f"{key}.dose")
    return register_course(course.name, course.registration, reference, prior_img, src=str(case_path),
                           key=f"{key}.registration", prior_dose=dose)


def prior_structure_dice(outcome: RegistrationOutcome, prior_structures, current, grid: Grid, protocol
                         ) -> dict:
    """Dice of each prior-course structure mapped onto ``grid`` against the current structure of the same
    organ (protocol alias) or, for structures no alias matches, of the same name. ``current``: StructureData
    list (crops on ``grid``). Returns {prior name: {"current": name, "dice": value}}."""
    by_organ, by_name = {}, {}
    for s in current:
        if s.mask.size == 0:
            continue
        by_name.setdefault(s.name.strip().casefold(), s)
        if s.organ is not None:
            by_organ.setdefault(s.organ.key, s)
    out = {}
    for ps in prior_structures:
        organ = protocol.match(ps.name)
        cur = by_organ.get(organ.key) if organ is not None else None
        cur = cur or by_name.get(ps.name.strip().casefold())
        if cur is None:
            continue
        mapped = map_mask(ps.mask, ps.grid, grid, outcome)
        if mapped is None:
            out[ps.name] = {"current": cur.name, "dice": 0.0}
            continue
        out[ps.name] = {"current": cur.name, "dice": dice(mapped[0], mapped[1], cur.mask, cur.box)}
    return out
