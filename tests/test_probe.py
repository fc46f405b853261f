"""The probe protocol (frozen backbone, light head) and the random-init controls of each network family."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from landmark_bench.cli import main
from landmark_bench.data.datamodule import LandmarkDataModule
from landmark_bench.methods import CONTROLS, build_backbone, control_of, family_of, method_names
from landmark_bench.finetune import finetune
from landmark_bench.models.detector import LandmarkDetector, ProbeHead, calibrate_batchnorm
from landmark_bench.presets import get_preset
from landmark_bench.pretrain import pretrain
from landmark_bench.sweep import plan


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("ddpm")
    return pretrain(method="ddpm", datasets=["phantom"], preset="tiny", out=out)["checkpoint"]


def _datamodule(settings: dict, augment: bool) -> LandmarkDataModule:
    cfg = settings["finetune"]
    datamodule = LandmarkDataModule(dataset="phantom", shots=5, seed=0, resolution=cfg["resolution"],
                                    batch_size=cfg["batch_size"], sigma=cfg["sigma"], augment=augment,
                                    samples_per_epoch=4 * cfg["batch_size"])
    datamodule.setup()
    return datamodule


@pytest.mark.parametrize("method", ["scratch", "scratch_unet"])
def test_probe_trains_the_head_and_leaves_every_backbone_tensor_unchanged(method):
    settings = get_preset("tiny")
    datamodule = _datamodule(settings, augment=False)
    model = LandmarkDetector(backbone=build_backbone(method, unet=settings["unet"]), protocol="probe",
                             num_landmarks=datamodule.reader.num_landmarks, max_steps=8, warmup_steps=1, lr=1e-2)
    backbone_before = {name: tensor.clone() for name, tensor in model.backbone.state_dict().items()}
    head_before = {name: tensor.clone() for name, tensor in model.head.state_dict().items()}
    assert any("running_mean" in name for name in backbone_before) or method == "scratch_unet"
    trainer = L.Trainer(max_steps=8, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[name]), name
    assert not any(torch.equal(tensor, head_before[name]) for name, tensor in model.head.state_dict().items()
                   if tensor.is_floating_point() and name.endswith("weight"))
    # the frozen features of the few-shot images were computed once: one cache entry per training image
    assert len(model._feature_cache) == len(datamodule.datasets["train"].records)


def _batchnorms(module: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [layer for layer in module.modules() if isinstance(layer, torch.nn.BatchNorm2d)]


def test_calibrated_batchnorm_holds_the_exact_statistics_of_the_images_and_no_weight_moves():
    torch.manual_seed(0)
    backbone = build_backbone("scratch", encoder="efficientnet_lite0")
    images = torch.rand(6, 1, 48, 40) ** 2
    weights = {name: tensor.clone() for name, tensor in backbone.named_parameters()}
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda layer, args: inputs.setdefault(layer, args[0].detach()))
             for layer in _batchnorms(backbone.encoder)]
    backbone.train()
    with torch.no_grad():
        backbone.pyramid(images)  # one batch of all six: the statistics every encoder BatchNorm should end with
    for hook in hooks:
        hook.remove()
    backbone.eval()
    calibrate_batchnorm(backbone, images, chunk_size=8)
    assert len(inputs) == len(_batchnorms(backbone.encoder)) > 10
    for layer, seen in inputs.items():
        torch.testing.assert_close(layer.running_mean, seen.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_var, seen.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
        assert layer.momentum == 0.1  # the layer's own momentum is back
    assert not backbone.training
    for name, tensor in backbone.named_parameters():
        assert torch.equal(tensor, weights[name]), name
    # chunks of near-equal size: statistics within a few percent of the one-batch ones
    calibrate_batchnorm(backbone, images, chunk_size=4)
    first = _batchnorms(backbone.encoder)[0]
    torch.testing.assert_close(first.running_mean, inputs[first].mean((0, 2, 3)), rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("source", ["train_split", "pretrained"])
def test_probe_run_estimates_batchnorm_on_the_training_images_unless_told_to_keep_the_stored(tmp_path, source):
    record = finetune(method="scratch", dataset="phantom", shots=5, seed=0, preset="tiny", out=tmp_path / "run",
                      accelerator="cpu", protocol="probe",
                      overrides={"finetune.max_steps": 4, "finetune.val_every": 4, "finetune.probe_batchnorm": source})
    state = torch.load(record["best_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    stored = {name[len("backbone."):]: tensor for name, tensor in state.items() if name.startswith("backbone.")}
    backbone = build_backbone("scratch", encoder=get_preset("tiny")["encoder"])
    backbone.load_state_dict(stored)
    means = {name: tensor for name, tensor in stored.items() if name.startswith("encoder.") and "running_mean" in name}
    if source == "pretrained":  # a random init's placeholders, untouched
        assert all(torch.equal(tensor, torch.zeros_like(tensor)) for tensor in means.values())
        return
    settings = get_preset("tiny")["finetune"]
    datamodule = LandmarkDataModule(dataset="phantom", shots=5, seed=0, resolution=settings["resolution"])
    images = datamodule.unlabelled_training_images()
    assert len(images) > 5  # the whole training split, not only the few shots
    calibrate_batchnorm(backbone, images)
    recalibrated = backbone.state_dict()
    assert means and not any(torch.equal(tensor, torch.zeros_like(tensor)) for tensor in means.values())
    for name, tensor in means.items():
        torch.testing.assert_close(tensor, recalibrated[name])


def test_unknown_probe_batchnorm_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="probe_batchnorm='running'"):
        finetune(method="scratch", dataset="phantom", shots=5, seed=0, preset="tiny", out=tmp_path / "run",
                 protocol="probe", overrides={"finetune.probe_batchnorm": "running"})


def test_probe_head_fuses_at_the_finest_level_and_returns_logits_at_the_image_size():
    head = ProbeHead([8, 4], out_channels=3, hidden=5)
    pyramid = [torch.randn(2, 8, 4, 5), torch.randn(2, 4, 16, 20)]  # coarsest first; finest at stride 2
    logits = head(pyramid, (32, 40))
    assert logits.shape == (2, 3, 32, 40)
    with pytest.raises(ValueError):
        head(pyramid[:1], (32, 40))  # one map per level, never fewer


def test_probe_head_pools_a_full_resolution_level_to_stride_two_like_an_encoders():
    """A UNet's finest level is at the image size; the head reads it 2x2-averaged, at an encoder's stride."""
    head = ProbeHead([8, 4], out_channels=3, hidden=5).eval()
    coarse, full = torch.randn(2, 8, 4, 5), torch.randn(2, 4, 16, 20)
    pooled = full.reshape(2, 4, 8, 2, 10, 2).mean(dim=(3, 5))
    logits = head([coarse, full], (16, 20))
    assert logits.shape == (2, 3, 16, 20)
    torch.testing.assert_close(logits, head([coarse, pooled], (16, 20)))
    assert not torch.allclose(logits, head([coarse, full.flip(-1)], (16, 20)))  # the full level is read, not dropped


@pytest.mark.parametrize("feature_stride", [1, 2])
def test_control_unet_has_exactly_the_pretrained_parameters(tiny_ddpm, feature_stride):
    settings = get_preset("tiny")
    shapes = {}
    for method, pretrained in (("scratch_unet", None), ("ddpm", tiny_ddpm)):
        backbone = build_backbone(method, pretrained=pretrained, unet=settings["unet"], feature_stride=feature_stride)
        model = LandmarkDetector(backbone=backbone, num_landmarks=5)
        assert model(torch.rand(2, 1, 32, 24)).shape == (2, 5, 32, 24)  # heatmaps at the input size at any stride
        shapes[method] = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes["scratch_unet"] == shapes["ddpm"]


def test_every_learned_method_has_its_family_control():
    for method in method_names():
        family = family_of(method)
        if family is None:
            assert control_of(method) is None
        elif method in CONTROLS.values():
            assert control_of(method) is None
        else:
            assert control_of(method) == CONTROLS[family] and family_of(control_of(method)) == family


def test_sweep_plans_a_probe_for_every_backbone_but_none_for_the_mean_shape(tmp_path):
    methods = ["mean_shape", "scratch", "scratch_unet"]
    _, jobs = plan(tmp_path, methods, ["phantom"], [5], [0], "tiny", protocols=["finetune", "probe"])
    planned = {(job.method, job.protocol) for job in jobs}
    assert planned == {("mean_shape", "finetune"), ("scratch", "finetune"), ("scratch_unet", "finetune"),
                       ("scratch", "probe"), ("scratch_unet", "probe")}
    assert len({job.out for job in jobs}) == len(jobs)


def test_probe_of_the_mean_shape_is_refused(tmp_path, capsys):
    assert main(["finetune", "--method", "mean_shape", "--protocol", "probe", "--preset", "tiny",
                 "--out", str(tmp_path / "run")]) == 2
    assert "has no backbone to probe" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["finetune", "probe"])
def test_under_bf16_autocast_the_backbone_runs_in_bf16_and_the_head_gives_float32_logits(protocol):
    """Sub-pixel decoding reads the logits: mixed precision must not round them to bf16."""
    settings = get_preset("tiny")
    model = LandmarkDetector(backbone=build_backbone("scratch_unet", unet=settings["unet"]), protocol=protocol,
                             num_landmarks=3).eval()
    image = torch.rand(2, 1, 32, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.backbone(image).dtype == torch.bfloat16
        logits = model(image)
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(image), atol=0.2, rtol=0.05)  # the same network, in other precision
