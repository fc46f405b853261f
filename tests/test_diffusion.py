"""Diffusion pretraining (ddpm, cdpm_align): conditioning, decoder taps, alignment loss, training, hand-over."""

from __future__ import annotations

import itertools
import json
import math

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread
from torch.utils.data import DataLoader

from landmark_bench.checkpoints import METHOD_KEY, CheckpointError
from landmark_bench.cli import main
from landmark_bench.losses import guidance_alignment_loss
from landmark_bench.methods import BackboneSpec, cdpm_align
from landmark_bench.methods.cdpm_align import CDPMAlignPretrain, draw_timestep_pair
from landmark_bench.methods.ddpm import EMA_PREFIX, DDPMPretrain, save_sample_grid
from landmark_bench.models.unet import (
    DiffusionBackbone,
    build_unet,
    decoder_features,
    epsilon_from_prediction,
    make_noise_scheduler,
    to_diffusion_range,
)
from landmark_bench.data.datamodule import UnlabeledDataModule
from landmark_bench.pretrain import RUN_KEYS, pretrain
from landmark_bench.presets import FINETUNE, PRESETS, UNET

TINY_UNET = UNET["tiny"]


def cdpm_backbone(path, dataset: str | None, **spec) -> DiffusionBackbone:
    return CDPMAlignPretrain.backbone(BackboneSpec(dataset=dataset, **spec), str(path))


def ddpm_backbone(path, dataset: str | None, **spec) -> DiffusionBackbone:
    return DDPMPretrain.backbone(BackboneSpec(dataset=dataset, **spec), str(path))
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
    assert conditional.class_embedding.num_embeddings == 4 and conditional.class_embedding.padding_idx == 3
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


def test_a_velocity_reads_back_as_exactly_its_noise():
    scheduler = make_noise_scheduler({"num_train_timesteps": 1000, "prediction_type": "v_prediction"})
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.rand((6, 1, 8, 8), generator=generator) * 2 - 1, torch.randn((6, 1, 8, 8), generator=generator)
    timesteps = torch.tensor([0, 50, 200, 500, 800, 999])
    noisy = scheduler.add_noise(clean, noise, timesteps)
    velocity = scheduler.get_velocity(clean, noise, timesteps)
    torch.testing.assert_close(epsilon_from_prediction(scheduler, velocity, noisy, timesteps), noise)
    epsilon_scheduler = make_noise_scheduler({"num_train_timesteps": 1000})
    assert epsilon_from_prediction(epsilon_scheduler, noise, noisy, timesteps) is noise


def test_v_prediction_trains_on_the_velocity_and_its_health_is_in_epsilon_units():
    """The v-prediction loss falls on a fixed batch, and the health record's ε-MSE of the trained UNet is the
    velocity error it was trained on, scaled by ᾱ (ε error = sqrt(ᾱ)·v error)."""
    torch.manual_seed(0)
    images = disc_images(4)
    module = DDPMPretrain(unet=TINY_UNET, dataset_names=DATASETS, max_steps=40, lr=3e-3, warmup_steps=0,
                          lr_schedule="constant", ema_decay=0.5, prediction_type="v_prediction")
    clean = to_diffusion_range(images)
    timesteps = torch.full((4,), 800)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    noisy = module.noise_scheduler.add_noise(clean, noise, timesteps)
    target = module.noise_scheduler.get_velocity(clean, noise, timesteps)

    def velocity_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(module.ema_unet.module(noisy, timesteps).sample, target).item()

    before = velocity_loss()
    batch = [{"image": image, "dataset_index": torch.tensor(0)} for image in images]
    quiet_trainer(40).fit(module, DataLoader(batch * 40, batch_size=4))
    after = velocity_loss()
    assert after < 0.5 * before
    alpha = float(module.noise_scheduler.alphas_cumprod[800])
    measured = module.denoising_mse(module.ema_unet.module, {"image": images, "dataset_index": torch.zeros(4).long()},
                                    800, seed=0)
    assert measured == pytest.approx(alpha * after, rel=1e-4)


def test_an_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of .*'x0'"):
        DDPMPretrain(unet=TINY_UNET, dataset_names=DATASETS, max_steps=6, prediction_type="x0")


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
    backbone = cdpm_backbone(str(path), "hand")
    loaded = backbone.unet.state_dict()
    assert set(loaded) == {name for name in ema if not name.startswith("conv_out.")}
    assert all(torch.equal(loaded[name], ema[name]) for name in loaded)
    assert any(not torch.equal(ema[name], online[name]) for name in loaded)  # the EMA, not the online weights
    assert backbone.condition_index == 1
    assert cdpm_backbone(str(path), "chest").condition_index == len(DATASETS)  # not pretrained on: ∅


