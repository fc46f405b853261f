"""The one mapping between the original pixel grid and the network grid.

Convention: a point (x, y) is in pixel units with the centre of the top-left pixel at (0, 0), so
pixel i covers [i - 0.5, i + 0.5). Images are resized (no crop, no padding) from (H, W) to (h, w), and
a pixel centre keeps its relative position: x_net = (x + 0.5) * w / W - 0.5. This is the convention
of PIL's and torch's (``align_corners=False``) resampling, so the cached images and the landmarks
stay registered.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _scale(orig_size: ArrayLike, net_size: ArrayLike, like: ArrayLike) -> ArrayLike:
    """(..., 2) factors (w / W, h / H) broadcastable against points (..., L, 2)."""
    if isinstance(like, torch.Tensor):
        orig = torch.as_tensor(orig_size, dtype=torch.float64, device=like.device)
        net = torch.as_tensor(net_size, dtype=torch.float64, device=like.device)
        return (net / orig).flip(-1).unsqueeze(-2)
    orig = np.asarray(orig_size, dtype=np.float64)
    net = np.asarray(net_size, dtype=np.float64)
    return np.expand_dims((net / orig)[..., ::-1], -2)


def to_network(points: ArrayLike, orig_size: ArrayLike, net_size: ArrayLike) -> ArrayLike:
    """Map (..., L, 2) xy points from the original grid (H, W) to the network grid (h, w)."""
    scale = _scale(orig_size, net_size, points)
    return (points + 0.5) * scale - 0.5


def to_original(points: ArrayLike, orig_size: ArrayLike, net_size: ArrayLike) -> ArrayLike:
    """Inverse of :func:`to_network`: network-grid xy points back to the original grid."""
    scale = _scale(orig_size, net_size, points)
    return (points + 0.5) / scale - 0.5
