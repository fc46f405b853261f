"""Augmented views of greyscale X-rays for the self-supervised baselines (SimCLR, MoCo v3, DINO).

The recipes follow the methods' papers (random resized crops, brightness/contrast jitter, Gaussian
blur, asymmetric blur between the two views of MoCo v3 and DINO, DINO's multi-crop) with the
changes an X-ray needs: one channel, no hue/saturation jitter, no grey-scale conversion or
solarisation, small rotations instead, and horizontal flips off by default because they swap the
patient's left and right, which a landmark detector must tell apart.

Normalisation is the detector's fixed grey one (``GREY_MEAN``/``GREY_STD`` of
``landmark_bench.models.decoder``: the ImageNet statistics averaged over RGB), so the pretrained
encoder sees the same input scale in pretraining and in fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.rotation import RandomRotateDegrees
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2 as T

from landmark_bench.models.decoder import GREY_MEAN, GREY_STD


def xray_view(
    size: int,
    scale: tuple[float, float],
    blur_prob: float,
    *,
    hflip_prob: float = 0.0,
    rotation_degrees: float = 10.0,
    rotation_prob: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
    jitter_prob: float = 0.8,
    blur_sigmas: tuple[float, float] = (0.1, 2.0),
    mean: float = GREY_MEAN,
    std: float = GREY_STD,
) -> T.Compose:
    """One random view: PIL 'L' image in, normalised ``(1, size, size)`` float tensor out.

    ``scale`` is the crop's share of the image area; ``blur_sigmas`` are in output pixels.
    """
    return T.Compose(
        [
            T.RandomResizedCrop(size=size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=hflip_prob),
            RandomRotateDegrees(prob=rotation_prob, degrees=rotation_degrees),
            T.RandomApply([T.ColorJitter(brightness=brightness, contrast=contrast)], p=jitter_prob),
            GaussianBlur(prob=blur_prob, sigmas=blur_sigmas),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=[mean], std=[std]),
        ]
    )


class XRayViews(MultiViewTransform):
    """Several views of one cached X-ray; refuses colour images rather than silently using one channel."""

    def __call__(self, image: Image.Image) -> list[Tensor]:
        if not isinstance(image, Image.Image) or image.mode != "L":
            mode = image.mode if isinstance(image, Image.Image) else type(image).__name__
            raise ValueError(f"X-ray views expect a one-channel PIL image (mode 'L'), got {mode!r}")
        return super().__call__(image)


def two_views(
    size: int = 96,
    scale: tuple[float, float] = (0.2, 1.0),
    blur_probs: tuple[float, float] = (0.5, 0.5),
    **view_settings: Any,
) -> XRayViews:
    """The two views of SimCLR (symmetric blur) or MoCo v3 (blur 1.0 / 0.1, as in BYOL)."""
    return XRayViews([xray_view(size, scale, blur_prob, **view_settings) for blur_prob in blur_probs])


def multi_crop_views(
    global_size: int = 96,
    global_scale: tuple[float, float] = (0.14, 1.0),
    local_size: int = 48,
    local_scale: tuple[float, float] = (0.05, 0.14),
    n_local: int = 6,
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
    **view_settings: Any,
) -> XRayViews:
    """DINO's multi-crop: 2 global views, then ``n_local`` local ones.

    Default scales are DINO's ResNet-50 ones (global 0.14-1, local 0.05-0.14); ``blur_probs`` are
    for (first global, second global, every local) view, as in DINO.
    """
    global_blur_first, global_blur_second, local_blur = blur_probs
    return XRayViews(
        [
            xray_view(global_size, global_scale, global_blur_first, **view_settings),
            xray_view(global_size, global_scale, global_blur_second, **view_settings),
            *[xray_view(local_size, local_scale, local_blur, **view_settings) for _ in range(n_local)],
        ]
    )
