"""One pretraining run on unlabelled images, resumable, ending in one checkpoint fine-tuning reads."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from landmark_bench.checkpoints import read_checkpoint
from landmark_bench.data.datamodule import UnlabeledDataModule
from landmark_bench.io import atomic_write
from landmark_bench.methods import get_method, method_names, preset_settings
from landmark_bench.runs import (
    AnnouncedCheckpointIO, clear_stale_temp_files, code_version, config_hash, record_json, run_lifecycle,
    share_cores,
)
from landmark_bench.tracking import finish, run_loggers

DEFAULT_PRETRAINING_DATASETS = ("isbi2015", "aasce2019", "hand", "chest")
# not module arguments: the UnlabeledDataModule's and the Trainer's
RUN_KEYS = ("resolution", "crop_size", "crop_scale", "held_out_fraction", "batch_size", "num_workers", "precision",
            "views")
CHECKPOINT_NAME = "pretrained.ckpt"


def pretraining_module(method: str, settings: dict, datasets: list[str] | tuple[str, ...]) -> L.LightningModule:
    """The module ``method`` pretrains under resolved preset ``settings`` (its network built from them)."""
    method_class = get_method(method)
    kwargs = {key: value for key, value in settings["pretrain"][method].items() if key not in RUN_KEYS}
    if method_class.family == "diffusion":
        kwargs.update(unet=settings["unet"], dataset_names=list(datasets))
    else:
        kwargs.update(encoder=settings["encoder"])
    return method_class(**kwargs)


def pretraining_data(method: str, cfg: dict, datasets: list[str] | tuple[str, ...], data_dir: str | None,
                     seed: int = 0) -> UnlabeledDataModule:
    """The unlabelled images ``method`` pretrains on, under its settings ``cfg``: two-view crops for an SSL method,
    plain (cropped) images for a diffusion one."""
    method_class = get_method(method)
    transform = None if method_class.family == "diffusion" else method_class.views_transform(**cfg.get("views", {}))
    return UnlabeledDataModule(datasets, data_dir, resolution=cfg["resolution"], batch_size=cfg["batch_size"],
                               transform=transform, num_workers=cfg.get("num_workers", 0),
                               crop_size=cfg.get("crop_size"), crop_scale=cfg.get("crop_scale"),
                               held_out_fraction=cfg.get("held_out_fraction", 0.0), seed=seed)


def pretrain(
    *,
    method: str,
    datasets: list[str] | tuple[str, ...] = DEFAULT_PRETRAINING_DATASETS,
    preset: str = "cpu",
    data_dir: str | None = None,
    out: str | Path | None = None,
    devices: int | str = 1,
    accelerator: str = "auto",
    wandb_group: str | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict:
    """Pretrain ``method`` on the training splits of ``datasets``; writes ``out/pretrained.ckpt``.

    ``overrides``: dotted preset keys (``{"pretrain.ddpm.max_steps": 2000}``), recorded in the config and its hash.

    A run killed mid-way resumes from ``out/checkpoints/last.ckpt`` when started again with the same
    arguments; a finished run is not repeated.
    """
    method_class = get_method(method)
    if not method_class.pretrains:
        raise ValueError(f"method {method!r} has no pretraining; methods that pretrain: "
                         f"{', '.join(method_names(pretrains=True))}")
    diffusion = method_class.family == "diffusion"
    settings = preset_settings(preset, overrides)
    cfg = settings["pretrain"][method]
    out = Path(out or Path("runs") / f"pretrain-{method}-{preset}")
    final = out / CHECKPOINT_NAME
    config = {"method": method, "datasets": list(datasets), "preset": preset, "seed": seed, "pretrain": cfg,
              "encoder": settings["encoder"], "unet": settings["unet"] if diffusion else None,
              "overrides": overrides or {}}
    record = {**config, "config_hash": config_hash(config), "code_version": code_version(), "checkpoint": str(final)}
    if final.is_file():
        if not (out / "run.json").is_file():  # killed after its checkpoint, before its record: record it now
            record.update(status="done", recorded_after_interruption=True)
            record_json(out / "run.json", record)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            clear_stale_temp_files(out)  # the killed write's temp file
        return {**record, "status": "done", "reused": True}
    started = time.perf_counter()
    with run_lifecycle(out) as figures:
        record_json(out / "config.json", record)
        L.seed_everything(seed, workers=True, verbose=False)
        share_cores(accelerator, devices)
        model = pretraining_module(method, settings, datasets)
        datamodule = pretraining_data(method, cfg, datasets, data_dir, seed)
        loggers = run_loggers(out, out.name, wandb_group, [method, "pretrain", *datasets], config)
        try:
            periodic = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                       every_n_train_steps=max(1, cfg["max_steps"] // 10))
            trainer = L.Trainer(max_steps=cfg["max_steps"], max_epochs=-1, accelerator=accelerator, devices=devices,
                                logger=loggers, callbacks=[periodic], plugins=[AnnouncedCheckpointIO()],
                                enable_model_summary=False, enable_progress_bar=False, default_root_dir=out,
                                precision=cfg.get("precision", "32-true"))
            last = out / "checkpoints" / "last.ckpt"
            resume = last.is_file()
            if resume:  # a killed run goes on from its last checkpoint instead of starting over
                record["resumed_from_step"] = int(read_checkpoint(last, method)["global_step"])
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if resume else None)
            temp = out / f".{CHECKPOINT_NAME}.partial"
            trainer.save_checkpoint(temp, weights_only=True)
            if trainer.is_global_zero:
                if hasattr(model, "save_sample_grid"):  # diffusion: what the EMA UNet generates
                    model.save_sample_grid(out / "samples.png")
                if hasattr(model, "health_record"):  # did pretraining learn? (loss against chance, held-out loss)
                    record["health"] = model.health_record(datamodule)
                    record_json(out / "health.json", record["health"])
                atomic_write(final, lambda stream: stream.write(temp.read_bytes()))
                temp.unlink()
        finally:
            finish(loggers)
        record.update(status="done", wall_seconds=time.perf_counter() - started, steps=trainer.global_step)
        figures.update(wall_seconds=record["wall_seconds"])
    record_json(out / "run.json", record)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return record
