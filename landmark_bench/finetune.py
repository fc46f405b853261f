"""One fine-tune run: few-shot training, model selection on validation, one test evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from landmark_bench.checkpoints import read_checkpoint
from landmark_bench.data.datamodule import LandmarkDataModule, parse_shots
from landmark_bench.evaluation import LandmarkEvaluation
from landmark_bench.methods import PROTOCOLS, detector_backbone, family_of, get_method, method_names, preset_settings
from landmark_bench.models.detector import (
    PROBE_BATCHNORM, LandmarkDetector, MeanShapeReference, calibrate_batchnorm,
)
from landmark_bench.presets import finetune_settings
from landmark_bench.runs import (
    AnnouncedCheckpointIO, code_version, config_hash, record_json, run_lifecycle, share_cores,
)
from landmark_bench.tracking import finish, run_loggers


def run_dir_name(method: str, dataset: str, shots: int | str, seed: int, protocol: str = "finetune") -> str:
    kind = "" if protocol == "finetune" else f"{protocol}-"
    return f"{method}-{kind}{dataset}-{shots}shot-seed{seed}"


def protocol_settings(settings: dict, dataset: str, protocol: str, method: str) -> dict:
    """The fine-tuning settings of ``method``'s ``protocol`` job on ``dataset`` under resolved preset ``settings``: a
    probe trains without augmentation (its frozen features are cached once per image)."""
    cfg = finetune_settings(settings, dataset, get_method(method).family)
    if cfg["probe_batchnorm"] not in PROBE_BATCHNORM:
        raise ValueError(f"finetune.probe_batchnorm={cfg['probe_batchnorm']!r} is not one of "
                         f"{', '.join(PROBE_BATCHNORM)}")
    if protocol == "probe":
        cfg["augment"] = False
    return cfg


def few_shot_data(cfg: dict, dataset: str, data_dir: str | None, shots: int | str, seed: int,
                  reader_options: dict | None = None) -> LandmarkDataModule:
    """The set-up loaders of a job: the seeded few-shot training subset, validation and test."""
    datamodule = LandmarkDataModule(
        dataset=dataset, data_dir=data_dir, shots=shots, seed=seed, resolution=cfg["resolution"],
        batch_size=cfg["batch_size"], sigma=cfg["sigma"], augment=cfg["augment"],
        augment_strength=cfg["augment_strength"], augment_noise=cfg["augment_noise"],
        samples_per_epoch=cfg["val_every"] * cfg["batch_size"], num_workers=cfg["num_workers"],
        reader_options=reader_options,
    )
    datamodule.setup()
    return datamodule


def landmark_detector(method: str, protocol: str, settings: dict, cfg: dict, datamodule: LandmarkDataModule,
                      pretrained: str | None) -> LandmarkDetector:
    """The detector a job trains: ``method``'s backbone (a probed one with its BatchNorm statistics re-estimated on
    the training images, ``cfg["probe_batchnorm"]``) and a new head."""
    backbone = detector_backbone(method, protocol, settings, cfg, datamodule.hparams.dataset, pretrained)
    if protocol == "probe" and cfg["probe_batchnorm"] == "train_split":
        calibrate_batchnorm(backbone, datamodule.unlabelled_training_images())
    return LandmarkDetector(
        backbone=backbone, num_landmarks=datamodule.reader.num_landmarks, loss=cfg["loss"],
        refine_window=cfg["refine_window"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
        max_steps=cfg["max_steps"], warmup_steps=cfg["warmup_steps"], protocol=protocol,
    )


def pretraining_hyper_parameters(method: str, pretrained: str | None) -> tuple[dict | None, list[str]]:
    """The pretraining checkpoint's hyperparameters, kept in the run's ``config.json`` so that ``predict`` rebuilds
    the detector's network from the run folder alone, wherever it moves; and the keys of values JSON cannot hold,
    kept only as their text, which ``predict`` therefore reads from the checkpoint instead."""
    if pretrained is None or not get_method(method).pretrains:  # none, or a misuse the backbone's builder names
        return None, []
    hyper_parameters = dict(read_checkpoint(pretrained).get("hyper_parameters", {}))
    as_text = sorted(key for key, value in hyper_parameters.items() if not json_can_hold(value))
    return json.loads(json.dumps(hyper_parameters, default=str)), as_text


def json_can_hold(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


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
    overrides: dict[str, Any] | None = None,
    reader_options: dict | None = None,
    protocol: str = "finetune",
) -> dict:
    """Fine-tune ``method`` on (dataset, shots, seed) under ``preset`` and evaluate it once on test.

    ``overrides``: dotted preset keys (``{"finetune.lr": 5e-4, "encoder": "resnet18"}``), recorded in
    ``config.json`` and in the config hash. ``protocol="probe"`` freezes the backbone and trains only a light head on its features, with the same
    subset, step budget, model selection and evaluation (no augmentation: the frozen features are cached).

    Writes into ``out``: ``config.json``, ``status.json`` (running, done or failed with its reason),
    ``metrics.json``, ``predictions.csv``, ``errors.csv``, ``heatmaps.png`` and the best checkpoint.
    Returns the run record (config, subset ids, metrics, wall times).
    """
    family = get_method(method).family
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    if protocol == "probe" and family is None:
        raise ValueError(f"method {method!r} has no backbone to probe; the probe protocol takes "
                         f"{', '.join(m for m in method_names() if family_of(m))}")
    shots = parse_shots(shots)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, not {seed!r}")
    settings = preset_settings(preset, overrides)
    cfg = protocol_settings(settings, dataset, protocol, method)
    out = Path(out or Path("runs") / run_dir_name(method, dataset, shots, seed, protocol))
    config = {"method": method, "protocol": protocol, "dataset": dataset, "shots": shots, "seed": seed,
              "preset": preset, "encoder": settings["encoder"], "pretrained": pretrained, "finetune": cfg,
              "overrides": overrides or {}, "reader_options": reader_options or {}}
    record = {**config, "config_hash": config_hash(config), "code_version": code_version(), "run_dir": str(out),
              "started_at": time.time()}
    started = time.perf_counter()
    with run_lifecycle(out) as figures:
        L.seed_everything(seed, workers=True, verbose=False)
        share_cores(accelerator, devices)
        datamodule = few_shot_data(cfg, dataset, data_dir, shots, seed, reader_options)
        record["subset_ids"] = datamodule.subset_ids
        pretraining, pretraining_as_text = pretraining_hyper_parameters(method, pretrained)
        record_json(out / "config.json", {**config, "subset_ids": datamodule.subset_ids,
                                          "config_hash": record["config_hash"],
                                          "pretraining_hyper_parameters": pretraining,
                                          "pretraining_hyper_parameters_as_text": pretraining_as_text})
        evaluation = LandmarkEvaluation(out)
        loggers = run_loggers(out, out.name, wandb_group,
                              [method, protocol, dataset, f"shots={shots}", f"seed={seed}"], config)
        try:
            trainer_args = dict(accelerator=accelerator, devices=devices, logger=loggers,
                                default_root_dir=out, enable_model_summary=False, num_sanity_val_steps=0,
                                precision=cfg["precision"], deterministic=cfg["deterministic"],
                                enable_progress_bar=cfg["progress_bar"], plugins=[AnnouncedCheckpointIO()])
            train_started = time.perf_counter()
            if family is None:  # the reference row: the few-shot subset's mean shape
                model = MeanShapeReference.from_training_set(datamodule.datasets["train"].landmarks_net,
                                                             datamodule.size)
                trainer = L.Trainer(callbacks=[evaluation], **trainer_args)
                trainer.test(model, datamodule=datamodule, verbose=False)
                record["train_seconds"] = 0.0
            else:
                model = landmark_detector(method, protocol, settings, cfg, datamodule, pretrained)
                checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/mre",
                                             mode="min", save_top_k=1, save_weights_only=True,
                                             enable_version_counter=False)
                trainer = L.Trainer(max_steps=cfg["max_steps"], max_epochs=-1, callbacks=[evaluation, checkpoint],
                                    **trainer_args)
                trainer.fit(model, datamodule=datamodule)
                record["train_seconds"] = time.perf_counter() - train_started
                record["best_checkpoint"] = checkpoint.best_model_path
                record["best_val_mre"] = float(checkpoint.best_model_score)
                trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)
        finally:
            finish(loggers)
        record["metrics"] = evaluation.results
        record.update(wall_seconds=time.perf_counter() - started, finished_at=time.time(), status="done")
        figures.update(wall_seconds=record["wall_seconds"], train_seconds=record["train_seconds"])
    record_json(out / "run.json", record)
    return record
