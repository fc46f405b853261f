"""The procedural phantom: deterministic, varied, anatomically ordered, and its picture matches its landmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from landmark_bench.data.phantom import LANDMARK_NAMES, PHANTOM_IMAGE_SIZE, PHANTOM_SPACING_MM, make_phantom

SAMPLE_SEED = 3
SAMPLE_COUNT = 40
FINGERS = ["thumb", "index", "middle", "ring", "little"]
BONE_LANDMARKS = [name for name in LANDMARK_NAMES if name.endswith(("_tip", "_end"))]


def column(name: str) -> int:
    return LANDMARK_NAMES.index(name)


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) images and (N, L, 2) landmarks of one seed."""
    images, landmarks = zip(*(make_phantom(SAMPLE_SEED, index) for index in range(SAMPLE_COUNT)))
    return np.stack(images), np.stack(landmarks)


def intensity_at(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """3x3-averaged intensity at (P, 2) xy points (pixel-centre convention), averaging the noise out."""
    smoothed = ndimage.uniform_filter(image.astype(np.float64), 3)
    return ndimage.map_coordinates(smoothed, [points[:, 1], points[:, 0]], order=1, mode="nearest")


def test_constants_shape_and_dtype() -> None:
    image, landmarks = make_phantom(0, 0)
    assert PHANTOM_IMAGE_SIZE[0] != PHANTOM_IMAGE_SIZE[1]
    assert PHANTOM_SPACING_MM > 0
    assert len(LANDMARK_NAMES) >= 10 and len(set(LANDMARK_NAMES)) == len(LANDMARK_NAMES)
    assert image.shape == PHANTOM_IMAGE_SIZE and image.dtype == np.uint8
    assert landmarks.shape == (len(LANDMARK_NAMES), 2) and landmarks.dtype == np.float64
    assert image.std() > 20  # bone, soft tissue and background use the grey range, not a flat image


def test_same_seed_and_index_is_bit_identical_in_a_fresh_process() -> None:
    image, landmarks = make_phantom(5, 17)
    again_image, again_landmarks = make_phantom(5, 17)
    assert np.array_equal(image, again_image) and np.array_equal(landmarks, again_landmarks)
    script = (
        "import sys, numpy as np; from landmark_bench.data.phantom import make_phantom; "
        "image, landmarks = make_phantom(5, 17); sys.stdout.buffer.write(image.tobytes() + landmarks.tobytes())"
    )
    repo_root = Path(__file__).resolve().parents[1]
    output = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, check=True).stdout
    assert output == image.tobytes() + landmarks.tobytes()


def test_other_indices_and_seeds_give_other_phantoms() -> None:
    image, landmarks = make_phantom(5, 17)
    for seed, index in [(5, 18), (6, 17), (17, 5)]:
        other_image, other_landmarks = make_phantom(seed, index)
        assert np.abs(other_landmarks - landmarks).max() > 1.0
        assert np.mean(other_image != image) > 0.5


