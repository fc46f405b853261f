"""Two checks of why SSL encoders probe worse than a random encoder (results/selection/ssl.md); validation MRE only.

    OMP_NUM_THREADS=1 .venv/bin/python results/selection/ssl_probe_checks.py recalibrate CHECKPOINT OUT
    OMP_NUM_THREADS=1 .venv/bin/python results/selection/ssl_probe_checks.py no-blur OUT

``recalibrate``: the SimCLR encoder's BatchNorm statistics re-estimated on the whole 160x128 pretraining images
(the pool of the cpu preset, no augmentation), then the ISBI 10-shot seed-0 probe. ``no-blur``: SimCLR pretrained
at the cpu preset without Gaussian blur in either view, then the same probe.
"""

import sys
from pathlib import Path

import torch

from landmark_bench import presets
from landmark_bench.checkpoints import read_checkpoint
from landmark_bench.data.datamodule import UnlabeledDataModule
from landmark_bench.finetune import finetune
from landmark_bench.models.decoder import GREY_MEAN, GREY_STD
from landmark_bench.models.encoder import create_encoder
from landmark_bench.pretrain import DEFAULT_PRETRAINING_DATASETS, pretrain

DATA = str(Path(__file__).resolve().parents[3] / "shared" / "data")


def probe(checkpoint: str, out: Path) -> float:
    record = finetune(method="simclr", dataset="isbi2015", shots=10, seed=0, preset="cpu", data_dir=DATA,
                      out=out / "probe", pretrained=checkpoint, accelerator="cpu", protocol="probe")
    return record["best_val_mre"]


def recalibrate(checkpoint_path: str, out: Path) -> float:
    checkpoint = read_checkpoint(checkpoint_path, "simclr")
    encoder = create_encoder(presets.PRESETS["cpu"]["encoder"])
    encoder.load_state_dict({key.removeprefix("encoder."): value for key, value in checkpoint["state_dict"].items()
                             if key.startswith("encoder.")})
    pool = UnlabeledDataModule(DEFAULT_PRETRAINING_DATASETS, DATA, resolution=(160, 128), batch_size=32)
    pool.setup()
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over every image
    encoder.train()
    with torch.no_grad():
        for start in range(0, len(pool.dataset), 32):
            images = torch.stack([pool.dataset[i]["image"] for i in range(start, min(start + 32, len(pool.dataset)))])
            encoder((images - GREY_MEAN) / GREY_STD)
    checkpoint["state_dict"] = {f"encoder.{key}": value for key, value in encoder.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out / "recalibrated.ckpt")
    return probe(str(out / "recalibrated.ckpt"), out)


def no_blur(out: Path) -> float:
    views = presets.SSL_PRETRAIN["cpu"]["simclr"]["views"]
    presets.SSL_PRETRAIN["cpu"]["simclr"]["views"] = {**views, "blur_probs": [0.0, 0.0]}
    record = pretrain(method="simclr", preset="cpu", data_dir=DATA, out=out / "pretrain", accelerator="cpu")
    print("health:", record["health"]["summary"])
    return probe(str(out / "pretrain" / "pretrained.ckpt"), out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[1]
    value = recalibrate(sys.argv[2], Path(sys.argv[3])) if mode == "recalibrate" else no_blur(Path(sys.argv[2]))
    print(f"{mode}: best validation MRE {value:.2f} mm")
