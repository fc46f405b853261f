"""The mean-shape reference's MRE on a dataset's validation split (the fine-tune runs report it on test only): the
bar a validation figure of a learned detector is read against.

    .venv/bin/python results/selection/mean_shape_val.py aasce2019 10 0
"""

from __future__ import annotations

import sys

import torch

from landmark_bench.finetune import few_shot_data, protocol_settings
from landmark_bench.methods import preset_settings
from landmark_bench.models.detector import MeanShapeReference


def main(dataset: str, shots: int, seed: int, preset: str = "cpu", data_dir: str = "../shared/data") -> None:
    cfg = protocol_settings(preset_settings(preset), dataset, "finetune", "mean_shape")
    datamodule = few_shot_data(cfg, dataset, data_dir, shots, seed)
    reference = MeanShapeReference.from_training_set(datamodule.datasets["train"].landmarks_net, datamodule.size)
    errors = []
    for batch in datamodule.val_dataloader():
        pred = reference.infer(batch)["pred"]
        spacing = torch.where(torch.isfinite(batch["spacing"]), batch["spacing"], torch.ones_like(batch["spacing"]))
        errors.append((pred - batch["landmarks_orig"].double()).norm(dim=-1) * spacing.double()[:, None])
    errors = torch.cat(errors)
    print(f"{dataset} {shots} shots seed {seed}: mean shape validation MRE {errors.mean():.2f} over {len(errors)} images")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
