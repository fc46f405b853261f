"""Seeded perturbations of an X-ray that mimic another device or clinic, its landmarks moved exactly with it.

Each perturbation is a named, deterministic function of (image, landmarks, seed, image_id): its random draws come
from ``SeedSequence((seed, hash(name, image_id), stream))``, so every method is scored on bit-identical images in
any process, and another image of the same split gets other draws. A geometric perturbation is one affine matrix in
the suite's pixel-centre convention (:mod:`landmark_bench.geometry`), applied to the pixels by the training
augmentation's own :func:`~landmark_bench.data.transforms.warp` and to the points by the same matrix; an intensity
perturbation leaves the points where they are.

Landmarks never leave the frame: a geometric perturbation is shrunk towards the identity, in steps of a tenth of its
drawn strength, until every landmark lies at least ``MARGIN`` of the shorter image side inside the output, so every
point is still scored and the MRE stays comparable with the clean one (the shrunk images are counted in the table).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from landmark_bench.data.readers import DataError, DatasetReader, Record
from landmark_bench.data.transforms import warp

MARGIN = 0.02  # of the output's shorter side: ISBI 2015, 39 px (3.9 mm); the phantom, 5 px
STRENGTHS = np.linspace(1.0, 0.0, 11)  # tried in turn until the landmarks fit; 0 is the identity


class Affine(NamedTuple):
    """The geometric part of a perturbation: original pixel centres -> output pixel centres."""

    matrix: np.ndarray  # (3, 3) float64
    size: tuple[int, int]  # output (H, W), never larger than the input
    strength: float  # the fraction of the drawn perturbation kept so that the landmarks fit (1: all of it)


def move_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(L, 2) xy points through a (3, 3) affine matrix (the same arithmetic as ``warp``)."""
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def _generator(name: str, seed: int, image_id: str, stream: int) -> np.random.Generator:
    """Independent streams for the geometry (0) and the intensities (1): the geometry, and so the records, are
    known without decoding the image."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"perturbation seed must be a non-negative integer, not {seed!r}")
    key = int.from_bytes(hashlib.sha256(f"{name}\0{image_id}".encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence((seed, key, stream)))


def _translation(dx: float, dy: float) -> np.ndarray:
    matrix = np.eye(3)
    matrix[:2, 2] = dx, dy
    return matrix


def _about_centre(linear: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (2, 2) linear map about the image centre, ((W - 1) / 2, (H - 1) / 2) in pixel-centre coordinates."""
    centre = np.array([(size[1] - 1) / 2, (size[0] - 1) / 2])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = centre - linear @ centre
    return matrix


def _fit(make: Callable[[float], tuple[np.ndarray, tuple[int, int]]], landmarks: np.ndarray) -> Affine:
    """The strongest of ``STRENGTHS`` whose output keeps every landmark ``MARGIN`` inside the frame."""
    for strength in STRENGTHS:
        matrix, size = make(float(strength))
        moved = move_points(matrix, landmarks)
        margin = MARGIN * min(size)
        inside = (moved >= margin).all() and (moved <= np.array([size[1], size[0]]) - 1 - margin).all()
        if inside or strength == 0:
            return Affine(matrix, size, float(strength))
    raise AssertionError("STRENGTHS ends with 0, the identity")


Geometry = Callable[[np.random.Generator, tuple[int, int], np.ndarray], Affine]
Intensity = Callable[[np.random.Generator, np.ndarray], np.ndarray]


def _crop_top(rng: np.random.Generator, size: tuple[int, int], landmarks: np.ndarray) -> Affine:
    """A whole number of rows cut off the top (e.g. the skull vault outside the collimation): a shorter image,
    which the resize to the network grid then stretches, as it would another clinic's."""
    fraction = rng.uniform(0.05, 0.15)

    def make(strength: float) -> tuple[np.ndarray, tuple[int, int]]:
        rows = round(strength * fraction * size[0])
        return _translation(0.0, -rows), (size[0] - rows, size[1])

    return _fit(make, landmarks)


def _zoom(low: float, high: float) -> Geometry:
    """Magnification about the image centre, same frame size (> 1: the anatomy larger in the frame)."""

    def zoom(rng: np.random.Generator, size: tuple[int, int], landmarks: np.ndarray) -> Affine:
        scale = rng.uniform(low, high)
        return _fit(lambda strength: (_about_centre(np.eye(2) * (1 + strength * (scale - 1)), size), size), landmarks)

    return zoom


def _shift(rng: np.random.Generator, size: tuple[int, int], landmarks: np.ndarray) -> Affine:
    """The patient off-centre: 5-10 % of the frame in a uniformly drawn direction."""
    angle, fraction = rng.uniform(0.0, 2 * math.pi), rng.uniform(0.05, 0.10)
    dx, dy = fraction * size[1] * math.cos(angle), fraction * size[0] * math.sin(angle)
    return _fit(lambda strength: (_translation(strength * dx, strength * dy), size), landmarks)


