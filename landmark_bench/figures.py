"""Figures: predicted heatmaps over test images."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from landmark_bench.geometry import to_network  # noqa: E402
from landmark_bench.heatmaps import probability_maps  # noqa: E402
from landmark_bench.io import atomic_write  # noqa: E402


def peak_normalised(logits: torch.Tensor) -> torch.Tensor:
    """(h, w): max over landmarks of each landmark's probability map divided by its own peak."""
    probs = probability_maps(logits)
    return (probs / probs.flatten(-2).amax(-1)[..., None, None]).amax(0)


def save_overlay(batch: dict, image_id: str, path: Path) -> None:
    """The first test image's heatmap and points on the network grid, for the leaderboard's overlay grid."""
    size = batch["image"].shape[-2:]
    io = BytesIO()
    np.savez_compressed(
        io, image=batch["image"][0, 0].numpy(), heatmap=peak_normalised(batch["logits"][0]).numpy(),
        pred=to_network(batch["pred"][0].double(), batch["orig_size"][0], size).numpy(),
        truth=to_network(batch["truth"][0].double(), batch["orig_size"][0], size).numpy(), image_id=np.array(image_id),
    )
    atomic_write(path, lambda stream: stream.write(io.getvalue()))


def overlay(axis, image: torch.Tensor, logits: torch.Tensor, pred: torch.Tensor, truth: torch.Tensor,
            orig_size: torch.Tensor) -> None:
    """One image: its heatmaps (each landmark's map scaled to its own peak), true (green) and predicted
    (red) points, all on the network grid."""
    probs = peak_normalised(logits)
    size = image.shape[-2:]
    axis.imshow(image[0], cmap="gray", vmin=0, vmax=1)
    axis.imshow(probs, cmap="inferno", alpha=0.5, vmin=0, vmax=1)
    for points, colour in ((truth, "lime"), (pred, "red")):
        net = to_network(points.double(), orig_size, size)
        axis.scatter(net[:, 0], net[:, 1], s=6, c=colour, linewidths=0)
    axis.set_axis_off()


def save_heatmap_figure(batch: dict, path: Path) -> None:
    count = len(batch["image"])
    figure, axes = plt.subplots(1, count, figsize=(3 * count, 3.6), squeeze=False)
    for column in range(count):
        overlay(axes[0, column], batch["image"][column], batch["logits"][column], batch["pred"][column],
                batch["truth"][column], batch["orig_size"][column])
    figure.suptitle("predicted heatmaps (truth green, prediction red)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