def test_negative_seed_or_index_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        make_phantom(-1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        make_phantom(0, -3)


def test_landmarks_inside_the_image_and_distinct(sample: tuple[np.ndarray, np.ndarray]) -> None:
    _, landmarks = sample
    height, width = PHANTOM_IMAGE_SIZE
    margin = 5.0
    assert landmarks[..., 0].min() >= margin and landmarks[..., 0].max() <= width - 1 - margin
    assert landmarks[..., 1].min() >= margin and landmarks[..., 1].max() <= height - 1 - margin
    distances = np.linalg.norm(landmarks[:, :, None] - landmarks[:, None], axis=-1)
    off_diagonal = ~np.eye(len(LANDMARK_NAMES), dtype=bool)
    assert distances[:, off_diagonal].min() > 8.0


def test_landmarks_vary_so_a_mean_shape_guess_is_poor(sample: tuple[np.ndarray, np.ndarray]) -> None:
    _, landmarks = sample
    spread = np.sqrt(landmarks.var(axis=0).sum(axis=-1))  # per landmark, pixels
    assert spread.min() > 10.0, dict(zip(LANDMARK_NAMES, spread.round(1)))
    mean_shape_error = np.linalg.norm(landmarks - landmarks.mean(axis=0), axis=-1).mean()
    assert mean_shape_error > 15.0


def test_anatomy_keeps_its_order(sample: tuple[np.ndarray, np.ndarray]) -> None:
    """Every hand is the same hand: fingers in order, tips above their joints, fingers above the wrist."""
    _, landmarks = sample
    x, y = landmarks[..., 0], landmarks[..., 1]
    for left, right in zip(FINGERS, FINGERS[1:]):
        assert np.all(x[:, column(f"{left}_tip")] < x[:, column(f"{right}_tip")]), (left, right)
        assert np.all(x[:, column(f"{left}_mcp")] < x[:, column(f"{right}_mcp")]), (left, right)
    for finger in FINGERS:
        assert np.all(y[:, column(f"{finger}_tip")] < y[:, column(f"{finger}_mcp")]), finger
        assert np.all(y[:, column(f"{finger}_mcp")] < y[:, column("radius_distal_end")]), finger
    assert np.all(x[:, column("radius_distal_end")] < x[:, column("ulna_distal_end")])


def test_bone_landmarks_are_bright(sample: tuple[np.ndarray, np.ndarray]) -> None:
    """Tips and bone ends lie on bone: brighter than three quarters of their image."""
    images, landmarks = sample
    bone_columns = [column(name) for name in BONE_LANDMARKS]
    for image, points in zip(images, landmarks):
        at_bone = intensity_at(image, points[bone_columns])
        assert np.all(at_bone > np.percentile(image, 75)), dict(zip(BONE_LANDMARKS, at_bone.round()))


def test_fingertips_are_where_the_bone_ends(sample: tuple[np.ndarray, np.ndarray]) -> None:
    """A tip is bone; a few pixels further along the finger there is only soft tissue."""
    images, landmarks = sample
    for finger in FINGERS:
        tips, joints = landmarks[:, column(f"{finger}_tip")], landmarks[:, column(f"{finger}_mcp")]
        along = (tips - joints) / np.linalg.norm(tips - joints, axis=-1, keepdims=True)
        for image, tip, direction in zip(images, tips, along):
            on_tip, beyond = intensity_at(image, np.stack([tip, tip + 8.0 * direction]))
            assert on_tip > beyond + 20, (finger, on_tip, beyond)


def test_joint_centres_lie_in_the_joint_space(sample: tuple[np.ndarray, np.ndarray]) -> None:
    """An MCP landmark is the dark gap between the metacarpal head and the proximal phalanx."""
    images, landmarks = sample
    for finger in FINGERS:
        tips, joints = landmarks[:, column(f"{finger}_tip")], landmarks[:, column(f"{finger}_mcp")]
        along = (tips - joints) / np.linalg.norm(tips - joints, axis=-1, keepdims=True)
        for image, joint, direction in zip(images, joints, along):
            probes = np.stack([joint, joint + 6 * direction, joint - 6 * direction])
            gap, phalanx, metacarpal = intensity_at(image, probes)
            assert gap < min(phalanx, metacarpal) - 20, (finger, gap, phalanx, metacarpal)


def test_fingertips_are_centred_across_the_finger_to_a_fraction_of_a_pixel(
    sample: tuple[np.ndarray, np.ndarray],
) -> None:
    """Across the finger the tip's round bone end is symmetric about the landmark; a half-pixel
    convention slip (pixel corners instead of centres) would move it by ~0.5 px."""
    images, landmarks = sample
    offsets = np.arange(-6.0, 6.01, 0.25)
    for finger in FINGERS[1:]:  # long fingers point up, so "across" is mostly x
        tips, joints = landmarks[:, column(f"{finger}_tip")], landmarks[:, column(f"{finger}_mcp")]
        along = (tips - joints) / np.linalg.norm(tips - joints, axis=-1, keepdims=True)
        across = np.stack([-along[:, 1], along[:, 0]], axis=-1)
        profiles = [
            ndimage.map_coordinates(image.astype(np.float64), (tip + offsets[:, None] * normal).T[::-1], order=1)
            for image, tip, normal in zip(images, tips, across)
        ]
        mean_profile = np.mean(profiles, axis=0)
        weights = mean_profile - mean_profile.min()
        centre = (weights * offsets).sum() / weights.sum()
        assert abs(centre) < 0.15, (finger, centre)
