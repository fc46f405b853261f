"""The one evaluation path: the ``LandmarkEvaluation`` callback and ``evaluate`` of a predictions CSV.

Both feed :class:`~landmark_bench.metrics.LandmarkMetrics` the same float64 points in the same
order, so ``landmark-bench evaluate`` on a run's ``predictions.csv`` reproduces its ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch

from landmark_bench.data.readers import DataError, Record
from landmark_bench.io import write_csv, write_json
from landmark_bench.metrics import LandmarkMetrics

PREDICTION_COLUMNS = ["image_id", "landmark", "x", "y"]


def metric_for(records: list[Record]) -> LandmarkMetrics:
    return LandmarkMetrics(num_landmarks=records[0].landmarks.shape[0])


def update_from_points(metric: LandmarkMetrics, records: list[Record], pred: np.ndarray, offset: int = 0) -> None:
    """Score (N, L, 2) original-pixel predictions of ``records`` in one update."""
    metric.update(
        torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float64)),
        torch.from_numpy(np.stack([record.landmarks for record in records])),
        torch.tensor([record.spacing or float("nan") for record in records], dtype=torch.float64),
        torch.arange(offset, offset + len(records)),
    )


def read_predictions(path: Path, records: list[Record]) -> np.ndarray:
    """(N, L, 2) predictions for ``records`` from an ``image_id,landmark,x,y`` CSV.

    Every (image, landmark) of the split exactly once: a missing, duplicate or unknown row is an
    error naming the row, never a silent skip.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"image_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"predictions file {path} cannot be read: {error}") from None
    missing_columns = [column for column in PREDICTION_COLUMNS if column not in frame.columns]
    if missing_columns:
        raise DataError(f"{path}: missing columns {missing_columns}; expected {','.join(PREDICTION_COLUMNS)}")
    num_landmarks = records[0].landmarks.shape[0]
    position = {record.image_id: row for row, record in enumerate(records)}
    pred = np.full((len(records), num_landmarks, 2), np.nan)
    seen = np.zeros((len(records), num_landmarks), dtype=bool)
    for line, (image_id, landmark, x, y) in enumerate(frame[PREDICTION_COLUMNS].itertuples(index=False), start=2):
        where = f"{path} line {line}"
        if image_id not in position:
            raise DataError(f"{where}: unknown image_id {image_id!r} (not in this split)")
        try:
            landmark_index, x, y = int(landmark), float(x), float(y)
        except (TypeError, ValueError):
            raise DataError(f"{where}: non-numeric landmark/x/y ({landmark!r}, {x!r}, {y!r})") from None
        if landmark_index != landmark or not 0 <= landmark_index < num_landmarks:
            raise DataError(f"{where}: landmark {landmark!r} is not an index in 0..{num_landmarks - 1}")
        if not (np.isfinite(x) and np.isfinite(y)):
            raise DataError(f"{where}: non-finite coordinates ({x}, {y})")
        row = position[image_id]
        if seen[row, landmark_index]:
            raise DataError(f"{where}: duplicate row for image {image_id!r}, landmark {landmark_index}")
        seen[row, landmark_index] = True
        pred[row, landmark_index] = (x, y)
    if not seen.all():
        row, landmark_index = np.argwhere(~seen)[0]
        raise DataError(
            f"{path}: {int((~seen).sum())} rows missing, e.g. image {records[row].image_id!r} landmark {landmark_index}"
        )
    return pred


def evaluate_predictions(path: Path, records: list[Record]) -> dict:
    """The suite's metrics for a predictions CSV over ``records``."""
    metric = metric_for(records)
    update_from_points(metric, records, read_predictions(path, records))
    return metric.compute()


def predictions_frame(records: list[Record], pred: np.ndarray) -> pd.DataFrame:
    num_landmarks = pred.shape[1]
    return pd.DataFrame({
        "image_id": np.repeat([record.image_id for record in records], num_landmarks),
        "landmark": np.tile(np.arange(num_landmarks), len(records)),
        "x": pred[..., 0].reshape(-1),
        "y": pred[..., 1].reshape(-1),
    })


