"""Self-supervised baselines (SimCLR, MoCo v3, DINO): views, learning, health records, checkpoint hand-over."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from lightly.loss import DINOLoss

from landmark_bench.checkpoints import CheckpointError
from landmark_bench.data.datamodule import UnlabeledDataModule
from landmark_bench.methods import dino, get_method, moco, simclr
from landmark_bench.models.encoder import create_encoder
from landmark_bench.presets import get_preset

# A small timm encoder keeps the tests fast; the methods treat every create_encoder name alike.
TEST_ENCODER = "test_resnet"
IMAGE_SIZE = 48
N_IMAGES = 16
TRAIN_STEPS = 30
# Milder views than the presets' so that a few dozen steps from random weights clearly learn.
MILD_VIEWS = {"rotation_prob": 0.0, "brightness": 0.2, "contrast": 0.2, "blur_sigmas": (0.1, 0.5)}
TWO_VIEW_SETTINGS = {"size": 32, "scale": (0.7, 1.0), **MILD_VIEWS}
MULTI_CROP_SETTINGS = {
    "global_size": 32,
    "global_scale": (0.7, 1.0),
    "local_size": 16,
    "local_scale": (0.3, 0.6),
    "n_local": 2,
    **MILD_VIEWS,
}


def phantom(index: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A synthetic greyscale image whose identity survives crops and jitter: a grating of its own
    orientation and frequency under a bright ellipse ("bone") on a dark background."""
    angle = np.pi * (index % 8) / 8
    frequency = 0.5 + 0.4 * (index // 8 % 2)
    rows, cols = np.mgrid[0:size, 0:size]
    grating = 0.5 + 0.5 * np.sin(frequency * (cols * np.cos(angle) + rows * np.sin(angle)))
    image = Image.fromarray((40 + 120 * grating).astype(np.uint8), mode="L")
    rng = np.random.default_rng(index)
    left, top = rng.integers(0, size // 2, 2)
    ImageDraw.Draw(image).ellipse([left, top, left + size // 3, top + size // 2], fill=230)
    return image


class PhantomViews(Dataset):
    """Stands in for the unlabeled DataModule: ``{"views": [...], "dataset_index": ...}`` per image."""

    def __init__(self, transform, n_images: int = N_IMAGES) -> None:
        self.images = [phantom(seed) for seed in range(n_images)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"views": self.transform(self.images[index]), "dataset_index": 0}


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# Per method: (LightningModule class, views_transform, small settings for CPU tests).
# DINO: batch norm in the head, because without it a random encoder's teacher outputs barely differ between
# images, centering flattens them, and the loss only starts falling after far more steps; and a fixed teacher
# temperature, because its warm-up raises the targets' entropy and with it the loss.
METHODS = {
    "simclr": (simclr.SimCLR, simclr.SimCLR.views_transform, TWO_VIEW_SETTINGS,
               dict(projection_hidden_dim=128, projection_dim=64, temperature=0.2, lr=3e-3)),
    "moco": (moco.MoCoV3, moco.MoCoV3.views_transform, TWO_VIEW_SETTINGS,
             dict(projection_hidden_dim=128, prediction_hidden_dim=128, projection_dim=64, base_momentum=0.9, lr=3e-3)),
    "dino": (dino.DINO, dino.DINO.views_transform, MULTI_CROP_SETTINGS,
             dict(head_hidden_dim=128, bottleneck_dim=64, output_dim=128, head_batch_norm=True,
                  warmup_teacher_temp=0.04, teacher_temp=0.04, base_momentum=0.9, lr=3e-3)),
}


def build(method: str, max_steps: int, **overrides) -> tuple[L.LightningModule, DataLoader]:
    """A small ``method`` module and a loader of its views of the phantom set."""
    module_class, views_transform, view_settings, settings = METHODS[method]
    model = module_class(encoder=TEST_ENCODER, max_steps=max_steps, **{**settings, **overrides})
    loader = DataLoader(PhantomViews(views_transform(**view_settings)), batch_size=8, shuffle=True, drop_last=True)
    return model, loader


def cpu_trainer(max_steps: int, tmp_path: Path, callbacks: list[L.Callback] = ()) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                     default_root_dir=tmp_path)


def train(method: str, tmp_path: Path, steps: int = TRAIN_STEPS, **overrides):
    """Train ``method`` on the phantom set: (model, trainer, per-step losses, initial state dict)."""
    L.seed_everything(0, verbose=False)
    model, loader = build(method, steps, **overrides)
    initial_state = copy.deepcopy(model.state_dict())
    recorder = LossRecorder()
    trainer = cpu_trainer(steps, tmp_path, [recorder])
    trainer.fit(model, loader)
    return model, trainer, recorder.losses, initial_state


METHOD_MODULES = {"simclr": simclr.SimCLR, "moco": moco.MoCoV3, "dino": dino.DINO}
MOMENTUM_ENCODERS = {"moco": "momentum_encoder", "dino": "teacher_encoder"}


@pytest.fixture(scope="module", params=list(METHOD_MODULES))
def trained(request, tmp_path_factory) -> dict:
    """Each method trained once, with a Trainer-written checkpoint; the tests below share the run."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    model, trainer, losses, initial_state = train(request.param, tmp_path)
    checkpoint_path = tmp_path / f"{request.param}.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    return {
        "method": request.param,
        "model": model,
        "losses": losses,
        "initial_state": initial_state,
        "checkpoint_path": checkpoint_path,
        "trainer": trainer,
    }


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_loss_falls(trained):
    losses = trained["losses"]
    assert len(losses) == TRAIN_STEPS
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.2, f"{trained['method']} did not learn: first 5 steps {first:.3f}, last 5 {last:.3f}"


def test_losses_are_logged_under_train(trained):
    metrics = trained["trainer"].callback_metrics
    assert "train/loss" in metrics and "train_loss" not in metrics
    assert all(key.startswith("train/") for key in metrics), sorted(metrics)


def test_health_record_tracks_every_step(trained):
    model = trained["model"]
    assert model.loss_history == pytest.approx(trained["losses"])
    record = model.health_record(None)
    window = math.ceil(0.1 * TRAIN_STEPS)
    assert record["final_loss"] == pytest.approx(np.mean(trained["losses"][-window:]))
    assert record["steps"] == TRAIN_STEPS and record["global_batch_size"] == 8


def test_encoder_state_dict_is_the_trained_online_encoder(trained):
    model = trained["model"]
    state = METHOD_MODULES[trained["method"]].encoder_state_dict(str(trained["checkpoint_path"]))
    encoder = create_encoder(TEST_ENCODER)
    encoder.load_state_dict(state, strict=True)
    assert_same_tensors(encoder.state_dict(), model.encoder.state_dict())
    changed = [key for key in state if not torch.equal(state[key], trained["initial_state"]["encoder." + key])]
    assert changed, "the checkpoint holds the untrained encoder"
    if trained["method"] in MOMENTUM_ENCODERS:
        momentum_state = getattr(model, MOMENTUM_ENCODERS[trained["method"]]).state_dict()
        assert any(not torch.equal(state[key], momentum_state[key]) for key in state), "got the momentum encoder"


def test_momentum_encoder_moves_after_the_online_one(trained):
    if trained["method"] not in MOMENTUM_ENCODERS:
        pytest.skip("SimCLR has no momentum encoder")
    model = trained["model"]
    name = MOMENTUM_ENCODERS[trained["method"]]
    online = dict(model.encoder.named_parameters())
    momentum = dict(getattr(model, name).named_parameters())
    assert not any(parameter.requires_grad for parameter in momentum.values())
    assert any(not torch.equal(value, trained["initial_state"][f"{name}.{key}"]) for key, value in momentum.items())
    assert any(not torch.equal(value, online[key]) for key, value in momentum.items())
    assert model.momentum_at(0) == pytest.approx(model.base_momentum)
    assert model.momentum_at(TRAIN_STEPS - 1) == pytest.approx(model.final_momentum)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_update_follows_the_schedule(momentum, tmp_path):
    """Momentum 0 copies the online weights after every step; momentum 1 never moves the copy."""
    model, _, _, initial_state = train("moco", tmp_path, steps=3, base_momentum=momentum, final_momentum=momentum)
    online = dict(model.encoder.named_parameters())
    for key, value in model.momentum_encoder.named_parameters():
        expected = online[key] if momentum == 0.0 else initial_state[f"momentum_encoder.{key}"]
        assert torch.equal(value, expected), key


def test_checkpoint_of_another_method_fails(trained):
    for other, module in METHOD_MODULES.items():
        if other != trained["method"]:
            with pytest.raises(CheckpointError, match="written by method"):
                module.encoder_state_dict(str(trained["checkpoint_path"]))


def test_checkpoint_without_encoder_prefix_fails(trained, tmp_path):
    checkpoint = torch.load(trained["checkpoint_path"], weights_only=True)
    checkpoint["state_dict"] = {
        key.replace("encoder.", "backbone.", 1): value for key, value in checkpoint["state_dict"].items()
    }
    renamed = tmp_path / "renamed.ckpt"
    torch.save(checkpoint, renamed)
    with pytest.raises(CheckpointError, match="no weights under 'encoder.'"):
        METHOD_MODULES[trained["method"]].encoder_state_dict(str(renamed))


@pytest.fixture(scope="module")
def short_dino_run(tmp_path_factory) -> tuple[dino.DINO, dict]:
    """Three DINO steps with the teacher-temperature warm-up and a longer last-layer freeze."""
    model, _, _, initial_state = train(
        "dino",
        tmp_path_factory.mktemp("short_dino"),
        steps=3,
        freeze_last_layer_steps=10,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_steps=2,
    )
    return model, initial_state


def test_dino_freezes_the_last_head_layer_during_the_first_steps(short_dino_run):
    model, initial_state = short_dino_run
    head = model.projection_head
    assert torch.equal(head.last_layer.weight_v, initial_state["projection_head.last_layer.weight_v"])
    assert not torch.equal(head.layers[0].weight, initial_state["projection_head.layers.0.weight"])


def test_dino_teacher_temperature_warms_up(short_dino_run):
    model, _ = short_dino_run
    temperatures = [model.teacher_temperature(step) for step in range(4)]
    assert temperatures[0] == pytest.approx(0.04)
    assert temperatures[0] < temperatures[1] < temperatures[2]
    assert temperatures[2] == temperatures[3] == pytest.approx(0.07)


def test_schedules_refuse_a_trainer_with_other_max_steps(tmp_path):
    model, loader = build("simclr", max_steps=5)
    with pytest.raises(ValueError, match="max_steps"):
        cpu_trainer(3, tmp_path).fit(model, loader)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_two_views_are_one_channel_at_the_requested_size(method):
    views = METHOD_MODULES[method].views_transform(size=24)(phantom(0))
    assert len(views) == 2
    for view in views:
        assert view.shape == (1, 24, 24) and view.dtype == torch.float32


def test_dino_views_are_two_global_then_local_crops():
    views = dino.DINO.views_transform(global_size=32, local_size=16, n_local=3)(phantom(0))
    assert [tuple(view.shape) for view in views] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 3


def test_views_refuse_colour_images():
    with pytest.raises(ValueError, match="one-channel"):
        simclr.SimCLR.views_transform()(phantom(0).convert("RGB"))


def half_bright(size: int = IMAGE_SIZE) -> Image.Image:
    """Bright left half, dark right half: a horizontal flip is plain to see."""
    pixels = np.full((size, size), 30, dtype=np.uint8)
    pixels[:, : size // 2] = 220
    return Image.fromarray(pixels, mode="L")


@pytest.mark.parametrize("make_views", [simclr.SimCLR.views_transform, moco.MoCoV3.views_transform, dino.DINO.views_transform])
def test_flips_are_off_by_default_and_a_setting(make_views):
    # Whole-image crops, no rotation or jitter: only a flip could move the bright half.
    if make_views == dino.DINO.views_transform:
        settings = {"global_scale": (1.0, 1.0), "n_local": 0}
    else:
        settings = {"scale": (1.0, 1.0)}
    settings.update(rotation_prob=0.0, jitter_prob=0.0)
    image = half_bright()

    def left_is_brighter(view: torch.Tensor) -> bool:
        half = view.shape[-1] // 2
        return bool(view[..., :half].mean() > view[..., half:].mean())

    default_views = [view for _ in range(10) for view in make_views(**settings)(image)]
    assert all(left_is_brighter(view) for view in default_views)
    flipped_views = [view for _ in range(10) for view in make_views(hflip_prob=1.0, **settings)(image)]
    assert not any(left_is_brighter(view) for view in flipped_views)


# Chance level of each method's loss at the tiny preset (batch B = 4): NT-Xent picks 1 of 2B - 1 views, MoCo v3's
# two directions each pick 1 of B keys with the loss scaled by 2 * temperature, DINO's uniform student over K outputs.
TINY = get_preset("tiny")
TINY_CHANCE = {
    "simclr": math.log(2 * 4 - 1),
    "moco": 4 * TINY["pretrain"]["moco"]["temperature"] * math.log(4),
    "dino": math.log(TINY["pretrain"]["dino"]["output_dim"]),
}


@pytest.mark.parametrize("method", list(METHOD_MODULES))
def test_health_record_at_the_tiny_preset(method, tmp_path):
    """The record ``pretrain`` writes as health.json: finite, the method's chance level, one readable line."""
    settings = TINY["pretrain"][method]
    L.seed_everything(0, verbose=False)
    model = get_method(method)(
        encoder=TINY["encoder"],
        **{key: value for key, value in settings.items() if key not in ("resolution", "batch_size", "views")},
    )
    datamodule = UnlabeledDataModule(["phantom"], resolution=settings["resolution"], batch_size=settings["batch_size"],
                                     transform=METHOD_MODULES[method].views_transform(**settings["views"]))
    cpu_trainer(settings["max_steps"], tmp_path).fit(model, datamodule=datamodule)
    record = model.health_record(datamodule)
    assert {"learned", "summary", "final_loss", "chance_loss"} <= record.keys()
    assert isinstance(record["learned"], bool)
    assert math.isfinite(record["final_loss"]) and record["final_loss"] > 0
    assert record["chance_loss"] == pytest.approx(TINY_CHANCE[method])
    assert record["steps"] == settings["max_steps"] and record["pretraining_images"] == len(datamodule.dataset)
    assert f"{record['final_loss']:.2f}" in record["summary"] and f"{record['chance_loss']:.2f}" in record["summary"]


def test_health_record_learned_is_the_final_loss_against_chance():
    model, _ = build("dino", max_steps=10)
    with pytest.raises(RuntimeError, match="no training step"):
        model.health_record(None)
    chance = math.log(METHODS["dino"][3]["output_dim"])
    model.loss_history = [chance] * 18 + [0.7 * chance] * 2
    assert model.health_record(None)["learned"]
    model.loss_history = [0.5 * chance] * 18 + [0.9 * chance] * 2
    assert not model.health_record(None)["learned"]
    # A low loss from a teacher that gives every image the same target: DINO's collapse, not learning.
    model.loss_history = [0.5 * chance] * 20
    model.teacher_entropies = {"teacher_entropy": 2.0, "teacher_batch_entropy": 2.1}
    assert not model.health_record(None)["learned"]
    model.teacher_entropies = {"teacher_entropy": 2.0, "teacher_batch_entropy": 4.0}
    assert model.health_record(None)["learned"]


class StopAt(L.Callback):
    """Ends a run after ``step`` of its steps, as a killed job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.global_step >= self.step


def test_loss_history_survives_resume(tmp_path):
    """A run resumed from its step-2 checkpoint keeps the first two losses and ends with one per step."""
    L.seed_everything(0, verbose=False)
    model, loader = build("simclr", max_steps=4)
    stopped = cpu_trainer(4, tmp_path, [StopAt(2)])
    stopped.fit(model, loader)
    stopped.save_checkpoint(tmp_path / "last.ckpt")
    first_two = list(model.loss_history)
    resumed, loader = build("simclr", max_steps=4)
    cpu_trainer(4, tmp_path).fit(resumed, loader, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(first_two) == 2 and resumed.loss_history[:2] == first_two and len(resumed.loss_history) == 4


def test_dino_leaves_its_uniform_plateau(trained):
    """DINO's loss starts near ln K and must end well below it, not settle on the collapsed uniform output."""
    if trained["method"] != "dino":
        pytest.skip("DINO's plateau")
    record = trained["model"].health_record(None)
    assert record["chance_loss"] == pytest.approx(math.log(128))
    assert record["learned"], record["summary"]
    # Not by collapsing onto one output: the images' targets differ (the batch-mean target is the flatter one).
    assert record["last_teacher_batch_entropy"] > record["last_teacher_entropy"] + 0.5, record


def test_dino_cross_view_entropy_is_lightlys_loss_for_the_same_targets():
    """The Sinkhorn-Knopp path scores its targets with exactly DINO's loss (every teacher view against every other
    student view), so only the targets differ between the two centerings."""
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 8, 32), torch.randn(4, 8, 32)
    expected = DINOLoss(output_dim=32, student_temp=0.1)(list(teacher), list(student), teacher_temp=0.04)
    targets = torch.softmax(teacher / 0.04, dim=-1)
    assert dino.cross_view_entropy(targets, student, student_temp=0.1) == pytest.approx(float(expected), rel=1e-6)


def test_dino_sinkhorn_targets_spread_the_batch_over_the_outputs():
    """DINOv2's centering: every image a distribution, the batch as a whole spread evenly over the K outputs, even
    when every image's logits are nearly the same (where mean-centering gives near-uniform targets)."""
    model, _ = build("dino", max_steps=1, centering="sinkhorn")
    torch.manual_seed(0)
    logits = 0.5 + 0.05 * torch.randn(64, 128)
    targets = model.teacher_targets(logits, teacher_temp=0.02)
    assert targets.sum(dim=-1) == pytest.approx(torch.ones(64), abs=1e-5)
    assert targets.mean(dim=0) == pytest.approx(torch.full((128,), 1 / 128), rel=0.2)
    per_image = -(targets * targets.clamp_min(1e-12).log()).sum(dim=-1).mean()
    assert per_image < math.log(128) - 1.0
    with pytest.raises(ValueError, match="centering must be one of"):
        build("dino", max_steps=1, centering="median")


def test_dino_with_sinkhorn_and_koleo_learns_without_collapse(tmp_path):
    """DINOv2's two changes: slower to leave ln K than the BatchNorm-head variant on the phantom, hence twice the
    steps, but on real X-rays the variant that does not collapse (results/selection/ssl.md)."""
    model, trainer, _, _ = train("dino", tmp_path, steps=2 * TRAIN_STEPS, centering="sinkhorn", koleo_weight=0.1,
                                 head_batch_norm=False, warmup_teacher_temp=0.02, teacher_temp=0.02)
    record = model.health_record(None)
    assert record["learned"], record["summary"]
    assert record["last_teacher_batch_entropy"] > record["last_teacher_entropy"] + 0.5, record
    assert "train/koleo" in trainer.callback_metrics
