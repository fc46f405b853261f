"""Optimiser steps/s under Lightning against a bare PyTorch loop, and peak memory, per method.

Both loops run the same LightningModule's ``training_step`` on the same cached batches with the same
optimiser in the same process; the bare loop calls backward, the optimiser, the scheduler and the
module's ``on_train_batch_end`` (momentum updates) itself. Each method runs in its own subprocess so
that peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightly.models.utils import update_momentum
from torch.utils.data import DataLoader

from benchmarks.common import markdown_table, report
from landmark_bench.data.datamodule import LandmarkDataModule, UnlabeledDataModule
from landmark_bench.methods import build_backbone, family_of, get_method, method_names
from landmark_bench.methods.ddpm import DDPMPretrain
from landmark_bench.methods.momentum import MomentumPretrainer
from landmark_bench.models.detector import LandmarkDetector
from landmark_bench.presets import finetune_settings, get_preset
from landmark_bench.pretrain import RUN_KEYS

# fine-tuning rows: the detector with the ImageNet encoder, and with the ddpm UNet (the diffusion rows' backbone)
FINETUNE = {"finetune-encoder": "imagenet", "finetune-unet": "ddpm"}


def unet_checkpoint(preset: str, data_dir: str, folder: Path) -> str:
    """A ``ddpm`` checkpoint of the preset's UNet after one step: what the diffusion fine-tunes load."""
    model, datamodule = build("ddpm", preset, data_dir, "")
    model.hparams.max_steps = 1
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)
    path = folder / "ddpm.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return str(path)


def build(method: str, preset: str, data_dir: str, dataset: str, channels_last: bool | None = None):
    settings = get_preset(preset)
    if method in FINETUNE:
        cfg = finetune_settings(settings, dataset, family_of(FINETUNE[method]))
        datamodule = LandmarkDataModule(dataset, data_dir, shots=10, seed=0, resolution=cfg["resolution"],
                                        batch_size=cfg["batch_size"], sigma=cfg["sigma"],
                                        samples_per_epoch=cfg["batch_size"] * 10_000)
        pretrained = None
        if family_of(FINETUNE[method]) == "diffusion":
            pretrained = unet_checkpoint(preset, data_dir, Path(tempfile.mkdtemp()))
        backbone = build_backbone(FINETUNE[method], encoder=settings["encoder"], pretrained=pretrained,
                                  dataset=dataset, unet=settings["unet"])
        model = LandmarkDetector(backbone=backbone, num_landmarks=datamodule.reader.num_landmarks, lr=cfg["lr"],
                                 max_steps=cfg["max_steps"], warmup_steps=cfg["warmup_steps"],
                                 channels_last=channels_last)
        return model, datamodule
    cfg = settings["pretrain"][method]
    kwargs = {key: value for key, value in cfg.items() if key not in RUN_KEYS}
    datasets = ["isbi2015", "aasce2019", "hand", "chest"]
    if family_of(method) == "diffusion":
        kwargs.update(unet=settings["unet"], dataset_names=datasets)
        transform = None
    else:
        kwargs.update(encoder=settings["encoder"])
        transform = get_method(method).views_transform(**cfg.get("views", {}))
    model = get_method(method)(**kwargs)
    datamodule = UnlabeledDataModule(datasets, data_dir, resolution=cfg["resolution"], batch_size=cfg["batch_size"],
                                     transform=transform, crop_size=cfg.get("crop_size"))
    return model, datamodule