def _rotate(rng: np.random.Generator, size: tuple[int, int], landmarks: np.ndarray) -> Affine:
    """A head or hand positioned 5-10 degrees off, either way, about the image centre."""
    angle = math.radians(rng.uniform(5.0, 10.0)) * rng.choice([-1.0, 1.0])

    def make(strength: float) -> tuple[np.ndarray, tuple[int, int]]:
        cos, sin = math.cos(strength * angle), math.sin(strength * angle)
        return _about_centre(np.array([[cos, -sin], [sin, cos]]), size), size

    return _fit(make, landmarks)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _contrast_gamma(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Another detector's response curve: gamma exp(+-0.4..0.7), then contrast x0.55..0.75 or x1.3..1.5 about the
    mean; beyond the training augmentation (gamma exp(+-0.3), contrast +-25 %)."""
    gamma = math.exp(rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.7))
    low_contrast, high_contrast, pick_low = rng.uniform(0.55, 0.75), rng.uniform(1.3, 1.5), rng.random() < 0.5
    values = (image.astype(np.float64) / 255.0) ** gamma
    mean = values.mean()
    return _to_uint8(255.0 * ((values - mean) * (low_contrast if pick_low else high_contrast) + mean))


NOISE_GRAIN = 256  # noise cells along the longer side: grain that survives the resize to the network grid


def _noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A noisier detector: Gaussian noise of 8-16 grey levels, correlated over 1/256 of the longer side, since
    pixel-sized noise on a 2400-pixel image would be averaged away by the resize to the network grid."""
    sigma = rng.uniform(8.0, 16.0)
    height, width = image.shape
    step = max(1, round(max(height, width) / NOISE_GRAIN))
    field = rng.standard_normal((math.ceil(height / step), math.ceil(width / step))).astype(np.float32)
    if step > 1:
        field = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BILINEAR))
    return _to_uint8(image + sigma * field / field.std())


@dataclass(frozen=True)
class Perturbation:
    """A named perturbation: a geometric part, an intensity part, or both (the geometry first)."""

    name: str
    summary: str  # one line for the table's notes
    geometry: Geometry | None = None
    intensity: Intensity | None = None

    def affine(self, size: tuple[int, int], landmarks: np.ndarray, seed: int, image_id: str) -> Affine:
        """The geometric part for an image of ``size`` (H, W): the identity for an intensity perturbation."""
        if self.geometry is None:
            return Affine(np.eye(3), tuple(size), 1.0)
        return self.geometry(_generator(self.name, seed, image_id, 0), tuple(size), np.asarray(landmarks))

    def __call__(self, image: np.ndarray, landmarks: np.ndarray, seed: int, image_id: str
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The perturbed (H', W') uint8 image and its (L, 2) xy landmarks, both in the output's pixel centres."""
        affine = self.affine(image.shape, landmarks, seed, image_id)
        points = torch.from_numpy(np.asarray(landmarks, dtype=np.float64))[None]
        if self.geometry is not None:
            pixels = torch.from_numpy(image.astype(np.float32))[None, None]
            warped, points = warp(pixels, points, torch.from_numpy(affine.matrix)[None])
            image = _to_uint8(warped[0, 0, :affine.size[0], :affine.size[1]].numpy())
        if self.intensity is not None:
            image = self.intensity(_generator(self.name, seed, image_id, 1), image)
        return image, points[0].numpy()


PERTURBATIONS: dict[str, Perturbation] = {perturbation.name: perturbation for perturbation in (
    Perturbation("crop_top", "top 5-15 % of the rows cut off (e.g. the skull vault): a shorter image", _crop_top),
    Perturbation("zoom_in", "magnified x1.10-1.25 about the image centre (anatomy larger in the frame)",
                 _zoom(1.10, 1.25)),
    Perturbation("zoom_out", "shrunk x0.80-0.90 about the image centre, black border", _zoom(0.80, 0.90)),
    Perturbation("shift", "shifted 5-10 % of the frame in a random direction, black border", _shift),
    Perturbation("rotate", "rotated 5-10 degrees either way about the image centre, black corners", _rotate),
    Perturbation("contrast_gamma", "gamma exp(+-0.4..0.7), contrast x0.55..0.75 or x1.3..1.5 about the mean",
                 intensity=_contrast_gamma),
    Perturbation("noise", "Gaussian noise of 8-16 grey levels, grain 1/256 of the longer side", intensity=_noise),
)}


def get_perturbation(name: str) -> Perturbation:
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; valid perturbations: {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name]


class PerturbedReader(DatasetReader):
    """``base``'s splits with every image perturbed: records carry the moved landmarks and the output size, known
    without decoding; ``load_image`` decodes the original and perturbs it.

    Its cache key does not know the perturbation's code, so cache it only in a scratch folder.
    """

    def __init__(self, base: DatasetReader, perturbation: Perturbation, seed: int):
        super().__init__(base.data_dir)
        self.base, self.perturbation, self.seed = base, perturbation, seed
        self.name = f"{base.name}-{perturbation.name}-seed{seed}"
        self.num_landmarks, self.landmark_names = base.num_landmarks, base.landmark_names
        self.splits, self.test_splits = base.splits, base.test_splits
        self.originals: dict[str, Record] = {}
        self.affines: dict[str, Affine] = {}  # per image id, to map points back to the original frame

    def _split_records(self, split: str) -> list[Record]:
        records = []
        for record in self.base.records(split):
            affine = self.perturbation.affine(record.size, record.landmarks, self.seed, record.image_id)
            self.originals[record.image_id], self.affines[record.image_id] = record, affine
            # a magnification changes the mm per pixel: a similarity's scale is the root of its determinant
            spacing = record.spacing / math.sqrt(abs(np.linalg.det(affine.matrix[:2, :2]))) if record.spacing else None
            records.append(Record(self.name, record.image_id, record.path, affine.size,
                                  move_points(affine.matrix, record.landmarks), spacing))
        return records

    def load_image(self, record: Record) -> np.ndarray:
        original = self.originals[record.image_id]
        image, _ = self.perturbation(self.base.load_image(original), original.landmarks, self.seed, record.image_id)
        if image.shape != record.size:
            raise DataError(f"{self.name}: image {record.image_id} came out {image.shape}, not {record.size}")
        return image
