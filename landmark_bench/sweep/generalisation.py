"""Cross-dataset scoring: each fine-tuned detector of a sweep applied to the test split of other datasets with the
same landmarks, through ``predict`` and ``evaluate_predictions``, so every score is the one ``landmark-bench predict
RUN --dataset OTHER`` prints. Rows go to the sweep's ``generalisation_runs.csv``, one per (run, evaluated-on
dataset), the run's own test score included; the leaderboard turns them into the generalisation table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from landmark_bench.data.readers import DatasetReader
from landmark_bench.data.registry import get_reader
from landmark_bench.evaluation import evaluate_predictions
from landmark_bench.io import write_csv, write_json
from landmark_bench.methods import get_method
from landmark_bench.predict import predict
from landmark_bench.sweep.planning import FinetuneJob

GENERALISATION_CSV = "generalisation_runs.csv"
COLUMNS = ["method", "protocol", "dataset", "shots", "seed", "run_dir", "eval_dataset", "split", "unit", "n_images",
           "mre", "mre_std"]


def dataset_readers(datasets: list[str], eval_datasets: list[str], data_dir: str | None) -> dict[str, DatasetReader]:
    """The reader of every trained-on and evaluated-on dataset, refusing (before anything runs) a pair whose
    landmarks differ: a detector's output k means landmark k of the dataset it was trained on."""
    readers = {name: get_reader(name, data_dir) for name in dict.fromkeys([*datasets, *eval_datasets])}
    for trained in datasets:
        for other in eval_datasets:
            first, second = readers[trained], readers[other]
            if first.num_landmarks != second.num_landmarks or list(first.landmark_names) != list(second.landmark_names):
                raise ValueError(f"--eval-datasets: runs trained on {trained!r} ({first.num_landmarks} landmarks) "
                                 f"cannot be scored on {other!r} ({second.num_landmarks} landmarks): cross-dataset "
                                 "scoring needs the same landmark definition (number and names)")
    return readers


def cross_score(job: FinetuneJob, reader: DatasetReader, data_dir: str | None) -> dict:
    """The run's metrics on ``reader``'s test split (pooled where it has several), computed once and kept in
    ``<run>/cross/<dataset>/`` with the predictions they score."""
    folder = Path(job.out) / "cross" / reader.name
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    records = predict(job.out, folder / "predictions.csv", dataset=reader.name, split=reader.test_splits[-1],
                      data_dir=data_dir)
    result = evaluate_predictions(folder / "predictions.csv", records)
    write_json(folder / "metrics.json", result)
    print(f"generalisation: {Path(job.out).name} on {reader.name}: MRE {result['mre']:.3f} {result['unit']}",
          flush=True)
    return result


def score_row(job: FinetuneJob, reader: DatasetReader, result: dict) -> dict:
    """One row of ``generalisation_runs.csv``: the run, the dataset it was scored on, and its metrics there."""
    return {"method": job.method, "protocol": job.protocol, "dataset": job.dataset, "shots": str(job.shots),
            "seed": job.seed, "run_dir": str(Path(job.out).resolve()), "eval_dataset": reader.name,
            "split": reader.test_splits[-1], "unit": result["unit"], "n_images": result["n_images"],
            "mre": result["mre"], "mre_std": result["mre_std"]}


def write_generalisation(out: Path, finetunes: list[FinetuneJob], eval_datasets: list[str],
                         data_dir: str | None) -> pd.DataFrame:
    """Rebuild ``generalisation_runs.csv``: every done run with a detector (a reference such as mean_shape has none)
    on its own test split and on that of each other evaluation dataset."""
    readers = dataset_readers(list(dict.fromkeys(job.dataset for job in finetunes)), eval_datasets, data_dir)
    rows = []
    for job in finetunes:
        if job.state() != "done" or get_method(job.method).family is None:
            continue
        own = readers[job.dataset]
        metrics = json.loads((Path(job.out) / "run.json").read_text())["metrics"]
        rows.append(score_row(job, own, metrics[own.test_splits[-1]]))
        rows.extend(score_row(job, readers[name], cross_score(job, readers[name], data_dir))
                    for name in eval_datasets if name != job.dataset)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    write_csv(out / GENERALISATION_CSV, frame)
    return frame