def bare_loop(model: L.LightningModule, batches: list, device: torch.device) -> float:
    """Steps/s of a plain loop over the module's own step, optimiser and scheduler, with its per-step extras
    (gradient edits before the step, EMA and momentum updates after it) called by hand."""
    configured = model.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured.get("lr_scheduler", {}).get("scheduler") if isinstance(configured, dict) else None
    model.train()
    started = time.perf_counter()
    for index, batch in enumerate(batches):
        batch = {key: [v.to(device) for v in value] if isinstance(value, list) else value.to(device)
                 for key, value in batch.items()}
        loss = model.training_step(batch, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.on_before_optimizer_step(optimizer)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if isinstance(model, DDPMPretrain):
            model.ema_unet.update_parameters(model.unet)
        if isinstance(model, MomentumPretrainer):
            for online, target in model.momentum_pairs:
                update_momentum(online, target, m=model.momentum_at(index))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batches) / (time.perf_counter() - started)


class StepTimer(L.Callback):
    """Times the steps after warm-up, as the bare loop does."""

    def __init__(self, warmup: int):
        self.warmup, self.started, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.started is None:
            self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.elapsed = time.perf_counter() - self.started
        self.steps = trainer.global_step - self.warmup


def measure(method: str, preset: str, data_dir: str, dataset: str, steps: int, warmup: int) -> dict:
    L.seed_everything(0, verbose=False)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    model, datamodule = build(method, preset, data_dir, dataset)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches, iterator = [], iter(loader)
    while len(batches) < warmup + steps:
        try:
            batches.append(next(iterator))
        except StopIteration:
            iterator = iter(loader)
    model.to(device)
    bare_loop(model, batches[:warmup], device)  # warm-up: kernel selection, allocator
    bare = bare_loop(model, batches[warmup:], device)
    flipped = None
    if method in FINETUNE:  # the same detector in the other memory format, to check the backbone's choice
        other, _ = build(method, preset, data_dir, dataset, channels_last=not model.hparams.channels_last)
        other.to(device)
        bare_loop(other, batches[:warmup], device)
        flipped = {"channels_last": other.hparams.channels_last, "bare": bare_loop(other, batches[warmup:], device)}

    model, _ = build(method, preset, data_dir, dataset)
    timer = StepTimer(warmup)
    # one epoch over the prepared batches; max_steps stays the module's own so its schedules match the bare loop's
    trainer = L.Trainer(max_steps=model.hparams["max_steps"], max_epochs=1, accelerator=accelerator, devices=1,
                        logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))  # the prepared batches, as they are
    lightning = timer.steps / timer.elapsed
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"method": method, "bare": bare, "lightning": lightning, "peak_mib": peak, "flipped": flipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--dataset", default="isbi2015")
    parser.add_argument("--methods", nargs="+", default=[*FINETUNE, *method_names(pretrains=True)])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.preset, args.data_dir, args.dataset, args.steps, args.warmup)))
        return
    rows = []
    for method in args.methods:
        command = [sys.executable, "-m", "benchmarks.training", "--one", method, "--preset", args.preset,
                   "--data-dir", args.data_dir, "--dataset", args.dataset, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        overhead = 100 * (result["bare"] / result["lightning"] - 1)
        flipped = result["flipped"]
        other_format = "–" if flipped is None else (
            f"{flipped['bare']:.2f} ({'NHWC' if flipped['channels_last'] else 'NCHW'})")
        rows.append([method, f"{result['bare']:.2f}", f"{result['lightning']:.2f}", f"{overhead:+.1f} %",
                     f"{result['peak_mib']:.0f}", other_format])
    memory = "peak GPU memory allocated (MiB)" if torch.cuda.is_available() else "peak process RSS (MiB)"
    table = markdown_table(["method", "bare loop steps/s", "Lightning steps/s", "Lightning overhead", memory,
                            "bare loop steps/s, other memory format"], rows)
    report(f"Training steps/s, Lightning vs bare PyTorch, preset {args.preset}", table,
           f"{args.steps} timed steps after {args.warmup} warm-up steps, same batches, same module and optimiser; "
           f"{torch.get_num_threads()} threads. finetune-encoder: the detector with the ImageNet encoder; "
           "finetune-unet: with the ddpm UNet. The last column runs the detector in the memory format its "
           "backbone does not choose.",
           append=not args.no_append)


if __name__ == "__main__":
    main()