class LandmarkEvaluation(L.Callback):
    """MRE, SDR and ERE on the validation split (logged for model selection) and on every test split.

    On test it logs through the trainer's logger and writes into ``out_dir``: ``metrics.json`` (one
    entry per split; ISBI: test1, test2 and pooled ``test``), ``predictions.csv`` (the pooled test
    split in the ``evaluate`` format), ``errors.csv`` (per image and landmark) and ``heatmaps.png``.
    """

    def __init__(self, out_dir: str | Path | None = None, figure_images: int = 4):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.figure_images = figure_images
        self.metrics: dict[str, LandmarkMetrics] = {}
        self.figure_batch: dict | None = None
        self.results: dict[str, dict] = {}

    def _new_metrics(self, splits: list[str], records: list[Record], device: torch.device) -> None:
        self.metrics = {split: metric_for(records).to(device) for split in splits}

    def _update(self, split: str, outputs: dict, batch: dict, offset: int = 0) -> None:
        self.metrics[split].update(outputs["pred"], batch["landmarks_orig"], batch["spacing"],
                                   batch["index"] + offset, outputs["ere"])

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._new_metrics(["val"], trainer.datamodule.datasets["val"].records, pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.metrics["val"].compute()
        self.results["val"] = result
        for name, value in flat_scalars(result).items():
            pl_module.log(f"val/{name}", value, prog_bar=name == "mre")

    def _test_splits(self, trainer: L.Trainer) -> tuple[list[str], str]:
        parts = list(trainer.datamodule.test_splits)
        return parts, ("test" if len(parts) > 1 else parts[0])

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts, pooled = self._test_splits(trainer)
        records = trainer.datamodule.datasets[parts[0]].records
        self._new_metrics(sorted(set(parts) | {pooled}), records, pl_module.device)
        self.figure_batch = None

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        parts, pooled = self._test_splits(trainer)
        split = parts[dataloader_idx]
        offset = sum(len(trainer.datamodule.datasets[part]) for part in parts[:dataloader_idx])
        self._update(split, outputs, batch)
        if pooled != split:
            self._update(pooled, outputs, batch, offset)
        if self.figure_batch is None and outputs["logits"] is not None and trainer.is_global_zero:
            keep = slice(0, self.figure_images)
            self.figure_batch = {"image": batch["image"][keep].cpu(), "logits": outputs["logits"][keep].float().cpu(),
                                 "pred": outputs["pred"][keep].cpu(), "truth": batch["landmarks_orig"][keep].cpu(),
                                 "orig_size": batch["orig_size"][keep].cpu()}

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts, pooled = self._test_splits(trainer)
        for split in [*parts, pooled] if pooled not in parts else parts:
            self.results[split] = self.metrics[split].compute()
            for name, value in flat_scalars(self.results[split]).items():
                pl_module.log(f"{split}/{name}", value)
        tables = {split: self.metrics[split].point_table() for split in parts}
        if trainer.is_global_zero and self.out_dir is not None:
            self._write(trainer, parts, pooled, tables)

    def _write(self, trainer: L.Trainer, parts: list[str], pooled: str, tables: dict) -> None:
        datamodule = trainer.datamodule
        pooled_records = [record for part in parts for record in datamodule.datasets[part].records]
        pooled_pred = np.concatenate([tables[part].pred.cpu().numpy() for part in parts])
        write_csv(self.out_dir / "predictions.csv", predictions_frame(pooled_records, pooled_pred))
        names = datamodule.reader.landmark_names
        rows = []
        for part in parts:
            table, records = tables[part], datamodule.datasets[part].records
            for row, index in enumerate(table.index.tolist()):
                for landmark, name in enumerate(names):
                    rows.append((part, records[index].image_id, landmark, name, *table.pred[row, landmark].tolist(),
                                 float(table.error[row, landmark]), float(table.ere[row, landmark]), table.unit))
        columns = ["split", "image_id", "landmark", "name", "x", "y", "radial_error", "ere", "unit"]
        write_csv(self.out_dir / "errors.csv", pd.DataFrame(rows, columns=columns))
        write_json(self.out_dir / "metrics.json", {split: self.results[split] for split in [*parts, pooled] if split in self.results})
        if self.figure_batch is not None:
            from landmark_bench.figures import save_heatmap_figure, save_overlay

            save_heatmap_figure(self.figure_batch, self.out_dir / "heatmaps.png")
            save_overlay(self.figure_batch, datamodule.datasets[parts[0]].records[0].image_id, self.out_dir / "overlay.npz")


def flat_scalars(result: dict) -> dict[str, float]:
    """The scalar entries of a metrics dict, SDR flattened as ``sdr_<threshold>``, for loggers."""
    scalars = {key: value for key, value in result.items() if isinstance(value, (int, float)) and value is not None}
    scalars.update({f"sdr_{threshold}": value for threshold, value in (result.get("sdr") or {}).items()})
    return scalars
