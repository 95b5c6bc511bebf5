"""Run the small-scale Table 4 study (pipeline/study.py).

python jobs/repro_study.py [--arms base,simclr] [--max-seeds 1] [overrides...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.runtime import quiet_environment  # noqa: E402
from pipeline.study import DEFAULT_CONFIG, run_study  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--arms", default=None, help="comma-separated arm slugs (default: all)")
    parser.add_argument("--max-seeds", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_environment()
    run_study(args.config, args.overrides, args.arms.split(",") if args.arms else None, args.max_seeds)
