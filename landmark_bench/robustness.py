"""``landmark-bench robustness``: every done run of a sweep scored on perturbed copies of its test split (or, to
choose settings, of its validation split).

A perturbed split (:mod:`landmark_bench.data.perturbations`) is made once per (dataset, perturbation, seed) and
resolution, through ``network_images`` (the fine-tuning loader's decode and resize), and every run predicts on those
same arrays with its detector's ``infer`` at its own precision, as ``predict`` does. Predictions are mapped back
through the inverse of each image's exact affine and scored by the suite's metric against the original landmarks,
so a perturbed MRE is in the units and pixel scale of the clean one (the run's own test metrics).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader

from landmark_bench.data.datamodule import LandmarkDataset, as_size, keep_batch
from landmark_bench.data.perturbations import MARGIN, PERTURBATIONS, PerturbedReader, get_perturbation, move_points
from landmark_bench.data.readers import DatasetReader, Record
from landmark_bench.data.registry import get_reader
from landmark_bench.evaluation import metric_for, update_from_points
from landmark_bench.io import atomic_write_text, write_csv
from landmark_bench.leaderboard import method_order, not_learned, protocol_order, read_results
from landmark_bench.methods import get_method
from landmark_bench.predict import check_same_landmarks, load_detector, network_images

CLEAN = "clean"
SPLITS = ("test", "val")


def done_runs(sweep_dir: Path, methods: list[str] | None,
              protocols: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The done rows of ``results.csv`` (of ``methods`` and ``protocols``, default all) whose run has a detector,
    each with its run folder; notes on those left out."""
    rows = read_results(sweep_dir / "results.csv")
    rows = rows[rows.status.eq("done") & rows.run_dir.notna()]
    for column, wanted in (("method", methods), ("protocol", protocols)):
        if wanted:
            unknown = sorted(set(wanted) - set(rows[column]))
            if unknown:
                done = ", ".join(sorted(set(rows[column])))
                raise ValueError(f"{sweep_dir}: no done runs of {column} {unknown}; done: {done}")
            rows = rows[rows[column].isin(wanted)]
    # results.csv holds absolute run folders: a sweep folder that was moved still has them under runs/
    folders = [Path(run) if Path(run).is_dir() else sweep_dir / "runs" / Path(run).name for run in rows.run_dir]
    options = [json.dumps(json.loads((folder / "config.json").read_text()).get("reader_options") or {}, sort_keys=True)
               for folder in folders]
    rows = rows.assign(run_folder=folders, reader_options=options)
    no_detector = sorted({method for method in rows.method if get_method(method).family is None})
    notes = [f"{method}: no detector (its prediction ignores the image), not scored" for method in no_detector]
    rows = rows[~rows.method.isin(no_detector)]
    if rows.empty:
        raise ValueError(f"{sweep_dir}: no done run with a detector to score")
    return rows.reset_index(drop=True), notes


def predict_points(model: torch.nn.Module, config: dict, pixels: np.ndarray, records: list[Record],
                   accelerator: str) -> np.ndarray:
    """(N, L, 2) original-pixel predictions of the run on ``pixels``, batched and at its precision as ``predict``."""
    cfg = config["finetune"]
    loader = DataLoader(LandmarkDataset(pixels, records, cfg["sigma"]), batch_size=cfg["batch_size"],
                        collate_fn=keep_batch)
    fabric = Fabric(accelerator=accelerator, devices=1, precision=cfg["precision"])
    model.to(fabric.device)
    pred = []
    for batch in loader:
        with torch.inference_mode(), fabric.autocast():
            pred.append(model.infer(fabric.to_device(batch))["pred"].cpu().numpy())
    return np.concatenate(pred)


def score(records: list[Record], pred: np.ndarray) -> dict:
    """The suite's metrics of (N, L, 2) points over ``records``."""
    metric = metric_for(records)
    update_from_points(metric, records, pred)
    return metric.compute()


Inputs = dict[tuple[str, int], tuple[PerturbedReader, dict[tuple[int, int], np.ndarray]]]


