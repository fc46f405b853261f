"""Decode and resize each image once; training reads the cached arrays, never a JPEG."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from landmark_bench.data.readers import DatasetReader, Record
from landmark_bench.io import atomic_write

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("LANDMARK_BENCH_CACHE", Path.home() / ".cache" / "landmark_bench"))


def resize_grey(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of an (H, W) uint8 image to ``size`` = (h, w), pixel-centre aligned."""
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def cache_folder(reader: DatasetReader, size: tuple[int, int], cache_dir: Path | None = None) -> Path:
    """Keyed by dataset, its source (data folder or phantom seed), resolution and cache version."""
    source = str(Path(reader.data_dir).resolve()) if reader.data_dir is not None else f"seed{getattr(reader, 'seed', 0)}"
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    return (cache_dir or default_cache_dir()) / f"{reader.name}-{digest}" / f"{size[0]}x{size[1]}-v{CACHE_VERSION}"


# np.load parses each header with ast.literal_eval, which CPython 3.11 cannot run in two threads at once
# ("SystemError: AST constructor recursion depth mismatch"): loads take turns, decoding stays parallel.
NPY_HEADER_LOCK = threading.Lock()


def cached_images(
    reader: DatasetReader, records: list[Record], size: tuple[int, int], cache_dir: Path | None = None, threads: int = 2
) -> np.ndarray:
    """(N, h, w) uint8 images of ``records`` at ``size``, decoding only those not cached yet."""
    folder = cache_folder(reader, size, cache_dir)

    def load(record: Record) -> np.ndarray:
        path = folder / f"{record.image_id}.npy"
        if path.is_file():
            try:
                with NPY_HEADER_LOCK:
                    cached = np.load(path, allow_pickle=False)
                if cached.shape == size and cached.dtype == np.uint8:
                    return cached
            except (OSError, ValueError):
                pass  # an unreadable cache entry is rebuilt from the source image below
        resized = resize_grey(reader.load_image(record), size)
        atomic_write(path, lambda stream: np.save(stream, resized))
        return resized

    if not records:
        return np.zeros((0, *size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return np.stack(list(pool.map(load, records)))