def test_backbone_gives_full_resolution_features_for_its_condition(cdpm_run):
    _, _, path = cdpm_run
    image = torch.rand(2, 1, 32, 24)
    hand = cdpm_backbone(str(path), "hand", timestep=5)
    features = hand(image)
    assert hand.out_channels == TINY_UNET["block_out_channels"][0] and hand.timestep == 5
    assert features.shape == (2, hand.out_channels, 32, 24)
    assert not torch.allclose(features, cdpm_backbone(str(path), "isbi2015", timestep=5)(image))
    with pytest.raises(ValueError, match="multiple of 8"):
        hand(torch.rand(1, 1, 30, 24))


def test_backbone_read_at_stride_two_is_the_decoder_tap_before_the_last_upsampler(cdpm_run):
    _, _, path = cdpm_run
    image = torch.rand(2, 1, 32, 24)
    full = cdpm_backbone(str(path), "hand")
    coarse = cdpm_backbone(str(path), "hand", feature_stride=2)
    channels = TINY_UNET["block_out_channels"][1]
    assert coarse.out_channels == channels and coarse.pyramid_channels == full.pyramid_channels[:3]
    assert len(coarse.unet.up_blocks) == 3 and coarse.unet.up_blocks[-1].upsamplers is None
    with torch.no_grad():
        features = coarse(image)
        tap = full.pyramid(image)[2]  # the third decoder scale, before its upsampler
        assert features.shape == (2, channels, 16, 12) and tap.shape == features.shape
        # a new norm (identity affine at init) and the UNet's activation over that very tap
        torch.testing.assert_close(features, F.silu(F.group_norm(tap, TINY_UNET["norm_num_groups"])))
        torch.testing.assert_close(coarse.pyramid(image), full.pyramid(image)[:3])
    kept = {name: tensor for name, tensor in full.state_dict().items()
            if name in coarse.state_dict() and not name.startswith("unet.conv_norm_out.")}  # the new norm
    assert all(torch.equal(coarse.state_dict()[name], tensor) for name, tensor in kept.items())  # pretrained weights
    assert not any(name.startswith("unet.up_blocks.3.") for name in coarse.state_dict())
    for stride in (0, 3, 16):
        with pytest.raises(ValueError, match="feature_stride"):
            cdpm_backbone(str(path), "hand", feature_stride=stride)


def test_ddpm_round_trip_and_cross_method_rejection(ddpm_checkpoint):
    module, path = ddpm_checkpoint
    backbone = ddpm_backbone(str(path), "isbi2015")
    assert isinstance(backbone, DiffusionBackbone) and backbone.condition_index is None
    ema = module.ema_unet.module.state_dict()
    assert all(torch.equal(value, ema[name]) for name, value in backbone.unet.state_dict().items())
    with pytest.raises(CheckpointError, match="written by method 'ddpm', not 'cdpm_align'"):
        cdpm_backbone(str(path), "isbi2015")


def test_mismatched_unet_config_fails_loudly(ddpm_checkpoint, tmp_path):
    _, path = ddpm_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["unet"] = {**TINY_UNET, "block_out_channels": [8, 8, 16, 32]}
    tampered = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, tampered)
    with pytest.raises(CheckpointError, match="do not fit"):
        ddpm_backbone(str(tampered), None)


def test_sample_grid_has_a_row_per_condition(cdpm_run, ddpm_checkpoint, tmp_path):
    cdpm_module, _, _ = cdpm_run
    ddpm_module, _ = ddpm_checkpoint
    conditional = imread(save_sample_grid(cdpm_module, tmp_path / "c.png", num_per_condition=2, num_inference_steps=3))
    plain = imread(save_sample_grid(ddpm_module, tmp_path / "d.png", num_per_condition=2, num_inference_steps=3))
    assert conditional.shape[0] > 2.5 * plain.shape[0]  # 3 rows (2 datasets + ∅) against 1
    assert [label for label, _ in cdpm_module.sample_conditions()] == [*DATASETS, "null ∅"]


