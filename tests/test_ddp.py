"""A fine-tune under two-process DDP (gloo on CPU) gives the metrics of a single-process evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning.pytorch as L
import pytest
import torch

from landmark_bench.data.datamodule import LandmarkDataModule
from landmark_bench.evaluation import LandmarkEvaluation
from landmark_bench.methods import build_backbone
from landmark_bench.models.detector import LandmarkDetector
from landmark_bench.presets import get_preset


def test_ddp_fine_tune_matches_single_process_evaluation(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "landmark_bench.cli", "finetune", "--method", "scratch", "--dataset", "phantom",
               "--shots", "5", "--seed", "0", "--preset", "tiny", "--devices", "2", "--accelerator", "cpu",
               "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)  # below pytest's 600 s
    assert finished.returncode == 0, finished.stderr[-3000:]
    recorded = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert "world_size=2" in finished.stderr or "distributed_backend=gloo" in finished.stderr

    cfg = get_preset("tiny")["finetune"]
    datamodule = LandmarkDataModule("phantom", shots=5, seed=0, resolution=cfg["resolution"], batch_size=3,
                                    sigma=cfg["sigma"])
    model = LandmarkDetector(backbone=build_backbone("scratch"), num_landmarks=datamodule.reader.num_landmarks,
                             refine_window=cfg["refine_window"])
    state = torch.load(run["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    evaluation = LandmarkEvaluation(tmp_path / "single")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[evaluation])
    trainer.test(model, datamodule=datamodule, verbose=False)
    single = evaluation.results["test"]
    assert single["n_images"] == recorded["test"]["n_images"] == 40  # no sample counted twice under DDP
    for key in ("mre", "mre_std", "ere"):
        assert single[key] == pytest.approx(recorded["test"][key], rel=1e-6, abs=1e-9), key
    assert {str(key): value for key, value in single["sdr"].items()} == recorded["test"]["sdr"]