def perturbed_inputs(reader: DatasetReader, split: str, names: list[str], seeds: list[int],
                     sizes: set[tuple[int, int]], scratch: Path) -> Inputs:
    """Per (perturbation, seed): its reader and the network images of ``split`` at each size, made once for all runs."""
    inputs = {}
    for name in names:
        for seed in seeds:
            perturbed = PerturbedReader(reader, get_perturbation(name), seed)
            records = perturbed.records(split)
            inputs[name, seed] = perturbed, {size: network_images(perturbed, records, size, scratch) for size in sizes}
    return inputs


def result_row(run: pd.Series, split: str, perturbation: str, perturbation_seed: float, result: dict) -> dict:
    return {"dataset": run.dataset, "shots": run.shots, "method": run.method, "protocol": run.protocol,
            "seed": run.seed, "run_dir": str(run.run_folder), "split": split, "perturbation": perturbation,
            "perturbation_seed": perturbation_seed, "pretraining_learned": run.get("pretraining_learned"),
            "unit": result["unit"], "n_images": result["n_images"],
            "mre": result["mre"], "mre_std": result["mre_std"],
            **{f"sdr_{float(threshold)}": value for threshold, value in result["sdr"].items()}}


def clean_result(run: pd.Series, split: str) -> dict:
    """The run's own test metrics, as ``results.csv`` holds them."""
    prefix = f"{split}_sdr_"
    sdr = {float(column[len(prefix):]): run[column] for column in run.index
           if column.startswith(prefix) and pd.notna(run[column])}
    return {"unit": run.unit, "n_images": run[f"{split}_n_images"], "mre": run[f"{split}_mre"],
            "mre_std": run[f"{split}_mre_std"], "sdr": sdr}


def score_dataset(runs: pd.DataFrame, reader: DatasetReader, names: list[str], seeds: list[int], accelerator: str,
                  split: str = "test") -> tuple[list[dict], dict[str, float]]:
    """Rows for every run of one dataset under every (perturbation, seed), with the clean row of each run; and per
    perturbation the fraction of images whose perturbation was shrunk to keep the landmarks in the frame.

    ``split`` "test": the pooled test split where there are several, clean as the run's own metrics; "val": the
    validation split, for choosing settings, clean scored here by the same path (``results.csv`` holds the last
    validation pass, not the restored checkpoint's)."""
    if split not in SPLITS:
        raise ValueError(f"robustness split {split!r} is not one of {', '.join(SPLITS)}")
    own_metrics = split == "test"
    split = reader.test_splits[-1] if own_metrics else split
    records = reader.records(split)
    sizes = {as_size(json.loads((run / "config.json").read_text())["finetune"]["resolution"])
             for run in runs.run_folder}
    rows = []
    with tempfile.TemporaryDirectory(prefix="landmark-bench-robustness-") as scratch:
        inputs = perturbed_inputs(reader, split, names, seeds, sizes, Path(scratch))
        clean = {} if own_metrics else {size: network_images(reader, records, size, Path(scratch)) for size in sizes}
    for _, run in runs.iterrows():
        model, config = load_detector(run.run_folder)
        check_same_landmarks(config["dataset"], reader, model.hparams.num_landmarks)
        size = as_size(config["finetune"]["resolution"])
        clean_row = clean_result(run, split) if own_metrics else \
            score(records, predict_points(model, config, clean[size], records, accelerator))
        rows.append(result_row(run, split, CLEAN, np.nan, clean_row))
        for (name, seed), (perturbed, pixels) in inputs.items():
            pred = predict_points(model, config, pixels[size], perturbed.records(split), accelerator)
            back = np.stack([move_points(np.linalg.inv(perturbed.affines[record.image_id].matrix), points)
                             for record, points in zip(records, pred)])
            rows.append(result_row(run, split, name, seed, score(records, back)))
        print(f"robustness: {run.method} {run.protocol} seed {run.seed} ({run.dataset}, {run.shots} shots) scored",
              flush=True)
    shrunk = {name: float(np.mean([affine.strength < 1 for (other, _), (perturbed, _) in inputs.items()
                                   if other == name for affine in perturbed.affines.values()])) for name in names}
    return rows, shrunk


