"""Every preset value of the suite, in one place.

``tiny``: seconds on a CPU, for tests. ``cpu``: the embedded default, sized for a laptop (the ISBI 10-shot sweep
of every method, both protocols, 3 seeds: the dry run's estimate is printed before it starts). ``paper``: GPU,
256 px or more, the paper's schedules.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any

import yaml

# Fine-tuning: the same budget (steps, augmentation, resolution) for every method of a preset.
# Resolution is (h, w); ISBI images are 2400x1935, so (h, w) keeps roughly their aspect.
_FINETUNE_COMMON = {
    "sigma": 2.0,  # Gaussian target, network pixels
    "augment": True,
    # the training augmentation's magnitudes (data.transforms.Augment): ``augment_strength`` scales the affine and
    # intensity ranges (1: rotation 10 degrees, scale 10 %, shift 5 %, gamma exp(0.3), contrast 25 %, brightness 0.1),
    # ``augment_noise`` the largest standard deviation of added Gaussian noise (0: none)
    "augment_strength": 1.0,
    "augment_noise": 0.0,
    "loss": "softmax_ce",
    "refine_window": 6,  # 3 sigma: the window mean is unbiased for the target width (see decode_heatmaps)
    "weight_decay": 1e-4,
    "num_workers": 0,
    "precision": "32-true",
    "deterministic": False,
    "progress_bar": False,
    "diffusion_timestep": None,  # None: the diffusion method's documented default
    "diffusion_noise_input": False,  # True: noise the image to that timestep; False: the timestep only sets the embedding
    # fine-tuning only (a probe reads every decoder level): the stride at which the diffusion UNet detector reads its
    # decoder; 2 drops the full-resolution level (DiffusionBackbone): a third less time per cpu fine-tune, measured on
    # ISBI validation and not adopted (cdpm_align 0.19 mm worse, results/selection/unet_stride.md)
    "diffusion_feature_stride": 1,
    # probe only: where a frozen backbone's BatchNorm statistics come from. "train_split": re-estimated on the
    # dataset's training images, labels unused, for every backbone alike (a random-init control has no statistics
    # of its own); "pretrained": as stored (the control's placeholders switch its BatchNorm off).
    # results/selection/probe.md
    "probe_batchnorm": "train_split",
}
FINETUNE: dict[str, dict] = {
    "tiny": {**_FINETUNE_COMMON, "resolution": [80, 64], "batch_size": 4, "max_steps": 60, "warmup_steps": 5,
             "val_every": 20, "lr": 3e-3},
    # cpu: augmentation strength 2 with noise up to 0.06, chosen on ISBI validation (clean and perturbed) over strength
    # 1 and 1.5 (results/selection/augmentation.md); the encoder detectors' own is in FAMILY_FINETUNE
    "cpu": {**_FINETUNE_COMMON, "resolution": [160, 128], "batch_size": 8, "max_steps": 200, "warmup_steps": 20,
            "val_every": 25, "lr": 2e-3, "augment_strength": 2.0, "augment_noise": 0.06},
    "paper": {**_FINETUNE_COMMON, "resolution": [320, 256], "batch_size": 8, "max_steps": 4000, "warmup_steps": 200,
              "val_every": 250, "lr": 1e-3, "num_workers": 4, "precision": "bf16-mixed", "progress_bar": True},
}
# A dataset's own fine-tuning settings, over ``FINETUNE[preset]`` for its jobs (``finetune_settings``); each is a
# setting, ``dataset_finetune.<dataset>.<key>``, and a ``finetune.<key>`` override holds for every dataset.
# AASCE 2019 spine X-rays are tall and narrow (height/width 2.1-3.5, median 2.6, over the 608 images): (h, w) at
# 2.67, multiples of 8 (the diffusion UNet), about as many pixels as the preset's ISBI size; the batch keeps ISBI's
# pixels per step, so the preset's step cost still holds. Target width: 10 shots of 68 vertebra corners (a corner's
# nearest neighbour a median 4.0 network pixels away at 256x96) mostly go wrong by a whole vertebra, not by a pixel;
# a wide target lowers those gross errors. cpu: sigma 5 (window 3 sigma) chosen on AASCE validation over 1.5, 3, 5
# and 8 (results/selection/aasce.md); tiny and paper: the same width relative to the image. The augmentation chosen on
# ISBI was not selected on AASCE: the spine keeps the magnitudes its committed grids were made with.
DATASET_FINETUNE: dict[str, dict[str, dict]] = {
    "tiny": {"aasce2019": {"resolution": [128, 48], "sigma": 2.5, "refine_window": 8, "batch_size": 3}},
    "cpu": {"aasce2019": {"resolution": [256, 96], "sigma": 5.0, "refine_window": 15, "batch_size": 6,
                          "augment_strength": 1.0, "augment_noise": 0.0}},
    "paper": {"aasce2019": {"resolution": [512, 192], "sigma": 10.0, "refine_window": 30, "batch_size": 6}},
}

# A network family's own fine-tuning settings (``"encoder"``: the timm encoder detector, ``"diffusion"``: the UNet
# detector), over ``FINETUNE[preset]`` and under a dataset's own; each is a setting,
# ``family_finetune.<family>.<key>``. cpu: the rule that chose the augmentation (results/selection/augmentation.md),
# applied to each family's own methods on the same validation runs, keeps strength 2 / noise 0.06 for the UNet
# detector (scratch_unet: mean ratio 0.607 against 0.730 for strength 1.5) and gives the encoder detectors strength
# 1.5 / noise 0.03 (scratch and imagenet: 0.933 against 0.960 for strength 2).
FAMILY_FINETUNE: dict[str, dict[str, dict]] = {
    "tiny": {"encoder": {}, "diffusion": {}},
    "cpu": {"encoder": {"augment_strength": 1.5, "augment_noise": 0.03}, "diffusion": {}},
    "paper": {"encoder": {}, "diffusion": {}},
}
FINETUNE_GROUPS = ("family_finetune", "dataset_finetune")
"""Where a job's fine-tuning settings may differ from the preset's, in the order they apply (the last wins)."""


def finetune_settings(settings: dict, dataset: str, family: str | None) -> dict:
    """The fine-tuning settings of a job of a ``family`` method (None: a reference row) on ``dataset`` under resolved
    preset ``settings``: the preset's, the family's own over them, the dataset's own over both (a new dict, which the
    job may change)."""
    return {**settings["finetune"], **settings["family_finetune"].get(family, {}),
            **settings["dataset_finetune"].get(dataset, {})}


def for_every_group(overrides: dict[str, Any], settings: dict) -> dict[str, Any]:
    """``overrides`` with each ``finetune.<key>`` also set in every family's and dataset's own settings that hold that
    key, unless the overrides set it there themselves: a fine-tuning setting given on the command line is never
    silently replaced by a family's or dataset's default."""
    wide = {f"{group}.{name}.{key}": value for dotted, value in overrides.items()
            if (key := dotted.removeprefix("finetune.")) != dotted
            for group in FINETUNE_GROUPS for name, own in settings[group].items() if key in own}
    return {**wide, **overrides}

# Diffusion pretraining (ddpm, cdpm_align): one UNet config per preset, shared by both methods and by their
# fine-tuning backbone. Keys are diffusers ``UNet2DModel`` arguments (channels, FiLM and the class
# embedding are set in ``landmark_bench.models.unet.build_unet``); four levels give CDPM-Align its four
# decoder scales, and fine-tuning sizes must be multiples of 8. ``sample_size`` is the size the UNet pretrains at,
# the crop or the whole cached image, (h, w) or one side of a square (it sets the size of the sample-grid figure).
UNET: dict[str, dict] = {
    "tiny": {"sample_size": 16, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"], "attention_head_dim": 8},
    "cpu": {"sample_size": [80, 64], "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"], "attention_head_dim": 32},
    "paper": {"sample_size": 256, "block_out_channels": [64, 128, 256, 512], "layers_per_block": 2,
              "norm_num_groups": 32,
              "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"], "attention_head_dim": 64},
}
# ``resolution``, ``crop_size``, ``crop_scale``, ``held_out_fraction`` and ``batch_size`` go to the
# UnlabeledDataModule; every other key is a keyword argument of ``DDPMPretrain`` / ``CDPMAlignPretrain`` (with
# ``unet=UNET[preset]``). Both methods get the same schedule so that they differ only by the condition and the
# alignment phase.
# The UNet pretrains on random ``crop_size`` crops of images cached at ``resolution`` (the fine-tuning resolution: the
# pixel scale it later localises at), or with ``crop_size`` None on whole images cached at ``resolution``
# (``crop_scale`` (lo, hi) would mix in larger windows resized to the crop: not chosen). ``held_out_fraction`` of each
# dataset's pool is kept out for the health record.
# cpu: lr and EMA chosen on the held-out denoising loss; whole images at half the fine-tuning resolution for 2000
# steps, because every run at the fine-tuning pixel scale (64 and 128 crops, multi-scale crops, v-prediction) and
# every 1000-step run sampled texture without anatomy, where this one samples skulls, spines, hands and lungs and
# is not worse on ISBI validation (results/selection/diffusion.md, "Twice the steps on whole images").
_DDPM = {
    "tiny": {"resolution": [32, 24], "crop_size": 16, "crop_scale": None, "held_out_fraction": 0.1, "batch_size": 4,
             "max_steps": 8, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9, "lr_schedule": "cosine",
             "weight_decay": 1e-6, "num_train_timesteps": 1000, "beta_schedule": "linear",
             "prediction_type": "epsilon"},
    "cpu": {"resolution": [80, 64], "crop_size": None, "crop_scale": None, "held_out_fraction": 0.05,
            "batch_size": 16, "max_steps": 2000, "lr": 3e-3, "warmup_steps": 50, "ema_decay": 0.995,
            "lr_schedule": "cosine", "weight_decay": 1e-6, "num_train_timesteps": 1000, "beta_schedule": "linear",
            "prediction_type": "epsilon"},
    # The CDPM-Align paper's settings as quoted by a public third-party reproduction (second-hand; the paper text
    # available to us has none, see DESIGN.md): T = 500, linear beta 1e-4 to 0.028, batch 16, AdamW lr 1e-4,
    # 50k iterations, downstream features at t = 200. EMA, warmup, LR decay and crops are not reported: ours.
    "paper": {"resolution": [320, 256], "crop_size": 256, "crop_scale": None, "held_out_fraction": 0.05,
              "batch_size": 16, "max_steps": 50000, "lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.9999,
              "lr_schedule": "cosine", "weight_decay": 1e-6, "num_train_timesteps": 500, "beta_schedule": "linear",
              "beta_start": 1e-4, "beta_end": 0.028, "prediction_type": "epsilon", "backbone_timestep": 200,
              "num_workers": 4, "precision": "bf16-mixed"},
}
_CDPM_ALIGN = {"condition_dropout": 0.1, "align_fraction": 0.1, "align_weight": 0.1, "align_timestep_gap": None,
               "align_timestep_range": None, "align_scales": None}
# Second-hand, as _DDPM["paper"]: 10% CFG dropout, the final 10% (5k of 50k iterations) aligned, lambda = 5, the two
# alignment timesteps uniform in [T/4, 3T/4]. Ours: gradient checkpointing in the alignment phase, whose four UNet
# passes a step peaked at 94 GiB without it (benchmarks/RESULTS.md, "GPU check"), more than an 80 GB GPU holds.
_CDPM_ALIGN_PAPER = {**_CDPM_ALIGN, "align_weight": 5.0, "align_timestep_range": [0.25, 0.75],
                     "checkpoint_alignment": True}
DIFFUSION_PRETRAIN: dict[str, dict[str, dict]] = {
    preset: {"ddpm": settings, "cdpm_align": {**settings, **(_CDPM_ALIGN_PAPER if preset == "paper" else _CDPM_ALIGN)}}
    for preset, settings in _DDPM.items()
}

# Self-supervised encoder pretraining (simclr, moco, dino). ``resolution`` and ``batch_size`` go to the
# UnlabeledDataModule, ``views`` to the method's ``views_transform``; every other key is a keyword argument of
# ``SimCLR`` / ``MoCoV3`` / ``DINO`` (with ``encoder=PRESETS[preset]["encoder"]``). Views are cut from the
# fine-tuning cache (same resolution), so no extra decoding. AdamW with warmup + cosine decay everywhere.
# cpu: ~650 images at 64 px views, batch 32, each sized to about 8 minutes of one thread (steps times the
# ESTIMATE step cost); blur sigmas scaled from 224 px to 64 px. Chosen on short runs on the unlabelled training
# images against each loss's chance level (results/selection/ssl.md): two-view crops of at least 40% of the image
# (at 20% the two views of one skull share too little for ten epochs to learn from, and SimCLR's loss rose above
# chance), SimCLR at temperature 0.2; momentum from 0.9 (DINO, MoCo), because at 0.99 the teacher of a run this
# short stays its random init and DINO's loss never leaves ln(output_dim). DINO with mean centering and multi-crop
# collapses onto a few outputs and then sits at ln K; DINO here builds on run "I600" of the selection notes: DINOv2's
# Sinkhorn-Knopp centering and KoLeo term, teacher at a fixed 0.02, K = 256, BatchNorm in the head, two global
# crops and no local crops (local crops of a skull were too hard to match). At 600 steps with crops of 40-100% it
# ended at 83% of ln K (the health bar is 80%); twelve settings run side by side on a lent GPU (results/selection/
# ssl.md, "Twelve DINO settings") chose 1200 steps with global crops of 60-100%: 78% of ln K there, and the lowest
# validation probe of the learned settings within twice the preset's cost. MoCo at temperature 0.2 and lr 1e-3
# ended at 81-84% of chance; thirteen settings on the GPU (ssl.md, "Thirteen MoCo settings") pointed to temperature
# 0.1 with lr 3e-3 at the same 280 steps, and four pretraining seeds of it and of three others, each probed and
# fine-tuned on ISBI validation (ssl.md, "MoCo with four pretraining seeds per setting"), chose it: all four at
# 74-78% of chance, mean validation probe 9.21 mm against 9.99 and fine-tune 2.49 against 2.53 for the old preset.
_CPU_VIEW = {"size": 64, "scale": [0.4, 1.0], "blur_sigmas": [0.1, 0.6]}
_CPU_GLOBAL_CROPS = {"global_size": 64, "global_scale": [0.6, 1.0], "local_size": 32, "local_scale": [0.05, 0.14],
                     "n_local": 0, "blur_sigmas": [0.1, 0.6]}
_PAPER_VIEW = {"size": 224, "scale": [0.2, 1.0]}
_PAPER_MULTI_CROP = {"global_size": 224, "global_scale": [0.14, 1.0], "local_size": 96, "local_scale": [0.05, 0.14],
                     "n_local": 6}
SSL_PRETRAIN: dict[str, dict[str, dict]] = {
    "tiny": {
        "simclr": {"resolution": 48, "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "lr": 1e-3,
                   "projection_hidden_dim": 64, "projection_dim": 32, "temperature": 0.1,
                   "views": {"size": 32, "scale": [0.2, 1.0]}},
        "moco": {"resolution": 48, "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "lr": 1e-3,
                 "projection_hidden_dim": 64, "prediction_hidden_dim": 64, "projection_dim": 32, "temperature": 0.2,
                 "base_momentum": 0.99, "views": {"size": 32, "scale": [0.2, 1.0]}},
        "dino": {"resolution": 48, "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "lr": 1e-3,
                 "head_hidden_dim": 64, "bottleneck_dim": 32, "output_dim": 128, "teacher_temp_warmup_steps": 2,
                 "freeze_last_layer_steps": 1, "base_momentum": 0.99,
                 "views": {"global_size": 32, "local_size": 16, "n_local": 2}},
    },
    "cpu": {
        "simclr": {"resolution": [160, 128], "batch_size": 32, "max_steps": 320, "warmup_steps": 32, "lr": 1e-3,
                   "weight_decay": 0.05, "projection_hidden_dim": 2048, "projection_dim": 128, "temperature": 0.2,
                   "views": _CPU_VIEW},
        "moco": {"resolution": [160, 128], "batch_size": 32, "max_steps": 280, "warmup_steps": 28, "lr": 3e-3,
                 "weight_decay": 0.05, "projection_hidden_dim": 1024, "prediction_hidden_dim": 1024,
                 "projection_dim": 256, "temperature": 0.1, "base_momentum": 0.9, "views": _CPU_VIEW},
        "dino": {"resolution": [160, 128], "batch_size": 32, "max_steps": 1200, "warmup_steps": 120, "lr": 1e-3,
                 "weight_decay": 0.04, "head_hidden_dim": 1024, "bottleneck_dim": 256, "output_dim": 256,
                 "warmup_teacher_temp": 0.02, "teacher_temp": 0.02, "teacher_temp_warmup_steps": 0,
                 "freeze_last_layer_steps": 20, "base_momentum": 0.9, "head_batch_norm": True,
                 "center_momentum": 0.9, "centering": "sinkhorn", "koleo_weight": 0.1, "views": _CPU_GLOBAL_CROPS},
    },
    "paper": {
        "simclr": {"resolution": [320, 256], "batch_size": 128, "max_steps": 5000, "warmup_steps": 500, "lr": 1e-3,
                   "weight_decay": 0.05, "projection_hidden_dim": 2048, "projection_dim": 128, "temperature": 0.1,
                   "num_workers": 8, "precision": "bf16-mixed", "views": _PAPER_VIEW},
        "moco": {"resolution": [320, 256], "batch_size": 128, "max_steps": 5000, "warmup_steps": 500, "lr": 1e-3,
                 "weight_decay": 0.05, "projection_hidden_dim": 4096, "prediction_hidden_dim": 4096,
                 "projection_dim": 256, "temperature": 0.2, "base_momentum": 0.996, "num_workers": 8,
                 "precision": "bf16-mixed", "views": _PAPER_VIEW},
        "dino": {"resolution": [320, 256], "batch_size": 128, "max_steps": 5000, "warmup_steps": 500, "lr": 1e-3,
                 "weight_decay": 0.04, "head_hidden_dim": 2048, "bottleneck_dim": 256, "output_dim": 4096,
                 "teacher_temp": 0.07, "teacher_temp_warmup_steps": 1500, "freeze_last_layer_steps": 50,
                 "base_momentum": 0.996, "num_workers": 8,
                 "precision": "bf16-mixed", "views": _PAPER_MULTI_CROP},
    },
}

# A new encoder SSL method with no pretraining entry of its own runs with these (its ``default_settings``);
# ``landmark-bench ... --set pretrain.<name>.<key>=...`` changes them like any other setting.
SSL_DEFAULTS: dict[str, dict] = {
    preset: {key: methods["simclr"][key] for key in ("resolution", "batch_size", "max_steps", "warmup_steps", "lr",
                                                     "weight_decay", "views") if key in methods["simclr"]}
    for preset, methods in SSL_PRETRAIN.items()
}

PRESETS: dict[str, dict] = {
    "tiny": {
        "encoder": "efficientnet_lite0",
        "finetune": FINETUNE["tiny"],
        "unet": UNET["tiny"],
        "pretrain": {"ddpm": DIFFUSION_PRETRAIN["tiny"]["ddpm"], "cdpm_align": DIFFUSION_PRETRAIN["tiny"]["cdpm_align"], **SSL_PRETRAIN["tiny"]},
    },
    "cpu": {
        "encoder": "efficientnet_lite0",
        "finetune": FINETUNE["cpu"],
        "unet": UNET["cpu"],
        "pretrain": {"ddpm": DIFFUSION_PRETRAIN["cpu"]["ddpm"], "cdpm_align": DIFFUSION_PRETRAIN["cpu"]["cdpm_align"], **SSL_PRETRAIN["cpu"]},
    },
    "paper": {
        "encoder": "efficientnet_lite0",
        "finetune": FINETUNE["paper"],
        "unet": UNET["paper"],
        "pretrain": {"ddpm": DIFFUSION_PRETRAIN["paper"]["ddpm"], "cdpm_align": DIFFUSION_PRETRAIN["paper"]["cdpm_align"], **SSL_PRETRAIN["paper"]},
    },
}

# Cost model of the sweep's dry run (seconds; per optimiser step where it says so). ``startup``: a job's process
# start and imports; ``evaluation``: a fine-tune's wall time outside its training loop (test evaluation, files).
# ``cpu``: from job wall times with one thread per job and two jobs on a 2-core CPU (benchmarks/RESULTS.md): the
# per-step figures of fine-tunes and probes are (wall - startup - evaluation) / steps, so a probe's step also carries
# its feature caching and validation; the other presets are guesses until measured. ``pretrain_step_by_family``: the
# cost of a pretraining method the model does not name (a user's own), its family's costliest. ``gpu_check``: on a
# preset whose jobs run on a GPU, where its per-step figures were measured (``GPU_CHECK_FILE``); None: guessed.
ESTIMATE: dict[str, dict] = {
    "tiny": {"startup": 5.0, "evaluation": {"encoder": 2.0, "diffusion": 2.0},
             "finetune_step": {"encoder": 0.1, "diffusion": 0.1}, "probe_step": {"encoder": 0.05, "diffusion": 0.05},
             "pretrain_step": {"ddpm": 0.1, "cdpm_align": 0.15, "simclr": 0.1, "moco": 0.1, "dino": 0.2},
             "pretrain_step_by_family": {"encoder": 0.2, "diffusion": 0.15}},
    # cpu: the fresh-clone `make benchmark SHOTS=10` of 2026-12-04 (benchmarks/RESULTS.md), two jobs at a time with
    # one thread each: a step is a job's training seconds (its validations included) over its steps, evaluation its
    # wall_seconds less training (test pass, figures, checkpoint), a pretraining step (wall - startup) / steps with
    # its health record and sample grid; the 2-core machines lent so far differ: the one of 2026-12-02 took 1.66 s
    # for the UNet fine-tune step that took 0.85 s here
    "cpu": {"startup": 12.0, "evaluation": {"encoder": 4.5, "diffusion": 11.0},
            "finetune_step": {"encoder": 0.28, "diffusion": 0.85}, "probe_step": {"encoder": 0.093, "diffusion": 0.13},
            "pretrain_step": {"ddpm": 0.37, "cdpm_align": 0.49, "simclr": 0.42, "moco": 0.52, "dino": 0.53},
            "pretrain_step_by_family": {"encoder": 0.53, "diffusion": 0.49},
            # AASCE 2019 (68 landmarks, 96 validation images) at the same steps and pixels per step as ISBI: the
            # ratio of its jobs' wall time less start-up to ISBI's model, from the 10-shot spine sweep of
            # 2026-12-03 (benchmarks/RESULTS.md)
            "dataset_factor": {"aasce2019": {"finetune": {"encoder": 2.4, "diffusion": 1.35},
                                             "probe": {"encoder": 6.0, "diffusion": 2.8}}}},
    "paper": {"startup": 30.0, "evaluation": {"encoder": 30.0, "diffusion": 60.0},
              "finetune_step": {"encoder": 0.05, "diffusion": 0.1}, "probe_step": {"encoder": 0.01, "diffusion": 0.01},
              "pretrain_step": {"ddpm": 0.1, "cdpm_align": 0.12, "simclr": 0.1, "moco": 0.1, "dino": 0.15},
              "pretrain_step_by_family": {"encoder": 0.15, "diffusion": 0.12}, "gpu_check": None},
}
# Written by ``make gpu-check`` (benchmarks/gpu_check.py) after a run on a GPU: the per-step seconds it measured for a
# preset, which replace that preset's guessed ones above, so the dry run's GPU-hours follow the hardware.
GPU_CHECK_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.json"


def cost_estimate(name: str) -> dict:
    """``ESTIMATE[name]`` with the per-step seconds ``make gpu-check`` measured for preset ``name`` on a GPU, if it is
    a GPU preset and the check has run (``gpu_check`` then says where and when); a check file that cannot be read is
    an error, not a silent guess."""
    estimate = copy.deepcopy(ESTIMATE[name])
    if "gpu_check" not in estimate or not GPU_CHECK_FILE.is_file():
        return estimate
    try:
        check = json.loads(GPU_CHECK_FILE.read_text())
        if check["preset"] != name:
            return estimate
        for key, measured in check["per_step_seconds"].items():
            estimate[key].update(measured)
        estimate["gpu_check"] = check["measured"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"GPU check file {GPU_CHECK_FILE} cannot be read ({error!r}): run `make gpu-check` on a "
                         "GPU again or delete it") from None
    return estimate


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every dotted key of ``tree`` that holds a value, e.g. ``finetune.lr`` or ``pretrain.dino.views.size``."""
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.extend(leaf_keys(value, f"{dotted}.") if isinstance(value, dict) and value else [dotted])
    return keys


