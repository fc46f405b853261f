"""Figures: predicted heatmaps over test images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from landmark_bench.geometry import to_network  # noqa: E402
from landmark_bench.heatmaps import probability_maps  # noqa: E402


def overlay(axis, image: torch.Tensor, logits: torch.Tensor, pred: torch.Tensor, truth: torch.Tensor,
            orig_size: torch.Tensor) -> None:
    """One image: its heatmaps (each landmark's map scaled to its own peak), true (green) and predicted
    (red) points, all on the network grid."""
    probs = probability_maps(logits)
    probs = (probs / probs.flatten(-2).amax(-1)[..., None, None]).amax(0)
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
