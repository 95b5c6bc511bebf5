"""`abpipe ingest|train|eval|sweep|demo`: thin calls into the modules, all sharing one config system.

Every command takes `--config FILE.yaml` and any number of dotted overrides (`train.lr=3e-4`).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError, load_config
from pipeline.runtime import quiet_environment

# Flags some commands take as shorthand for a dotted override (the value is kept a plain string).
SHORTCUTS = {
    "eval": {"--checkpoint": "eval.checkpoint", "--tasks": "eval.tasks"},
    "sweep": {
        "--runs": "sweep.runs",
        "--experiments": "sweep.experiments",
        "--checkpoints": "sweep.checkpoints",
        "--tasks": "eval.tasks",
    },
}


def _load(args):
    flags = SHORTCUTS.get(args.command, {})
    quoted = [
        "{}='{}'".format(key, value.replace("'", "''"))
        for flag, key in flags.items()
        if (value := getattr(args, flag[2:], None)) is not None
    ]
    return load_config(args.config, [*quoted, *args.overrides]).resolved()


def ingest_config(args):
    """`ingest [SOURCE] [--input/--urls PATH] [--out DIR] [overrides]`: SOURCE and the flags win over
    the same dotted keys; paths are taken verbatim (not parsed as YAML like override values)."""
    import dataclasses

    words = [o for o in args.overrides if "=" not in o]
    if len(words) > 1:
        raise ConfigError(f"ingest takes at most one SOURCE, got {words}; overrides look like section.key=value")
    cfg = load_config(args.config, [o for o in args.overrides if "=" in o])
    given = {"source": words[0] if words else None, "input": args.input, "output": args.out}
    cfg.ingest = dataclasses.replace(cfg.ingest, **{k: v for k, v in given.items() if v is not None})
    return cfg.resolved()


def cmd_ingest(args) -> dict:
    from pipeline.ingest import run_ingest

    return run_ingest(ingest_config(args))


def cmd_train(args) -> dict:
    from pipeline.train.trainer import run_pretrain

    return run_pretrain(_load(args))


def cmd_eval(args) -> dict:
    from pipeline.eval.job import EvalError, run_eval

    try:
        return run_eval(_load(args))
    except EvalError as exc:
        print(f"abpipe: eval failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_sweep(args) -> dict:
    from pipeline.eval.sweep import run_sweep

    return run_sweep(_load(args))


def cmd_demo(args) -> dict:
    from pipeline.demo import run_demo

    return run_demo(args.config, args.overrides)


COMMANDS = {
    "ingest": (
        cmd_ingest,
        "a source (image_folder, files, cc12m/urls, coco, epic_kitchens) -> WebDataset shards + manifest + _stats.json",
    ),
    "train": (
        cmd_train,
        "pretrain (objective.name: ab_simclr, ab_clip or a baseline) on shards with Ray Train; resumes from the latest checkpoint",
    ),
    "eval": (cmd_eval, "frozen-feature probes of a checkpoint (dir or MLflow run) on eval tasks"),
    "sweep": (cmd_sweep, "evaluate every checkpoint x task of pretraining runs, skipping pairs already done"),
    "demo": (cmd_demo, "the whole pipeline on shipped data: ingest -> pretrain -> eval"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML config (see jobs/configs/)")
        for flag, key in SHORTCUTS.get(name, {}).items():
            p.add_argument(flag, default=None, help=f"same as {key}=VALUE (lists comma-separated)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 views.num_views=4")
        if name == "ingest":
            p.usage = (
                "abpipe ingest [SOURCE] [--input/--urls PATH] [--out DIR|s3://...] [--config F] [section.key=value ...]"
            )
            p.add_argument(
                "--input",
                "--urls",
                dest="input",
                default=None,
                help="ingest.input: a folder, a file list, or a url+caption list",
            )
            p.add_argument(
                "--out", dest="out", default=None, help="ingest.output: the shard directory (local or s3://...)"
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_environment()
    parser = build_parser()
    # Overrides may come after options (`ingest cc12m --out D a.b=1`): argparse leaves those over.
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += rest
    from pipeline.storage import StorageError

    try:
        result = COMMANDS[args.command][0](args)
    except ConfigError as exc:
        print(f"abpipe: config error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # credentials, bucket, endpoint: the line says which, no traceback
        print(f"abpipe: storage error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
