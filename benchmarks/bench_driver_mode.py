"""Start-up of a short run: the loop through TorchTrainer (train.num_workers=1) against the loop in the driver
(train.num_workers=0), alternated on one Ray instance, the same micro run (tests/test_train.py's config, 2 steps).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_driver_mode.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from pipeline.config import Config, IngestConfig, PathsConfig, RayConfig
    from pipeline.data.sample_data import write_digits_folder
    from pipeline.ingest import run_ingest
    from pipeline.runtime import init_ray
    from pipeline.train.trainer import run_pretrain
    from tests.test_train import micro_config

    root = Path(tempfile.mkdtemp(prefix="abpipe-bench-driver-"))
    init_ray(RayConfig(num_cpus=2, temp_dir=str(root / "ray")))
    folder = write_digits_folder(root / "digits", size=32, per_class=30)
    shards = root / "shards"
    run_ingest(
        Config(
            paths=PathsConfig(root=str(root / "ingest")),
            ingest=IngestConfig(input=str(folder), output=str(shards), samples_per_shard=100),
        )
    )
    times: dict[int, list[float]] = {1: [], 0: []}
    for i in range(args.repeats):
        for workers in (1, 0):
            cfg = micro_config(root / f"run_{workers}_{i}", shards, steps=2, num_workers=workers)
            started = time.perf_counter()
            result = run_pretrain(cfg)
            times[workers].append(time.perf_counter() - started)
            print(f"num_workers={workers} run {i}: {times[workers][-1]:.1f} s (step {result['metrics'].get('step')})")
    ray_train, driver = (sum(times[w]) / len(times[w]) for w in (1, 0))
    print(f"mean: TorchTrainer {ray_train:.1f} s, driver {driver:.1f} s, ratio {ray_train / driver:.2f}x")


if __name__ == "__main__":
    main()
