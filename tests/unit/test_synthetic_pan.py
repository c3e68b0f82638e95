"""The synthetic generator's camera pan (data.synthetic_pan_share): off, today's examples bit for bit; on, a share of
targets shifted whole by the pan on top of the object's motion, the rest untouched."""

import hashlib

import numpy as np
import pytest

from motionnft_core.config import DataConfig
from motionnft_core.data.synthetic import camera_pan, make_example, pan_image

# sha256 of input + target bytes of today's examples (seed 0, 64 px), taken before the pan existed
TODAY = {0: "ac17773a9bd9df04", 1: "ed9afd6f45bfb07e", 7: "6d78edff5026872d"}


@pytest.mark.parametrize("index", sorted(TODAY))
def test_off_is_todays_example(index):
    ex = make_example(0, index, 64)
    assert hashlib.sha256(ex.input_image.tobytes() + ex.target_image.tobytes()).hexdigest()[:16] == TODAY[index]
    again = make_example(0, index, 64, pan_share=0.0, pan_pixels=5)
    assert np.array_equal(ex.target_image, again.target_image) and (again.camera_dx, again.camera_dy) == (0, 0)
    assert DataConfig().synthetic_pan_share == 0.0


def test_pan_image_shifts_the_content_and_repeats_the_edge():
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2)
    right = pan_image(image, 1, 0)[..., 0]
    assert right.tolist() == [[0, 0, 1, 2], [4, 4, 5, 6], [8, 8, 9, 10], [12, 12, 13, 14]]
    up = pan_image(image, 0, -2)[..., 0]
    assert up.tolist() == [[8, 9, 10, 11], [12, 13, 14, 15], [12, 13, 14, 15], [12, 13, 14, 15]]


def test_a_share_of_targets_is_panned_on_top_of_the_objects_motion():
    panned = 0
    for index in range(40):
        plain = make_example(0, index, 64)
        ex = make_example(0, index, 64, pan_share=0.5, pan_pixels=4)
        assert np.array_equal(ex.input_image, plain.input_image) and ex.prompt == plain.prompt
        pan = camera_pan(0, index, 64, share=0.5, pixels=4)
        assert (ex.camera_dx, ex.camera_dy) == pan
        if pan == (0, 0):
            assert np.array_equal(ex.target_image, plain.target_image)
        else:
            panned += 1
            assert abs(pan[0]) + abs(pan[1]) == 4
            assert np.array_equal(ex.target_image, pan_image(plain.target_image, *pan))
    assert 10 <= panned <= 30
