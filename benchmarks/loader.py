"""Training-loader throughput: the cached pipeline against the naive per-sample one.

Both produce the same tensors (augmented image, moved landmarks, Gaussian targets) for the same ISBI
images; the naive pipeline decodes the full-resolution JPEG and resizes it for every sample, as the
original research code did.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import markdown_table, report
from landmark_bench.data.cache import resize_grey
from landmark_bench.data.datamodule import LandmarkDataset, as_size, keep_batch
from landmark_bench.data.cache import cached_images
from landmark_bench.data.registry import get_reader
from landmark_bench.data.transforms import Augment
from landmark_bench.geometry import to_network
from landmark_bench.heatmaps import gaussian_targets


class NaiveDataset(Dataset):
    """Decode, resize, augment and build targets from scratch for every sample."""

    def __init__(self, reader, records, size, sigma):
        self.reader, self.records, self.size, self.sigma = reader, records, size, sigma
        self.augment = Augment()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = torch.from_numpy(resize_grey(self.reader.load_image(record), self.size))[None].float() / 255
        points = to_network(torch.from_numpy(record.landmarks), torch.tensor(record.size), self.size).float()
        image, points = self.augment(image, points)
        return {"image": image, "landmarks": points, "target": gaussian_targets(points, self.size, self.sigma)}


def samples_per_second(dataset: Dataset, batch_size: int, workers: int, samples: int, **loader_options) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        **loader_options)
    seen, started = 0, time.perf_counter()
    while seen < samples:
        for batch in loader:
            seen += len(batch["image"])
            if seen >= samples:
                break
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--dataset", default="isbi2015")
    parser.add_argument("--resolution", type=int, nargs="+", default=[160, 128])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--naive-samples", type=int, default=64)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    size = as_size(args.resolution if len(args.resolution) > 1 else args.resolution[0])
    reader = get_reader(args.dataset, args.data_dir)
    records = reader.records("train") + reader.records("val")
    cached_images(reader, records, size)  # build the cache once, outside the timing
    cached = LandmarkDataset(cached_images(reader, records, size), records, sigma=2.0, augment=Augment())
    naive = NaiveDataset(reader, records, size, sigma=2.0)
    rows = []
    for workers in args.workers:
        fast = samples_per_second(cached, args.batch_size, workers, args.samples, collate_fn=keep_batch)
        slow = samples_per_second(naive, args.batch_size, workers, args.naive_samples)
        rows.append([workers, f"{fast:.1f}", f"{slow:.2f}", f"{fast / slow:.0f}x"])
    table = markdown_table(["workers", "cached samples/s", "naive (decode+resize) samples/s", "ratio"], rows)
    report(f"Training loader, {args.dataset} {size[0]}x{size[1]}, batch {args.batch_size}", table,
           "Both with augmentation (affine + intensity) and Gaussian targets; naive decodes the full JPEG every time.",
           append=not args.no_append)


if __name__ == "__main__":
    main()
