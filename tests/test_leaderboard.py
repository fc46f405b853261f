"""Leaderboards and figures from synthetic sweep rows, per-image errors and overlays.

The synthetic sweep: ISBI (mm; test1, test2, pooled test; shots 10 and 25) and AASCE (px; test;
shots 10 and all), three seeds. Per-seed metric values are chosen so that means/stds are known by
hand; per-image errors make ``ddpm`` equal to the best method up to symmetric noise and ``scratch``
clearly worse. ``moco`` fails one seed at ISBI 10 shots with values that would win if averaged;
``dino`` has no ``errors.csv``.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from landmark_bench.leaderboard import PER_IMAGE_CSV, ablation_markdown, build_leaderboard, read_results

SEEDS = (0, 1, 2)
MM_THRESHOLDS = ("2.0", "2.5", "3.0", "4.0")
PX_THRESHOLDS = ("5.0", "10.0", "20.0", "40.0")
IMAGES = {"test1": [str(i) for i in range(151, 159)], "test2": [str(i) for i in range(301, 309)],
          "test": [f"a{i:02d}" for i in range(6)]}
LANDMARK_OFFSETS = np.array([-0.1, 0.0, 0.1])  # zero mean: a per-image MRE is its level exactly

# ISBI test1 at 10 shots, per seed; other splits and shots are shifted copies (see SPLIT_SHIFT, SHOTS_SHIFT).
# SDR: per threshold, the mean over seeds (seeds add -2, 0, +2).
ISBI = {
    "mean_shape": {"mre": [4.0, 4.2, 4.4], "ere": None, "sdr": [10, 15, 20, 30], "level": 4.0},
    "scratch": {"mre": [2.6, 2.8, 3.0], "ere": [3.0, 3.1, 3.2], "sdr": [40, 50, 60, 70], "level": 2.8},
    "moco": {"mre": [1.0, 1.0, 1.0], "ere": [1.0, 1.0, 1.0], "sdr": [90, 92, 94, 96], "level": 1.0},
    "dino": {"mre": [2.0, 2.1, 2.2], "ere": [2.4, 2.5, 2.6], "sdr": [60, 65, 70, 80], "level": 2.0},
    "ddpm": {"mre": [1.65, 1.45, 1.55], "ere": [1.9, 1.9, 1.9], "sdr": [76, 78, 82, 88], "level": 1.5},
    "cdpm_align": {"mre": [1.4, 1.5, 1.6], "ere": [2.0, 2.1, 2.2], "sdr": [72, 80, 86, 92], "level": 1.5},
}
AASCE = {
    "mean_shape": {"mre": [30.0, 31.0, 32.0], "ere": None, "sdr": [5, 10, 30, 60], "level": 31.0},
    "scratch": {"mre": [14.0, 15.0, 16.0], "ere": [16.0, 17.0, 18.0], "sdr": [20, 40, 60, 80], "level": 15.0},
    "cdpm_align": {"mre": [9.0, 10.0, 11.0], "ere": [12.0, 12.0, 12.0], "sdr": [30, 55, 80, 95], "level": 10.0},
}
SPLIT_SHIFT = {"test1": 0.0, "test2": 0.4, "test": 0.2}
SHOTS_SHIFT = {"10": 0.0, "25": -0.2, "all": -1.0}
INTER_OBSERVER = {"test1": 1.0, "test2": 1.2, "test": 1.1}  # better than every method: still never best


def _metrics(values: dict, split: str, shots: str, seed: int, thresholds: tuple[str, ...]) -> dict:
    shift = SPLIT_SHIFT[split] + SHOTS_SHIFT[shots]
    row = {f"{split}_mre": values["mre"][seed] + shift, f"{split}_mre_std": 0.5,
           f"{split}_ere": np.nan if values["ere"] is None else values["ere"][seed] + shift}
    row.update({f"{split}_sdr_{t}": sdr + 2 * (seed - 1) for t, sdr in zip(thresholds, values["sdr"])})
    return row


def _write_errors(run_dir: Path, method: str, level: float, seed: int, parts: list[str], unit: str) -> None:
    """Per-image errors: the method's level plus an image pattern shared by all methods, plus (except for
    the best) per-image noise that is exactly symmetric (+e and -e), i.e. equal to the best within noise."""
    rng = np.random.default_rng(zlib.crc32(f"{method}-{seed}".encode()))
    rows = []
    for part in parts:
        images = IMAGES[part]
        half = rng.normal(0.0, 0.1, len(images) // 2)
        noise = np.zeros(len(images)) if method == "cdpm_align" else rng.permutation(np.r_[half, -half])
        for index, image_id in enumerate(images):
            image_level = level + 0.3 * np.sin(index) + 0.1 * seed + noise[index]
            for landmark, offset in enumerate(LANDMARK_OFFSETS):
                rows.append((part, image_id, landmark, f"L{landmark}", 10.0, 20.0, image_level + offset,
                             np.nan if method == "mean_shape" else 2.0, unit))
    columns = ["split", "image_id", "landmark", "name", "x", "y", "radial_error", "ere", "unit"]
    pd.DataFrame(rows, columns=columns).to_csv(run_dir / "errors.csv", index=False)


def _write_overlay(run_dir: Path, method: str, image_id: str) -> None:
    rng = np.random.default_rng(0)
    arrays = {"image": rng.random((40, 32), dtype=np.float32), "pred": np.array([[5.0, 6.0], [20.0, 30.0]]),
              "truth": np.array([[6.0, 6.0], [21.0, 29.0]]), "image_id": np.array(image_id)}
    if method != "mean_shape":
        arrays["heatmap"] = rng.random((40, 32), dtype=np.float32)
    np.savez(run_dir / "overlay.npz", **arrays)


def write_sweep(root: Path) -> Path:
    rows = []
    for dataset, methods, unit, thresholds, parts, splits, all_shots in (
        ("isbi2015", ISBI, "mm", MM_THRESHOLDS, ["test1", "test2"], ["test1", "test2", "test"], ["10", "25"]),
        ("aasce2019", AASCE, "px", PX_THRESHOLDS, ["test"], ["test"], ["10", "all"]),
    ):
        for method, values in methods.items():
            for shots in all_shots:
                for seed in SEEDS:
                    run_dir = root / "runs" / f"{method}-{dataset}-{shots}-{seed}"
                    run_dir.mkdir(parents=True)
                    row = {"method": method, "dataset": dataset, "shots": shots, "seed": seed, "preset": "tiny",
                           "run_dir": str(run_dir), "unit": unit, "status": "done", "reason": ""}
                    if method == "moco" and shots == "10" and seed == 2:
                        rows.append({**row, "status": "failed", "reason": "CUDA out of memory"})
                        continue
                    row["val_mre"] = 1.0  # model selection only: never on a leaderboard
                    for split in splits:
                        row.update(_metrics(values, split, shots, seed, thresholds))
                    rows.append(row)
                    if method != "dino":
                        _write_errors(run_dir, method, values["level"] + SHOTS_SHIFT[shots], seed, parts, unit)
                    _write_overlay(run_dir, method, IMAGES[parts[0]][0])
    reference = {"method": "inter_observer", "dataset": "isbi2015", "shots": "", "seed": np.nan,
                 "status": "done", "reason": "", "run_dir": "", "unit": "mm"}
    for split, mre in INTER_OBSERVER.items():
        reference.update({f"{split}_mre": mre, f"{split}_ere": np.nan,
                          **{f"{split}_sdr_{t}": 99.0 for t in MM_THRESHOLDS}})
    rows.append(reference)
    path = root / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def built(sweep: Path) -> dict[str, Path]:
    return build_leaderboard(sweep, sweep.parent / "leaderboard")


@pytest.fixture(scope="module")
def board(built: dict[str, Path]) -> pd.DataFrame:
    return pd.read_csv(built["csv"], dtype={"shots": str})


def row(board: pd.DataFrame, method: str, dataset: str = "isbi2015", split: str = "test1",
        shots: str = "10") -> pd.Series:
    match = board[(board.dataset == dataset) & (board.split == split) & (board.shots == shots)
                  & (board.method == method)]
    assert len(match) == 1, (method, dataset, split, shots)
    return match.iloc[0]


def markdown_table(text: str, title: str) -> list[str]:
    """The table lines of the Markdown section whose heading starts with ``title``."""
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_means_and_stds_over_seeds(board: pd.DataFrame) -> None:
    best = row(board, "cdpm_align")
    assert best.mre_mean == pytest.approx(1.5) and best.mre_std == pytest.approx(0.1)
    assert best.ere_mean == pytest.approx(2.1) and best.ere_std == pytest.approx(0.1)
    assert best["sdr_2.0"] == pytest.approx(72.0) and best["sdr_4.0"] == pytest.approx(92.0)
    assert best.n_seeds == 3 and not best.incomplete
    ddpm = row(board, "ddpm")
    assert ddpm.mre_mean == pytest.approx(1.55) and ddpm.mre_std == pytest.approx(0.1)
    assert np.isnan(row(board, "mean_shape").ere_mean)
    # Each split reads its own columns; shots are separate tables.
    assert row(board, "cdpm_align", split="test2").mre_mean == pytest.approx(1.9)
    assert row(board, "cdpm_align", split="test").mre_mean == pytest.approx(1.7)
    assert row(board, "cdpm_align", shots="25").mre_mean == pytest.approx(1.3)
    assert row(board, "scratch", dataset="aasce2019", split="test", shots="all").mre_mean == pytest.approx(14.2)


def test_one_table_per_split_and_shots_in_order(board: pd.DataFrame, built: dict[str, Path]) -> None:
    tables = board[["dataset", "shots", "split"]].drop_duplicates().values.tolist()
    assert tables == [["aasce2019", "10", "test"], ["aasce2019", "all", "test"],
                      ["isbi2015", "10", "test1"], ["isbi2015", "10", "test2"], ["isbi2015", "10", "test"],
                      ["isbi2015", "25", "test1"], ["isbi2015", "25", "test2"], ["isbi2015", "25", "test"]]
    assert set(board.loc[board.dataset == "aasce2019", "unit"]) == {"px"}
    assert row(board, "scratch", dataset="aasce2019", split="test")[["sdr_5.0", "sdr_40.0"]].notna().all()
    assert "val" not in set(board.split)
    text = built["markdown"].read_text()
    assert markdown_table(text, "isbi2015, Test1, 10 shots (mm)")[0].startswith("| Method | MRE (mm) | SDR 2 mm (%)")
    assert "## aasce2019, Test, all training images (px)" in text


def test_best_marked_per_column(board: pd.DataFrame, built: dict[str, Path]) -> None:
    table = board[(board.dataset == "isbi2015") & (board.split == "test1") & (board.shots == "10")]
    best = {column: table.loc[table[column], "method"].tolist()
            for column in ["best_mre", "best_ere", "best_sdr_2.0", "best_sdr_2.5", "best_sdr_4.0"]}
    assert best == {"best_mre": ["cdpm_align"], "best_ere": ["ddpm"], "best_sdr_2.0": ["ddpm"],
                    "best_sdr_2.5": ["cdpm_align"], "best_sdr_4.0": ["cdpm_align"]}
    lines = markdown_table(built["markdown"].read_text(), "isbi2015, Test1, 10 shots")
    cdpm = next(line for line in lines if line.startswith("| cdpm_align "))
    ddpm = next(line for line in lines if line.startswith("| ddpm "))
    assert "**1.50 ± 0.10**" in cdpm and "**80.0**" in cdpm and "**72.0**" not in cdpm
    assert "**76.0**" in ddpm and "**1.90 ± 0.00**" in ddpm and "**1.55" not in ddpm
    assert sum(line.count("**") for line in lines) // 2 == 6  # MRE, ERE and four SDR columns


def test_inter_observer_set_apart_never_best(board: pd.DataFrame, built: dict[str, Path]) -> None:
    reference = board[board.method == "inter_observer"]
    assert len(reference) == 6 and set(reference.dataset) == {"isbi2015"}  # every ISBI table, no other
    assert not reference.filter(like="best_").eq(True).to_numpy().any()
    assert reference["p_value"].isna().all() and reference["reference"].all()
    assert row(board, "inter_observer", split="test2", shots="25").mre_mean == pytest.approx(1.2)
    lines = markdown_table(built["markdown"].read_text(), "isbi2015, Test (pooled), 25 shots")
    assert lines[-1].startswith("| *inter-observer (reference)* | 1.10 |") and "**" not in lines[-1]
    latex = built["latex"].read_text()
    assert latex.count("\\midrule\n\\textit{inter-observer (reference)}") == 6


def test_failed_seed_is_incomplete_not_averaged(board: pd.DataFrame, built: dict[str, Path], sweep: Path) -> None:
    moco = row(board, "moco")
    assert moco.incomplete and moco.n_seeds == 2 and moco.n_expected == 3
    assert np.isnan(moco.mre_mean) and not moco.best_mre and np.isnan(moco.p_value)
    assert not row(board, "moco", shots="25").incomplete  # only the cell with the failure
    text = built["markdown"].read_text()
    line = next(line for line in markdown_table(text, "isbi2015, Test1, 10 shots") if line.startswith("| moco "))
    assert "incomplete (2/3)" in line and "1.00" not in line
    assert "moco: incomplete, 2/3 seeds with test1 results (seed 2: failed, CUDA out of memory)" in text
    # With two seeds expected the same rows are complete: averaged, and (values of 1.0) the best.
    relaxed = build_leaderboard(sweep, sweep.parent / "relaxed", expected_seeds=2)
    relaxed_moco = row(pd.read_csv(relaxed["csv"], dtype={"shots": str}), "moco")
    assert not relaxed_moco.incomplete and relaxed_moco.mre_mean == pytest.approx(1.0) and relaxed_moco.best_mre


def test_paired_test_separates_equal_from_worse(board: pd.DataFrame, built: dict[str, Path]) -> None:
    for split, pairs in (("test1", 24), ("test", 48)):  # pooled test pairs the images of both parts
        ddpm, scratch = row(board, "ddpm", split=split), row(board, "scratch", split=split)
        assert ddpm.compared_to == "cdpm_align" and ddpm.n_pairs == pairs and scratch.n_pairs == pairs
        assert ddpm.p_value >= 0.05 and ddpm.not_different
        assert scratch.p_value < 0.001 and not scratch.not_different
    assert np.isnan(row(board, "cdpm_align").p_value)
    assert np.isnan(row(board, "dino").p_value) and not row(board, "dino").not_different
    text = built["markdown"].read_text()
    lines = markdown_table(text, "isbi2015, Test1, 10 shots")
    assert next(line for line in lines if line.startswith("| ddpm ")).split("|")[2].strip().endswith("†")
    assert "†" not in next(line for line in lines if line.startswith("| scratch "))
    assert "dino: no errors.csv for seed(s) 0, 1, 2; significance test skipped" in text
    assert "Wilcoxon signed-rank" in text


def test_latex_is_structurally_sound(built: dict[str, Path]) -> None:
    latex = built["latex"].read_text()
    unescaped = re.sub(r"\\[{}]", "", latex)
    depth = 0
    for char in unescaped:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0
    tables = latex.split("\\begin{table}")[1:]
    assert len(tables) == 8 and latex.count("\\end{table}") == 8
    for table in tables:
        assert table.count("\\toprule") == 1 and table.count("\\bottomrule") == 1 and "\\midrule" in table
        assert "\\textbf{" in table and "Wilcoxon signed-rank" in table and "\\caption{" in table
        body = table.split("\\toprule", 1)[1].split("\\bottomrule", 1)[0]
        columns = {line.count("&") for line in body.splitlines() if line.endswith("\\\\")}
        assert len(columns) == 1  # every row as wide as the header
    assert re.search(r"(?<!\\)_", latex.replace("\\_", "")) is None  # method names escaped
    assert "cdpm\\_align" in latex and "(mm)" in latex and "(px)" in latex


def test_figures_are_written(built: dict[str, Path]) -> None:
    names = {"mre_vs_shots_isbi2015", "ere_vs_shots_isbi2015", "mre_vs_shots_aasce2019", "ere_vs_shots_aasce2019",
             "overlays"}
    assert names <= set(built)
    for name in names:
        assert built[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(built[name])
        assert pixels.std() > 0.01  # something is drawn
    overlays = matplotlib.image.imread(built["overlays"])
    assert overlays.shape[1] > 2 * overlays.shape[0]  # two datasets (rows) by six methods (columns)


def test_overlays_of_different_images_rejected(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path)
    _write_overlay(tmp_path / "runs" / "ddpm-isbi2015-10-0", "ddpm", "999")
    with pytest.raises(ValueError, match="different images"):
        build_leaderboard(sweep, tmp_path / "out")


def test_two_done_rows_for_one_job_rejected(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path)
    frame = pd.read_csv(sweep, dtype={"shots": str})
    retried = frame[(frame.method == "moco") & (frame.shots == "10") & (frame.seed == 2)].assign(status="done")
    pd.concat([frame, retried]).to_csv(sweep, index=False)
    assert read_results(sweep).query("method == 'moco' and shots == '10' and seed == 2").status.tolist() == ["done"]
    pd.concat([frame, frame.iloc[[0]]]).to_csv(sweep, index=False)
    with pytest.raises(ValueError, match="several done rows"):
        read_results(sweep)


def test_reference_row_of_two_sweeps_of_one_dataset_counts_once(tmp_path: Path) -> None:
    """The 10- and 25-shot sweeps of ISBI each write the inter-observer row: read together it is one reference."""
    sweep = write_sweep(tmp_path)
    frame = pd.read_csv(sweep, dtype={"shots": str})
    reference = frame.method.eq("inter_observer")
    assert reference.sum() == 1
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    frame[~frame.shots.eq("25")].to_csv(first, index=False)
    frame[frame.shots.eq("25") | reference].to_csv(second, index=False)
    both = read_results(first, second)
    assert both.method.eq("inter_observer").sum() == 1 and len(both) == len(frame)
    assert "inter-observer (reference)" in build_leaderboard([first, second], tmp_path / "out")["markdown"].read_text()
    frame.loc[reference, "test_mre"] += 0.5  # a reference that differs between the two is not silently picked
    frame[frame.shots.eq("25") | reference].to_csv(second, index=False)
    with pytest.raises(ValueError, match="several done rows"):
        read_results(first, second)


# A two-protocol sweep with both random-init controls: per-image MRE levels built by hand per (protocol, method),
# (seed, image), so each gain and its p-value can be recomputed here from the same numbers.
PROTOCOL_SEEDS = (0, 1, 2)
PROTOCOL_IMAGES = [f"img{i:02d}" for i in range(8)]
PROTOCOL_BASES = {
    "finetune": {"mean_shape": 6.0, "scratch": 3.0, "simclr": 2.8, "scratch_unet": 3.2, "ddpm": 3.0, "cdpm_align": 2.9},
    "probe": {"scratch": 7.0, "simclr": 4.5, "scratch_unet": 7.5, "ddpm": 4.8, "cdpm_align": 4.4},
}
NO_ERRORS = ("probe", "cdpm_align", 1)  # a run whose errors.csv is missing: gain shown, not tested


def protocol_levels() -> dict[tuple[str, str], np.ndarray]:
    """(protocol, method) -> per-image MRE, shape (seeds, images)."""
    rng = np.random.default_rng(14)
    return {(protocol, method): base + rng.normal(0.0, 0.3, (len(PROTOCOL_SEEDS), len(PROTOCOL_IMAGES)))
            for protocol, bases in PROTOCOL_BASES.items() for method, base in bases.items()}


def write_protocol_sweep(root: Path) -> Path:
    rows = []
    for (protocol, method), levels in protocol_levels().items():
        for seed in PROTOCOL_SEEDS:
            name = f"{method}-isbi2015-10shot-seed{seed}" if protocol == "finetune" else \
                f"{method}-probe-isbi2015-10shot-seed{seed}"
            run_dir = root / "runs" / name
            run_dir.mkdir(parents=True)
            rows.append({"method": method, "dataset": "isbi2015", "shots": "10", "protocol": protocol, "seed": seed,
                         "run_dir": str(run_dir), "unit": "mm", "status": "done", "reason": "",
                         "test_mre": levels[seed].mean(), "test_mre_std": 0.5,
                         "test_ere": np.nan if method == "mean_shape" else levels[seed].mean() + 1.0,
                         "test_sdr_2.0": 50.0})
            if (protocol, method, seed) == NO_ERRORS:
                continue
            errors = pd.DataFrame({"split": "test", "image_id": PROTOCOL_IMAGES, "landmark": 0, "name": "L0",
                                   "x": 1.0, "y": 1.0, "radial_error": levels[seed], "ere": np.nan, "unit": "mm"})
            errors.to_csv(run_dir / "errors.csv", index=False)
    path = root / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def protocol_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_protocol_sweep(tmp_path_factory.mktemp("protocols"))


@pytest.fixture(scope="module")
def protocol_built(protocol_sweep: Path) -> dict[str, Path]:
    return build_leaderboard(protocol_sweep, protocol_sweep.parent / "leaderboard")


@pytest.fixture(scope="module")
def protocol_board(protocol_built: dict[str, Path]) -> pd.DataFrame:
    return pd.read_csv(protocol_built["csv"], dtype={"shots": str})


def protocol_row(board: pd.DataFrame, method: str, protocol: str) -> pd.Series:
    match = board[(board.method == method) & (board.protocol == protocol)]
    assert len(match) == 1, (method, protocol)
    return match.iloc[0]


@pytest.mark.parametrize("protocol, method, control", [
    ("finetune", "simclr", "scratch"), ("finetune", "ddpm", "scratch_unet"), ("finetune", "cdpm_align", "scratch_unet"),
    ("probe", "simclr", "scratch"), ("probe", "ddpm", "scratch_unet"),
])
def test_gain_over_own_family_control(protocol_board: pd.DataFrame, protocol: str, method: str, control: str) -> None:
    levels = protocol_levels()
    treated, untreated = levels[protocol, method], levels[protocol, control]
    row = protocol_row(protocol_board, method, protocol)
    assert row.control == control
    assert row.gain_mre == pytest.approx(treated.mean(axis=1).mean() - untreated.mean(axis=1).mean())
    assert row.gain_p_value == pytest.approx(wilcoxon(treated.ravel(), untreated.ravel()).pvalue)
    assert row.gain_n_pairs == treated.size


def test_controls_and_baseline_have_no_gain(protocol_board: pd.DataFrame) -> None:
    for method, protocol in [("scratch", "finetune"), ("scratch_unet", "probe"), ("mean_shape", "finetune")]:
        row = protocol_row(protocol_board, method, protocol)
        assert pd.isna(row.control) and np.isnan(row.gain_mre) and np.isnan(row.gain_p_value)
    assert "mean_shape" not in set(protocol_board.loc[protocol_board.protocol == "probe", "method"])


def test_missing_errors_keeps_gain_untested(protocol_board: pd.DataFrame, protocol_built: dict[str, Path]) -> None:
    levels = protocol_levels()
    row = protocol_row(protocol_board, "cdpm_align", "probe")
    expected = levels["probe", "cdpm_align"].mean(axis=1).mean() - levels["probe", "scratch_unet"].mean(axis=1).mean()
    assert row.gain_mre == pytest.approx(expected) and np.isnan(row.gain_p_value) and row.gain_n_pairs == 0
    text = protocol_built["markdown"].read_text()
    assert "cdpm_align: per-image errors missing for it or its control scratch_unet; gain not tested" in text
    probe = markdown_table(text, "isbi2015, Test (pooled), 10 shots (mm), probe")
    assert next(line for line in probe if line.startswith("| cdpm_align ")).split("|")[-3].strip() == \
        f"{expected:+.2f} (untested)"


def test_gain_shown_in_markdown_and_latex(protocol_board: pd.DataFrame, protocol_built: dict[str, Path]) -> None:
    text = protocol_built["markdown"].read_text()
    lines = markdown_table(text, "isbi2015, Test (pooled), 10 shots (mm), finetune")
    assert lines[0].endswith("| ERE (mm) | ΔMRE vs control (mm) | Seeds |")
    simclr = protocol_row(protocol_board, "simclr", "finetune")
    p_value = "p < 0.001" if simclr.gain_p_value < 0.001 else f"p = {simclr.gain_p_value:.3f}"
    cells = [cell.strip() for cell in next(line for line in lines if line.startswith("| simclr ")).split("|")]
    assert cells[-3] == f"{simclr.gain_mre:+.2f} ({p_value})"
    assert next(line for line in lines if line.startswith("| scratch ")).split("|")[-3].strip() == "control"
    assert "ΔMRE vs control: the method's MRE minus that of its own network family's random-init control" in text
    assert "(scratch for the encoder family, scratch_unet for the diffusion family)" in text
    latex = protocol_built["latex"].read_text()
    assert "$\\Delta$MRE vs control (mm) $\\downarrow$" in latex and "\\label{tab:isbi2015-test-10-probe}" in latex


def test_missing_control_gives_empty_gain_with_note(tmp_path: Path) -> None:
    sweep = write_protocol_sweep(tmp_path)
    frame = pd.read_csv(sweep, dtype={"shots": str})
    untested = (frame.method == "scratch_unet") & (frame.protocol == "probe")
    frame[~untested].to_csv(sweep, index=False)
    built = build_leaderboard(sweep, tmp_path / "out")
    board = pd.read_csv(built["csv"], dtype={"shots": str})
    for method in ("ddpm", "cdpm_align"):
        row = protocol_row(board, method, "probe")
        assert row.control == "scratch_unet" and np.isnan(row.gain_mre) and np.isnan(row.gain_p_value)
        assert not np.isnan(protocol_row(board, method, "finetune").gain_mre)  # the other protocol keeps its own
    text = built["markdown"].read_text()
    assert "ddpm: no rows of its control scratch_unet; gain not computed" in text
    probe = markdown_table(text, "isbi2015, Test (pooled), 10 shots (mm), probe")
    assert next(line for line in probe if line.startswith("| ddpm ")).split("|")[-3].strip() == "–"
    assert not np.isnan(protocol_row(board, "simclr", "probe").gain_mre)


def test_side_by_side_holds_both_protocols(protocol_board: pd.DataFrame, protocol_built: dict[str, Path]) -> None:
    text = protocol_built["markdown"].read_text()
    lines = markdown_table(text, "Protocols side by side: isbi2015, Test (pooled), 10 shots (mm)")
    assert lines[0] == ("| Method | finetune MRE (mm) | finetune ΔMRE vs control | probe MRE (mm) "
                        "| probe ΔMRE vs control |")
    methods = [line.split("|")[1].strip() for line in lines[2:]]
    assert methods == ["mean_shape", "scratch", "simclr", "scratch_unet", "ddpm", "cdpm_align"]
    ddpm = [cell.strip() for cell in lines[2 + methods.index("ddpm")].split("|")[2:-1]]
    for protocol, (mre, gain) in zip(("finetune", "probe"), (ddpm[:2], ddpm[2:])):
        row = protocol_row(protocol_board, "ddpm", protocol)
        assert mre == f"{row.mre_mean:.2f} ± {row.mre_std:.2f}" and gain.startswith(f"{row.gain_mre:+.2f} (p ")
    mean_shape = [cell.strip() for cell in lines[2].split("|")[2:-1]]
    assert mean_shape[2:] == ["–", "–"]  # never run under the probe
    for column, protocol in ((2, "finetune"), (4, "probe")):  # the best MRE of each protocol in bold
        bold = [method for method, line in zip(methods, lines[2:]) if line.split("|")[column].strip().startswith("**")]
        assert bold == protocol_board.loc[protocol_board.best_mre & (protocol_board.protocol == protocol),
                                          "method"].tolist()
    latex = protocol_built["latex"].read_text()
    assert latex.count("\\begin{table}") == 3 and "\\multicolumn{2}{c}{probe}" in latex
    side = latex.split("\\begin{table}")[1]
    body = side.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    assert {line.count("&") for line in body.splitlines() if line.endswith("\\\\")} == {4}


def test_old_results_without_protocol_are_finetune(sweep: Path, board: pd.DataFrame, built: dict[str, Path],
                                                  tmp_path: Path) -> None:
    assert set(board.protocol) == {"finetune"} and "Protocols side by side" not in built["markdown"].read_text()
    frame = pd.read_csv(sweep, dtype={"shots": str})
    frame["protocol"] = ["finetune" if index % 2 else "" for index in range(len(frame))]  # empty cells too
    frame.to_csv(tmp_path / "results.csv", index=False)
    assert set(read_results(tmp_path / "results.csv").protocol) == {"finetune"}
    rebuilt = pd.read_csv(build_leaderboard(tmp_path / "results.csv", tmp_path / "out")["csv"], dtype={"shots": str})
    pd.testing.assert_frame_equal(rebuilt, board)


def test_same_job_under_two_protocols_is_not_a_duplicate(protocol_sweep: Path) -> None:
    results = read_results(protocol_sweep)
    assert len(results) == 3 * (len(PROTOCOL_BASES["finetune"]) + len(PROTOCOL_BASES["probe"]))


def test_protocol_figures_are_written(protocol_built: dict[str, Path]) -> None:
    for name in ("mre_vs_shots_isbi2015", "ere_vs_shots_isbi2015", "gain_vs_control_isbi2015_10shots"):
        assert protocol_built[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(protocol_built[name]).std() > 0.01


def write_variant_sweep(root: Path, method: str, shift: dict[str, float]) -> Path:
    """A sweep of ``method`` alone whose per-image errors are the protocol sweep's plus ``shift[protocol]``."""
    rows = []
    for (protocol, name), levels in protocol_levels().items():
        if name != method:
            continue
        for seed in PROTOCOL_SEEDS:
            run_dir = root / "runs" / f"{method}-{protocol}-{seed}"
            run_dir.mkdir(parents=True)
            errors = levels[seed] + shift[protocol]
            rows.append({"method": method, "dataset": "isbi2015", "shots": "10", "protocol": protocol, "seed": seed,
                         "run_dir": str(run_dir), "unit": "mm", "status": "done", "reason": "",
                         "test_mre": errors.mean(), "test_mre_std": 0.5})
            pd.DataFrame({"split": "test", "image_id": PROTOCOL_IMAGES, "landmark": 0, "name": "L0", "x": 1.0,
                          "y": 1.0, "radial_error": errors, "ere": np.nan, "unit": "mm"}).to_csv(
                run_dir / "errors.csv", index=False)
    pd.DataFrame(rows).to_csv(root / "results.csv", index=False)
    return root


