"""`abpipe ingest|train|eval|sweep|scenes|study|export|demo`: thin calls into the modules, one config system.

Every command takes `--config FILE.yaml` and any number of dotted overrides (`train.lr=3e-4`),
`--verbose` (Ray's own logs on the console, tracebacks on errors) and `--json` (the result as one
JSON document on stdout; the human output then goes to stderr). Each ends with a summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback

from pipeline import console
from pipeline.config import ConfigError, InputError, load_config
from pipeline.runtime import RayStartError, quiet_environment

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


# Each command reads its config before importing its module (torch, Ray): a bad config fails at once.


def cmd_ingest(args) -> dict:
    cfg = ingest_config(args)
    from pipeline.ingest import run_ingest

    return run_ingest(cfg)


def cmd_train(args) -> dict:
    cfg = _load(args)
    from pipeline.train.trainer import run_pretrain

    return run_pretrain(cfg)


def cmd_eval(args) -> dict:
    cfg = _load(args)
    from pipeline.eval.job import run_eval

    return run_eval(cfg)


def cmd_sweep(args) -> dict:
    cfg = _load(args)
    from pipeline.eval.sweep import run_sweep

    return run_sweep(cfg)


def cmd_export(args) -> dict:
    """`export REF --out DIR [--weights teacher|student] [--name N] [--no-register] [overrides]`."""
    import os

    from pipeline.export import CheckpointError, ExportError, run_export

    words = [o for o in args.overrides if "=" not in o]
    if len(words) != 1:
        raise ConfigError(f"export takes one checkpoint directory or MLflow run id, got {words or 'none'}")
    raw = load_config(args.config, [o for o in args.overrides if "=" in o])
    explicit_uri = raw.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    try:
        result = run_export(
            words[0],
            args.out,
            args.weights,
            explicit_uri,
            raw.resolved().tracking.tracking_uri,
            register_model=not args.no_register,
            name=args.name,
        )
    except (CheckpointError, ExportError) as exc:
        raise InputError(f"export failed: {exc}") from None
    return result.to_dict()


def cmd_scenes(args) -> dict:
    """`scenes [scenes.objects=digits] [scenes.output=DIR] ...`: write the scene set (COCO layout + objects)."""
    cfg = _load(args)
    from pipeline.data.scenes import write_scenes

    return {**write_scenes(cfg.scenes), "output": cfg.scenes.output}


def cmd_study(args) -> dict:
    """`study [--preset dense] [--arms a,b] [--max-seeds N] [overrides]`: run or resume the scenes study
    (pipeline/study.py)."""
    from pipeline.study import DEFAULT_CONFIG, report, run_study

    if args.report:  # tables only, from a results file: nothing is run
        if not os.path.isfile(args.report):
            raise InputError(f"--report {args.report}: no such results file")
        return {"report": report(args.report), "results_file": args.report}
    arms = [a for a in args.arms.split(",") if a] if args.arms else None
    return run_study(args.config or DEFAULT_CONFIG, args.overrides, arms, args.max_seeds, args.preset or "")


def cmd_demo(args) -> dict:
    from pipeline.demo import run_demo

    return run_demo(args.config, args.overrides)


# -- the summary table each command ends with -------------------------------------------------------


def summarize_ingest(result: dict) -> None:
    from pipeline.ingest import summary_rows

    console.summary("ingest", summary_rows(result))


def summarize_train(result: dict) -> None:
    from pipeline.train.trainer import summary_rows

    console.summary("pretraining", summary_rows(result))


def summarize_export(result: dict) -> None:
    rows = [
        ("architecture", result["architecture"]),
        ("weights", f"{result['weights']} of {result['checkpoint']} (step {result['step']})"),
        ("tensors", f"{result['tensors']} written and loaded back ({result['parameters']:,} parameters)"),
        ("max abs diff", f"{result['max_abs_diff']:.2e} (features, exported vs checkpoint)"),
        ("out", result["out"]),
    ]
    if result.get("registered", {}).get("version"):
        rows.append(("MLflow model", f"{result['registered']['name']} v{result['registered']['version']}"))
    console.summary("export", rows)


def summarize_scenes(result: dict) -> None:
    rows = [("classes", ", ".join(result["classes"]))]
    for split, s in result["splits"].items():
        rows.append(
            (
                split,
                f"{s['scenes']} scenes, {s['boxes']} boxes, {s['object_images_used']} object images; "
                f"{s['object_centric']} object-centric images",
            )
        )
    rows.append(("out", result["output"]))
    console.summary("scenes", rows)


def summarize_study(result: dict) -> None:
    from pipeline.study import TABLES

    if "report" in result:
        console.note(f"study tables from {result['results_file']}:\n{result['report']}")
        return
    for name, lines in result["tables"].items():
        if lines:
            console.note(f"{TABLES[name]}:\n" + "\n".join(lines))
    console.note(f"rows: {result['results_file']}")


def summarize_eval(result: dict) -> None:
    from pipeline.eval.job import summary_rows

    header, rows = summary_rows(result)
    console.summary(f"eval of {result.get('checkpoint')} (step {result.get('step')})", rows, header)


def summarize_sweep(result: dict) -> None:
    from pipeline.eval.sweep import summary_line, summary_rows

    header, rows = summary_rows(result)
    console.summary(summary_line(result), rows, header)


COMMANDS = {
    "ingest": (
        cmd_ingest,
        summarize_ingest,
        "a source (image_folder, files, cc12m/urls, coco, epic_kitchens) -> WebDataset shards + manifest + _stats.json",
    ),
    "train": (
        cmd_train,
        summarize_train,
        "pretrain (objective.name: ab_simclr, ab_clip or a baseline) on shards with Ray Train;"
        " resumes from the latest checkpoint",
    ),
    "eval": (cmd_eval, summarize_eval, "frozen-feature probes of a checkpoint (dir or MLflow run) on eval tasks"),
    "sweep": (
        cmd_sweep,
        summarize_sweep,
        "evaluate every checkpoint x task of pretraining runs, skipping pairs already done",
    ),
    "demo": (
        cmd_demo,
        None,
        "the whole pipeline on shipped data: ingest -> pretrain -> eval",
    ),  # prints its own summary
    "scenes": (
        cmd_scenes,
        summarize_scenes,
        "write the scenes benchmark: COCO-layout scenes of real object images + an object-centric variant",
    ),
    "study": (
        cmd_study,
        summarize_study,
        "run or resume the scenes study (AB vs baselines and ablations); results in <root>/study_results.jsonl",
    ),
    "export": (
        cmd_export,
        summarize_export,
        "a checkpoint's encoder (dir or run id) as timm model.safetensors + config.json + card",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and `--help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"abpipe: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="abpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML config (see jobs/configs/)")
        p.add_argument("--verbose", "-v", action="store_true", help="show Ray's own logs and the traceback of an error")
        p.add_argument(
            "--json",
            action="store_true",
            help="print the result as one JSON document on stdout (the rest goes to stderr)",
        )
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
        if name == "study":
            p.add_argument("--arms", default=None, help="comma-separated arm slugs (default: all; see docs/study.md)")
            p.add_argument("--max-seeds", type=int, default=None, help="at most this many seeds per arm")
            p.add_argument("--preset", default=None, help="scene preset (dense: COCO's density + learning curves)")
            p.add_argument("--report", default=None, help="print the tables of a results jsonl and run nothing")
        if name == "export":
            p.usage = (
                "abpipe export CHECKPOINT_DIR|RUN_ID --out DIR [--weights teacher|student] [--name NAME] "
                "[--no-register] [section.key=value ...]"
            )
            p.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
            p.add_argument("--weights", choices=("teacher", "student"), default="teacher", help="default: EMA teacher")
            p.add_argument("--name", default=None, help="MLflow registered model name (default abpipe-<run name>)")
            p.add_argument("--no-register", action="store_true", help="do not log/register the export in MLflow")
    return parser


# -- failures: one clear line, the traceback only with --verbose ---------------------------------------


_INPUT_ERRORS = {
    "pipeline.eval.job": "EvalError",
    "pipeline.eval.tasks": "TaskFormatError",
    "pipeline.checkpoints": "CheckpointError",
}


def _input_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises (a config, a path, a file's content), as opposed to a bug in abpipe.

    Error types of modules not imported yet cannot have been raised, so they are not imported here
    (that would cost torch's import on the way to a one-line message)."""
    loaded = [getattr(sys.modules[m], name) for m, name in _INPUT_ERRORS.items() if m in sys.modules]
    return (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, *loaded)


