"""Landmark metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from landmark_bench.geometry import to_network, to_original
from landmark_bench.heatmaps import decode_heatmaps, gaussian_targets
from landmark_bench.metrics import LandmarkMetrics, expected_radial_error, wrist_width_spacing

NAN = float("nan")
ISBI_SIZE = (2400, 1935)  # (H, W) original
NET_SIZE = (128, 160)  # (h, w) network, deliberately not the same aspect ratio


def _one_hot_logits(shape: tuple[int, int, int, int], cells: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Logits 0 at the given (b, l, y, x) cells and -1e4 elsewhere: all the mass on those cells."""
    logits = torch.full(shape, -1e4, dtype=torch.float64)
    for b, landmark, y, x in cells:
        logits[b, landmark, y, x] = 0.0
    return logits


def test_radial_error_of_a_3_4_5_triangle_in_mm_and_in_pixels() -> None:
    pred = torch.tensor([[[13.0, 24.0]]])
    target = torch.tensor([[[10.0, 20.0]]])
    in_mm = LandmarkMetrics(num_landmarks=1)
    in_mm.update(pred, target, torch.tensor([0.1]), torch.tensor([0]))
    result = in_mm.compute()
    assert result["unit"] == "mm"
    assert result["mre"] == pytest.approx(0.5)
    assert result["mre_std"] == 0.0
    assert result["n_images"] == 1
    in_px = LandmarkMetrics(num_landmarks=1)
    in_px.update(pred, target, torch.tensor([NAN]), torch.tensor([0]))
    result = in_px.compute()
    assert result["unit"] == "px"
    assert result["mre"] == 5.0
    assert set(result["sdr"]) == {5.0, 10.0, 20.0, 40.0}


def test_non_square_resize_maps_network_points_back_exactly() -> None:
    # x_orig = (x + 0.5) * 1935 / 160 - 0.5, y_orig = (y + 0.5) * 2400 / 128 - 0.5
    net_points = torch.tensor([[[79.5, 63.5], [0.0, 0.0], [159.0, 127.0]]], dtype=torch.float64)
    orig = to_original(net_points, torch.tensor([ISBI_SIZE]), NET_SIZE)
    expected = torch.tensor([[[967.0, 1199.5], [5.546875, 8.875], [1928.453125, 2390.125]]], dtype=torch.float64)
    assert torch.allclose(orig, expected, rtol=0.0, atol=1e-9)
    target = expected + torch.tensor([3.0, 4.0], dtype=torch.float64)
    metrics = LandmarkMetrics(num_landmarks=3)
    metrics.update(orig, target, torch.tensor([0.1]), torch.tensor([7]))
    assert metrics.compute()["per_landmark_mre"] == pytest.approx([0.5, 0.5, 0.5])


def test_decoded_network_heatmaps_score_near_zero_in_the_original_grid() -> None:
    truth = torch.tensor([[[812.3, 1004.9], [1500.0, 333.3]], [[77.7, 2100.2], [1200.6, 1800.1]]], dtype=torch.float64)
    orig_size = torch.tensor([ISBI_SIZE, ISBI_SIZE])
    logits = gaussian_targets(to_network(truth, orig_size, NET_SIZE), NET_SIZE, sigma=1.0).log()
    pred = to_original(decode_heatmaps(logits), orig_size, NET_SIZE)
    metrics = LandmarkMetrics(num_landmarks=2)
    metrics.update(pred, truth, torch.tensor([0.1, 0.1]), torch.tensor([0, 1]))
    # one network pixel is 1.2 mm across and 1.9 mm down; decoding must land well inside it
    assert metrics.compute()["mre"] < 0.1


def test_wrist_width_spacing_scales_the_pair_to_50_mm() -> None:
    landmarks = np.zeros((37, 2))
    landmarks[0] = (100.0, 200.0)
    landmarks[4] = (400.0, 600.0)  # 500 px apart
    landmarks[1] = (100.0, 100.0)
    landmarks[5] = (100.0, 350.0)  # 250 px apart
    assert wrist_width_spacing(landmarks) == pytest.approx(0.1)
    assert wrist_width_spacing(torch.as_tensor(landmarks), pair=(1, 5)) == pytest.approx(0.2)
    assert wrist_width_spacing(landmarks, width_mm=60.0) == pytest.approx(0.12)
    with pytest.raises(ValueError, match="degenerate"):
        wrist_width_spacing(landmarks, pair=(2, 3))  # both at the origin
    landmarks[4] = NAN
    with pytest.raises(ValueError, match="degenerate"):
        wrist_width_spacing(landmarks)
    with pytest.raises(ValueError, match="out of range"):
        wrist_width_spacing(landmarks, pair=(0, 37))


