"""Count the assertions of a test tree: `assert` statements and `pytest.raises` / `pytest.warns` uses, per
file and in total, from the source's syntax tree (no test is run; `pytest.approx` sits inside an assert).

Issue 28 asks that shortening the suite never assert less: run this before and after a change and
compare the totals (`--json` for a machine-readable count).

    .venv/bin/python scripts/count_assertions.py [tests/] [--json]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

CHECKS = ("raises", "warns")  # pytest.<name>(...) calls that assert something


def count_source(source: str, name: str = "<source>") -> dict[str, int]:
    """{"assert": n, "raises": n, "warns": n} of one module's source."""
    counts = dict.fromkeys(("assert", *CHECKS), 0)
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Assert):
            counts["assert"] += 1
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CHECKS:
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "pytest":
                counts[node.func.attr] += 1
    return counts


def count_tree(root: Path) -> dict[str, dict[str, int]]:
    """Per test module under `root` (files named test_*.py and the helpers beside them)."""
    return {str(p.relative_to(root)): count_source(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="tests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    per_file = count_tree(Path(args.root))
    total = {k: sum(c[k] for c in per_file.values()) for k in ("assert", *CHECKS)}
    if args.json:
        print(json.dumps({"total": total, "files": per_file}, indent=1))
    else:
        for name, c in per_file.items():
            if any(c.values()):
                print(f"{sum(c.values()):6d}  {name}")
        print(f"{sum(total.values()):6d}  total ({', '.join(f'{k} {v}' for k, v in total.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
