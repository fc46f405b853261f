"""Beyond one dataset: a sweep's detectors scored on another dataset with the same landmarks (``--eval-datasets``,
two small phantoms of different seeds), and each method's mean rank across the datasets of a sweep (hand-made
results with known ranks)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from landmark_bench.cli import main
from landmark_bench.data.registry import DATASETS, PhantomReader
from landmark_bench.evaluation import evaluate_predictions
from landmark_bench.leaderboard import (
    build_leaderboard, build_tables, generalisation_table, rank_across_datasets, read_results,
)
from landmark_bench.predict import predict


def small_phantom(name: str, seed: int) -> type[PhantomReader]:
    """A phantom dataset of its own name: few images, its anatomy and pose drawn from ``seed``."""

    class SmallPhantom(PhantomReader):
        def __init__(self, data_dir: str | None = None):
            super().__init__(data_dir, seed=seed, num_train=10, num_val=4, num_test=6)

    SmallPhantom.name = name
    return SmallPhantom


@pytest.fixture
def phantoms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATASETS, "phantom_a", small_phantom("phantom_a", 0))
    monkeypatch.setitem(DATASETS, "phantom_b", small_phantom("phantom_b", 1))


def test_sweep_scores_its_detectors_on_another_dataset(phantoms, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--methods", "mean_shape", "scratch", "--datasets", "phantom_a", "--eval-datasets",
                 "phantom_b", "--shots", "5", "--seeds", "0", "1", "--preset", "tiny", "--out", str(out),
                 "--set", "finetune.max_steps=6", "finetune.val_every=3"]) == 0
    printed = capsys.readouterr().out
    assert "# Generalisation across datasets" in printed and "generalisation_csv:" in printed
    table = pd.read_csv(out / "leaderboard" / "generalisation.csv", dtype={"shots": str})
    assert table[["method", "protocol", "trained_on", "evaluated_on"]].values.tolist() == [
        ["scratch", "finetune", "phantom_a", "phantom_a"], ["scratch", "finetune", "phantom_a", "phantom_b"]]
    assert set(table["n_seeds"]) == {2} and set(table["unit"]) == {"mm"}
    results = read_results(out / "results.csv")
    runs = results[results["method"] == "scratch"].sort_values("seed")
    direct = []
    for run_dir in runs["run_dir"]:
        records = predict(run_dir, tmp_path / "direct.csv", dataset="phantom_b", data_dir=None)
        direct.append(evaluate_predictions(tmp_path / "direct.csv", records)["mre"])
    for evaluated, values in (("phantom_a", runs["test_mre"].to_numpy()), ("phantom_b", np.array(direct))):
        row = table[table["evaluated_on"] == evaluated].iloc[0]
        assert row["mre_mean"] == pytest.approx(values.mean(), abs=1e-9)
        assert row["mre_std"] == pytest.approx(values.std(ddof=1), abs=1e-9)
    text = (out / "leaderboard" / "generalisation.md").read_text()
    assert "| Method | Protocol | phantom_a → phantom_a (mm) | phantom_a → phantom_b (mm) |" in text
    own = runs["test_mre"]
    assert (f"| scratch | finetune | {own.mean():.2f} ± {own.std():.2f} | {np.mean(direct):.2f} ± "
            f"{np.std(direct, ddof=1):.2f} |") in text


def test_eval_dataset_with_other_landmarks_is_refused_before_running(data_dir, tmp_path, capsys):
    assert main(["sweep", "--methods", "scratch", "--datasets", "phantom", "--eval-datasets", "aasce2019",
                 "--data-dir", str(data_dir), "--preset", "tiny", "--out", str(tmp_path / "sweep")]) == 2
    error = capsys.readouterr().err
    assert "'phantom' (12 landmarks)" in error and "'aasce2019' (68 landmarks)" in error
    assert not (tmp_path / "sweep").exists()


def test_incomplete_cell_of_the_generalisation_table_is_not_averaged():
    runs = pd.DataFrame([{"method": "scratch", "protocol": "finetune", "dataset": "a", "eval_dataset": evaluated,
                          "shots": "10", "seed": seed, "split": "test", "unit": "px", "mre": 1.0 + seed}
                         for evaluated in ("a", "b") for seed in (0, 1) if (evaluated, seed) != ("b", 1)])
    table = generalisation_table(runs)
    assert table["incomplete"].tolist() == [False, True] and table["mre_mean"].iloc[0] == pytest.approx(1.5)
    assert math.isnan(table["mre_mean"].iloc[1])


# Mean MRE per (dataset, method) at finetune, 10 shots; the two seeds are the mean -/+ 0.1. Ranks by hand:
# alpha: imagenet 1, scratch 2, ddpm 3, dino 4; beta (dino incomplete): scratch 1, ddpm 2, imagenet 3;
# gamma: ddpm 1, scratch and imagenet tied at 2.5, dino 4. Mean ranks: scratch 11/6, ddpm 2, imagenet 13/6, dino none.
MRE = {"alpha": {"scratch": 2.0, "imagenet": 1.0, "ddpm": 3.0, "dino": 4.0},
       "beta": {"scratch": 10.0, "imagenet": 30.0, "ddpm": 20.0, "dino": 5.0},
       "gamma": {"scratch": 5.0, "imagenet": 5.0, "ddpm": 1.0, "dino": 9.0}}
UNITS = {"alpha": "mm", "beta": "px", "gamma": "px"}


def hand_made_results(path: Path) -> Path:
    rows = []
    for dataset, methods in MRE.items():
        for method, mre in methods.items():
            for seed, delta in ((0, -0.1), (1, 0.1)):
                failed = dataset == "beta" and method == "dino" and seed == 1
                rows.append({"method": method, "protocol": "finetune", "dataset": dataset, "shots": "10",
                             "seed": seed, "status": "failed" if failed else "done", "reason": "",
                             "run_dir": str(path / "none"), "unit": UNITS[dataset],
                             "test_mre": np.nan if failed else mre + delta})
    # Cells one dataset only has: no ranks across datasets for them.
    rows.append({**rows[0], "shots": "25"})
    rows.append({**rows[0], "protocol": "probe"})
    pd.DataFrame(rows).to_csv(path / "results.csv", index=False)
    return path / "results.csv"


def test_mean_rank_across_datasets(tmp_path):
    results = hand_made_results(tmp_path)
    ranks = rank_across_datasets(build_tables(read_results(results)))
    assert set(zip(ranks["protocol"], ranks["shots"])) == {("finetune", "10")}
    rank = ranks.set_index(["dataset", "method"])["rank"]
    assert rank["alpha"].to_dict() == {"scratch": 2, "imagenet": 1, "ddpm": 3, "dino": 4}
    assert rank["gamma"].to_dict() == {"scratch": 2.5, "imagenet": 2.5, "ddpm": 1, "dino": 4}
    assert math.isnan(rank["beta", "dino"]) and rank["beta", "imagenet"] == 3
    mean_rank = ranks.groupby("method")["mean_rank"].first()
    assert mean_rank[["scratch", "ddpm", "imagenet"]].tolist() == pytest.approx([11 / 6, 2, 13 / 6])
    assert math.isnan(mean_rank["dino"])

    paths = build_leaderboard(results, tmp_path / "leaderboard")
    assert pd.read_csv(paths["across_datasets"]).shape[0] == 12
    text = paths["markdown"].read_text()
    section = text[text.index("## Across datasets: finetune, 10 shots"):]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Method | Mean rank | alpha MRE (mm) | beta MRE (px) | gamma MRE (px) |"
    assert [line.split(" | ")[0][2:] for line in lines[1:5]] == ["scratch", "ddpm", "imagenet", "dino"]
    assert lines[1] == "| scratch | 1.83 | 2.00 ± 0.14 (2) | 10.00 ± 0.14 (1) | 5.00 ± 0.14 (2.5) |"
    assert lines[4].startswith("| dino | – | 4.00 ± 0.14 (4) | – |")
    assert "Across datasets: probe" not in text and "Across datasets: finetune, 25 shots" not in text


def test_leaderboard_over_one_sweep_per_dataset_ranks_across_them(tmp_path, capsys):
    """Sweeps run apart, one per dataset, give through ``landmark-bench leaderboard A B --out`` the same mean ranks
    as one sweep holding every row; a job done in two of them is an error naming both files."""
    together = pd.read_csv(hand_made_results(tmp_path))
    for dataset, rows in together.groupby("dataset"):
        (tmp_path / dataset).mkdir()
        rows.to_csv(tmp_path / dataset / "results.csv", index=False)
    folders = [str(tmp_path / dataset) for dataset in sorted(MRE)]
    assert main(["leaderboard", *folders, "--out", str(tmp_path / "apart")]) == 0
    expected = build_leaderboard(tmp_path / "results.csv", tmp_path / "together")
    assert (tmp_path / "apart" / "across_datasets.csv").read_text() == expected["across_datasets"].read_text()
    assert "## Across datasets: finetune, 10 shots" in capsys.readouterr().out

    assert main(["leaderboard", *folders]) != 0
    assert "--out" in capsys.readouterr().err
    assert main(["leaderboard", folders[0], folders[0], "--out", str(tmp_path / "twice")]) != 0
    error = capsys.readouterr().err
    assert "several done rows for one job" in error and error.count(f"{folders[0]}/results.csv") == 2
    assert not (tmp_path / "twice").exists()