def _root_cause(exc: BaseException) -> BaseException:
    """The exception a worker actually raised, under Ray Train's and Ray's wrappers."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    for _ in range(10):
        inner = getattr(exc, "cause", None) or getattr(exc, "controller_failure", None) or exc.__cause__
        if not isinstance(inner, BaseException) or inner is exc:
            return exc
        exc = inner
    return exc


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip()) or "(no message)"


def failure_line(exc: BaseException) -> tuple[str, int] | None:
    """(the one line to print, exit code) for an expected failure; None for a bug (keep its traceback)."""
    if isinstance(exc, ConfigError):
        return f"config error: {_one_line(exc)}", 2
    if isinstance(exc, _input_errors()):
        return f"error: {_one_line(exc)}", 1
    if isinstance(exc, RayStartError):
        return _one_line(exc), 1
    storage = sys.modules.get("pipeline.storage")  # credentials, bucket, endpoint: the line says which
    if storage is not None and isinstance(exc, storage.StorageError):
        return f"storage error: {_one_line(exc)}", 2
    train = sys.modules.get("ray.train")
    if train is not None and isinstance(exc, train.TrainingFailedError):
        from pipeline.runtime import ray_logs_dir

        cause = _root_cause(exc)
        where = ray_logs_dir()
        return f"training failed: {type(cause).__name__}: {_one_line(exc if cause is exc else cause)}" + (
            f" (Ray's logs: {where})" if where else ""
        ), 1
    return None


def _fail(exc: BaseException) -> int:
    line = failure_line(exc)
    if line is None:
        raise exc
    partial = getattr(exc, "result", None)  # an eval whose other tasks finished: their table still prints
    if partial:
        summarize_eval(partial)
    if console.verbose():
        traceback.print_exception(exc)
    console.error(line[0])
    return line[1]


def main(argv: list[str] | None = None) -> int:
    quiet_environment()
    parser = build_parser()
    # Overrides may come after options (`ingest cc12m --out D a.b=1`): argparse leaves those over.
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-")]
    if unknown:
        parser.exit(2, f"abpipe: unrecognized arguments: {' '.join(unknown)} (see `abpipe {args.command} --help`)\n")
    args.overrides += rest
    with console.configured(verbose=args.verbose, json_output=args.json):
        return _run(args)


def _run(args) -> int:
    run, summarize, _ = COMMANDS[args.command]
    out = sys.stdout
    # `--json`: stdout carries the result only. Whatever else writes to stdout meanwhile goes to stderr:
    # Ray's driver prints the raylet's warnings ("N PYTHON worker processes have been started ...")
    # to sys.stdout whatever log_to_driver says, and one such line made the result unparseable.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        try:
            result = run(args)
        except KeyboardInterrupt:
            console.error("interrupted")
            return 130
        except Exception as exc:
            return _fail(exc)
        if summarize is not None and result is not None:
            summarize(result)
        if args.json:
            print(json.dumps(result, indent=1, default=str), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