def write_ablation_sweeps(root: Path) -> tuple[Path, Path]:
    """The protocol sweep as base and a ``ddpm`` variant whose probe errors are 1 mm higher, each with its sweep.json."""
    base = write_protocol_sweep(root / "base").parent
    (base / "sweep.json").write_text(json.dumps({"overrides": {}}))
    variant = write_variant_sweep(root / "variant", "ddpm", {"finetune": 0.0, "probe": 1.0})
    (variant / "sweep.json").write_text(json.dumps({"overrides": {"pretrain.ddpm.lr": 0.1}}))
    return base, variant


def test_ablation_table_compares_one_method_across_two_sweeps(tmp_path: Path) -> None:
    base, variant = write_ablation_sweeps(tmp_path)
    text = ablation_markdown(base, variant, "ddpm")
    assert "pretrain.ddpm.lr" in text and "control scratch_unet" in text
    rows = {line.split(" | ")[2]: line.split(" | ") for line in text.splitlines() if line.startswith("| isbi2015")}
    levels = protocol_levels()
    for protocol, shift in (("finetune", 0.0), ("probe", 1.0)):
        cells = rows[protocol]
        assert cells[3] == "0 1 2"
        assert cells[4].startswith(f"{levels[(protocol, 'scratch_unet')].mean(axis=1).mean():.2f}")
        assert cells[5].startswith(f"{levels[(protocol, 'ddpm')].mean(axis=1).mean():.2f}")
        assert cells[7] == f"{shift:.2f}"
    assert rows["finetune"][8] == "p = 1.000"  # identical errors: no difference
    assert rows["probe"][8] == "p < 0.001"
    assert rows["probe"][9].rstrip(" |") == str(len(PROTOCOL_SEEDS) * len(PROTOCOL_IMAGES))


