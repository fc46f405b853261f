"""LandmarkMetrics under DDP (2 CPU processes, gloo) gives bit-identical numbers to one process."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from landmark_bench.metrics import LandmarkMetrics

NUM_SAMPLES = 7  # odd: DistributedSampler pads rank 1 with a repeated sample
NUM_LANDMARKS = 3
WORLD_SIZE = 2
BATCH_SIZE = 2
WORKER_DEADLINE_S = 60


def _sample(index: int) -> dict[str, torch.Tensor]:
    """Deterministic per-sample prediction, target, spacing and ERE, as a model would give them."""
    generator = torch.Generator().manual_seed(1000 + index)
    target = torch.rand(NUM_LANDMARKS, 2, generator=generator, dtype=torch.float64) * 1900
    pred = target + torch.randn(NUM_LANDMARKS, 2, generator=generator, dtype=torch.float64) * 25
    return {
        "pred": pred,
        "target": target,
        "spacing": torch.tensor(0.1, dtype=torch.float64),
        "ere": torch.rand(NUM_LANDMARKS, generator=generator, dtype=torch.float64) * 4,
        "index": torch.tensor(index),
    }


def _evaluate(indices: list[int]) -> tuple[dict, dict]:
    """Feed the samples in batches like a validation loop; return compute() and the point table."""
    metrics = LandmarkMetrics(num_landmarks=NUM_LANDMARKS)
    for start in range(0, len(indices), BATCH_SIZE):
        samples = [_sample(i) for i in indices[start : start + BATCH_SIZE]]
        batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        metrics.update(batch["pred"], batch["target"], batch["spacing"], batch["index"], ere=batch["ere"])
    table = metrics.point_table()
    return metrics.compute(), {"index": table.index, "error": table.error, "ere": table.ere, "pred": table.pred}


def _worker(rank: int, out_dir: str) -> None:
    # a forked child cannot use the OpenMP pool of a parent that already ran torch ops (it hangs);
    # one thread per child, as DataLoader workers do
    torch.set_num_threads(1)
    # the ranks meet through a file, not a port: a free port picked here could be taken before the ranks bind it
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=WORKER_DEADLINE_S),
    )
    try:
        sampler = DistributedSampler(range(NUM_SAMPLES), num_replicas=WORLD_SIZE, rank=rank, shuffle=True, seed=3)
        indices = list(sampler)
        result, table = _evaluate(indices)
        torch.save({"indices": indices, "result": result, "table": table}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_result_equals_single_process_exactly(tmp_path: Path) -> None:
    # fork, not spawn: the children inherit the imported torch/torchmetrics instead of spending
    # several CPU-seconds each importing them again
    context = mp.start_processes(
        _worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=False, start_method="fork"
    )
    deadline = time.monotonic() + WORKER_DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {WORKER_DEADLINE_S} s")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    seen = ranks[0]["indices"] + ranks[1]["indices"]
    assert len(seen) == NUM_SAMPLES + 1 and set(seen) == set(range(NUM_SAMPLES))  # one sample evaluated twice

    single_result, single_table = _evaluate(list(range(NUM_SAMPLES)))
    assert single_result["n_images"] == NUM_SAMPLES
    for rank in ranks:
        assert rank["result"] == single_result
        for key, value in single_table.items():
            assert torch.equal(rank["table"][key], value), key
