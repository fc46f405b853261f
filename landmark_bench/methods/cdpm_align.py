"""CDPM-Align pretraining: a dataset-conditional DDPM with a final guidance-alignment phase (Di Via et al. 2026).

Phase 1 (all but the last ``align_fraction`` of ``max_steps``): conditional ε-prediction, the condition being
the dataset index, replaced by the null condition ∅ with probability ``condition_dropout`` (classifier-free
guidance training, Ho & Salimans 2022).

Phase 2 (alignment): for each clean image x0 with label y, timesteps t1, t2 are drawn and x0 is noised to
x_t1, x_t2; four passes f(x_ti, ti, c), c ∈ {y, ∅}, give decoder features h^s at the UNet's four scales
(``decoder_features``), and ``λ · guidance_alignment_loss`` (``landmark_bench.losses``) is added.

Choices the paper leaves open, each a setting (defaults in parentheses):
- ``align_weight`` λ (0.1): the alignment loss lies in [0, 2] and the ε-loss settles around 0.01-0.1, so
  0.1 gives the alignment term a weight comparable to the diffusion loss without swamping it.
- ``condition_dropout`` p (0.1): the rate of Ho & Salimans' experiments.
- ``align_timestep_range`` (None = all training timesteps): the window [lo·T, hi·T] (fractions of T) that
  t1 and t2 are drawn from, uniformly and independently; the reported setting is [T/4, 3T/4].
- ``align_timestep_gap`` (None): t1, t2 independent; an integer draws t2 uniformly within that distance of
  t1 instead (still inside the window).
- ``align_scales`` (None = all four): which decoder scales enter the loss, indexed coarsest (0) to finest
  (3); the tap at each scale is the up block's hidden state before its upsampler (see ``decoder_features``).
- The ε-loss during phase 2 is the expectation of the phase-1 loss over the dropout draw,
  ``(1 - p) · MSE(conditional passes) + p · MSE(null passes)``, computed from the same four passes, so the
  diffusion objective does not change between phases and no fifth pass is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from landmark_bench.losses import guidance_alignment_loss
from landmark_bench.methods.base import register
from landmark_bench.methods.ddpm import DDPMPretrain
from landmark_bench.models.unet import decoder_features, to_diffusion_range


def draw_timestep_pair(
    batch_size: int,
    num_train_timesteps: int,
    max_gap: int | None,
    device: torch.device | str = "cpu",
    timestep_range: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Two timesteps per sample for the alignment passes, inside ``timestep_range`` (fractions of T, both ends
    included; None: every timestep): independent uniform, or ``|t2 - t1| <= max_gap``."""
    lowest, highest = 0, num_train_timesteps - 1
    if timestep_range is not None:
        lowest, highest = round(timestep_range[0] * num_train_timesteps), round(timestep_range[1] * num_train_timesteps)
        highest = min(highest, num_train_timesteps - 1)
    first = torch.randint(lowest, highest + 1, (batch_size,), device=device)
    if max_gap is None:
        return first, torch.randint(lowest, highest + 1, (batch_size,), device=device)
    low = (first - max_gap).clamp(min=lowest)
    high = (first + max_gap).clamp(max=highest)
    second = low + (torch.rand(batch_size, device=device) * (high - low + 1)).long()
    return first, second