def test_ablation_table_reads_stored_per_image_errors_once_run_folders_are_gone(tmp_path: Path) -> None:
    base, variant = write_ablation_sweeps(tmp_path)
    with_folders = ablation_markdown(base, variant, "ddpm")
    for sweep in (base, variant):
        build_leaderboard(sweep / "results.csv", sweep)  # writes per_image_mre.csv beside results.csv
    for run_dir in [*(base / "runs").iterdir(), *(variant / "runs").iterdir()]:
        shutil.rmtree(run_dir)
    assert ablation_markdown(base, variant, "ddpm") == with_folders
    (variant / PER_IMAGE_CSV).unlink()  # without it the paired test has nothing to pair
    bare = [line.split(" | ") for line in ablation_markdown(base, variant, "ddpm").splitlines()
            if line.startswith("| isbi2015")]
    assert len(bare) == 2 and all(cells[8] == "–" and cells[9].rstrip(" |") == "0" for cells in bare)


def test_committed_results_regenerate_whole_without_their_run_folders(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "sweep")
    first = build_leaderboard(sweep, tmp_path / "first")
    committed = tmp_path / "committed"
    committed.mkdir()
    shutil.copy(sweep, committed / "results.csv")
    shutil.copy(first["per_image"], committed / "per_image_mre.csv")
    shutil.rmtree(tmp_path / "sweep" / "runs")  # as on a fresh clone: only the committed files
    again = build_leaderboard(committed / "results.csv", tmp_path / "again")
    first_board = pd.read_csv(first["csv"])
    assert first_board.gain_p_value.notna().any() and first_board.p_value.notna().any()
    pd.testing.assert_frame_equal(pd.read_csv(again["csv"]), first_board)
    assert again["markdown"].read_text() == first["markdown"].read_text()
    pd.testing.assert_frame_equal(pd.read_csv(again["per_image"]), pd.read_csv(first["per_image"]))
    # the stored file is what carries the paired tests: without it they are gone
    (committed / "per_image_mre.csv").unlink()
    bare = pd.read_csv(build_leaderboard(committed / "results.csv", tmp_path / "bare")["csv"])
    assert bare.gain_p_value.isna().all() and bare.p_value.isna().all()
