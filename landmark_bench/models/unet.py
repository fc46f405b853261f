"""The diffusion UNet shared by ``ddpm`` and ``cdpm_align``, its decoder taps and its fine-tuning backbone.

Both methods build the same diffusers ``UNet2DModel`` (one greyscale channel in and out) from a preset's
``"unet"`` dict, with FiLM conditioning (``resnet_time_scale_shift="scale_shift"``: every resnet block scales
and shifts its normalised features with a projection of the time embedding). ``cdpm_align`` adds the dataset
condition through diffusers' class embedding, whose vector is summed with the time embedding and therefore
reaches every block through the same FiLM projection.

The null condition ∅ is the last class index, and its embedding row is fixed at zero (``padding_idx``: zero
at init, never a gradient, so AdamW's decoupled decay and the EMA keep it at zero). The unconditional path
``f(x, t, ∅)`` is therefore exactly the plain, class-free UNet with the same weights: the time embedding
alone drives FiLM.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor

DEFAULT_BACKBONE_TIMESTEP = 0
"""Timestep at which the fine-tuning backbone runs the UNet, by default on the clean image (see ``noise_input``).

Di Via et al. (WACV 2025) fine-tune their DDPM UNet end to end as a pixel-wise classifier on clean images,
calling it with no time embedding at all; diffusers' UNet always adds one, and ``t = 0`` (the least-noise
end of the schedule, the input it saw with clean images) is the closest equivalent.
"""


def to_diffusion_range(image: Tensor) -> Tensor:
    """[0, 1] images to the [-1, 1] range the diffusion process is defined on."""
    return image * 2 - 1


def build_unet(config: dict, num_conditions: int | None = None) -> UNet2DModel:
    """A one-channel FiLM UNet from a preset's ``"unet"`` dict (``UNet2DModel`` keyword arguments).

    ``num_conditions`` datasets (``cdpm_align``) add a class embedding of ``num_conditions + 1`` rows, the
    last being the null condition ∅, held at zero; ``None`` (``ddpm``) builds the same UNet without one.
    """
    unet = UNet2DModel(
        in_channels=1,
        out_channels=1,
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=None if num_conditions is None else num_conditions + 1,
        **config,
    )
    if num_conditions is not None:
        null_index = num_conditions
        unet.class_embedding.padding_idx = null_index
        with torch.no_grad():
            unet.class_embedding.weight[null_index].zero_()
    return unet


def decoder_features(
    unet: UNet2DModel, sample: Tensor, timestep: Tensor | int, class_labels: Tensor | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Run the UNet and return its prediction with one decoder feature map per UNet scale.

    Each up block contributes its hidden state just before its upsampler (the last block: its output), so a
    four-level UNet gives four maps, coarsest first, at 1/8, 1/4, 1/2 and 1/1 of the input size, with the
    up blocks' channel counts. Hooks are removed on return, so the UNet is left as it was.
    """
    features: list[Tensor] = []
    handles = []
    for block in unet.up_blocks:
        if block.upsamplers:
            handles.append(block.upsamplers[0].register_forward_pre_hook(lambda _, args: features.append(args[0])))
        else:
            handles.append(block.register_forward_hook(lambda _, __, output: features.append(output)))
    try:
        prediction = unet(sample, timestep, class_labels).sample
    finally:
        for handle in handles:
            handle.remove()
    return prediction, features


PREDICTION_TYPES = ("epsilon", "v_prediction")
"""What the UNet is trained to predict: the noise ε, or the velocity v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 (Salimans and
Ho 2022), whose loss weighs the high-noise timesteps, where an image's layout is decided, far more than ε's
loss does."""


def make_noise_scheduler(hparams: dict) -> DDPMScheduler:
    """The DDPM noise schedule of a module's (or a checkpoint's) hyperparameters; older checkpoints lack the
    beta range and the prediction type and get diffusers' defaults, which they were trained with."""
    return DDPMScheduler(
        num_train_timesteps=hparams["num_train_timesteps"],
        beta_schedule=hparams.get("beta_schedule", "linear"),
        beta_start=hparams.get("beta_start", 1e-4),
        beta_end=hparams.get("beta_end", 0.02),
        prediction_type=hparams.get("prediction_type", "epsilon"),
    )


def epsilon_from_prediction(scheduler: DDPMScheduler, prediction: Tensor, noisy: Tensor, timesteps: Tensor) -> Tensor:
    """The noise ε implied by a UNet output under ``scheduler``'s prediction type, so that losses of ε- and
    v-prediction UNets are measured on one scale."""
    if scheduler.config.prediction_type == "epsilon":
        return prediction
    alphas = scheduler.alphas_cumprod.to(device=noisy.device, dtype=noisy.dtype)[timesteps].view(-1, 1, 1, 1)
    return alphas.sqrt() * prediction + (1 - alphas).sqrt() * noisy