def apply_overrides(settings: dict, overrides: dict[str, Any], open_keys: dict[str, set[str]] | None = None) -> dict:
    """``settings`` with each dotted key of ``overrides`` replaced (in place; also returned).

    ``open_keys``: for a dotted node (``"pretrain.dino"``), the further keys it may be given though the preset does
    not name them (a module's keyword arguments at their defaults). Any other key that is not in the preset is an
    error listing the valid keys under the part of it that exists, so a typo never silently runs the default.
    """
    open_keys = open_keys or {}
    for dotted, value in overrides.items():
        node, parts = settings, dotted.split(".")
        for depth, part in enumerate(parts):
            known = ".".join(parts[:depth])
            if depth == len(parts) - 1 and isinstance(node, dict) and part in open_keys.get(known, ()):
                node[part] = value
                continue
            if not isinstance(node, dict) or part not in node:
                under = node if isinstance(node, dict) else {}
                valid = sorted({*leaf_keys(under, f"{known}." if known else ""),
                                *(f"{known}.{key}" for key in open_keys.get(known, ()))})
                raise ValueError(f"unknown setting {dotted!r}; valid settings"
                                 f"{f' under {known!r}' if known else ''}: {', '.join(valid)}")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return settings


def parse_value(text: str) -> Any:
    """A Python literal (``5e-4``, ``[160, 128]``, ``None``, ``True``), else the text itself (``resnet18``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["finetune.lr=5e-4", ...]`` (the command line's ``--set``) to ``{"finetune.lr": 0.0005, ...}``."""
    overrides = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = parse_value(value.strip())
    return overrides


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML file of settings, nested (``finetune: {lr: 5e-4}``) or dotted (``finetune.lr: 5e-4``), as dotted keys."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"config file {path} cannot be read: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, not {type(loaded).__name__}")

    def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
        flat = {}
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            flat.update(flatten(value, f"{dotted}.") if isinstance(value, dict) else {dotted: value})
        return flat

    return flatten(loaded)


def get_preset(name: str, overrides: dict[str, Any] | None = None, pretrain_defaults: dict | None = None,
               open_keys: dict[str, set[str]] | None = None) -> dict:
    """A deep copy of preset ``name`` with its cost model, the families' and datasets' own fine-tuning settings, a
    ``pretrain_defaults`` entry for each pretraining method the preset does not name (a method added by a user), and
    the dotted ``overrides`` applied (``open_keys``: see ``apply_overrides``).

    Unknown names list the valid presets; unknown override keys list the valid settings.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    settings = copy.deepcopy({**PRESETS[name], "family_finetune": FAMILY_FINETUNE[name],
                              "dataset_finetune": DATASET_FINETUNE[name], "estimate": cost_estimate(name)})
    settings["pretrain"] = {**copy.deepcopy(pretrain_defaults or {}), **settings["pretrain"]}
    # a family may be given any fine-tuning setting, whether or not the preset already sets one for it
    family_keys = {f"family_finetune.{family}": set(settings["finetune"]) for family in settings["family_finetune"]}
    return apply_overrides(settings, for_every_group(overrides or {}, settings), {**family_keys, **(open_keys or {})})