def markdown(frame: pd.DataFrame, names: list[str], seeds: Sequence[int], shrunk: dict[str, dict[str, float]],
             notes: list[str], title: str, split: str = "test") -> str:
    """One table per (dataset, shots): a row per (method, protocol), clean MRE and MRE under each perturbation
    (means over the run seeds and the perturbation seeds), then the same for the first SDR threshold."""
    clean = ("the run's own test metrics" if split == "test"
             else "the unperturbed images, scored by the same path with the restored checkpoint")
    lines = [f"# Robustness: {title}", "",
             f"Every method sees the same perturbed {split} images (perturbation seeds {', '.join(map(str, seeds))}); "
             f"clean: {clean}. Values are means over the sweep's seeds of the mean over the "
             "perturbation seeds. Geometric perturbations are shrunk towards the identity (in tenths) until every "
             f"landmark lies {MARGIN:.0%} of the shorter side inside the frame, so every point is scored; errors "
             "are measured in the original image (predictions mapped back by the exact inverse affine).", ""]
    lines += [f"- {name}: {PERTURBATIONS[name].summary}" for name in names]
    lines += [f"- {note}" for note in notes]
    if not_learned(frame):
        lines.append("- (not learned): the run fine-tuned a pretraining whose health record says it did not learn "
                     "(see the pretraining's health.json); the row measures an untrained network, not the method")
    for dataset, fractions in shrunk.items():
        kept = ", ".join(f"{name} {fraction:.0%}" for name, fraction in fractions.items()
                         if PERTURBATIONS[name].geometry)
        lines.append(f"- {dataset}: images whose perturbation was shrunk: {kept or 'none geometric'}")
    columns = [CLEAN, *names]
    for (dataset, shots), cell in frame.groupby(["dataset", "shots"], sort=True):
        unit = cell.unit.iloc[0]
        sdr_column = next(column for column in cell.columns if column.startswith("sdr_") and cell[column].notna().any())
        per_run = cell.groupby(["method", "protocol", "seed", "perturbation"])[["mre", sdr_column]].mean()
        means = per_run.groupby(["method", "protocol", "perturbation"]).mean()
        runs = cell.groupby(["method", "protocol"]).seed.nunique()
        for metric, heading in (("mre", f"MRE ({unit})"), (sdr_column, f"SDR@{sdr_column[4:]} {unit} (%)")):
            lines += ["", f"## {dataset}, {cell['split'].iloc[0]}, {shots} shots: {heading}", "",
                      "| method | protocol | runs | " + " | ".join(columns) + " |",
                      "|---|---|---:|" + "---:|" * len(columns)]
            for protocol in protocol_order(cell.protocol):
                for method in method_order(cell[cell.protocol.eq(protocol)].method):
                    values = [means[metric].get((method, protocol, column), np.nan) for column in columns]
                    own = cell[cell.method.eq(method) & cell.protocol.eq(protocol)]
                    label = f"{method} (not learned)" if not_learned(own) else method
                    lines.append(f"| {label} | {protocol} | {runs[method, protocol]} | "
                                 + " | ".join(f"{value:.2f}" for value in values) + " |")
    return "\n".join(lines) + "\n"


def robustness(sweep_dir: str | Path, out: str | Path, *, perturbations: list[str] | None = None,
               methods: list[str] | None = None, protocols: list[str] | None = None, seeds: Sequence[int] = (0, 1),
               data_dir: str | None = None, accelerator: str = "auto", split: str = "test") -> str:
    """Score every done run of ``sweep_dir`` on each perturbation x seed of its ``split`` (test, or val to choose
    settings); write ``out`` (Markdown) and the per-run rows beside it (``.csv``); return the Markdown."""
    sweep_dir, out = Path(sweep_dir), Path(out)
    names = list(perturbations or PERTURBATIONS)
    for name in names:
        get_perturbation(name)
    runs, notes = done_runs(sweep_dir, methods, protocols)
    if data_dir is None and (sweep_dir / "sweep.json").is_file():
        data_dir = json.loads((sweep_dir / "sweep.json").read_text()).get("data_dir")
    rows, shrunk = [], {}
    for (dataset, options), group in runs.groupby(["dataset", "reader_options"], sort=True):
        reader = get_reader(dataset, data_dir, **json.loads(options))
        dataset_rows, shrunk[dataset] = score_dataset(group, reader, names, list(seeds), accelerator, split)
        rows += dataset_rows
    frame = pd.DataFrame(rows)
    write_csv(out.with_suffix(".csv"), frame)
    text = markdown(frame, names, list(seeds), shrunk, notes, sweep_dir.name, split)
    atomic_write_text(out, text)
    return text
