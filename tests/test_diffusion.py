"""Diffusion pretraining (ddpm, cdpm_align): conditioning, decoder taps, alignment loss, training, hand-over."""

from __future__ import annotations

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread
from torch.utils.data import DataLoader

from landmark_bench.checkpoints import METHOD_KEY, CheckpointError
from landmark_bench.losses import guidance_alignment_loss
from landmark_bench.methods import cdpm_align, ddpm
from landmark_bench.methods.cdpm_align import CDPMAlignPretrain, draw_timestep_pair
from landmark_bench.methods.ddpm import EMA_PREFIX, DDPMPretrain, save_sample_grid
from landmark_bench.models.unet import (
    DiffusionBackbone,
    build_unet,
    decoder_features,
    null_condition_index,
    to_diffusion_range,
)
from landmark_bench.pretrain import RUN_KEYS
from landmark_bench.presets import FINETUNE, PRESETS, UNET

TINY_UNET = UNET["tiny"]
SIZE = TINY_UNET["sample_size"]
DATASETS = ["isbi2015", "hand"]


def disc_images(count: int) -> torch.Tensor:
    """Bright discs at different places on a dark background: simple, learnable, in [0, 1]."""
    rows, columns = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    discs = [((columns - 0.3 - 0.1 * index) ** 2 + (rows - 0.5) ** 2 < 0.06).float() for index in range(count)]
    return torch.stack(discs)[:, None]


def loader(num_images: int = 8, batch_size: int = 4) -> DataLoader:
    images = disc_images(num_images)
    labels = torch.arange(num_images) % len(DATASETS)
    items = [{"image": image, "dataset_index": label} for image, label in zip(images, labels)]
    return DataLoader(items, batch_size=batch_size)


