"""Heatmap targets, losses and sub-pixel decoding, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from landmark_bench.heatmaps import (
    decode_heatmaps,
    disc_targets,
    gaussian_targets,
    pixel_cross_entropy,
    probability_maps,
    spatial_softmax_cross_entropy,
)


def test_gaussian_targets_are_normalised_gaussians_centred_on_the_points() -> None:
    points = torch.tensor([[[3.0, 5.0], [10.25, 2.5]], [[0.0, 0.0], [7.5, 5.5]]])
    maps = gaussian_targets(points, (12, 16), sigma=1.5)
    assert maps.shape == (2, 2, 12, 16)
    assert torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(2, 2), atol=1e-6)
    # value at a pixel relative to the peak pixel is exp(-d^2 / (2 sigma^2))
    ratio = maps[0, 0, 5, 5] / maps[0, 0, 5, 3]  # 2 px to the right of (3, 5)
    assert ratio.item() == pytest.approx(math.exp(-4 / (2 * 1.5**2)), rel=1e-5)
    ratio_y = maps[0, 0, 6, 3] / maps[0, 0, 5, 3]  # 1 px below
    assert ratio_y.item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)), rel=1e-5)
    # a map centred on the grid is symmetric, so its centroid is the point
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(16.0), indexing="ij")
    centroid = torch.stack([(maps[1, 1] * xs).sum(), (maps[1, 1] * ys).sum()])
    assert torch.allclose(centroid, points[1, 1], atol=1e-4)


def test_gaussian_target_of_a_point_far_outside_is_still_a_distribution() -> None:
    points = torch.tensor([[500.0, -300.0], [-1.0, 4.0]])
    maps = gaussian_targets(points, (8, 8), sigma=1.0)
    assert torch.isfinite(maps).all()
    assert torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(2), atol=1e-6)
    assert maps[0].argmax().item() == 0 * 8 + 7  # top-right corner, nearest to (500, -300)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_targets(points, (8, 8), sigma=0.0)


def test_disc_targets_label_discs_and_give_overlaps_to_the_nearest_landmark() -> None:
    points = torch.tensor([[[1.0, 1.0], [4.0, 1.0]]])
    classes = disc_targets(points, (3, 7), radius=2.0)
    expected = torch.tensor(
        [
            [1, 1, 1, 2, 2, 2, 0],  # (3, 0): 2.24 from landmark 0, 1.41 from landmark 1
            [1, 1, 1, 2, 2, 2, 2],  # (2, 1): 1 from landmark 0, 2 from landmark 1 -> nearest is 0
            [1, 1, 1, 2, 2, 2, 0],
        ]
    )
    assert classes.dtype == torch.long
    assert torch.equal(classes[0], expected)


def test_spatial_softmax_cross_entropy_matches_soft_label_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, generator=generator)
    targets = gaussian_targets(torch.rand(2, 3, 2, generator=generator) * 5, (6, 5), sigma=1.0)
    reference = F.cross_entropy(logits.reshape(6, 30), targets.reshape(6, 30))
    assert spatial_softmax_cross_entropy(logits, targets).item() == pytest.approx(reference.item(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        spatial_softmax_cross_entropy(logits, targets[:, :2])


def test_training_logits_with_spatial_softmax_cross_entropy_learns_the_point() -> None:
    point = torch.tensor([[[9.3, 4.7]]])
    target = gaussian_targets(point, (12, 16), sigma=1.0)
    logits = torch.zeros(1, 1, 12, 16, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.5)
    initial_loss = spatial_softmax_cross_entropy(logits, target).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = spatial_softmax_cross_entropy(logits, target)
        loss.backward()
        optimizer.step()
    entropy = -(target * target.clamp_min(1e-30).log()).sum().item()  # the lowest reachable loss
    assert loss.item() < initial_loss - 2.0
    assert loss.item() == pytest.approx(entropy, abs=0.05)
    assert torch.allclose(decode_heatmaps(logits), point.double(), atol=0.1)


def test_pixel_cross_entropy_uniform_logits_cost_log_of_the_class_count() -> None:
    classes = disc_targets(torch.tensor([[[2.0, 2.0], [6.0, 3.0]]]), (6, 9), radius=1.0)
    uniform = torch.zeros(1, 3, 6, 9)
    assert pixel_cross_entropy(uniform, classes).item() == pytest.approx(math.log(3), rel=1e-6)
    confident = F.one_hot(classes, 3).permute(0, 3, 1, 2).float() * 20
    assert pixel_cross_entropy(confident, classes).item() < 1e-6


def test_probability_maps_sum_to_one_per_landmark() -> None:
    probs = probability_maps(torch.randn(2, 4, 5, 7))
    assert torch.allclose(probs.sum(dim=(-2, -1)), torch.ones(2, 4), atol=1e-6)


@pytest.mark.parametrize(("sigma", "window", "tolerance"), [(1.0, 2, 0.05), (2.0, 6, 0.01)])
def test_decode_recovers_sub_pixel_gaussian_peaks(sigma: float, window: int, tolerance: float) -> None:
    # a non-square grid and distinct x/y fractions so a swapped axis or a pure arg-max fails
    fractions = torch.linspace(0.0, 0.5, 11)
    points = torch.stack([20.0 + fractions, 11.0 + fractions.flip(0) * 0.9], dim=-1).reshape(1, 11, 2)
    points = points.double()
    logits = gaussian_targets(points, (24, 40), sigma).log()
    decoded = decode_heatmaps(logits, window=window)
    assert decoded.dtype == torch.float64
    assert decoded.shape == (1, 11, 2)
    assert (decoded - points).abs().max().item() < tolerance


def test_decode_without_window_is_the_arg_max_and_batches_are_independent() -> None:
    points = torch.tensor([[[6.3, 5.6], [12.2, 7.9]], [[0.0, 13.0], [19.0, 0.0]]], dtype=torch.float64)
    logits = gaussian_targets(points, (14, 20), sigma=1.0).log()
    assert torch.equal(decode_heatmaps(logits, window=0), points.round())
    decoded = decode_heatmaps(logits, window=2)
    assert torch.allclose(decoded[0], points[0], atol=0.05)
    # peaks on the border: out-of-image cells weigh nothing, so the estimate stays finite and inside
    assert torch.isfinite(decoded[1]).all()
    assert (decoded[1] >= 0).all() and (decoded[1, :, 0] <= 19).all() and (decoded[1, :, 1] <= 13).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_of_low_precision_logits_equals_the_decode_of_their_float64_values(dtype: torch.dtype) -> None:
    # the peak is searched at the logits' own precision: the points must be exactly those of the exact float64 copy,
    # ties (an all-zero map) included
    logits = (torch.randn(2, 5, 24, 40, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    logits[1, 0] = 0
    for window in (0, 2, 6):
        assert torch.equal(decode_heatmaps(logits, window=window), decode_heatmaps(logits.double(), window=window))
