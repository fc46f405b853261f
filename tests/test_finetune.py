"""Fine-tuning under the tiny preset on the phantom: it learns, and its files are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from landmark_bench.cli import main
from landmark_bench.finetune import finetune
from landmark_bench.predict import load_detector


def test_tiny_scratch_beats_mean_shape_by_a_wide_margin(tiny_runs):
    learned, reference = tiny_runs["scratch"]["metrics"]["test"], tiny_runs["mean_shape"]["metrics"]["test"]
    assert learned["unit"] == "mm" and learned["n_images"] == 40
    assert learned["mre"] * 4 < reference["mre"], (learned["mre"], reference["mre"])
    assert learned["ere"] is not None and reference["ere"] is None
    assert tiny_runs["scratch"]["subset_ids"] == tiny_runs["mean_shape"]["subset_ids"]  # same images, any method


def test_validation_computes_ere_only_in_the_pass_that_ends_training(tiny_runs):
    run_dir = Path(tiny_runs["scratch"]["run_dir"])
    logged = pd.concat(pd.read_csv(path) for path in run_dir.glob("logs/**/metrics.csv"))
    passes = logged.dropna(subset=["val/mre"]).sort_values("step")
    assert len(passes) == 3  # tiny: 60 steps, a pass every 20
    assert passes["val/ere"].isna().tolist() == [True, True, False]
    assert tiny_runs["scratch"]["metrics"]["val"]["ere"] == pytest.approx(passes["val/ere"].iloc[-1])


def test_predictions_csv_reproduces_metrics_json_exactly(tiny_runs, tmp_path):
    run_dir = Path(tiny_runs["scratch"]["run_dir"])
    recorded = json.loads((run_dir / "metrics.json").read_text())["test"]
    out = tmp_path / "evaluated.json"
    assert main(["evaluate", "--dataset", "phantom", "--split", "test", "--predictions",
                 f"{run_dir}/predictions.csv", "--json", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    for key in ("mre", "mre_std", "sdr", "per_landmark_mre", "n_images", "unit"):
        assert evaluated[key] == recorded[key], key
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "done"
    for name in ("config.json", "errors.csv", "heatmaps.png", "checkpoints/best.ckpt"):
        assert (run_dir / name).is_file(), name


def test_unet_detector_read_at_stride_two_learns_and_predict_rebuilds_it(tiny_runs, tmp_path):
    record = finetune(method="scratch_unet", dataset="phantom", shots=10, seed=0, preset="tiny", out=tmp_path,
                      overrides={"finetune.diffusion_feature_stride": 2})
    reference = tiny_runs["mean_shape"]["metrics"]["test"]["mre"]
    assert record["metrics"]["test"]["mre"] * 1.5 < reference, (record["metrics"]["test"]["mre"], reference)
    model, _ = load_detector(tmp_path)  # strict load: the rebuilt backbone reads at the run's stride
    assert model.backbone.feature_stride == 2
    with torch.no_grad():
        assert model(torch.rand(1, 1, 80, 64)).shape == (1, model.hparams.num_landmarks, 80, 64)


def test_non_finite_loss_stops_with_a_failed_status(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        finetune(method="scratch", dataset="phantom", shots=5, seed=0, preset="tiny", out=tmp_path,
                 overrides={"finetune.lr": 1e30, "finetune.max_steps": 6, "finetune.warmup_steps": 1,
                            "finetune.val_every": 3})
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and "non-finite training loss" in status["reason"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "resnet", "--preset", "tiny"], "unknown method 'resnet'; valid methods: mean_shape, scratch, imagenet"),
        (["--method", "scratch", "--preset", "huge"], "unknown preset 'huge'; valid presets: tiny, cpu, paper"),
        (["--method", "scratch", "--preset", "tiny", "--dataset", "chest", "--shots", "50"],
         "shots=50 is larger than the training split (6 images)"),
        (["--method", "simclr", "--preset", "tiny"], "needs a pretraining checkpoint"),
    ],
)
def test_bad_settings_are_named(data_dir, tmp_path, capsys, args, message):
    assert main(["finetune", *args, "--data-dir", str(data_dir), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--seed", "one"), ("--shots", "2.5")])
def test_wrongly_typed_values_are_rejected_by_name(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--method", "scratch", flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
