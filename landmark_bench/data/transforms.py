"""Augmentation on cached arrays that moves the landmarks with the image."""

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


def warp(image: torch.Tensor, points: torch.Tensor, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a 3x3 pixel-space affine ``matrix`` (input -> output) to a (C, h, w) image and (L, 2) points."""
    height, width = image.shape[-2:]
    to_norm = pixel_to_normalised(height, width)
    theta = (to_norm @ torch.linalg.inv(matrix) @ torch.linalg.inv(to_norm))[:2].to(image.dtype)
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    warped = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    moved = points.double() @ matrix[:2, :2].T + matrix[:2, 2]
    return warped, moved.to(points.dtype)


@dataclass
class Augment:
    """Small random affine (about the image centre) and intensity changes, per sample.

    Defaults are mild: X-ray anatomy has a canonical pose, and flips would swap anatomical sides.
    """

    max_rotation_deg: float = 10.0
    max_scale: float = 0.1
    max_translation: float = 0.05  # fraction of the image size
    max_contrast: float = 0.25
    max_brightness: float = 0.1
    max_gamma: float = 0.3

    def __call__(
        self, image: torch.Tensor, points: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` (1, h, w) float in [0, 1], ``points`` (L, 2) xy network pixels."""
        u = torch.rand(7, generator=generator, dtype=torch.float64) * 2 - 1
        height, width = image.shape[-2:]
        angle = math.radians(self.max_rotation_deg) * u[0]
        scale = 1 + self.max_scale * u[1]
        cx, cy = (width - 1) / 2, (height - 1) / 2
        rotation = torch.tensor([[torch.cos(angle), -torch.sin(angle)], [torch.sin(angle), torch.cos(angle)]]) * scale
        shift = torch.tensor([cx, cy], dtype=torch.float64) - rotation @ torch.tensor([cx, cy], dtype=torch.float64)
        shift += torch.stack([u[2] * width, u[3] * height]) * self.max_translation
        matrix = torch.eye(3, dtype=torch.float64)
        matrix[:2, :2], matrix[:2, 2] = rotation, shift
        image, points = warp(image, points, matrix)
        gamma = float(torch.exp(u[4] * self.max_gamma))
        image = image.clamp(0, 1) ** gamma
        mean = image.mean()
        image = (image - mean) * (1 + self.max_contrast * float(u[5])) + mean + self.max_brightness * float(u[6])
        return image.clamp(0, 1), points
