"""Augmentation on cached arrays that moves the landmarks with the image, a whole batch at once.

Per-sample augmentation spends most of its time in the fixed cost of many tiny tensor operations; one
``affine_grid``/``grid_sample`` call per batch amortises it (``benchmarks/loader.py`` measures the gain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pixel_to_normalised(height: int, width: int) -> torch.Tensor:
    """3x3 map from pixel-centre coordinates to grid_sample's [-1, 1] (``align_corners=False``)."""
    return torch.tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )


def warp(images: torch.Tensor, points: torch.Tensor, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply (B, 3, 3) pixel-space affine ``matrices`` (input -> output) to (B, C, h, w) images and (B, L, 2) points."""
    height, width = images.shape[-2:]
    to_norm = pixel_to_normalised(height, width)
    theta = (to_norm @ torch.linalg.inv(matrices) @ torch.linalg.inv(to_norm))[:, :2].to(images.dtype)
    # affine_grid's result, built separably: a (B, 1, w, 2) column term plus a (B, h, 1, 2) row term is a
    # few times cheaper than its (h * w, 3) @ (3, 2) product per image
    xs = (torch.arange(width, dtype=images.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=images.dtype) * 2 + 1) / height - 1
    column_term = xs[None, None, :, None] * theta[:, None, None, :, 0]
    row_term = ys[None, :, None, None] * theta[:, None, None, :, 1] + theta[:, None, None, :, 2]
    grid = column_term + row_term
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = points.double() @ matrices[:, :2, :2].transpose(1, 2) + matrices[:, None, :2, 2]
    return warped, moved.to(points.dtype)


@dataclass
class Augment:
    """Small random affine (about the image centre) and intensity changes, drawn per sample.

    Defaults are mild: X-ray anatomy has a canonical pose, and flips would swap anatomical sides. ``strength``
    multiplies every magnitude (a fine-tuning setting chosen on validation, ``finetune.augment_strength``); 0 is the
    identity. ``max_noise`` adds zero-mean Gaussian noise of a per-image standard deviation uniform in
    [0, ``max_noise``] (intensity units, [0, 1] images), drawn after the rest so that without it every other draw is
    as before.
    """

    max_rotation_deg: float = 10.0
    max_scale: float = 0.1
    max_translation: float = 0.05  # fraction of the image size
    max_contrast: float = 0.25
    max_brightness: float = 0.1
    max_gamma: float = 0.3
    strength: float = 1.0
    max_noise: float = 0.0

    def __post_init__(self):
        if self.strength < 0 or self.max_noise < 0:
            raise ValueError(f"augmentation strength ({self.strength}) and noise ({self.max_noise}) must be >= 0")
        if self.strength * max(self.max_scale, self.max_contrast) >= 1:
            raise ValueError(f"augmentation strength {self.strength} would scale or contrast some images by 0 or less "
                             f"(at most {1 / max(self.max_scale, self.max_contrast):g})")

    def batch(
        self, images: torch.Tensor, points: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` (B, 1, h, w) float in [0, 1], ``points`` (B, L, 2) xy network pixels."""
        u = (torch.rand(len(images), 7, generator=generator, dtype=torch.float64) * 2 - 1) * self.strength
        height, width = images.shape[-2:]
        angle = math.radians(self.max_rotation_deg) * u[:, 0]
        scale = 1 + self.max_scale * u[:, 1]
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
        centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
        shift = centre - rotation @ centre + u[:, 2:4] * torch.tensor([width, height]) * self.max_translation
        matrices = torch.eye(3, dtype=torch.float64).repeat(len(images), 1, 1)
        matrices[:, :2, :2], matrices[:, :2, 2] = rotation, shift
        images, points = warp(images, points, matrices)
        per_image = (-1,) + (1,) * (images.dim() - 1)
        gamma = torch.exp(u[:, 4] * self.max_gamma).to(images.dtype).view(per_image)
        images = images.clamp(0, 1) ** gamma
        mean = images.mean((-2, -1), keepdim=True)
        contrast = (1 + self.max_contrast * u[:, 5]).to(images.dtype).view(per_image)
        brightness = (self.max_brightness * u[:, 6]).to(images.dtype).view(per_image)
        images = (images - mean) * contrast + mean + brightness
        if self.max_noise > 0:
            std = torch.rand(len(images), generator=generator, dtype=torch.float64) * self.max_noise
            noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
            images = images + noise * std.to(images.dtype).view(per_image)
        return images.clamp(0, 1), points

    def __call__(
        self, image: torch.Tensor, points: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: ``image`` (1, h, w), ``points`` (L, 2)."""
        images, moved = self.batch(image[None], points[None], generator)
        return images[0], moved[0]
