"""Plain denoising diffusion pretraining (``ddpm``; Ho et al. 2020, as used by Di Via et al., WACV 2025).

The UNet learns ε-prediction on the unlabeled X-rays; an exponential moving average of its weights is kept
in the checkpoint and is what fine-tuning starts from (the EMA weights are the better generative model and
the smoother starting point).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_scheduler
from matplotlib.figure import Figure
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from landmark_bench.checkpoints import METHOD_KEY, CheckpointError, read_checkpoint, strip_prefix
from landmark_bench.models.unet import DEFAULT_BACKBONE_TIMESTEP, DiffusionBackbone, build_unet, to_diffusion_range

EMA_PREFIX = "ema_unet.module."


class DDPMPretrain(L.LightningModule):
    """Unconditional ε-prediction DDPM pretraining of the shared UNet, with an EMA copy of its weights.

    A training batch holds ``"image"`` (B, 1, H, W) in [0, 1] and ``"dataset_index"`` (B,) long. Subclasses set
    ``conditional`` to add the dataset condition and ``method_name`` to tag checkpoints.
    ``dataset_names`` (the pretraining datasets, in the order of ``batch["dataset_index"]``) is recorded for
    provenance here and is the condition vocabulary in ``cdpm_align``.
    """

    method_name = "ddpm"
    conditional = False

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
    ):
        """``lr_schedule``: a diffusers ``get_scheduler`` name; ``weight_decay``: as diffusers' training example."""
        super().__init__()
        self.save_hyperparameters()
        if not dataset_names:
            raise ValueError("dataset_names must name the pretraining datasets")
        self.unet = build_unet(unet, num_conditions=len(dataset_names) if self.conditional else None)
        self.ema_unet = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema_unet.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)

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
        """Noise ``clean`` at uniformly drawn timesteps: (noisy, noise, timesteps)."""
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.hparams.num_train_timesteps, (clean.shape[0],), device=clean.device)
        return self.noise_scheduler.add_noise(clean, noise, timesteps), noise, timesteps

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        noisy, noise, timesteps = self.add_noise(to_diffusion_range(batch["image"]))
        prediction = self.unet(noisy, timesteps, self.training_condition(batch)).sample
        loss = F.mse_loss(prediction, noise)
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
        checkpoint[METHOD_KEY] = self.method_name


def load_backbone(
    checkpoint_path: str | Path, method: type[DDPMPretrain], dataset_name: str | None, timestep: int | None
) -> DiffusionBackbone:
    """The EMA UNet of a ``method`` checkpoint as a fine-tuning backbone (shared by ddpm and cdpm_align).

    The UNet is rebuilt from the saved hyperparameters and loaded strictly: a missing or extra tensor is an
    error naming the file. A conditional UNet runs with ``dataset_name``'s index in the saved pretraining
    list, or the null condition when the dataset was not among them.
    """
    checkpoint = read_checkpoint(checkpoint_path, expected_method=method.method_name)
    hparams = checkpoint.get("hyper_parameters")
    if not hparams or "unet" not in hparams or "dataset_names" not in hparams:
        raise CheckpointError(
            f"checkpoint {checkpoint_path} lacks the UNet config or dataset names in 'hyper_parameters'"
        )
    dataset_names = list(hparams["dataset_names"])
    unet = build_unet(hparams["unet"], num_conditions=len(dataset_names) if method.conditional else None)
    ema_weights = strip_prefix(checkpoint["state_dict"], EMA_PREFIX, checkpoint_path)
    try:
        unet.load_state_dict(ema_weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {checkpoint_path}: EMA weights do not fit the saved UNet config ({error})"
        ) from None
    condition_index = None
    if method.conditional:
        condition_index = dataset_names.index(dataset_name) if dataset_name in dataset_names else len(dataset_names)
    return DiffusionBackbone(
        unet,
        timestep=DEFAULT_BACKBONE_TIMESTEP if timestep is None else timestep,
        condition_index=condition_index,
    )


def build_backbone(checkpoint_path: str, dataset_name: str | None, timestep: int | None = None) -> DiffusionBackbone:
    """The EMA UNet of a ``ddpm`` checkpoint as a backbone (``dataset_name`` is unused: plain DDPM has no condition).

    ``timestep`` defaults to ``DEFAULT_BACKBONE_TIMESTEP``.
    """
    return load_backbone(checkpoint_path, DDPMPretrain, dataset_name, timestep)


@torch.no_grad()
def save_sample_grid(
    module: DDPMPretrain, path: str | Path, num_per_condition: int = 4, num_inference_steps: int = 25, seed: int = 0
) -> Path:
    """Save a PNG of images sampled by the EMA UNet: one row per dataset condition and one for ∅ (or one
    unconditional row for ``ddpm``), labelled, so a run's generative quality can be checked by eye.

    Sampling is deterministic DDIM (eta 0) from seeded noise at the UNet's ``sample_size``.
    """
    unet = module.ema_unet.module
    was_training = unet.training
    unet.eval()
    scheduler = DDIMScheduler.from_config(module.noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    conditions = module.sample_conditions()
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((len(conditions) * num_per_condition, 1, size, size), generator=generator).to(module.device)
    class_labels = None
    if module.conditional:
        indices = [index for _, index in conditions for _ in range(num_per_condition)]
        class_labels = torch.tensor(indices, dtype=torch.long, device=module.device)
    for timestep in scheduler.timesteps:
        prediction = unet(sample, timestep, class_labels).sample
        sample = scheduler.step(prediction, timestep, sample).prev_sample
    unet.train(was_training)
    images = ((sample.clamp(-1, 1) + 1) / 2).float().cpu().numpy()[:, 0]

    figure = Figure(figsize=(1.6 * num_per_condition + 1.2, 1.6 * len(conditions)))
    axes = figure.subplots(len(conditions), num_per_condition, squeeze=False)
    for row, (label, _) in enumerate(conditions):
        for column in range(num_per_condition):
            axis = axes[row, column]
            axis.imshow(images[row * num_per_condition + column], cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(label)
    figure.suptitle(f"{module.method_name}: EMA samples, step {module.global_step}")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
