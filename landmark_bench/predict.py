"""``landmark-bench predict``: a fine-tuned detector applied to a dataset split or to a folder of images.

Images take the fine-tuning path itself (the reader's ``load_image``, ``cached_images``' resize at the run's
resolution, ``LandmarkDataset``'s batches, the detector's ``infer`` at the run's precision), so a run's test images,
copied anywhere under any name, give back the run's own ``predictions.csv``.
"""

from __future__ import annotations

import json
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader
from tqdm import tqdm

from landmark_bench.checkpoints import CheckpointError, read_checkpoint
from landmark_bench.data.cache import cached_images
from landmark_bench.data.datamodule import LandmarkDataset, as_size, keep_batch
from landmark_bench.data.readers import DataError, DatasetReader, Record, image_size
from landmark_bench.data.registry import DATASETS, get_reader
from landmark_bench.evaluation import predictions_frame
from landmark_bench.io import atomic_write, write_csv
from landmark_bench.methods import detector_architecture, get_method, preset_settings
from landmark_bench.models.detector import LandmarkDetector

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class FolderReader(DatasetReader):
    """The images of one folder (not of its subfolders) as the unannotated split ``"all"``, ids their file stems.

    ``spacing``: mm per original pixel of every image, if known, so that ERE is in mm; otherwise pixels.
    """

    name = "folder"
    splits = ("all",)
    test_splits = ("all",)

    def __init__(self, data_dir: str | Path, num_landmarks: int, spacing: float | None = None):
        if spacing is not None and not spacing > 0:
            raise ValueError(f"spacing must be a positive number of mm per pixel, not {spacing}")
        super().__init__(data_dir)
        self.num_landmarks = num_landmarks
        self.spacing = spacing

    def _split_records(self, split: str) -> list[Record]:
        if not self.data_dir.is_dir():
            raise DataError(f"image folder {self.data_dir} does not exist")
        paths = sorted(path for path in self.data_dir.iterdir()
                       if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
        if not paths:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.data_dir}")
        by_id: dict[str, Path] = {}
        for path in paths:
            if path.stem in by_id:  # the id is the CSV's key: two files under one id would be one image there
                raise DataError(f"{by_id[path.stem]} and {path} share the image id {path.stem!r}")
            by_id[path.stem] = path
        unknown = np.full((self.num_landmarks, 2), np.nan)
        return [Record(self.name, path.stem, path, image_size(path), unknown, self.spacing) for path in paths]


def run_files(run: str | Path) -> tuple[Path, Path]:
    """(config.json, checkpoint) of a run folder, or of a checkpoint inside one (``<run>/checkpoints/best.ckpt``):
    the checkpoint holds the detector's weights and head, the config how its backbone was built."""
    run = Path(run)
    folder, checkpoint = (run, run / "checkpoints" / "best.ckpt") if run.is_dir() else (run.parent.parent, run)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: {run} is neither a fine-tune run folder nor a checkpoint in one")
    return config, checkpoint


def load_detector(run: str | Path) -> tuple[LandmarkDetector, dict]:
    """The run's detector with its best weights, in eval mode, and the run's config.

    The network is rebuilt as ``finetune`` built it (method, preset and overrides, protocol) at random init from the
    pretraining's hyperparameters kept in ``config.json``, and every weight comes from the detector's checkpoint: the
    run folder is self-contained, wherever it is copied. Run folders from before those hyperparameters were kept, and
    runs whose pretraining has values JSON cannot hold, read them from the pretraining checkpoint the config names.
    """
    config_path, checkpoint_path = run_files(run)
    config = json.loads(config_path.read_text())
    method = get_method(config["method"])
    if method.family is None:
        raise ValueError(f"run {run} is the {config['method']!r} reference, which has no detector to apply")
    checkpoint = read_checkpoint(checkpoint_path)
    if "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"checkpoint {checkpoint_path} holds no detector hyperparameters")
    pretraining = config.get("pretraining_hyper_parameters")
    as_text = config.get("pretraining_hyper_parameters_as_text") or []
    if (pretraining is None or as_text) and method.pretrains:
        try:
            pretraining = read_checkpoint(config["pretrained"], expected_method=config["method"])["hyper_parameters"]
        except CheckpointError as error:
            if not as_text:
                raise
            raise CheckpointError(f"{config_path} holds the pretraining's {', '.join(as_text)} only as text (JSON "
                                  f"cannot hold them), so they must come from its checkpoint: {error}") from None
    settings, cfg = preset_settings(config["preset"], config.get("overrides")), config["finetune"]
    hparams = checkpoint["hyper_parameters"]
    backbone = detector_architecture(config["method"], hparams.get("protocol", "finetune"), settings,
                                     {"diffusion_feature_stride": 1, **cfg}, config["dataset"], pretraining)
    model = LandmarkDetector(backbone=backbone, **hparams)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {checkpoint_path} does not fit the detector of {config_path}: "
                              f"{error}") from None
    return model.eval(), config


