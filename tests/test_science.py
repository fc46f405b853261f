"""The scientific core, not only the instruments: every method pretrained at the tiny preset and fine-tuned on
the phantom learns; the detector starts from exactly the checkpoint's tensors; the pixel_ce loss trains; and
the ISBI test splits are counted and pooled as published."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from landmark_bench.finetune import finetune
from landmark_bench.methods import build_backbone, family_of, get_method, method_names
from landmark_bench.methods.ddpm import EMA_PREFIX
from landmark_bench.checkpoints import read_checkpoint, strip_prefix
from landmark_bench.models.detector import LandmarkDetector
from landmark_bench.predict import predict
from landmark_bench.pretrain import pretrain

LEARNED_METHODS = [method for method in method_names() if family_of(method) is not None]
# Every learned method, whatever its pretraining, must land at least this many times closer than the mean shape
# (the tiny UNet detector, 60 steps at 80x64, is the weakest: about 1.8x).
BEATS_MEAN_SHAPE_BY = 1.5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("pretrain")
    return {method: pretrain(method=method, datasets=["phantom"], preset="tiny", out=out / method)["checkpoint"]
            for method in method_names(pretrains=True)}


@pytest.fixture(scope="module")
def finetuned(checkpoints, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every learned method fine-tuned at the tiny preset on the phantom (10 shots, seed 0) from its checkpoint."""
    out = tmp_path_factory.mktemp("finetune")
    return {method: finetune(method=method, dataset="phantom", shots=10, seed=0, preset="tiny", out=out / method,
                             pretrained=checkpoints.get(method))
            for method in LEARNED_METHODS}


@pytest.mark.slow
@pytest.mark.parametrize("method", LEARNED_METHODS)
def test_every_method_pretrained_then_fine_tuned_beats_the_mean_shape(method, finetuned, tiny_runs):
    learned = finetuned[method]["metrics"]["test"]["mre"]
    reference = tiny_runs["mean_shape"]["metrics"]["test"]["mre"]
    assert learned * BEATS_MEAN_SHAPE_BY < reference, (method, learned, reference)


@pytest.mark.slow
@pytest.mark.parametrize("method, protocol", [*((method, "finetune") for method in method_names(pretrains=True)),
                                              ("cdpm_align", "probe")])
def test_a_run_folder_moved_away_from_its_pretraining_predicts_as_the_run_did(method, protocol, finetuned,
                                                                            checkpoints, tmp_path):
    """A run folder copied elsewhere, its pretraining checkpoint gone, still rebuilds its detector (the diffusion
    UNet's config, condition and schedule from config.json) and predicts exactly the run's own test points."""
    run = finetuned[method] if protocol == "finetune" else finetune(
        method=method, protocol=protocol, dataset="phantom", shots=10, seed=0, preset="tiny", out=tmp_path / "run",
        pretrained=checkpoints[method])
    moved = shutil.copytree(run["run_dir"], tmp_path / "moved run")
    pretraining = Path(checkpoints[method])
    hidden = pretraining.rename(pretraining.with_name("elsewhere.ckpt"))
    try:
        predict(moved, tmp_path / "test.csv", dataset="phantom", split="test", accelerator="cpu")
    finally:
        hidden.rename(pretraining)
    predicted = pd.read_csv(tmp_path / "test.csv", dtype={"image_id": str})
    own = pd.read_csv(moved / "predictions.csv", dtype={"image_id": str})
    assert predicted[["image_id", "landmark"]].equals(own[["image_id", "landmark"]])
    np.testing.assert_allclose(predicted[["x", "y"]].to_numpy(), own[["x", "y"]].to_numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", method_names(pretrains=True))
def test_detector_starts_from_exactly_the_checkpoint_tensors(method, checkpoints):
    path = checkpoints[method]
    detector = LandmarkDetector(num_landmarks=5, backbone=build_backbone(method, pretrained=path, dataset="phantom"))
    if family_of(method) == "encoder":
        expected = get_method(method).encoder_state_dict(path)
        found = detector.backbone.encoder.state_dict()
    else:  # the EMA UNet, less the output convolution the detector replaces with its own head
        expected = {name: tensor for name, tensor in
                    strip_prefix(read_checkpoint(path)["state_dict"], EMA_PREFIX, path).items()
                    if not name.startswith("conv_out.") and name != "n_averaged"}
        found = detector.backbone.unet.state_dict()
    assert set(found) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name


@pytest.mark.parametrize("method", method_names(pretrains=True, family="diffusion"))
def test_unet_detector_read_at_stride_two_starts_from_the_checkpoint_tensors_it_keeps(method, checkpoints):
    """The decoder read one level coarser keeps every pretrained tensor but those of the full-resolution level (the
    last up block, the upsampler before it, the final norm, the output convolution); its new norm is the only
    tensor not from the checkpoint."""
    path = checkpoints[method]
    detector = LandmarkDetector(num_landmarks=5, backbone=build_backbone(method, pretrained=path, dataset="phantom",
                                                                         feature_stride=2))
    dropped = ("conv_out.", "conv_norm_out.", "up_blocks.3.", "up_blocks.2.upsamplers.")
    expected = {name: tensor for name, tensor in strip_prefix(read_checkpoint(path)["state_dict"], EMA_PREFIX,
                                                              path).items()
                if not name.startswith(dropped) and name != "n_averaged"}
    found = detector.backbone.unet.state_dict()
    assert set(found) - set(expected) == {"conv_norm_out.weight", "conv_norm_out.bias"}
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name


def test_pixel_cross_entropy_loss_trains(tiny_runs, tmp_path):
    record = finetune(method="scratch", dataset="phantom", shots=10, seed=0, preset="tiny", out=tmp_path,
                      overrides={"finetune.loss": "pixel_ce", "finetune.max_steps": 300})
    reference = tiny_runs["mean_shape"]["metrics"]["test"]["mre"]
    assert record["metrics"]["test"]["mre"] * BEATS_MEAN_SHAPE_BY < reference


def test_isbi_mean_shape_counts_test1_test2_and_pools_them_by_image(data_dir, tmp_path):
    metrics = finetune(method="mean_shape", dataset="isbi2015", data_dir=str(data_dir), shots=10, seed=0,
                       preset="tiny", out=tmp_path)["metrics"]
    assert (metrics["test1"]["n_images"], metrics["test2"]["n_images"], metrics["test"]["n_images"]) == (150, 100, 250)
    pooled = (150 * metrics["test1"]["mre"] + 100 * metrics["test2"]["mre"]) / 250
    assert metrics["test"]["mre"] == pytest.approx(pooled, rel=1e-9)
