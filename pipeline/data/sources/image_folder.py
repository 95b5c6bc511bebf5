"""Input listing for the image-folder and file-list sources.

Every regular file becomes an item, images or not: a stray text file in a class folder must show up
as a counted `not_image` skip, not vanish. Only hidden files (.DS_Store, ._*) are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_image_folder(root: str | os.PathLike) -> list[dict]:
    """root/<class>/**/<file> -> [{input, id, labels: [class]}], sorted for a stable key order."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"ingest.input: not a folder: {root}")
    items = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and _visible(path, base):
                rel = path.relative_to(base)
                items.append({"input": str(path), "id": str(rel.with_suffix("")), "labels": [folder.name]})
    return items


def list_image_files(paths: str | os.PathLike | Iterable[str]) -> list[dict]:
    """A text file with one path per line (blank lines and # comments ignored), or a list of paths.

    Paths are not checked here: a missing one is counted as `missing` by the ingest workers.
    """
    if isinstance(paths, (str, os.PathLike)):
        listing = Path(paths)
        if not listing.is_file():
            raise FileNotFoundError(f"ingest.input: file list not found: {paths}")
        lines = [ln.strip() for ln in listing.read_text().splitlines()]
        base = listing.parent
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        entries = [e if os.path.isabs(e) else str(base / e) for e in entries]
    else:
        entries = [str(p) for p in paths]
    return [{"input": p, "id": Path(p).stem, "labels": []} for p in entries]
