"""Shared body of the Ray job entrypoints: hand every argument to `abpipe <command>` unchanged.

The entrypoints stay thin so a job submitted with `ray job submit` runs exactly the code path of the
local `abpipe` command (`--config FILE`, the command's flags, dotted overrides). They run as scripts
(`python jobs/pretrain.py`), so the repository root is put on `sys.path`: with a runtime_env
`working_dir` the package is importable without installing it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def run(command: str, description: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"jobs/{Path(sys.argv[0]).name}",
        usage=f"%(prog)s [--config FILE] [abpipe {command} options] [section.key=value ...]",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Arguments are those of `abpipe {command}` (see `abpipe {command} --help`). "
        f"Configs in jobs/configs/: {', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.yaml')))}.",
    )
    _, forwarded = parser.parse_known_args(argv)  # only -h/--help is ours
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from pipeline.cli import main

    return main([command, *forwarded])