def check_same_landmarks(run_dataset: str, reader: DatasetReader, num_landmarks: int) -> None:
    """A detector means something only on the landmarks it was trained for: the same count, and the same names
    where the run's dataset is known to this process."""
    names = getattr(DATASETS.get(run_dataset), "landmark_names", None)
    if reader.num_landmarks != num_landmarks or (names is not None and list(names) != list(reader.landmark_names)):
        raise ValueError(f"the run was trained on the {num_landmarks} landmarks of {run_dataset!r}; "
                         f"{reader.name!r} has {reader.num_landmarks} landmarks that are not the same")


def network_images(reader: DatasetReader, records: list[Record], size: tuple[int, int], cache_dir: Path | None,
                   chunk: int = 64) -> np.ndarray:
    """(N, h, w) uint8 images through ``cached_images`` (the fine-tuning loader), a chunk at a time for the
    progress bar; every image is decoded before anything is written, so an unreadable one leaves no output."""
    parts = []
    with tqdm(total=len(records), desc="reading", unit="image", disable=None) as bar:
        for start in range(0, len(records), chunk):
            parts.append(cached_images(reader, records[start:start + chunk], size, cache_dir))
            bar.update(len(parts[-1]))
    return np.concatenate(parts)


def save_overlay_png(batch: dict, outputs: dict, row: int, image_id: str, path: Path) -> None:
    """The suite's heatmap overlay (network grid; truth green where known, prediction red) of one input."""
    import matplotlib.pyplot as plt

    from landmark_bench.figures import overlay

    figure, axis = plt.subplots(figsize=(4, 4 * batch["image"].shape[-2] / batch["image"].shape[-1]))
    overlay(axis, batch["image"][row].cpu(), outputs["logits"][row].float().cpu(), outputs["pred"][row].cpu(),
            batch["landmarks_orig"][row].cpu(), batch["orig_size"][row].cpu())
    axis.set_title(image_id, fontsize=8)
    stream = BytesIO()
    figure.savefig(stream, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write(path, lambda file: file.write(stream.getvalue()))


def predict(
    run: str | Path,
    out: str | Path,
    *,
    images: str | Path | None = None,
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    reader_options: dict | None = None,
    overlays: str | Path | None = None,
    batch_size: int | None = None,
    spacing: float | None = None,
    accelerator: str = "auto",
) -> list[Record]:
    """Apply a run (folder or checkpoint) to the ``images`` folder or to ``split`` of ``dataset``; return the records.

    Writes ``out`` atomically: the ``evaluate`` format (image_id, landmark, x, y in original pixels) plus each point's
    ``ere`` and its ``unit``; with ``overlays``, a ``<image_id>.png`` there per input.
    """
    if (images is None) == (dataset is None):
        raise ValueError("predict takes either a folder of images or a dataset (with its split), not both or neither")
    model, config = load_detector(run)
    cfg = config["finetune"]
    size, num_landmarks = as_size(cfg["resolution"]), model.hparams.num_landmarks
    with tempfile.TemporaryDirectory(prefix="landmark-bench-predict-") as scratch:
        if images is not None:  # decoded afresh: a folder's files may change under the same names
            reader = FolderReader(images, num_landmarks, spacing)
            records = reader.records("all")
            pixels = network_images(reader, records, size, Path(scratch))
        else:
            reader = get_reader(dataset, data_dir, **(reader_options or {}))
            check_same_landmarks(config["dataset"], reader, num_landmarks)
            records = reader.records(split)
            pixels = network_images(reader, records, size, None)
    loader = DataLoader(LandmarkDataset(pixels, records, cfg["sigma"]), batch_size=batch_size or cfg["batch_size"],
                        collate_fn=keep_batch)
    fabric = Fabric(accelerator=accelerator, devices=1, precision=cfg["precision"])
    model.to(fabric.device)
    pred, ere = [], []
    with tqdm(total=len(records), desc="predicting", unit="image", disable=None) as bar:
        for batch in loader:
            with torch.inference_mode(), fabric.autocast():
                outputs = model.infer(fabric.to_device(batch))
            pred.append(outputs["pred"].cpu().numpy())
            ere.append(outputs["ere"].cpu().numpy())
            if overlays is not None:
                for row, index in enumerate(batch["index"].tolist()):
                    image_id = records[index].image_id
                    save_overlay_png(batch, outputs, row, image_id, Path(overlays) / f"{image_id}.png")
            bar.update(len(batch["index"]))
    frame = predictions_frame(records, np.concatenate(pred))
    frame["ere"] = np.concatenate(ere).reshape(-1)
    frame["unit"] = np.repeat(["mm" if record.spacing else "px" for record in records], num_landmarks)
    write_csv(out, frame)
    return records