def test_sdr_counts_an_error_exactly_at_the_threshold_as_a_success() -> None:
    # spacing 0.5 is exact in binary, so errors are exactly 2, 2.5, 3, 4 and 4.5 mm
    offsets = torch.tensor([4.0, 5.0, 6.0, 8.0, 9.0], dtype=torch.float64)
    target = torch.zeros(1, 5, 2, dtype=torch.float64)
    pred = torch.stack([offsets, torch.zeros(5, dtype=torch.float64)], -1).unsqueeze(0)
    metrics = LandmarkMetrics(num_landmarks=5)
    metrics.update(pred, target, torch.tensor([0.5]), torch.tensor([0]))
    result = metrics.compute()
    assert result["sdr"] == {2.0: 20.0, 2.5: 40.0, 3.0: 60.0, 4.0: 80.0}
    assert result["mre"] == pytest.approx(3.2)
    # population std: deviations -1.2, -0.7, -0.2, 0.8, 1.3 -> variance 4.3 / 5
    assert result["mre_std"] == pytest.approx(math.sqrt(0.86))

    pixel_offsets = torch.tensor([5.0, 10.0, 20.0, 40.0, 41.0], dtype=torch.float64)
    pred_px = torch.stack([torch.zeros(5, dtype=torch.float64), pixel_offsets], -1).unsqueeze(0)
    in_px = LandmarkMetrics(num_landmarks=5, sdr_thresholds_px=(5, 10, 20, 40, 50))
    in_px.update(pred_px, target, torch.tensor([NAN]), torch.tensor([0]))
    assert in_px.compute()["sdr"] == {5.0: 20.0, 10.0: 40.0, 20.0: 60.0, 40.0: 80.0, 50.0: 100.0}


def test_ere_of_a_one_hot_heatmap_on_the_prediction_is_zero() -> None:
    logits = _one_hot_logits((1, 2, 128, 160), [(0, 0, 40, 100), (0, 1, 127, 0)])
    orig_size = torch.tensor([ISBI_SIZE])
    net_points = torch.tensor([[[100.0, 40.0], [0.0, 127.0]]], dtype=torch.float64)
    pred = to_original(net_points, orig_size, NET_SIZE)
    ere = expected_radial_error(logits, pred, orig_size, torch.tensor([0.1]))
    assert ere.shape == (1, 2)
    assert torch.equal(ere, torch.zeros(1, 2, dtype=torch.float64))


def test_ere_measures_distance_in_the_original_grid_per_axis() -> None:
    # all mass on network pixel (0, 0); predictions one network pixel right, and one down
    logits = _one_hot_logits((1, 2, 128, 160), [(0, 0, 0, 0), (0, 1, 0, 0)])
    orig_size = torch.tensor([ISBI_SIZE])
    pred = to_original(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64), orig_size, NET_SIZE)
    ere = expected_radial_error(logits, pred, orig_size, torch.tensor([0.1]))
    assert ere[0].tolist() == pytest.approx([1935 / 160 * 0.1, 2400 / 128 * 0.1])
    in_pixels = expected_radial_error(logits, pred, orig_size, torch.tensor([NAN]))
    assert in_pixels[0].tolist() == pytest.approx([1935 / 160, 2400 / 128])


def test_ere_of_two_equal_peaks_is_half_their_distance() -> None:
    # original grid = network grid; peaks 6 px apart on a row and 3-4-5 apart diagonally
    logits = _one_hot_logits((2, 1, 16, 16), [(0, 0, 5, 2), (0, 0, 5, 8), (1, 0, 2, 2), (1, 0, 6, 5)])
    pred = torch.tensor([[[2.0, 5.0]], [[5.0, 6.0]]], dtype=torch.float64)
    ere = expected_radial_error(logits, pred, torch.tensor([[16, 16], [16, 16]]), torch.tensor([0.5, NAN]))
    assert ere[:, 0].tolist() == pytest.approx([6 / 2 * 0.5, 5 / 2])