@register
class CDPMAlignPretrain(DDPMPretrain):
    """Dataset-conditional DDPM with classifier-free-guidance dropout and a final guidance-alignment phase."""

    name = "cdpm_align"
    conditional = True

    def __init__(
        self,
        *,
        condition_dropout: float = 0.1,
        align_fraction: float = 0.1,
        align_weight: float = 0.1,
        align_timestep_gap: int | None = None,
        align_timestep_range: list[float] | None = None,
        align_scales: list[int] | None = None,
        checkpoint_alignment: bool = False,
        **kwargs,
    ):
        """Keyword arguments of ``DDPMPretrain`` plus the CDPM-Align settings described in the module docstring.

        ``checkpoint_alignment``: diffusers' gradient checkpointing (each block's activations recomputed in the
        backward pass) from the first alignment step on: the same gradients for more time and less memory in that
        phase, whose four passes a step set the run's peak.
        """
        super().__init__(**kwargs)
        if not 0 <= condition_dropout < 1:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        if not 0 <= align_fraction <= 1:
            raise ValueError(f"align_fraction must be in [0, 1], got {align_fraction}")
        if align_timestep_gap is not None and align_timestep_gap < 0:
            raise ValueError(f"align_timestep_gap must be None or >= 0, got {align_timestep_gap}")
        if align_timestep_range is not None and not 0 <= align_timestep_range[0] <= align_timestep_range[1] <= 1:
            raise ValueError(f"align_timestep_range must be [lo, hi], 0 <= lo <= hi <= 1, got {align_timestep_range}")
        num_scales = len(self.unet.up_blocks)
        self.align_scales = list(range(num_scales)) if align_scales is None else list(align_scales)
        if not self.align_scales or not all(0 <= scale < num_scales for scale in self.align_scales):
            raise ValueError(f"align_scales must pick among the UNet's {num_scales} decoder scales, got {align_scales}")
        self.null_index = len(self.hparams.dataset_names)
        self.align_start_step = round(self.hparams.max_steps * (1 - align_fraction))

    def training_condition(self, batch: dict) -> Tensor:
        """The dataset index, replaced by ∅ with probability ``condition_dropout``."""
        labels = batch["dataset_index"]
        dropped = torch.rand(labels.shape, device=labels.device) < self.hparams.condition_dropout
        return torch.where(dropped, torch.full_like(labels, self.null_index), labels)

    def condition_labels(self, dataset_index: Tensor) -> Tensor:
        """Each image's own dataset condition (no dropout), for evaluation."""
        return dataset_index

    def sample_conditions(self) -> list[tuple[str, int | None]]:
        datasets = [(name, index) for index, name in enumerate(self.hparams.dataset_names)]
        return [*datasets, ("null ∅", self.null_index)]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if self.global_step < self.align_start_step:
            return super().training_step(batch, batch_idx)
        return self.alignment_step(batch)

    def alignment_step(self, batch: dict) -> Tensor:
        """Diffusion loss plus λ·L_align from the four passes f(x_ti, ti, c), i ∈ {1, 2}, c ∈ {y, ∅}.

        The four passes run as one batch of 4B: the UNet normalises per sample (GroupNorm) and attends within
        a sample, so this is the same computation as four separate passes, in one call.
        """
        if self.hparams.checkpoint_alignment and not self.unet.is_gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        clean = to_diffusion_range(batch["image"])
        labels = batch["dataset_index"]
        batch_size = clean.shape[0]
        first, second = draw_timestep_pair(
            batch_size, self.hparams.num_train_timesteps, self.hparams.align_timestep_gap, clean.device,
            self.hparams.align_timestep_range,
        )
        timesteps = torch.cat([first, second])
        noise = torch.randn((2 * batch_size, *clean.shape[1:]), device=clean.device, dtype=clean.dtype)
        noisy = self.noise_scheduler.add_noise(clean.repeat(2, 1, 1, 1), noise, timesteps)
        target = self.target(clean.repeat(2, 1, 1, 1), noise, timesteps)
        null_labels = torch.full_like(labels, self.null_index)
        prediction, features = decoder_features(
            self.unet,
            torch.cat([noisy, noisy]),
            torch.cat([timesteps, timesteps]),
            torch.cat([labels, labels, null_labels, null_labels]),
        )
        conditional_prediction, null_prediction = prediction.chunk(2)
        dropout = self.hparams.condition_dropout
        diffusion_loss = (
            (1 - dropout) * F.mse_loss(conditional_prediction, target) + dropout * F.mse_loss(null_prediction, target)
        )

        cond_1, cond_2, null_1, null_2 = zip(*(features[scale].chunk(4) for scale in self.align_scales), strict=True)
        align_loss, cosines = guidance_alignment_loss(list(cond_1), list(null_1), list(cond_2), list(null_2))
        loss = diffusion_loss + self.hparams.align_weight * align_loss

        self.log("train/diffusion_loss", diffusion_loss, prog_bar=True)
        self.log("train/align_loss", align_loss, prog_bar=True)
        for scale, cosine in zip(self.align_scales, cosines, strict=True):
            self.log(f"train/guidance_cosine_scale{scale}", cosine)
        self.log("train/loss", loss)
        return loss

