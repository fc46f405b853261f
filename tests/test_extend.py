"""Extending the suite without editing it: a new dataset reader (and a new method) defined here, registered
through the public API, and run through pretrain, finetune, a sweep and the leaderboard at the tiny preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import json
import math

import torch
import torch.nn.functional as F

from landmark_bench.checkpoints import CheckpointError
from landmark_bench.cli import main
from landmark_bench.data.readers import DatasetReader, Record, check_landmarks, image_size
from landmark_bench.data.registry import register_dataset
from landmark_bench.finetune import finetune
from landmark_bench.methods import EncoderPretrainer, register
from landmark_bench.predict import load_detector
from landmark_bench.pretrain import pretrain


@register
class RotationPrediction(EncoderPretrainer):
    """A user's toy self-supervised method on the encoder: tell which of four right-angle turns a view was given."""

    name = "toy_rotation"

    def __init__(self, *, max_steps: int, encoder: str = "efficientnet_lite0", lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__(encoder=encoder, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps)
        self.save_hyperparameters()
        self.classifier = torch.nn.Linear(self.feature_dim, 4)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["views"][0]
        turns = torch.arange(len(images), device=images.device) % 4
        turned = torch.stack([torch.rot90(image, int(turn), dims=(1, 2)) for image, turn in zip(images, turns)])
        loss = F.cross_entropy(self.classifier(self(turned)), turns)
        self.track_loss(loss, batch_size=len(images))
        return loss

    def chance_loss(self) -> tuple[float, str]:
        return math.log(4), "ln(4)"


def test_a_new_method_runs_through_every_command(tiny_runs, tmp_path):
    record = pretrain(method="toy_rotation", datasets=["phantom"], preset="tiny", out=tmp_path / "pretrain",
                      overrides={"pretrain.toy_rotation.max_steps": 6})
    health = json.loads((tmp_path / "pretrain" / "health.json").read_text())
    assert health["chance_loss"] == pytest.approx(math.log(4)) and math.isfinite(health["final_loss"])
    tuned = finetune(method="toy_rotation", dataset="phantom", shots=10, seed=0, preset="tiny",
                     pretrained=record["checkpoint"], out=tmp_path / "finetune")
    assert tuned["metrics"]["test"]["mre"] * 1.5 < tiny_runs["mean_shape"]["metrics"]["test"]["mre"]
    sweep = ["sweep", "--methods", "mean_shape", "scratch", "toy_rotation", "--protocols", "finetune", "probe",
             "--datasets", "phantom", "--shots", "5", "--seeds", "0", "--preset", "tiny",
             "--out", str(tmp_path / "sweep"), "--set", "pretrain.toy_rotation.max_steps=3"]
    assert main([*sweep, "--dry-run"]) == 0
    assert main(sweep) == 0
    assert main(["leaderboard", str(tmp_path / "sweep")]) == 0
    board = pd.read_csv(tmp_path / "sweep" / "leaderboard" / "leaderboard.csv")
    rows = board[(board.method == "toy_rotation") & (board.split == "test")]
    assert set(rows.protocol) == {"finetune", "probe"} and set(rows.control) == {"scratch"}


def test_a_pretraining_setting_json_cannot_hold_comes_back_from_its_checkpoint(tmp_path, monkeypatch):
    pretrained = tmp_path / "pretrain" / "pretrained.ckpt"
    pretrain(method="toy_rotation", datasets=["phantom"], preset="tiny", out=pretrained.parent,
             overrides={"pretrain.toy_rotation.max_steps": 2})
    checkpoint = torch.load(pretrained, weights_only=True)
    checkpoint["hyper_parameters"]["feature_dtype"] = torch.float16  # a plugin's setting a checkpoint holds, JSON not
    torch.save(checkpoint, pretrained)
    run = tmp_path / "finetune"
    finetune(method="toy_rotation", dataset="phantom", shots=5, seed=0, preset="tiny", pretrained=str(pretrained),
             out=run, overrides={"finetune.max_steps": 2, "finetune.warmup_steps": 1, "finetune.val_every": 2})
    config = json.loads((run / "config.json").read_text())
    assert config["pretraining_hyper_parameters"]["feature_dtype"] == "torch.float16"
    assert config["pretraining_hyper_parameters_as_text"] == ["feature_dtype"]

    seen = []
    architecture = RotationPrediction.architecture
    monkeypatch.setattr(RotationPrediction, "architecture", classmethod(
        lambda cls, spec, hyper_parameters=None: seen.append(hyper_parameters) or architecture(spec, hyper_parameters)))
    load_detector(run)
    assert seen[-1]["feature_dtype"] is torch.float16 and seen[-1]["max_steps"] == 2
    pretrained.rename(tmp_path / "elsewhere.ckpt")
    with pytest.raises(CheckpointError, match="feature_dtype only as text"):
        load_detector(run)


@register_dataset
class DotsReader(DatasetReader):
    """A user's own layout: ``dots/images/<id>.png`` and ``dots/landmarks.csv`` (image_id, x0, y0, x1, y1)."""

    name = "dots"
    num_landmarks = 2
    landmark_names = ["left_dot", "right_dot"]
    spacing_mm = 0.5

    def __init__(self, data_dir: str | Path):
        super().__init__(data_dir)
        self.root = Path(data_dir) / "dots"

    def _split_records(self, split: str) -> list[Record]:
        table = pd.read_csv(self.root / "landmarks.csv", dtype={"image_id": str}).sort_values("image_id")
        parts = {"train": table.iloc[:24], "val": table.iloc[24:32], "test": table.iloc[32:]}
        records = []
        for row in parts[split].itertuples():
            path = self.root / "images" / f"{row.image_id}.png"
            size = image_size(path)
            points = np.array([[row.x0, row.y0], [row.x1, row.y1]], dtype=np.float64)
            where = f"{self.root / 'landmarks.csv'} row {row.image_id}"
            records.append(Record(self.name, row.image_id, path, size,
                                  check_landmarks(points, size, self.num_landmarks, where), self.spacing_mm))
        return records


@pytest.fixture(scope="module")
def dots_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 X-ray-sized-down images, each with two bright blobs at seeded places: the two landmarks."""
    root = tmp_path_factory.mktemp("user-data")
    (root / "dots" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:96, 0:72]
    table = []
    for index in range(40):
        left, right = rng.uniform([8, 12], [30, 84]), rng.uniform([42, 12], [64, 84])
        image = 30 + 10 * rng.standard_normal((96, 72))
        for x, y in (left, right):
            image += 200 * np.exp(-((columns - x) ** 2 + (rows - y) ** 2) / 8)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "dots" / "images" / f"{index:03d}.png")
        table.append({"image_id": f"{index:03d}", "x0": left[0], "y0": left[1], "x1": right[0], "y1": right[1]})
    pd.DataFrame(table).to_csv(root / "dots" / "landmarks.csv", index=False)
    return root


def test_a_new_dataset_runs_through_every_command(dots_dir, tmp_path, capsys):
    checkpoint = pretrain(method="simclr", datasets=["dots"], preset="tiny", data_dir=str(dots_dir),
                          out=tmp_path / "pretrain")["checkpoint"]
    runs = {method: finetune(method=method, dataset="dots", shots=10, seed=0, preset="tiny", data_dir=str(dots_dir),
                             out=tmp_path / method, pretrained=checkpoint if method == "simclr" else None)
            for method in ("mean_shape", "scratch", "simclr")}
    assert runs["scratch"]["metrics"]["test"]["n_images"] == 8
    assert runs["scratch"]["metrics"]["test"]["mre"] * 2 < runs["mean_shape"]["metrics"]["test"]["mre"]
    sweep = ["sweep", "--methods", "mean_shape", "scratch", "--datasets", "dots", "--shots", "5", "--seeds", "0",
             "--preset", "tiny", "--data-dir", str(dots_dir), "--out", str(tmp_path / "sweep")]
    assert main([*sweep, "--dry-run"]) == 0
    assert main(sweep) == 0
    assert main(["leaderboard", str(tmp_path / "sweep")]) == 0
    board = (tmp_path / "sweep" / "leaderboard" / "leaderboard.md").read_text()
    assert "dots, Test, 5 shots (mm)" in board and "scratch" in board


def test_plugins_named_in_the_environment_are_registered_for_the_commands(tmp_path, monkeypatch, capsys):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("from landmark_bench.methods import EncoderInitialisation, register\n\n"
                      "@register\nclass MyWeights(EncoderInitialisation):\n    name = 'my_weights'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LANDMARK_BENCH_PLUGINS", "my_plugin")
    assert main(["sweep", "--methods", "scratch", "my_weights", "--preset", "tiny", "--shots", "5", "--seeds", "0",
                 "--out", str(tmp_path / "sweep"), "--dry-run"]) == 0
    assert "finetune my_weights phantom 5-shot seed 0" in capsys.readouterr().out
    monkeypatch.setenv("LANDMARK_BENCH_PLUGINS", "no_such_plugin")
    with pytest.raises(SystemExit, match="no_such_plugin"):
        main(["--version"])
