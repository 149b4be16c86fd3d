"""Masks read as bounding-box crops (issue 15: structure loading) give exactly what the whole masks give.

Hand values: a mask on a 1 mm grid with origin (-10, -20, -30) mm whose voxels span i 3..5, j 2..3, k 1..1 is
kept as a 1 x 2 x 3 (k, j, i) crop whose first voxel's centre is at (-10 + 3, -20 + 2, -30 + 1) = (-7, -18, -29) mm.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ReirradiationNPCLib import masks
from ReirradiationNPCLib.geometry import Grid, bounding_box
from ReirradiationNPCLib.io import read_segmentation, read_structures, write_segmentation

FINE = Grid((12, 10, 8), (-10.0, -20.0, -30.0), (1.0, 1.0, 1.0))


def _write(folder, name, arr, grid=FINE):
    img = sitk.GetImageFromArray(arr)
    grid.apply_to(img)
    sitk.WriteImage(img, str(folder / f"{name}.nrrd"), useCompression=True)


def test_bounding_box_by_hand():
    m = np.zeros((4, 5, 6), dtype=bool)
    m[1, 2, 3] = True
    m[2, 4, 0] = True
    assert bounding_box(m) == (slice(1, 3), slice(2, 5), slice(0, 4))
    assert bounding_box(m, pad=1) == (slice(0, 4), slice(1, 5), slice(0, 5))   # clipped at the array's edges
    assert bounding_box(np.zeros((3, 3, 3), bool)) is None
    assert bounding_box(np.zeros((0, 3, 3), bool)) is None
    f = np.zeros((3, 4, 5), np.float32)
    f[2, 1, 4] = np.nan                                  # NaN is non-zero, as numpy's any() says
    f[0, 3, 1] = -2.0
    assert bounding_box(f) == (slice(0, 3), slice(1, 4), slice(1, 5))
    # a non-contiguous view: j 0, 2, 4 and i 1.. kept, so (1, 2, 3) -> (1, 1, 2) and (2, 4, 0) is left out
    assert bounding_box(m[:, ::2, 1:]) == (slice(1, 2), slice(1, 2), slice(2, 3))


def test_read_structures_crop_by_hand(tmp_path):
    a = np.zeros(FINE.shape, np.uint8)
    a[1, 2:4, 3:6] = 1
    _write(tmp_path, "A", a)
    _write(tmp_path, "Empty", np.zeros(FINE.shape, np.uint8))
    full = {s.name: s for s in read_structures(tmp_path)}
    crop = {s.name: s for s in read_structures(tmp_path, crop=True)}
    assert full["A"].mask.shape == (8, 10, 12) and full["A"].parent is None
    s = crop["A"]
    assert s.mask.shape == (1, 2, 3) and s.mask.dtype == bool and s.mask.all()
    assert s.grid.size == (3, 2, 1)
    assert np.allclose(s.grid.origin, (-7.0, -18.0, -29.0))
    assert s.parent[0] == FINE and s.parent[1] == (slice(1, 2), slice(2, 4), slice(3, 6))
    e = crop["Empty"]
    assert e.mask.shape == (1, 1, 1) and not e.mask.any()
    assert masks.structure_on_grid(e, FINE) is None


def test_crop_gives_the_same_masks_on_any_grid(tmp_path):
    """The evaluation-grid mask and box of a crop equal those of the whole mask: on the same grid (the crop as is),
    on an aligned coarser grid and on a shifted one (volume and half rules)."""
    rng = np.random.default_rng(3)
    k, j, i = np.meshgrid(np.arange(8), np.arange(10), np.arange(12), indexing="ij")
    ell = ((i - 6.3) / 3.7) ** 2 + ((j - 4.6) / 2.9) ** 2 + ((k - 3.8) / 2.2) ** 2 <= 1.0
    ell &= rng.random(ell.shape) < 0.9                   # holes: ties and partial coverage
    _write(tmp_path, "E", ell.astype(np.uint8))
    [whole] = read_structures(tmp_path)
    [crop] = read_structures(tmp_path, crop=True)
    coarse = Grid((6, 5, 4), (-9.5, -19.5, -29.5), (2.0, 2.0, 2.0))          # voxel edges on fine edges
    shifted = Grid((5, 5, 4), (-9.13, -19.71, -29.4), (2.5, 2.5, 2.5))
    oblique = Grid((6, 5, 5), (-9.0, -19.0, -30.0), (2.0, 2.0, 2.0),
                   (0.9950041652780258, -0.09983341664682815, 0.0, 0.09983341664682815, 0.9950041652780258, 0.0,
                    0.0, 0.0, 1.0))
    for grid in (FINE, coarse, shifted, oblique):
        for rule in ("volume", "half"):
            a = masks.structure_on_grid(whole, grid, rule)
            b = masks.structure_on_grid(crop, grid, rule)
            assert a[1] == b[1] and np.array_equal(a[0], b[0]), (grid, rule)
    same = masks.structure_on_grid(crop, FINE)
    assert same[1] == crop.parent[1] and np.array_equal(same[0], ell[crop.parent[1]])


def test_segmentation_crop(tmp_path):
    a = np.zeros(FINE.shape, bool)
    a[2:4, 1, 5:9] = True
    b = np.zeros(FINE.shape, bool)
    b[6, 7:9, 0] = True
    write_segmentation([("A", a, (1, 0, 0)), ("B", b, (0, 1, 0))], FINE, tmp_path / "s.seg.nrrd")
    got = {s.name: s for s in read_segmentation(tmp_path / "s.seg.nrrd", crop=True)}
    assert got["A"].parent[1] == (slice(2, 4), slice(1, 2), slice(5, 9)) and got["A"].mask.sum() == 8
    assert got["B"].parent[1] == (slice(6, 7), slice(7, 9), slice(0, 1)) and got["B"].mask.sum() == 2
    assert np.allclose(got["B"].grid.origin, (-10.0, -13.0, -24.0))


def test_prepared_structures_keep_the_crop_and_its_exact_box(synthetic_case):
    """pipeline.prepare crops each mask file once (on reading) and keeps the file's grid and the crop's exact box
    (StructureData.source_parent): the crop is the whole mask's bounding box, on the sub-grid of that box."""
    from ReirradiationNPCLib.case import load_case
    from ReirradiationNPCLib.pipeline import prepare
    case = load_case(synthetic_case)
    prep = prepare(case)
    whole = {s.name: s for s in read_structures(case.reference_structures)}
    assert prep.structures and all(s.source_parent is not None for s in prep.structures)
    for s in prep.structures:
        file_grid, box = s.source_parent
        w = whole[s.name]
        assert file_grid == w.grid and box == bounding_box(w.mask)
        assert np.array_equal(s.source_mask, w.mask[box]) and s.source_mask.flags.c_contiguous
        assert s.source_grid == w.grid.subgrid(tuple(b.start for b in box[::-1]), tuple(b.stop for b in box[::-1]))


