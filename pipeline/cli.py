"""`abpipe ingest|train|eval|demo`: thin calls into the modules, all sharing one config system.

Every command takes `--config FILE.yaml` and any number of dotted overrides (`train.lr=3e-4`).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError, load_config
from pipeline.runtime import quiet_environment


def _load(args):
    return load_config(args.config, args.overrides).resolved()


def cmd_ingest(args) -> dict:
    from pipeline.ingest import run_ingest

    cfg = _load(args)
    return run_ingest(cfg)


def cmd_train(args) -> dict:
    from pipeline.train.trainer import run_pretrain

    return run_pretrain(_load(args))


def cmd_eval(args) -> dict:
    from pipeline.eval.job import run_eval

    return run_eval(_load(args))


def cmd_demo(args) -> dict:
    from pipeline.demo import run_demo

    return run_demo(args.config, args.overrides)


COMMANDS = {
    "ingest": (cmd_ingest, "image folder / file list -> WebDataset shards + manifest + _stats.json"),
    "train": (cmd_train, "pretrain (AB_SimCLR) on shards with Ray Train; resumes from the latest checkpoint"),
    "eval": (cmd_eval, "frozen-feature probes (kNN, linear) of a checkpoint or MLflow run"),
    "demo": (cmd_demo, "the whole pipeline on shipped data: ingest -> pretrain -> eval"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML config (see jobs/configs/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 views.num_views=4")
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_environment()
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command][0](args)
    except ConfigError as exc:
        print(f"abpipe: config error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
