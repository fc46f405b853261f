"""``landmark-bench evaluate``: inter-observer error on ISBI, and bad predictions files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from landmark_bench.cli import main


def run_cli(*args: str) -> int:
    return main([str(arg) for arg in args])


def test_junior_against_senior_is_the_inter_observer_error(data_dir, tmp_path, capsys):
    results = {}
    for split in ("test1", "test2"):
        junior = tmp_path / f"junior-{split}.csv"
        assert run_cli("annotations", "--dataset", "isbi2015", "--data-dir", data_dir, "--split", split,
                       "--ground-truth", "junior", "--out", junior) == 0
        out = tmp_path / f"{split}.json"
        assert run_cli("evaluate", "--dataset", "isbi2015", "--data-dir", data_dir, "--split", split,
                       "--ground-truth", "senior", "--predictions", junior, "--json", out) == 0
        results[split] = json.loads(out.read_text())
        assert results[split]["unit"] == "mm" and results[split]["n_images"] == {"test1": 150, "test2": 100}[split]
        # two doctors disagree by about 1-3 mm on average: not zero, not a mis-registration
        assert 0.5 < results[split]["mre"] < 3.5
        assert 0 < results[split]["sdr"]["2.0"] < results[split]["sdr"]["4.0"] <= 100
    printed = capsys.readouterr().out
    assert "MRE" in printed and "SDR@2.0mm" in printed
    senior = tmp_path / "senior.csv"
    run_cli("annotations", "--dataset", "isbi2015", "--data-dir", data_dir, "--split", "test1",
            "--ground-truth", "senior", "--out", senior)
    out = tmp_path / "self.json"
    run_cli("evaluate", "--dataset", "isbi2015", "--data-dir", data_dir, "--split", "test1",
            "--ground-truth", "senior", "--predictions", senior, "--json", out)
    assert json.loads(out.read_text())["mre"] == 0.0


@pytest.fixture()
def chest_predictions(data_dir, tmp_path):
    path = tmp_path / "truth.csv"
    assert run_cli("annotations", "--dataset", "chest", "--data-dir", data_dir, "--split", "test", "--out", path) == 0
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda frame: frame.drop(index=4), "1 rows missing"),
        (lambda frame: pd.concat([frame, frame.iloc[[3]]]), "line 20: duplicate row"),
        (lambda frame: frame.assign(image_id=frame.image_id.where(frame.index != 2, "CHNCXR_9999_0")),
         "line 4: unknown image_id 'CHNCXR_9999_0'"),
        (lambda frame: frame.assign(x=frame.x.astype(object).where(frame.index != 0, "left")), "line 2: non-numeric"),
        (lambda frame: frame.assign(landmark=frame.landmark.where(frame.index != 1, 6)), "line 3: landmark 6"),
        (lambda frame: frame.drop(columns="y"), "missing columns"),
    ],
)
def test_bad_predictions_file_names_file_and_row(data_dir, chest_predictions, tmp_path, capsys, edit, message):
    assert run_cli("evaluate", "--dataset", "chest", "--data-dir", data_dir, "--split", "test",
                   "--predictions", chest_predictions) == 0
    assert "MRE    0.000" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    edit(pd.read_csv(chest_predictions, dtype={"image_id": str})).to_csv(bad, index=False)
    out = tmp_path / "never.json"
    assert run_cli("evaluate", "--dataset", "chest", "--data-dir", data_dir, "--split", "test",
                   "--predictions", bad, "--json", out) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and pd.Series([error]).str.contains(message).all(), error
    assert not out.exists()  # nothing half-written
