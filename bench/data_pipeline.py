"""Input pipeline throughput: clips/s for F=16 clips at 64x64 and 512x512, 0/1/2 workers.

    python bench/data_pipeline.py [--batches 12] [--batch-size 4]

Generates small synthetic sets in a temporary directory (64x64: 48 identities x 24
frames, raw frames; 512x512: 6 identities x 20 frames, PNG frames), then for each
resolution and worker count builds the pipeline, discards the first batch (worker
start-up) and times the next --batches batches. Also times the synthetic generation
of the 200-identity, 48-frame, 64x64 set (the CLI's default size) with 2 processes.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from consist_jax.data import pipeline, synthetic

SETS = {
    64: synthetic.SyntheticConfig(identities=48, frames=24, size=64, seed=0, test_fraction=0.0),
    512: synthetic.SyntheticConfig(identities=6, frames=20, size=512, seed=0, test_fraction=0.0,
                                   image_encoding="png", workers=2),
}


def clips_per_second(data_dir: str, size: int, workers: int, batches: int, batch_size: int) -> float:
    config = dict(data_dir=data_dir, batch_size=batch_size, clip_length=16, resolution=(size, size),
                  worker_count=workers, worker_buffer_size=2 * batch_size)
    iterator = pipeline.make_pipeline(config, "train", seed=0, process_index=0, process_count=1)
    next(iterator)  # worker start-up and first reads
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def generation_seconds(root: str) -> float:
    start = time.perf_counter()
    synthetic.generate(os.path.join(root, "full"), synthetic.SyntheticConfig(workers=2))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as root:
        if not args.skip_generation:
            print(f"synthetic 200 identities x 48 frames x 64x64, 2 processes: "
                  f"{generation_seconds(root):.1f} s")
        print("resolution  workers  clips/s (F=16, batch %d)" % args.batch_size)
        for size, config in SETS.items():
            data_dir = os.path.join(root, f"set{size}")
            synthetic.generate(data_dir, config)
            for workers in (0, 1, 2):
                rate = clips_per_second(data_dir, size, workers, args.batches, args.batch_size)
                print(f"{size}x{size:<8d} {workers:7d}  {rate:8.1f}", flush=True)


if __name__ == "__main__":
    main()
