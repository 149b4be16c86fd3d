"""Working images of the registration (issue 15): block averages to about working_spacing_mm, exact means, and the
option's validation. (Registration accuracy is tested in test_registration.py, unchanged.)"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ReirradiationNPCLib import registration as reg
from ReirradiationNPCLib.errors import InputError


def _image(shape_kji, spacing, origin=(0.0, 0.0, 0.0)):
    arr = np.arange(np.prod(shape_kji), dtype=np.float32).reshape(shape_kji)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img, arr


def test_clinical_voxels_are_averaged_in_3x3x1_blocks():
    img, arr = _image((4, 6, 9), (0.98, 0.98, 2.5))
    w = reg.working_image(img, 2.5)
    assert w.GetSize() == (3, 2, 4)                                  # i: 9/3, j: 6/3, k: 4/1
    assert w.GetSpacing() == pytest.approx((2.94, 2.94, 2.5))
    # each working voxel is the mean of the 3 x 3 x 1 block it covers; its centre is the block's centre
    expect = arr.reshape(4, 2, 3, 3, 3).mean(axis=(2, 4))
    assert np.allclose(sitk.GetArrayFromImage(w), expect, rtol=0, atol=1e-3)
    assert w.GetOrigin() == pytest.approx((0.98, 0.98, 0.0))


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (3.0, 3.0, 3.0), (2.5, 2.5, 2.5)])
def test_coarse_voxels_are_left_as_they_are(spacing):
    img, _ = _image((3, 4, 5), spacing)
    assert reg.working_image(img, 2.5) is img
    assert reg.working_image(_image((3, 4, 5), (0.5, 0.5, 0.5))[0], 0).GetSize() == (5, 4, 3)   # 0: native


@pytest.mark.parametrize("value", [-1, "2.5", 11, True])
def test_working_spacing_option_is_checked(value, tmp_path):
    with pytest.raises(InputError) as e:
        reg.validate_options({"method": "rigid", "working_spacing_mm": value}, "case.yaml", "courses[0].registration",
                             tmp_path)
    assert "working_spacing_mm" in str(e.value)
    ok = reg.validate_options({"method": "rigid", "working_spacing_mm": 0}, "case.yaml", "r", tmp_path)
    assert ok["working_spacing_mm"] == 0.0