def quiet_trainer(max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


class MetricRecorder(L.Callback):
    """The logged metrics after every training batch (a copy, as ``callback_metrics`` keeps old keys)."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append({name: float(value) for name, value in trainer.callback_metrics.items()})


@pytest.fixture(scope="module")
def cdpm_run(tmp_path_factory):
    """A 6-step CDPM-Align run whose last half is the alignment phase, and its Trainer checkpoint."""
    torch.manual_seed(0)
    module = CDPMAlignPretrain(
        unet=TINY_UNET, dataset_names=DATASETS, max_steps=6, lr=1e-3, warmup_steps=0,
        ema_decay=0.5, align_fraction=0.5,
    )
    recorder = MetricRecorder()
    trainer = quiet_trainer(6, callbacks=[recorder])
    trainer.fit(module, loader())
    path = tmp_path_factory.mktemp("cdpm") / "cdpm_align.ckpt"
    trainer.save_checkpoint(path)
    return module, recorder, path


@pytest.fixture(scope="module")
def ddpm_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    module = DDPMPretrain(unet=TINY_UNET, dataset_names=DATASETS, max_steps=2, warmup_steps=0, ema_decay=0.5)
    trainer = quiet_trainer(2)
    trainer.fit(module, loader())
    path = tmp_path_factory.mktemp("ddpm") / "ddpm.ckpt"
    trainer.save_checkpoint(path, weights_only=True)  # as the pretraining runner writes its final checkpoint
    return module, path


def test_condition_changes_unet_output():
    torch.manual_seed(0)
    unet = build_unet(TINY_UNET, num_conditions=2)
    noisy, timesteps = torch.randn(2, 1, SIZE, SIZE), torch.tensor([10, 500])
    first = unet(noisy, timesteps, torch.tensor([0, 0])).sample
    second = unet(noisy, timesteps, torch.tensor([1, 1])).sample
    assert not torch.allclose(first, second, atol=1e-5)


def test_null_condition_is_the_class_free_unet():
    """f(x, t, ∅) is exactly the UNet without class embedding, holding the same other weights."""
    torch.manual_seed(0)
    conditional = build_unet(TINY_UNET, num_conditions=3)
    assert null_condition_index(conditional) == 3
    assert torch.count_nonzero(conditional.class_embedding.weight[3]) == 0
    plain = build_unet(TINY_UNET)
    weights = {name: value for name, value in conditional.state_dict().items() if "class_embedding" not in name}
    plain.load_state_dict(weights, strict=True)
    noisy, timesteps = torch.randn(3, 1, SIZE, SIZE), torch.tensor([0, 250, 999])
    null_output = conditional(noisy, timesteps, torch.full((3,), 3)).sample
    torch.testing.assert_close(null_output, plain(noisy, timesteps).sample, rtol=0, atol=1e-6)
    first_dataset = conditional(noisy, timesteps, torch.zeros(3, dtype=torch.long)).sample
    assert not torch.allclose(first_dataset, null_output, atol=1e-5)


def test_decoder_features_are_the_four_decoder_scales():
    torch.manual_seed(0)
    unet = build_unet(TINY_UNET, num_conditions=2)
    noisy, timesteps, labels = torch.randn(2, 1, SIZE, SIZE), torch.tensor([3, 700]), torch.tensor([0, 2])
    prediction, features = decoder_features(unet, noisy, timesteps, labels)
    channels = TINY_UNET["block_out_channels"][::-1]
    assert [tuple(feature.shape) for feature in features] == [
        (2, channels[scale], SIZE // 2 ** (3 - scale), SIZE // 2 ** (3 - scale)) for scale in range(4)
    ]
    torch.testing.assert_close(prediction, unet(noisy, timesteps, labels).sample)
    # the finest tap is what the output head reads
    torch.testing.assert_close(unet.conv_out(unet.conv_act(unet.conv_norm_out(features[-1]))), prediction)
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in unet.modules())


def numpy_alignment_loss(cond_1, null_1, cond_2, null_2) -> float:
    per_scale = []
    for c1, n1, c2, n2 in zip(cond_1, null_1, cond_2, null_2):
        g1 = (c1 - n1).reshape(len(c1), -1)
        g2 = (c2 - n2).reshape(len(c2), -1)
        cosine = (g1 * g2).sum(1) / (np.linalg.norm(g1, axis=1) * np.linalg.norm(g2, axis=1))
        per_scale.append(1 - cosine.mean())
    return float(np.mean(per_scale))


def test_guidance_alignment_loss_matches_numpy():
    generator = torch.Generator().manual_seed(3)
    shapes = [(3, 8, 2, 2), (3, 8, 4, 4), (3, 4, 8, 8), (3, 4, 16, 16)]
    features = [[torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes] for _ in range(4)]
    loss, cosines = guidance_alignment_loss(*features)
    expected = numpy_alignment_loss(*[[tensor.numpy() for tensor in group] for group in features])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert cosines.shape == (4,)
    assert (1 - cosines).mean().item() == pytest.approx(expected, rel=1e-6)


def test_guidance_alignment_loss_is_zero_for_parallel_and_two_for_opposite_guidance():
    generator = torch.Generator().manual_seed(4)
    cond = [torch.randn(2, 4, 4, 4, generator=generator) for _ in range(4)]
    null = [torch.randn(2, 4, 4, 4, generator=generator) for _ in range(4)]
    scaled = [n + 3 * (c - n) for c, n in zip(cond, null)]
    flipped = [n - (c - n) for c, n in zip(cond, null)]
    assert guidance_alignment_loss(cond, null, scaled, null)[0].item() == pytest.approx(0, abs=1e-5)
    assert guidance_alignment_loss(cond, null, flipped, null)[0].item() == pytest.approx(2, abs=1e-5)


def test_timestep_pair_respects_the_gap():
    torch.manual_seed(0)
    first, second = draw_timestep_pair(4096, 1000, max_gap=20)
    assert (first - second).abs().max() <= 20 and (first - second).abs().max() >= 15
    assert second.min() >= 0 and second.max() <= 999
    first, second = draw_timestep_pair(4096, 1000, max_gap=None)
    assert (first - second).abs().max() > 500


def test_alignment_loss_absent_before_the_phase_and_logged_after(cdpm_run):
    module, recorder, _ = cdpm_run
    assert module.align_start_step == 3 and len(recorder.steps) == 6
    for metrics in recorder.steps[:3]:
        assert "train/align_loss" not in metrics and "train/diffusion_loss" in metrics
    align_losses = [metrics["train/align_loss"] for metrics in recorder.steps[3:]]
    assert all(loss > 0 for loss in align_losses) and len(set(align_losses)) == 3  # a new value at every step
    for metrics in recorder.steps[3:]:
        cosines = [metrics[f"train/guidance_cosine_scale{scale}"] for scale in range(4)]
        assert all(-1 <= cosine <= 1 for cosine in cosines)
        assert metrics["train/align_loss"] == pytest.approx(1 - np.mean(cosines), abs=1e-5)
        expected_total = metrics["train/diffusion_loss"] + 0.1 * metrics["train/align_loss"]
        assert metrics["train/loss"] == pytest.approx(expected_total, rel=1e-5)


def test_null_embedding_stays_zero_through_training(cdpm_run):
    module, _, _ = cdpm_run
    for unet in (module.unet, module.ema_unet.module):
        assert torch.count_nonzero(unet.class_embedding.weight[module.null_index]) == 0
        assert torch.count_nonzero(unet.class_embedding.weight[: module.null_index]) > 0


def test_epsilon_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    images = disc_images(4)
    module = DDPMPretrain(
        unet=TINY_UNET, dataset_names=DATASETS, max_steps=25, lr=3e-3, warmup_steps=0, lr_schedule="constant"
    )
    generator = torch.Generator().manual_seed(1)
    clean = to_diffusion_range(images).repeat(8, 1, 1, 1)
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(clean),), generator=generator)
    noisy = module.noise_scheduler.add_noise(clean, noise, timesteps)

    def held_out_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(module.unet(noisy, timesteps).sample, noise).item()

    before = held_out_loss()
    batch = [{"image": image, "dataset_index": torch.tensor(0)} for image in images]
    quiet_trainer(25).fit(module, DataLoader(batch * 25, batch_size=4))
    assert held_out_loss() < 0.5 * before


def test_trainer_max_steps_must_match_the_schedule():
    module = DDPMPretrain(unet=TINY_UNET, dataset_names=DATASETS, max_steps=6)
    with pytest.raises(ValueError, match="max_steps"):
        quiet_trainer(3).fit(module, loader())


def test_checkpoint_round_trip_gives_exactly_the_ema_unet(cdpm_run):
    module, _, path = cdpm_run
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint[METHOD_KEY] == "cdpm_align"
    weights = checkpoint["state_dict"]
    ema = {name[len(EMA_PREFIX):]: value for name, value in weights.items() if name.startswith(EMA_PREFIX)}
    online = {name[len("unet."):]: value for name, value in weights.items() if name.startswith("unet.")}
    backbone = cdpm_align.build_backbone(str(path), "hand")
    loaded = backbone.unet.state_dict()
    assert set(loaded) == {name for name in ema if not name.startswith("conv_out.")}
    assert all(torch.equal(loaded[name], ema[name]) for name in loaded)
    assert any(not torch.equal(ema[name], online[name]) for name in loaded)  # the EMA, not the online weights
    assert backbone.condition_index == 1
    assert cdpm_align.build_backbone(str(path), "chest").condition_index == len(DATASETS)  # not pretrained on: ∅


def test_backbone_gives_full_resolution_features_for_its_condition(cdpm_run):
    _, _, path = cdpm_run
    image = torch.rand(2, 1, 32, 24)
    hand = cdpm_align.build_backbone(str(path), "hand", timestep=5)
    features = hand(image)
    assert hand.out_channels == TINY_UNET["block_out_channels"][0] and hand.timestep == 5
    assert features.shape == (2, hand.out_channels, 32, 24)
    assert not torch.allclose(features, cdpm_align.build_backbone(str(path), "isbi2015", timestep=5)(image))
    with pytest.raises(ValueError, match="multiple of 8"):
        hand(torch.rand(1, 1, 30, 24))


def test_ddpm_round_trip_and_cross_method_rejection(ddpm_checkpoint):
    module, path = ddpm_checkpoint
    backbone = ddpm.build_backbone(str(path), "isbi2015")
    assert isinstance(backbone, DiffusionBackbone) and backbone.condition_index is None
    ema = module.ema_unet.module.state_dict()
    assert all(torch.equal(value, ema[name]) for name, value in backbone.unet.state_dict().items())
    with pytest.raises(CheckpointError, match="written by method 'ddpm', not 'cdpm_align'"):
        cdpm_align.build_backbone(str(path), "isbi2015")


def test_mismatched_unet_config_fails_loudly(ddpm_checkpoint, tmp_path):
    _, path = ddpm_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["unet"] = {**TINY_UNET, "block_out_channels": [8, 8, 16, 32]}
    tampered = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, tampered)
    with pytest.raises(CheckpointError, match="do not fit"):
        ddpm.build_backbone(str(tampered), None)


def test_sample_grid_has_a_row_per_condition(cdpm_run, ddpm_checkpoint, tmp_path):
    cdpm_module, _, _ = cdpm_run
    ddpm_module, _ = ddpm_checkpoint
    conditional = imread(save_sample_grid(cdpm_module, tmp_path / "c.png", num_per_condition=2, num_inference_steps=3))
    plain = imread(save_sample_grid(ddpm_module, tmp_path / "d.png", num_per_condition=2, num_inference_steps=3))
    assert conditional.shape[0] > 2.5 * plain.shape[0]  # 3 rows (2 datasets + ∅) against 1
    assert [label for label, _ in cdpm_module.sample_conditions()] == [*DATASETS, "null ∅"]


@pytest.mark.parametrize("preset", ["tiny", "cpu", "paper"])
def test_presets_build_both_methods_on_one_unet(preset):
    settings = PRESETS[preset]
    ddpm_settings, cdpm_settings = settings["pretrain"]["ddpm"], settings["pretrain"]["cdpm_align"]
    assert settings["unet"]["sample_size"] == ddpm_settings["resolution"] == cdpm_settings["resolution"]
    assert {name: cdpm_settings[name] for name in ddpm_settings} == ddpm_settings  # same schedule, cdpm adds its own
    assert len(settings["unet"]["block_out_channels"]) == 4  # four decoder scales for the alignment loss
    assert all(side % 8 == 0 for side in FINETUNE[preset]["resolution"])
    if preset == "paper":
        return  # built on a GPU; its config is checked above
    kwargs = {name: value for name, value in cdpm_settings.items() if name not in RUN_KEYS}
    module = CDPMAlignPretrain(unet=settings["unet"], dataset_names=DATASETS, **kwargs)
    assert len(module.align_scales) == 4
