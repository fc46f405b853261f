"""The mean-image reference of a diffusion pretraining's health record, for pretrainings recorded before the health
record carried it: ε-MSE on the run's held-out samples of predicting each as its dataset's mean training image.

    OMP_NUM_THREADS=1 .venv/bin/python results/selection/mean_image_reference.py RUN_FOLDER [RUN_FOLDER ...]

RUN_FOLDER: a pretraining's folder (config.json and pretrained.ckpt); its data are read from ../shared/data.
"""

import json
import sys
from pathlib import Path

from landmark_bench.methods.ddpm import DDPMPretrain
from landmark_bench.pretrain import pretraining_data

for folder in map(Path, sys.argv[1:]):
    config = json.loads((folder / "config.json").read_text())
    health = json.loads((folder / "health.json").read_text())
    method = config["method"]
    settings = config["pretrain"]
    datamodule = pretraining_data(method, settings, config["datasets"], "../shared/data")
    datamodule.setup("fit")
    held_out = datamodule.held_out.fixed_batch(crops_per_image=4, seed=0)
    training = datamodule.dataset.fixed_batch(crops_per_image=4, seed=0)
    module = DDPMPretrain(unet=config["unet"], dataset_names=config["datasets"], max_steps=1,
                          **{key: settings[key] for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
                             if key in settings})
    reference = module.mean_image_mse(held_out, health["timesteps"], training)
    figures = lambda values: " / ".join(f"{value:.3g}" for value in values)  # noqa: E731
    print(f"{folder}: pretrained {figures(health['pretrained_mse'])}; mean image {figures(reference)}", flush=True)