def test_scene_placement_of_a_structure_by_hand():
    """mrml_scene._on_reference: a crop of a mask file on the reference grid goes to its exact box on that grid;
    a box of the reference grid's voxels without a known offset (an RTSTRUCT rasterised on the CT's lattice) to the
    box found from its origin: (-7, -18, -29) mm is voxel (3, 2, 1) of FINE; anything else stays on its own grid."""
    from ReirradiationNPCLib.mrml_scene import _on_reference
    mask = np.ones((1, 2, 3), bool)
    sub = FINE.subgrid((3, 2, 1), (6, 4, 2))
    box = (slice(1, 2), slice(2, 4), slice(3, 6))
    assert _on_reference(mask, sub, (FINE, box), FINE) == (box, FINE)
    assert _on_reference(mask, sub, None, FINE) == (box, FINE)
    other = Grid((12, 10, 8), (-10.0, -20.0, -30.0), (1.0, 1.0, 2.0))        # another lattice: own grid
    own = (slice(0, 1), slice(0, 2), slice(0, 3))
    assert _on_reference(mask, other.subgrid((3, 2, 1), (6, 4, 2)), (other, box), FINE) == \
        (own, other.subgrid((3, 2, 1), (6, 4, 2)))
    half = Grid((3, 2, 1), (-6.5, -18.0, -29.0), (1.0, 1.0, 1.0))             # half a voxel off FINE's centres
    assert _on_reference(mask, half, None, FINE) == (own, half)
    assert _on_reference(mask, sub, None, None) == (own, sub)
