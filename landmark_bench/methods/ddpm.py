"""Plain denoising diffusion pretraining (``ddpm``; Ho et al. 2020, as used by Di Via et al., WACV 2025).

The UNet learns ε-prediction on the unlabeled X-rays; an exponential moving average of its weights is kept
in the checkpoint and is what fine-tuning starts from (the EMA weights are the better generative model and
the smoother starting point).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from matplotlib.figure import Figure
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from landmark_bench.checkpoints import METHOD_KEY, CheckpointError, read_checkpoint, strip_prefix
from landmark_bench.methods.base import BackboneSpec, register
from landmark_bench.presets import DIFFUSION_PRETRAIN
from landmark_bench.models.unet import (
    DEFAULT_BACKBONE_TIMESTEP,
    PREDICTION_TYPES,
    DiffusionBackbone,
    build_unet,
    epsilon_from_prediction,
    make_noise_scheduler,
    to_diffusion_range,
)

EMA_PREFIX = "ema_unet.module."
HEALTH_TIMESTEPS = (0.05, 0.2, 0.5, 0.8)
HEALTH_RATIO = 0.7
"""A pretraining has ``learned`` when its held-out denoising MSE is at most this share of the untrained
UNet's at every health timestep."""


@register
class DDPMPretrain(L.LightningModule):
    """Unconditional ε-prediction DDPM pretraining of the shared UNet, with an EMA copy of its weights.

    A training batch holds ``"image"`` (B, 1, H, W) in [0, 1] and ``"dataset_index"`` (B,) long. Subclasses set
    ``conditional`` to add the dataset condition and ``name`` to register and tag checkpoints. Fine-tuning
    starts from the EMA UNet of the checkpoint (``backbone``).
    ``dataset_names`` (the pretraining datasets, in the order of ``batch["dataset_index"]``) is recorded for
    provenance here and is the condition vocabulary in ``cdpm_align``.
    """

    name: ClassVar[str] = "ddpm"
    family: ClassVar[str] = "diffusion"
    pretrains: ClassVar[bool] = True
    conditional: ClassVar[bool] = False

    @classmethod
    def default_settings(cls, preset: str) -> dict[str, Any]:
        """Pretraining settings of a diffusion method with no entry of its own in the preset: ``ddpm``'s."""
        return copy.deepcopy(DIFFUSION_PRETRAIN[preset]["ddpm"])

    @classmethod
    def backbone(cls, spec: BackboneSpec, checkpoint: str | None) -> DiffusionBackbone:
        """The EMA UNet of the checkpoint, conditioned (when conditional) on ``spec.dataset``."""
        return load_backbone(checkpoint, cls, spec)

    @classmethod
    def architecture(cls, spec: BackboneSpec, hyper_parameters: dict | None = None) -> DiffusionBackbone:
        """``backbone``'s network at random init, from the pretraining's hyperparameters (UNet config, condition
        vocabulary, noise schedule and downstream timestep) instead of its checkpoint."""
        if not hyper_parameters or "unet" not in hyper_parameters or "dataset_names" not in hyper_parameters:
            raise ValueError(f"method {cls.name!r} rebuilds its backbone from the pretraining's hyperparameters "
                             "with its UNet config and dataset names")
        return diffusion_backbone(unet_of(hyper_parameters, cls), hyper_parameters, cls, spec)

    def save_sample_grid(self, path: str | Path) -> Path:
        return save_sample_grid(self, path)

    @classmethod
    def sample_grid_from_checkpoint(cls, checkpoint_path: str | Path, path: str | Path, **sampling: Any) -> Path:
        """Render a finished pretraining's sample grid again (e.g. at another guidance scale) from its checkpoint."""
        checkpoint = read_checkpoint(checkpoint_path, expected_method=cls.name)
        module = cls(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"], strict=True)
        return save_sample_grid(module, path, step=int(checkpoint["global_step"]), **sampling)

    def __init__(
        self,
        *,
        unet: dict,
        dataset_names: list[str],
        max_steps: int,
        lr: float = 1e-4,
        warmup_steps: int = 500,
        lr_schedule: str = "cosine",
        weight_decay: float = 1e-6,
        ema_decay: float = 0.999,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        backbone_timestep: int = DEFAULT_BACKBONE_TIMESTEP,
        health_timesteps: tuple[float, ...] = HEALTH_TIMESTEPS,
    ):
        """``lr_schedule``: a diffusers ``get_scheduler`` name; ``weight_decay``: as diffusers' training example.

        ``prediction_type``: one of ``PREDICTION_TYPES``; the sampler and the health record follow it.
        ``backbone_timestep``: the timestep fine-tuning runs this UNet at unless told otherwise, saved with the
        checkpoint so a preset's pretraining and its downstream reading travel together.
        ``health_timesteps``: fractions of ``num_train_timesteps`` at which ``health_record`` measures.
        """
        super().__init__()
        self.save_hyperparameters()
        if not dataset_names:
            raise ValueError("dataset_names must name the pretraining datasets")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = build_unet(unet, num_conditions=len(dataset_names) if self.conditional else None)
        self.ema_unet = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema_unet.requires_grad_(False)
        self.noise_scheduler = make_noise_scheduler(self.hparams)

    def on_fit_start(self) -> None:
        """The LR schedule (and cdpm_align's phases) are laid out over ``max_steps``: the Trainer must agree."""
        if self.trainer.max_steps != self.hparams.max_steps:
            raise ValueError(
                f"Trainer(max_steps={self.trainer.max_steps}) differs from the module's "
                f"max_steps={self.hparams.max_steps}"
            )

    def training_condition(self, batch: dict) -> Tensor | None:
        """Class labels fed to the UNet during training; plain DDPM has none."""
        return None

    def sample_conditions(self) -> list[tuple[str, int | None]]:
        """(label, class index) of each row of the sample grid."""
        return [("unconditional", None)]

    def add_noise(self, clean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Noise ``clean`` at uniformly drawn timesteps: (noisy, target, timesteps), the target being what the
        UNet is trained to predict."""
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.hparams.num_train_timesteps, (clean.shape[0],), device=clean.device)
        return self.noise_scheduler.add_noise(clean, noise, timesteps), self.target(clean, noise, timesteps), timesteps

    def target(self, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The training target of the ``prediction_type``: the noise, or the velocity."""
        if self.hparams.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(clean, noise, timesteps)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        noisy, target, timesteps = self.add_noise(to_diffusion_range(batch["image"]))
        prediction = self.unet(noisy, timesteps, self.training_condition(batch)).sample
        loss = F.mse_loss(prediction, target)
        self.log("train/diffusion_loss", loss, prog_bar=True)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        scheduler = get_scheduler(
            self.hparams.lr_schedule,
            optimizer,
            num_warmup_steps=self.hparams.warmup_steps,
            num_training_steps=self.hparams.max_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs) -> None:
        """Step, then fold the new weights into the EMA: once per real optimizer step, whatever the accumulation."""
        super().optimizer_step(*args, **kwargs)
        self.ema_unet.update_parameters(self.unet)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[METHOD_KEY] = self.name

    def condition_labels(self, dataset_index: Tensor) -> Tensor | None:
        """Class labels for evaluating images of these datasets with their own condition; none for plain DDPM."""
        return None

    @torch.no_grad()
    def denoising_mse(
        self, unet: UNet2DModel, batch: dict, timestep: int, seed: int = 0, batch_size: int = 64
    ) -> float:
        """Mean ε-prediction MSE of ``unet`` (its output read as the ε it implies) on ``batch`` noised to
        ``timestep`` with noise fixed by ``seed``."""
        clean = to_diffusion_range(batch["image"]).to(self.device)
        labels = self.condition_labels(batch["dataset_index"].to(self.device))
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        timesteps = torch.full((len(clean),), timestep, dtype=torch.long, device=self.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        total = 0.0
        for start in range(0, len(clean), batch_size):
            part = slice(start, start + batch_size)
            prediction = unet(noisy[part], timesteps[part], None if labels is None else labels[part]).sample
            epsilon = epsilon_from_prediction(self.noise_scheduler, prediction.float(), noisy[part], timesteps[part])
            total += F.mse_loss(epsilon, noise[part], reduction="sum").item()
        return total / noise.numel()

    def mean_image_mse(self, batch: dict, timesteps: list[int], training_batch: dict) -> list[float]:
        """ε-prediction MSE on ``batch``, at each timestep, of predicting the clean image as its dataset's per-pixel
        mean image over ``training_batch``.

        The best prediction that ignores the image: its ε error is sqrt(ᾱ/(1 − ᾱ))·(x0 − mean), whatever the
        noise, so the MSE is ᾱ/(1 − ᾱ) times the images' mean squared deviation from their dataset's mean image.
        """
        clean = to_diffusion_range(batch["image"]).double()
        training = to_diffusion_range(training_batch["image"]).double()
        index, training_index = batch["dataset_index"], training_batch["dataset_index"]
        missing = sorted(set(index.tolist()) - set(training_index.tolist()))
        if missing:
            raise ValueError(f"mean_image_mse: no training images of dataset index {missing}")
        means = {value: training[training_index == value].mean(0) for value in index.unique().tolist()}
        deviation = clean - torch.stack([means[value] for value in index.tolist()])
        spread = float(deviation.square().mean())
        alphas = self.noise_scheduler.alphas_cumprod.double()
        return [float(alphas[timestep] / (1 - alphas[timestep])) * spread for timestep in timesteps]

    @torch.no_grad()
    def health_record(self, datamodule, crops_per_image: int = 4, seed: int = 0) -> dict:
        """Did pretraining learn? The held-out denoising MSE of the EMA UNet against the same architecture
        freshly initialised (seeded), at the fixed ``health_timesteps``, with fixed seeded noise.

        The images are ``datamodule.held_out`` (a deterministic slice of each dataset's pretraining pool that
        training never saw; never a test split), ``crops_per_image`` seeded crops each when the datamodule
        crops; a conditional UNet is evaluated with each image's own condition.
        """
        datamodule.setup("fit")
        if datamodule.held_out is None or not len(datamodule.held_out):
            raise ValueError("health_record needs held-out images: set held_out_fraction > 0 on the datamodule")
        batch = datamodule.held_out.fixed_batch(crops_per_image=crops_per_image, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            untrained = build_unet(
                self.hparams.unet, num_conditions=len(self.hparams.dataset_names) if self.conditional else None
            ).to(self.device)
        pretrained = self.ema_unet.module
        was_training = pretrained.training
        pretrained.eval()
        untrained.eval()
        total = self.hparams.num_train_timesteps
        timesteps = [min(total - 1, round(fraction * total)) for fraction in self.hparams.health_timesteps]
        learned_mse = [self.denoising_mse(pretrained, batch, timestep, seed + step) for step, timestep in
                       enumerate(timesteps)]
        untrained_mse = [self.denoising_mse(untrained, batch, timestep, seed + step) for step, timestep in
                         enumerate(timesteps)]
        training_batch = datamodule.dataset.fixed_batch(crops_per_image=crops_per_image, seed=seed)
        mean_image_mse = self.mean_image_mse(batch, timesteps, training_batch)
        pretrained.train(was_training)
        ratios = [learned / untrained for learned, untrained in zip(learned_mse, untrained_mse, strict=True)]
        learned = all(ratio <= HEALTH_RATIO for ratio in ratios)

        def figures(values: list[float]) -> str:
            return "/".join(f"{value:.3g}" for value in values)

        return {
            "learned": learned,
            "summary": (
                f"{self.name}: held-out denoising MSE t={'/'.join(map(str, timesteps))}: "
                f"{figures(learned_mse)} vs untrained {figures(untrained_mse)} "
                f"({'learned' if learned else 'NOT learned'}: criterion <= {HEALTH_RATIO}x untrained at every t); "
                f"the condition's mean image {figures(mean_image_mse)}"
            ),
            "metric": "held-out epsilon-prediction MSE (EMA UNet vs seeded fresh init, fixed seeded noise)",
            "timesteps": timesteps,
            "pretrained_mse": learned_mse,
            "untrained_mse": untrained_mse,
            "mean_image_mse": mean_image_mse,
            "mean_image": "x0 predicted as the per-pixel mean of the training samples of the image's dataset, the "
                          "image itself unseen: a UNet above it at a timestep predicts the layout worse than that",
            "ratio": ratios,
            "criterion_ratio": HEALTH_RATIO,
            "held_out_images": len(datamodule.held_out),
            "held_out_samples": len(batch["image"]),
            "sample_shape": list(batch["image"].shape[1:]),
            "held_out": "deterministic slice of each dataset's pretraining pool (held_out_fraction), never trained on",
            "step": int(self.global_step),
        }


def unet_of(hparams: dict, method: type[DDPMPretrain]) -> UNet2DModel:
    """The UNet a ``method`` pretraining with ``hparams`` trained, at random init."""
    return build_unet(hparams["unet"], num_conditions=len(hparams["dataset_names"]) if method.conditional else None)


def diffusion_backbone(unet: UNet2DModel, hparams: dict, method: type[DDPMPretrain],
                       spec: BackboneSpec) -> DiffusionBackbone:
    """``unet`` of a ``method`` pretraining with ``hparams`` as the fine-tuning backbone ``spec`` asks for.

    ``spec.timestep`` ``None`` takes the pretraining's ``backbone_timestep`` (``DEFAULT_BACKBONE_TIMESTEP`` for
    checkpoints without one); ``spec.noise_input``: see ``DiffusionBackbone``, noised with the pretraining's schedule;
    ``spec.feature_stride``: see ``DiffusionBackbone``. A conditional UNet runs with ``spec.dataset``'s index in the
    pretraining's dataset list, or the null condition when the dataset was not among them.
    """
    condition_index = None
    if method.conditional:
        dataset_names = list(hparams["dataset_names"])
        condition_index = dataset_names.index(spec.dataset) if spec.dataset in dataset_names else len(dataset_names)
    timestep = hparams.get("backbone_timestep", DEFAULT_BACKBONE_TIMESTEP) if spec.timestep is None else spec.timestep
    return DiffusionBackbone(
        unet,
        timestep=timestep,
        condition_index=condition_index,
        noise_input=spec.noise_input,
        feature_stride=spec.feature_stride,
        noise_scheduler=make_noise_scheduler(hparams),
    )


def load_backbone(checkpoint_path: str | Path, method: type[DDPMPretrain], spec: BackboneSpec) -> DiffusionBackbone:
    """The EMA UNet of a ``method`` checkpoint as a fine-tuning backbone (shared by ddpm and cdpm_align).

    The UNet is rebuilt from the saved hyperparameters and loaded strictly: a missing or extra tensor is an
    error naming the file; the rest is ``diffusion_backbone``'s.
    """
    checkpoint = read_checkpoint(checkpoint_path, expected_method=method.name)
    hparams = checkpoint.get("hyper_parameters")
    if not hparams or "unet" not in hparams or "dataset_names" not in hparams:
        raise CheckpointError(
            f"checkpoint {checkpoint_path} lacks the UNet config or dataset names in 'hyper_parameters'"
        )
    unet = unet_of(hparams, method)
    ema_weights = strip_prefix(checkpoint["state_dict"], EMA_PREFIX, checkpoint_path)
    try:
        unet.load_state_dict(ema_weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {checkpoint_path}: EMA weights do not fit the saved UNet config ({error})"
        ) from None
    return diffusion_backbone(unet, hparams, method, spec)


@torch.no_grad()
def save_sample_grid(
    module: DDPMPretrain, path: str | Path, num_per_condition: int = 4, num_inference_steps: int = 50, seed: int = 0,
    guidance_scale: float = 3.0, step: int | None = None, size: tuple[int, int] | None = None,
) -> Path:
    """Save a PNG of images sampled by the EMA UNet: one row per dataset condition and one for ∅ (or one
    unconditional row for ``ddpm``), labelled, so a run's generative quality can be checked by eye.

    Sampling is deterministic DDIM (eta 0) from seeded noise at the UNet's ``sample_size``. A conditional UNet
    (trained with condition dropout) samples with classifier-free guidance at ``guidance_scale``
    (ε∅ + w·(ε_c − ε∅); the ∅ row is unguided), which is how such a model is meant to be sampled and what
    makes the per-dataset conditions tell apart. ``step``: the training step named in the title (default: the
    module's own). ``size``: (h, w) of the samples, default the UNet's ``sample_size`` (the pretraining
    crop); the fine-tuning resolution shows whether a UNet trained on crops also learned the image's layout.
    """
    unet = module.ema_unet.module
    was_training = unet.training
    unet.eval()
    scheduler = DDIMScheduler.from_config(module.noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    conditions = module.sample_conditions()
    sample_size = unet.config.sample_size
    height, width = size or (tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size))
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((len(conditions) * num_per_condition, 1, height, width), generator=generator).to(module.device)
    class_labels = null_labels = None
    if module.conditional:
        indices = [index for _, index in conditions for _ in range(num_per_condition)]
        class_labels = torch.tensor(indices, dtype=torch.long, device=module.device)
        null_labels = torch.full_like(class_labels, module.null_index)
    for timestep in scheduler.timesteps:
        prediction = unet(sample, timestep, class_labels).sample
        if module.conditional and guidance_scale != 1.0:
            unguided = unet(sample, timestep, null_labels).sample
            prediction = unguided + guidance_scale * (prediction - unguided)
        sample = scheduler.step(prediction, timestep, sample).prev_sample
    unet.train(was_training)
    images = ((sample.clamp(-1, 1) + 1) / 2).float().cpu().numpy()[:, 0]

    figure = Figure(figsize=(1.6 * num_per_condition * max(1.0, width / height) + 1.2,
                             1.6 * len(conditions) * max(1.0, height / width)))
    axes = figure.subplots(len(conditions), num_per_condition, squeeze=False)
    for row, (label, _) in enumerate(conditions):
        for column in range(num_per_condition):
            axis = axes[row, column]
            axis.imshow(images[row * num_per_condition + column], cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(label)
    guidance = f", guidance {guidance_scale:g}" if module.conditional else ""
    step = module.global_step if step is None else step
    figure.suptitle(f"{module.name}: EMA samples {height}x{width}, step {step}, DDIM {num_inference_steps}{guidance}")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
