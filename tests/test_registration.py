"""Image-landmark registration: a blob at a known original point lands, after the cache's own resize, where
``geometry.to_network`` says it does; an offset here would bias every method's MRE alike and go unseen."""

from __future__ import annotations

import numpy as np
import pytest

from landmark_bench.data.cache import resize_grey
from landmark_bench.geometry import to_network, to_original

ORIGINAL = (233, 301)  # (H, W): non-square, odd, no common factor with the network sizes
POINTS = np.array([[150.3, 117.6], [62.75, 40.2], [241.1, 190.45], [88.5, 160.5]])  # xy, sub-pixel
TOLERANCE_PX = 0.05


def blob_image(centre: np.ndarray, sigma: float) -> np.ndarray:
    """A bright Gaussian blob at ``centre`` (xy, pixel-centre convention) on black, as uint8 like a decoded image."""
    y, x = np.mgrid[:ORIGINAL[0], :ORIGINAL[1]].astype(np.float64)
    return np.rint(250 * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2))).astype(np.uint8)


def centroid(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted xy centroid in pixel-centre coordinates."""
    weights = image.astype(np.float64)
    y, x = np.mgrid[:image.shape[0], :image.shape[1]]
    return np.array([(weights * x).sum(), (weights * y).sum()]) / weights.sum()


@pytest.mark.parametrize("size", [(80, 64), (160, 128), (120, 200), (400, 480), (466, 301)],
                         ids=["down-3x-4.7x", "down-1.5x-2.4x", "down-1.9x-up-0.7x", "up-1.7x-1.6x", "up-2x-1x"])
def test_a_blob_lands_where_the_mapping_puts_it(size):
    scale = max(ORIGINAL[0] / size[0], ORIGINAL[1] / size[1], 1.0)
    for point in POINTS:
        # wide enough to stay smooth on the coarser grid: 2.5 network pixels when down-scaling
        drawn = blob_image(point, sigma=2.5 * scale)
        assert np.abs(centroid(drawn) - point).max() < 0.01  # the drawing itself is centred
        resized = resize_grey(drawn, size)
        assert resized.shape == size
        expected = to_network(point[None], ORIGINAL, size)[0]
        error = centroid(resized) - expected
        assert np.abs(error).max() < TOLERANCE_PX, (
            f"{ORIGINAL} -> {size}: blob at {point} measured at {centroid(resized)} on the network grid, mapped to "
            f"{expected}: error {error} px")


def test_the_mapping_round_trips():
    for size in [(80, 64), (400, 480)]:
        assert np.allclose(to_original(to_network(POINTS, ORIGINAL, size), ORIGINAL, size), POINTS, atol=1e-12)