def test_samples_command_renders_a_checkpoint_with_guidance_and_refuses_a_non_generative_one(cdpm_run, tmp_path,
                                                                                           capsys):
    _, _, path = cdpm_run
    unguided, guided = tmp_path / "g1.png", tmp_path / "g3.png"
    assert main(["samples", "--checkpoint", str(path), "--out", str(unguided), "--guidance-scale", "1",
                 "--steps", "3"]) == 0
    assert main(["samples", "--checkpoint", str(path), "--out", str(guided), "--steps", "3"]) == 0
    assert imread(unguided).shape == imread(guided).shape
    assert not np.array_equal(imread(unguided), imread(guided))  # guidance moves the conditional rows
    tall = tmp_path / "tall.png"  # e.g. the fine-tuning resolution: portrait samples from the crop-trained UNet
    assert main(["samples", "--checkpoint", str(path), "--out", str(tall), "--steps", "2", "--size", "32", "16"]) == 0
    height, width = imread(tall).shape[:2]
    assert height / width > 1.5 * imread(guided).shape[0] / imread(guided).shape[1]
    foreign = tmp_path / "foreign.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint[METHOD_KEY] = "simclr"
    torch.save(checkpoint, foreign)
    assert main(["samples", "--checkpoint", str(foreign), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not generate images" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("preset", ["tiny", "cpu", "paper"])
def test_presets_build_both_methods_on_one_unet(preset):
    settings = PRESETS[preset]
    ddpm_settings, cdpm_settings = settings["pretrain"]["ddpm"], settings["pretrain"]["cdpm_align"]
    assert ddpm_settings["crop_size"] == cdpm_settings["crop_size"]
    trained_at = ddpm_settings["crop_size"] or ddpm_settings["resolution"]  # a crop, or the whole cached image
    assert settings["unet"]["sample_size"] == trained_at
    if ddpm_settings["crop_size"]:  # crops are cut at the fine-tuning pixel scale
        assert ddpm_settings["resolution"] == FINETUNE[preset]["resolution"] or preset == "tiny"
    else:  # whole images keep the fine-tuning aspect, at a scale the UNet's levels divide
        fine = FINETUNE[preset]["resolution"]
        assert ddpm_settings["resolution"][0] * fine[1] == ddpm_settings["resolution"][1] * fine[0]
        assert all(side % 8 == 0 for side in ddpm_settings["resolution"])
    assert ddpm_settings["held_out_fraction"] > 0  # the health record needs held-out images
    assert {name: cdpm_settings[name] for name in ddpm_settings} == ddpm_settings  # same schedule, cdpm adds its own
    assert len(settings["unet"]["block_out_channels"]) == 4  # four decoder scales for the alignment loss
    assert all(side % 8 == 0 for side in FINETUNE[preset]["resolution"])
    if preset == "paper":
        return  # built on a GPU; its config is checked above
    kwargs = {name: value for name, value in cdpm_settings.items() if name not in RUN_KEYS}
    module = CDPMAlignPretrain(unet=settings["unet"], dataset_names=DATASETS, **kwargs)
    assert len(module.align_scales) == 4


def test_paper_preset_has_the_reported_cdpm_align_settings():
    """The second-hand settings of DESIGN.md ("What is reported about the paper's settings")."""
    settings = PRESETS["paper"]["pretrain"]["cdpm_align"]
    assert settings["num_train_timesteps"] == 500 and settings["beta_schedule"] == "linear"
    assert (settings["beta_start"], settings["beta_end"]) == (1e-4, 0.028)
    assert settings["condition_dropout"] == 0.1 and settings["align_weight"] == 5
    assert settings["align_timestep_range"] == [0.25, 0.75] and settings["align_fraction"] == 0.1
    assert (settings["batch_size"], settings["lr"], settings["max_steps"]) == (16, 1e-4, 50000)
    assert settings["backbone_timestep"] == 200


def test_gradient_checkpointing_gives_the_alignment_step_the_same_loss_and_gradients():
    """The paper preset checkpoints cdpm_align's UNet to fit its four-pass alignment steps: a memory setting only."""
    modules, losses = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = CDPMAlignPretrain(unet=TINY_UNET, dataset_names=DATASETS, max_steps=4, align_weight=2.0,
                                   checkpoint_alignment=checkpointing)
        module.log = lambda *args, **kwargs: None
        torch.manual_seed(1)
        loss = module.alignment_step({"image": disc_images(3), "dataset_index": torch.tensor([0, 1, 0])})
        loss.backward()
        modules.append(module)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    plain, checkpointed = modules
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    assert PRESETS["paper"]["pretrain"]["cdpm_align"]["checkpoint_alignment"]
    for (name, a), (_, b) in zip(plain.unet.named_parameters(), checkpointed.unet.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name, rtol=1e-4, atol=1e-6)


def test_timestep_pair_stays_in_the_range():
    torch.manual_seed(0)
    first, second = draw_timestep_pair(4096, 500, max_gap=None, timestep_range=(0.25, 0.75))
    for drawn in (first, second):
        assert drawn.min() == 125 and drawn.max() == 375
    first, second = draw_timestep_pair(4096, 500, max_gap=10, timestep_range=(0.25, 0.75))
    assert second.min() >= 125 and second.max() <= 375 and (first - second).abs().max() <= 10


def contains_window(image: torch.Tensor, window: torch.Tensor) -> bool:
    height, width = window.shape
    return any(
        torch.equal(image[top : top + height, left : left + width], window)
        for top in range(image.shape[0] - height + 1)
        for left in range(image.shape[1] - width + 1)
    )


def test_unlabeled_datamodule_crops_at_the_cache_scale_and_holds_out_a_fixed_slice(tmp_path):
    def datamodule(seed: int) -> UnlabeledDataModule:
        module = UnlabeledDataModule(["phantom"], resolution=[40, 32], crop_size=16, held_out_fraction=0.1,
                                     seed=seed, cache_dir=str(tmp_path))
        module.setup("fit")
        return module

    first, again, other = datamodule(0), datamodule(0), datamodule(1)
    assert len(first.dataset) == 90 and len(first.held_out) == 10  # the phantom's 100 pretraining images
    assert not any(torch.equal(image, held) for image in first.dataset.images for held in first.held_out.images)
    assert torch.equal(first.held_out.images, other.held_out.images)  # the held-out slice does not move with seed
    items = [first.dataset[index] for index in range(6)]
    assert all(item["image"].shape == (1, 16, 16) and 0 <= item["image"].min() <= item["image"].max() <= 1
               for item in items)
    for index, item in enumerate(items):  # a crop is a window of the 40x32 cached image, not a resized image
        assert contains_window(first.dataset.images[index], (item["image"][0] * 255).round().to(torch.uint8))
    assert all(torch.equal(item["image"], again.dataset[index]["image"]) for index, item in enumerate(items))
    assert any(not torch.equal(item["image"], other.dataset[index]["image"]) for index, item in enumerate(items))
    batch = first.held_out.fixed_batch(crops_per_image=3, seed=5)
    assert batch["image"].shape == (30, 1, 16, 16) and torch.equal(batch["dataset_index"], torch.zeros(30).long())
    torch.testing.assert_close(batch["image"], first.held_out.fixed_batch(crops_per_image=3, seed=5)["image"])
    whole = UnlabeledDataModule(["phantom"], resolution=16, cache_dir=str(tmp_path))
    whole.setup("fit")
    assert whole.dataset[0]["image"].shape == (1, 16, 16) and len(whole.dataset) == 100 and len(whole.held_out) == 0


def test_multi_scale_crops_show_the_whole_image_at_the_top_of_the_range_and_keep_held_out_crops_plain(tmp_path):
    def datamodule(crop_scale) -> UnlabeledDataModule:
        module = UnlabeledDataModule(["phantom"], resolution=[40, 32], crop_size=16, held_out_fraction=0.1,
                                     cache_dir=str(tmp_path), crop_scale=crop_scale)
        module.setup("fit")
        return module

    whole = datamodule([3.0, 3.0])  # 48x48 windows, clipped to the 40x32 image: the whole image, resized
    for index in range(3):
        image = whole.dataset.images[index][None, None].float()
        expected = F.interpolate(image, size=(16, 16), mode="bilinear", antialias=True).round().clamp(0, 255) / 255
        torch.testing.assert_close(whole.dataset[index]["image"], expected[0])
    mixed = datamodule([1.0, 1.06])  # windows of 16 (factor below 1.03) or 17 pixels
    items = [mixed.dataset[index]["image"] for index in range(20)]
    assert all(item.shape == (1, 16, 16) for item in items)
    plain = [contains_window(mixed.dataset.images[index], (item[0] * 255).round().to(torch.uint8))
             for index, item in enumerate(items)]
    assert any(plain) and not all(plain)  # some windows at the cache's scale, the others resized from larger ones
    held = mixed.held_out.fixed_batch(crops_per_image=2, seed=5)["image"]
    assert all(contains_window(mixed.held_out.images[index // 2], (crop[0] * 255).round().to(torch.uint8))
               for index, crop in enumerate(held))
    with pytest.raises(ValueError, match="crop_scale"):
        datamodule([0.5, 2.0]).dataset


@pytest.mark.parametrize("method", ["ddpm", "cdpm_align"])
def test_tiny_pretraining_writes_a_health_record(method, tmp_path):
    record = pretrain(method=method, datasets=["phantom"], preset="tiny", out=tmp_path, accelerator="cpu")
    health = json.loads((tmp_path / "health.json").read_text())
    assert json.loads((tmp_path / "run.json").read_text())["health"] == health
    assert health == json.loads(json.dumps(record["health"]))
    assert {"learned", "summary", "timesteps", "pretrained_mse", "untrained_mse", "mean_image_mse", "ratio"} \
        <= set(health)
    assert isinstance(health["learned"], bool) and "held-out denoising MSE" in health["summary"]
    assert health["timesteps"] == [50, 200, 500, 800]
    values = health["pretrained_mse"] + health["untrained_mse"] + health["mean_image_mse"] + health["ratio"]
    assert len(values) == 16 and all(math.isfinite(value) and value > 0 for value in values)
    assert health["learned"] == all(ratio <= 0.7 for ratio in health["ratio"])
    assert health["held_out_images"] == 10 and health["sample_shape"] == [1, 16, 16]


def test_health_record_sees_what_training_taught():
    """Trained on the held-out kind of images, the EMA UNet denoises them far better than a fresh one."""
    torch.manual_seed(0)
    images = disc_images(4)
    module = DDPMPretrain(unet=TINY_UNET, dataset_names=DATASETS, max_steps=60, lr=3e-3, warmup_steps=0,
                          lr_schedule="constant", ema_decay=0.5)
    batch = [{"image": image, "dataset_index": torch.tensor(0)} for image in images]
    quiet_trainer(60).fit(module, DataLoader(batch * 60, batch_size=4))

    class HeldOut:
        held_out = type("Held", (), {"__len__": lambda self: 4,
                                     "fixed_batch": lambda self, **_: {"image": images,
                                                                       "dataset_index": torch.zeros(4).long()}})()
        dataset = held_out

        def setup(self, stage):
            pass

    health = module.health_record(HeldOut())
    assert health["learned"] and all(ratio < 0.5 for ratio in health["ratio"])


def test_mean_image_reference_is_the_error_of_predicting_each_dataset_mean_training_image():
    """The closed form equals the ε-MSE measured by predicting x0 as the per-dataset mean of the training images, for
    any noise; a dataset without training images is refused."""
    module = DDPMPretrain(unet=TINY_UNET, dataset_names=DATASETS, max_steps=6)
    images, training_images = disc_images(6)[:3], disc_images(6)
    labels, training_labels = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 1])
    clean = to_diffusion_range(images).double()
    training = to_diffusion_range(training_images).double()
    means = torch.stack([training[training_labels == label].mean(0) for label in labels])
    alphas = module.noise_scheduler.alphas_cumprod.double()
    timesteps = [50, 500, 800]
    training_batch = {"image": training_images, "dataset_index": training_labels}
    reference = module.mean_image_mse({"image": images, "dataset_index": labels}, timesteps, training_batch)
    for timestep, value in zip(timesteps, reference, strict=True):
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(timestep), dtype=torch.float64)
        alpha = alphas[timestep]
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        predicted_noise = (noisy - alpha.sqrt() * means) / (1 - alpha).sqrt()
        assert value == pytest.approx(float(F.mse_loss(predicted_noise, noise)), rel=1e-9)
    with pytest.raises(ValueError, match=r"no training images of dataset index \[1\]"):
        module.mean_image_mse({"image": images, "dataset_index": labels}, timesteps,
                              {"image": training_images[:3], "dataset_index": training_labels[:3]})


def stub_features(timestep: int, condition: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """A fixed random feature map per scale, a function of (timestep, condition) only."""
    generator = torch.Generator().manual_seed(1000 * timestep + condition)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def test_alignment_step_pairs_the_four_passes_as_the_paper_defines(monkeypatch):
    """L_align = mean_s (1 - cos(g1, g2)), g_i = h(x_ti, ti, y) - h(x_ti, ti, ∅), from stub decoder features
    keyed by (timestep, condition): any other pairing of the four passes gives another value."""
    shapes = [(4, 2, 2), (4, 4, 4), (2, 8, 8), (2, 16, 16)]
    first, second = torch.tensor([10, 300, 620]), torch.tensor([700, 40, 500])
    labels = torch.tensor([0, 1, 0])
    module = CDPMAlignPretrain(unet=TINY_UNET, dataset_names=DATASETS, max_steps=4, align_weight=2.0,
                               align_timestep_range=[0.0, 0.9])
    null = module.null_index
    seen = {}

    def fake_pair(batch_size, num_train_timesteps, max_gap, device, timestep_range):
        assert (batch_size, num_train_timesteps, timestep_range) == (3, 1000, [0.0, 0.9])
        return first, second

    def fake_decoder_features(unet, sample, timesteps, class_labels):
        seen.update(sample=sample, timesteps=timesteps, labels=class_labels)
        features = [stub_features(int(t), int(c), shapes) for t, c in zip(timesteps, class_labels)]
        stacked = [torch.stack([per_pass[scale] for per_pass in features]) for scale in range(len(shapes))]
        return torch.zeros_like(sample), stacked

    logged = {}
    monkeypatch.setattr(cdpm_align, "draw_timestep_pair", fake_pair)
    monkeypatch.setattr(cdpm_align, "decoder_features", fake_decoder_features)
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    images = disc_images(3)
    loss = module.alignment_step({"image": images, "dataset_index": labels})

    # the passes: each x_ti goes in with y and with ∅, at its own ti
    sample, timesteps, class_labels = seen["sample"], seen["timesteps"], seen["labels"]
    for position, (t, c) in enumerate(zip(timesteps.tolist(), class_labels.tolist())):
        row = position % 3
        expected_t = (first if position % 6 < 3 else second)[row]
        assert t == expected_t and c == (labels[row] if position < 6 else null)
    torch.testing.assert_close(sample[:6], sample[6:])  # the same noisy images under both conditions

    def loss_of(pairing) -> float:
        """1 - cos over the passes named (t-index, condition) for (cond_1, null_1, cond_2, null_2), per sample."""
        per_scale = []
        for scale in range(len(shapes)):
            cosines = []
            for row in range(3):
                times = {1: int(first[row]), 2: int(second[row])}
                conditions = {"y": int(labels[row]), "null": null}
                h = [stub_features(times[i], conditions[c], shapes)[scale].flatten() for i, c in pairing]
                cosines.append(F.cosine_similarity(h[0] - h[1], h[2] - h[3], dim=0))
            per_scale.append(1 - torch.stack(cosines).mean())
        return float(torch.stack(per_scale).mean())

    correct = [(1, "y"), (1, "null"), (2, "y"), (2, "null")]
    expected = loss_of(correct)
    assert logged["train/align_loss"] == pytest.approx(expected, rel=1e-5)
    for a, b in itertools.combinations(range(4), 2):  # the test can tell any swap of two passes apart
        swapped = list(correct)
        swapped[a], swapped[b] = swapped[b], swapped[a]
        assert loss_of(swapped) != pytest.approx(expected, rel=1e-3)
    assert float(loss) == pytest.approx(logged["train/diffusion_loss"] + 2.0 * expected, rel=1e-5)


def test_backbone_noise_input_is_deterministic_and_pyramid_matches_forward(cdpm_run):
    _, _, path = cdpm_run
    image = torch.rand(2, 1, 32, 24)
    clean = cdpm_backbone(str(path), "hand", timestep=200)
    noised = cdpm_backbone(str(path), "hand", timestep=200, noise_input=True)
    assert not clean.noise_input and noised.noise_input
    with torch.no_grad():
        torch.testing.assert_close(noised(image), noised(image))  # fixed seeded noise: deterministic
        assert not torch.allclose(noised(image), clean(image))
        pyramid = noised.pyramid(image)
        channels = TINY_UNET["block_out_channels"][::-1]
        assert [tuple(level.shape) for level in pyramid] == [
            (2, channels[scale], 32 // 2 ** (3 - scale), 24 // 2 ** (3 - scale)) for scale in range(4)
        ]
        unet = noised.unet
        torch.testing.assert_close(unet.conv_act(unet.conv_norm_out(pyramid[-1])), noised(image))
    assert cdpm_backbone(str(path), "hand").timestep == 0  # the checkpoint's backbone_timestep
