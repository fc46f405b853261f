"""Choose the fine-tuning budget on validation data: best validation MRE per method and step count.

Each run fine-tunes with the preset's settings except ``max_steps`` (warm-up kept at 10% of it) and reports
the best validation MRE of the run (the checkpoint the preset restores for testing). Test metrics are
written into the run folders like every run's, but not read here: the choice uses validation only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchmarks.common import markdown_table, report


def run_one(method: str, steps: int, seed: int, dataset: str, shots: int, preset: str, data_dir: str,
            pretrained: str | None, out: str) -> tuple[str, int, int, float, float]:
    os.environ["WANDB_MODE"] = "disabled"
    import torch

    from landmark_bench.finetune import finetune

    torch.set_num_threads(1)  # the jobs share the cores
    record = finetune(method=method, dataset=dataset, shots=shots, seed=seed, preset=preset, data_dir=data_dir,
                      pretrained=pretrained, out=f"{out}/{method}-{steps}-seed{seed}",
                      overrides={"finetune.max_steps": steps, "finetune.warmup_steps": steps // 10})
    return method, steps, seed, record["best_val_mre"], record["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["imagenet"])
    parser.add_argument("--pretrained", nargs="*", default=[], help="METHOD=CKPT for pretrained methods")
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dataset", default="isbi2015")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    checkpoints = dict(item.split("=", 1) for item in args.pretrained)
    out = tempfile.mkdtemp(prefix="select-steps-")
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, method, steps, seed, args.dataset, args.shots, args.preset, args.data_dir,
                               checkpoints.get(method), out)
                   for method in args.methods for seed in args.seeds for steps in args.steps]
        results = [future.result() for future in futures]
    rows = []
    for method in args.methods:
        for steps in args.steps:
            mine = [r for r in results if r[0] == method and r[1] == steps]
            rows.append([method, steps, " / ".join(f"{r[3]:.3f}" for r in mine), f"{np.mean([r[3] for r in mine]):.3f}",
                         f"{np.mean([r[4] for r in mine]):.0f}"])
    table = markdown_table(["method", "max_steps", f"best val MRE (mm), seeds {args.seeds}", "mean",
                            "train s (1 thread, jobs sharing the cores)"], rows)
    report(f"Fine-tuning budget on validation, {args.dataset} {args.shots}-shot, preset {args.preset}", table,
           "Validation split only; test metrics of these runs are not looked at.", append=not args.no_append)


if __name__ == "__main__":
    main()