class DiffusionBackbone(nn.Module):
    """A pretrained UNet run end to end as a dense feature extractor for the landmark detector.

    The image is mapped to the diffusion range [-1, 1] and passed through the UNet at a fixed ``timestep``
    with a fixed condition; the output is the UNet's last feature map (after its final norm and activation)
    with ``conv_out`` removed, at full input resolution, so the detector adds its own output layer for the
    landmark heatmaps.

    ``feature_stride`` 2 (or 4, ...) reads the decoder that many times coarser instead: the last up block(s) and the
    upsampler before them are removed, and a new GroupNorm and SiLU stand in for the final norm at that level's
    width. On the ``cpu`` UNet the full-resolution upsampler and last up block are about a third of the fine-tuning
    backbone's multiply-adds; the detector upsamples its heatmap logits to the input size.

    ``noise_input`` decides what the timestep means downstream. ``False`` (default): the clean image goes in
    and the timestep only sets the time embedding (Di Via et al. fine-tune on clean images). ``True``: the
    image is first noised to ``timestep`` with ``noise_scheduler`` (as the reported CDPM-Align features at
    t = 200 are read from a noised input), with noise drawn from a generator seeded by ``noise_seed`` at every
    call, so the same image gives the same features and evaluation stays deterministic.
    """

    channels_last = False
    """On CPU this UNet steps slower on NHWC: 0.72 vs 0.91 steps/s on 2 cores (benchmarks/RESULTS.md)."""

    def __init__(
        self,
        unet: UNet2DModel,
        timestep: int = DEFAULT_BACKBONE_TIMESTEP,
        condition_index: int | None = None,
        noise_input: bool = False,
        noise_scheduler: DDPMScheduler | None = None,
        noise_seed: int = 0,
        feature_stride: int = 1,
    ):
        super().__init__()
        if (condition_index is None) != (unet.class_embedding is None):
            raise ValueError(
                "a conditional UNet needs a condition index and an unconditional one must have none "
                f"(got condition_index={condition_index}, class embedding: {unet.class_embedding is not None})"
            )
        if condition_index is not None and not 0 <= condition_index < unet.class_embedding.num_embeddings:
            raise ValueError(
                f"condition index {condition_index} outside the UNet's {unet.class_embedding.num_embeddings} conditions"
            )
        if noise_input and noise_scheduler is None:
            raise ValueError("noise_input=True needs the noise_scheduler the UNet was pretrained with")
        levels = len(unet.config.block_out_channels)
        dropped = feature_stride.bit_length() - 1
        if feature_stride < 1 or feature_stride != 2**dropped or dropped >= levels:
            raise ValueError(f"feature_stride={feature_stride} is not a power of two of at most {2 ** (levels - 1)} "
                             f"(this UNet has {levels} levels)")
        self.feature_stride = feature_stride
        self.out_channels: int = unet.config.block_out_channels[dropped]
        # decoder taps, coarsest first
        self.pyramid_channels: list[int] = list(reversed(unet.config.block_out_channels))[: levels - dropped]
        self.timestep = timestep
        self.condition_index = condition_index
        self.noise_input = noise_input
        self.noise_scheduler = noise_scheduler
        self.noise_seed = noise_seed
        self.size_multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        unet.conv_out = nn.Identity()
        if dropped:
            unet.up_blocks = unet.up_blocks[: levels - dropped]
            unet.up_blocks[-1].upsamplers = None
            unet.conv_norm_out = nn.GroupNorm(unet.config.norm_num_groups, self.out_channels,
                                              eps=unet.config.norm_eps)
        self.unet = unet

    def prepare(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The UNet's (sample, timesteps, class labels) for a (B, 1, H, W) image in [0, 1]."""
        height, width = image.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of {self.size_multiple}, as this UNet's levels need"
            )
        batch_size = image.shape[0]
        timesteps = torch.full((batch_size,), self.timestep, dtype=torch.long, device=image.device)
        class_labels = None
        if self.condition_index is not None:
            class_labels = torch.full((batch_size,), self.condition_index, dtype=torch.long, device=image.device)
        sample = to_diffusion_range(image)
        if self.noise_input:
            generator = torch.Generator().manual_seed(self.noise_seed)
            noise = torch.randn(sample.shape, generator=generator).to(device=sample.device, dtype=sample.dtype)
            sample = self.noise_scheduler.add_noise(sample, noise, timesteps)
        return sample, timesteps, class_labels

    def forward(self, image: Tensor) -> Tensor:
        """(B, 1, H, W) image in [0, 1] to (B, out_channels, H / feature_stride, W / feature_stride) features; H and W
        divisible by ``size_multiple``."""
        return self.unet(*self.prepare(image)).sample

    def pyramid(self, image: Tensor) -> list[Tensor]:
        """The four decoder taps of ``decoder_features`` (coarsest first) for the input ``forward`` would see."""
        return decoder_features(self.unet, *self.prepare(image))[1]