def test_ere_threshold_removes_low_tails() -> None:
    # a peak and a second cell 10 px away at 0.04 of the peak's probability
    logits = _one_hot_logits((1, 1, 12, 12), [(0, 0, 1, 1)])
    logits[0, 0, 1, 11] = math.log(0.04)
    pred = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    size, spacing = torch.tensor([[12, 12]]), torch.tensor([1.0])
    assert expected_radial_error(logits, pred, size, spacing).item() == 0.0
    kept = expected_radial_error(logits, pred, size, spacing, threshold=0.03).item()
    assert kept == pytest.approx(10 * 0.04 / 1.04)
    logits[0, 0, 1, 11] = math.log(0.06)  # above the default cut: kept
    assert expected_radial_error(logits, pred, size, spacing).item() == pytest.approx(10 * 0.06 / 1.06)


def test_ere_is_averaged_by_the_metric_and_per_landmark() -> None:
    metrics = LandmarkMetrics(num_landmarks=2)
    pred = torch.zeros(2, 2, 2)
    metrics.update(pred, pred, torch.tensor([0.1, 0.1]), torch.tensor([0, 1]), ere=torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    result = metrics.compute()
    assert result["ere"] == pytest.approx(3.0)
    assert result["per_landmark_ere"] == pytest.approx([2.0, 4.0])
    without = LandmarkMetrics(num_landmarks=2)
    without.update(pred, pred, torch.tensor([0.1, 0.1]), torch.tensor([0, 1]))
    assert without.compute()["ere"] is None
    assert without.compute()["per_landmark_ere"] is None
    mixed = LandmarkMetrics(num_landmarks=2)
    mixed.update(pred, pred, torch.tensor([0.1, 0.1]), torch.tensor([0, 1]))
    mixed.update(pred, pred, torch.tensor([0.1, 0.1]), torch.tensor([2, 3]), ere=torch.ones(2, 2))
    with pytest.raises(ValueError, match="some samples only"):
        mixed.compute()


def _sample(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prediction and a target for sample ``index``, errors growing with the index."""
    target = torch.full((1, 2, 2), float(index), dtype=torch.float64)
    pred = target + torch.tensor([[[3.0 * (index + 1), 0.0], [0.0, 1.0]]], dtype=torch.float64)
    return pred, target


def test_repeated_indices_are_counted_once_and_order_does_not_matter() -> None:
    def run(order: list[int]) -> tuple[dict, LandmarkMetrics]:
        metrics = LandmarkMetrics(num_landmarks=2)
        for index in order:
            pred, target = _sample(index)
            metrics.update(pred, target, torch.tensor([0.5]), torch.tensor([index]))
        return metrics.compute(), metrics

    once, _ = run([0, 1, 2])
    # errors: landmark 0 is 1.5, 3, 4.5 mm; landmark 1 is 0.5 mm each
    assert once["per_landmark_mre"] == pytest.approx([3.0, 0.5])
    assert once["n_images"] == 3
    padded, metrics = run([2, 0, 1, 2, 2])  # sample 2, the worst, repeated as a sampler pads
    assert padded == once
    table = metrics.point_table()
    assert table.index.tolist() == [0, 1, 2]
    assert table.unit == "mm"
    assert table.error[:, 0].tolist() == pytest.approx([1.5, 3.0, 4.5])
    assert torch.equal(table.pred, torch.cat([_sample(i)[0] for i in range(3)]))
    assert torch.isnan(table.ere).all()


def test_result_is_json_ready() -> None:
    metrics = LandmarkMetrics(num_landmarks=2)
    pred, target = _sample(1)
    metrics.update(pred, target, torch.tensor([0.1]), torch.tensor([0]), ere=torch.ones(1, 2))
    result = metrics.compute()
    assert json.loads(json.dumps(result))["mre"] == result["mre"]
    for value in (result["mre"], result["mre_std"], result["ere"], *result["sdr"].values(), *result["per_landmark_mre"]):
        assert type(value) is float
    assert type(result["n_images"]) is int


def test_bad_input_is_refused_with_a_clear_error() -> None:
    metrics = LandmarkMetrics(num_landmarks=2)
    with pytest.raises(ValueError, match="update was never called"):
        metrics.compute()
    pred, target = _sample(0)
    with pytest.raises(ValueError, match=r"must both be \(1, 2, 2\)"):
        metrics.update(pred[:, :1], target[:, :1], torch.tensor([0.1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="spacing"):
        metrics.update(pred, target, torch.tensor([0.1, 0.1]), torch.tensor([0]))
    metrics.update(pred, target, torch.tensor([0.1]), torch.tensor([0]))
    metrics.update(pred, target, torch.tensor([NAN]), torch.tensor([1]))
    with pytest.raises(ValueError, match="entirely in mm or entirely in pixels"):
        metrics.compute()
