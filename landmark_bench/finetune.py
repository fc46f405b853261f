"""One fine-tune run: few-shot training, model selection on validation, one test evaluation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import traceback
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from landmark_bench.data.datamodule import LandmarkDataModule, parse_shots
from landmark_bench.evaluation import LandmarkEvaluation
from landmark_bench.io import write_json
from landmark_bench.methods import FINETUNE_METHODS, check_method
from landmark_bench.models.detector import LandmarkDetector, MeanShapeReference
from landmark_bench.presets import get_preset
from landmark_bench.tracking import finish, run_loggers


# Under DDP every rank runs this function; only rank zero records the run.
record_json = rank_zero_only(write_json)


def threads_per_process(processes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, processes))


def share_cores(accelerator: str, devices: int | str) -> None:
    """CPU DDP ranks split the cores: more threads than cores makes every rank crawl."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and isinstance(devices, int) and devices > 1:
        torch.set_num_threads(threads_per_process(devices))


def code_version() -> str:
    """The git commit of the suite (with ``-dirty`` for local changes), or the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                                   capture_output=True, text=True, timeout=10, check=True)
        return described.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"landmark_bench=={version('landmark_bench')}"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_dir_name(method: str, dataset: str, shots: int | str, seed: int) -> str:
    return f"{method}-{dataset}-{shots}shot-seed{seed}"


def finetune(
    *,
    method: str,
    dataset: str,
    shots: int | str,
    seed: int,
    preset: str = "cpu",
    data_dir: str | None = None,
    out: str | Path | None = None,
    pretrained: str | None = None,
    devices: int | str = 1,
    accelerator: str = "auto",
    wandb_group: str | None = None,
    overrides: dict | None = None,
    reader_options: dict | None = None,
) -> dict:
    """Fine-tune ``method`` on (dataset, shots, seed) under ``preset`` and evaluate it once on test.

    Writes into ``out``: ``config.json``, ``status.json`` (running, done or failed with its reason),
    ``metrics.json``, ``predictions.csv``, ``errors.csv``, ``heatmaps.png`` and the best checkpoint.
    Returns the run record (config, subset ids, metrics, wall times).
    """
    check_method(method, FINETUNE_METHODS)
    shots = parse_shots(shots)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, not {seed!r}")
    settings = get_preset(preset)
    cfg = {**settings["finetune"], **(overrides or {})}
    out = Path(out or Path("runs") / run_dir_name(method, dataset, shots, seed))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a run killed mid-write; the files they would replace are whole
        stale.unlink(missing_ok=True)
    config = {"method": method, "dataset": dataset, "shots": shots, "seed": seed, "preset": preset,
              "encoder": settings["encoder"], "pretrained": pretrained, "finetune": cfg,
              "reader_options": reader_options or {}}
    record = {**config, "config_hash": config_hash(config), "code_version": code_version(), "run_dir": str(out),
              "started_at": time.time()}
    record_json(out / "status.json", {"status": "running"})
    started = time.perf_counter()
    loggers = []
    try:
        L.seed_everything(seed, workers=True, verbose=False)
        share_cores(accelerator, devices)
        datamodule = LandmarkDataModule(
            dataset=dataset, data_dir=data_dir, shots=shots, seed=seed, resolution=cfg["resolution"],
            batch_size=cfg["batch_size"], sigma=cfg["sigma"], augment=cfg["augment"],
            samples_per_epoch=cfg["val_every"] * cfg["batch_size"], num_workers=cfg["num_workers"],
            reader_options=reader_options,
        )
        datamodule.setup()
        record["subset_ids"] = datamodule.subset_ids
        record_json(out / "config.json", {**config, "subset_ids": datamodule.subset_ids, "config_hash": record["config_hash"]})
        evaluation = LandmarkEvaluation(out)
        loggers = run_loggers(out, out.name, wandb_group, [method, dataset, f"shots={shots}", f"seed={seed}"], config)
        trainer_args = dict(accelerator=accelerator, devices=devices, logger=loggers,
                            default_root_dir=out, enable_model_summary=False, num_sanity_val_steps=0,
                            precision=cfg["precision"], deterministic=cfg["deterministic"],
                            enable_progress_bar=cfg["progress_bar"])
        train_started = time.perf_counter()
        if method == "mean_shape":
            model = MeanShapeReference.from_training_set(datamodule.datasets["train"].landmarks_net, datamodule.size)
            trainer = L.Trainer(callbacks=[evaluation], **trainer_args)
            trainer.test(model, datamodule=datamodule, verbose=False)
            record["train_seconds"] = 0.0
        else:
            model = LandmarkDetector(
                num_landmarks=datamodule.reader.num_landmarks, method=method, encoder=settings["encoder"],
                pretrained=pretrained, dataset=dataset, diffusion_timestep=cfg["diffusion_timestep"], loss=cfg["loss"],
                refine_window=cfg["refine_window"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                max_steps=cfg["max_steps"], warmup_steps=cfg["warmup_steps"],
            )
            checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/mre", mode="min",
                                         save_top_k=1, save_weights_only=True, enable_version_counter=False)
            trainer = L.Trainer(max_steps=cfg["max_steps"], max_epochs=-1, callbacks=[evaluation, checkpoint],
                                **trainer_args)
            trainer.fit(model, datamodule=datamodule)
            record["train_seconds"] = time.perf_counter() - train_started
            record["best_checkpoint"] = checkpoint.best_model_path
            record["best_val_mre"] = float(checkpoint.best_model_score)
            trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)
        record["metrics"] = evaluation.results
        record.update(wall_seconds=time.perf_counter() - started, finished_at=time.time(), status="done")
    except BaseException as error:
        record.update(status="failed", reason=f"{type(error).__name__}: {error}",
                      wall_seconds=time.perf_counter() - started)
        record_json(out / "status.json", {"status": "failed", "reason": record["reason"],
                                         "traceback": traceback.format_exc()})
        raise
    finally:
        finish(loggers)
    record_json(out / "status.json", {"status": "done", "wall_seconds": record["wall_seconds"],
                                     "train_seconds": record["train_seconds"]})
    record_json(out / "run.json", record)
    return record
