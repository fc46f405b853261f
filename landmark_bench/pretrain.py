"""One pretraining run on unlabelled images, resumable, ending in one checkpoint fine-tuning reads."""

from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from landmark_bench.checkpoints import read_checkpoint
from landmark_bench.data.datamodule import UnlabeledDataModule
from landmark_bench.finetune import code_version, config_hash, record_json, share_cores
from landmark_bench.io import atomic_write
from landmark_bench.methods import DIFFUSION_METHODS, PRETRAINING, check_method, method_module, pretraining_class
from landmark_bench.presets import get_preset
from landmark_bench.tracking import finish, run_loggers

DEFAULT_PRETRAINING_DATASETS = ("isbi2015", "aasce2019", "hand", "chest")
RUN_KEYS = ("resolution", "batch_size", "num_workers", "precision", "views")  # not module arguments
CHECKPOINT_NAME = "pretrained.ckpt"


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
    overrides: dict | None = None,
    seed: int = 0,
) -> dict:
    """Pretrain ``method`` on the training splits of ``datasets``; writes ``out/pretrained.ckpt``.

    A run killed mid-way resumes from ``out/checkpoints/last.ckpt`` when started again with the same
    arguments; a finished run is not repeated.
    """
    check_method(method, PRETRAINING)
    settings = get_preset(preset)
    cfg = {**settings["pretrain"][method], **(overrides or {})}
    out = Path(out or Path("runs") / f"pretrain-{method}-{preset}")
    final = out / CHECKPOINT_NAME
    config = {"method": method, "datasets": list(datasets), "preset": preset, "seed": seed, "pretrain": cfg,
              "encoder": settings["encoder"], "unet": settings["unet"] if method in DIFFUSION_METHODS else None}
    record = {**config, "config_hash": config_hash(config), "code_version": code_version(), "checkpoint": str(final)}
    if final.is_file():
        return {**record, "status": "done", "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    record_json(out / "status.json", {"status": "running"})
    record_json(out / "config.json", record)
    started = time.perf_counter()
    loggers = []
    try:
        L.seed_everything(seed, workers=True, verbose=False)
        share_cores(accelerator, devices)
        module_kwargs = {key: value for key, value in cfg.items() if key not in RUN_KEYS}
        module = method_module(method)
        if method in DIFFUSION_METHODS:
            module_kwargs.update(unet=settings["unet"], dataset_names=list(datasets))
            transform = None
        else:
            module_kwargs.update(encoder=settings["encoder"])
            transform = module.views_transform(**cfg.get("views", {}))
        model = pretraining_class(method)(**module_kwargs)
        loggers = run_loggers(out, out.name, wandb_group, [method, "pretrain", *datasets], config)
        datamodule = UnlabeledDataModule(datasets, data_dir, resolution=cfg["resolution"], batch_size=cfg["batch_size"],
                                         transform=transform, num_workers=cfg.get("num_workers", 0))
        periodic = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                   every_n_train_steps=max(1, cfg["max_steps"] // 10))
        trainer = L.Trainer(max_steps=cfg["max_steps"], max_epochs=-1, accelerator=accelerator, devices=devices,
                            logger=loggers, callbacks=[periodic],
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
            atomic_write(final, lambda stream: stream.write(temp.read_bytes()))
            temp.unlink()
            if hasattr(module, "save_sample_grid"):
                module.save_sample_grid(model, out / "samples.png")
        record.update(status="done", wall_seconds=time.perf_counter() - started, steps=trainer.global_step)
    except BaseException as error:
        record_json(out / "status.json", {"status": "failed", "reason": f"{type(error).__name__}: {error}",
                                         "traceback": traceback.format_exc()})
        raise
    finally:
        finish(loggers)
    record_json(out / "status.json", {"status": "done", "wall_seconds": record["wall_seconds"]})
    record_json(out / "run.json", record)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return record
