"""Result rows, read back from the run folders rather than kept in memory, so ``results.csv`` rebuilt after a kill
holds every finished job exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from landmark_bench.io import write_csv
from landmark_bench.sweep.planning import FinetuneJob


def flatten_metrics(metrics: dict) -> dict:
    """One column a split and metric, so every run is one row of ``results.csv``."""
    row = {}
    for split, result in metrics.items():
        for key in ("mre", "mre_std", "ere", "n_images"):
            row[f"{split}_{key}"] = result.get(key)
        for threshold, value in result["sdr"].items():
            row[f"{split}_sdr_{float(threshold)}"] = value
        row["unit"] = result["unit"]
    return row


def pretraining_learned(checkpoint: str | None) -> bool | None:
    """The verdict of the pretraining's health record (``health.json`` beside its checkpoint); None if it has none."""
    if not checkpoint:
        return None
    try:
        return bool(json.loads((Path(checkpoint).parent / "health.json").read_text())["learned"])
    except (OSError, ValueError, KeyError):
        return None


def job_row(job: FinetuneJob) -> dict | None:
    """The result row of a finished job, or None while it is pending."""
    base = {"method": job.method, "protocol": job.protocol, "dataset": job.dataset, "shots": str(job.shots),
            "seed": job.seed, "preset": job.preset, "run_dir": str(Path(job.out).resolve())}
    state = job.state()
    if state == "done":
        record = json.loads((Path(job.out) / "run.json").read_text())
        return {**base, "status": "done", "reason": "", "subset_ids": " ".join(record.get("subset_ids", [])),
                "pretraining_learned": pretraining_learned(job.pretrained),
                "config_hash": record["config_hash"], "code_version": record["code_version"],
                "checkpoint": record.get("best_checkpoint", ""), "pretrained": job.pretrained or "",
                "wall_seconds": record["wall_seconds"], "train_seconds": record["train_seconds"],
                # the validation MRE of the restored checkpoint; ``val_mre`` is the pass that ended training
                "best_val_mre": record.get("best_val_mre"), **flatten_metrics(record["metrics"])}
    if state == "failed":
        status = json.loads((Path(job.out) / "status.json").read_text())
        return {**base, "status": "failed", "reason": status.get("reason", "unknown")}
    return None


def reference_rows(dataset: str, data_dir: str | None) -> list[dict]:
    """The dataset's human reference rows (its reader's ``reference_readers``: e.g. ISBI's junior doctor scored
    against its senior doctor), on each test split."""
    from landmark_bench.data.registry import get_reader
    from landmark_bench.evaluation import metric_for, update_from_points

    reader = get_reader(dataset, data_dir)
    rows = []
    for name, (truth, observer) in reader.reference_readers().items():
        metrics = {}
        for split in reader.test_splits:
            records = truth.records(split)
            metric = metric_for(records)
            update_from_points(metric, records, np.stack([record.landmarks for record in observer.records(split)]))
            metrics[split] = metric.compute()
        rows.append({"method": name, "dataset": dataset, "shots": "", "seed": np.nan, "status": "done", "reason": "",
                     **flatten_metrics(metrics)})
    return rows


def write_results(out: Path, finetunes: list[FinetuneJob], data_dir: str | None) -> pd.DataFrame:
    """Rebuild ``results.csv`` from the run folders (plus the human reference rows when the data is at hand)."""
    rows = [row for row in map(job_row, finetunes) if row is not None]
    if data_dir:
        for dataset in dict.fromkeys(job.dataset for job in finetunes):
            rows.extend(reference_rows(dataset, data_dir))
    frame = pd.DataFrame(rows)
    write_csv(out / "results.csv", frame)
    return frame
