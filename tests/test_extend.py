"""Extending the suite without editing it: a new dataset reader (and a new method) defined here, registered
through the public API, and run through pretrain, finetune, a sweep and the leaderboard at the tiny preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmark_bench.cli import main
from landmark_bench.data.readers import DatasetReader, Record, check_landmarks, image_size
from landmark_bench.data.registry import register_dataset
from landmark_bench.finetune import finetune
from landmark_bench.pretrain import pretrain


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
