"""Input listing for the image-folder and file-list sources.

Every regular file becomes an item, images or not: a stray text file in a class folder must show up
as a counted `not_image` skip, not vanish. Likewise a file directly under the root becomes an
unlabelled item and a broken symlink an item the workers count as `missing`. Only hidden files and
folders (.DS_Store, ._*, .git) are ignored: they are never inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def _is_input(path: Path) -> bool:
    """A regular file, or a dangling symlink (counted as `missing`); not a fifo, socket or device."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def _loops_back(here: str, target: str) -> bool:
    """A link to this folder or one above it: following it would walk forever."""
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def list_image_folder(root: str | os.PathLike) -> list[dict]:
    """root/<class>/**/<file> -> [{input, id: "<class>/.../<stem>", labels: [class]}], sorted.

    Sorting makes the global sample keys (and so shard contents) identical across re-runs.
    Symlinked class folders are followed: datasets are often assembled that way.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"ingest.input: not a folder: {root}")
    items = []
    for folder, dirs, files in os.walk(base, followlinks=True):
        here = os.path.realpath(folder)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and not _loops_back(here, os.path.realpath(os.path.join(folder, d)))
        ]
        for name in files:
            path = Path(folder, name)
            if name.startswith(".") or not _is_input(path):
                continue
            rel = path.relative_to(base)
            labels = [rel.parts[0]] if len(rel.parts) > 1 else []
            items.append({"input": str(path), "id": rel.with_suffix("").as_posix(), "labels": labels})
    return sorted(items, key=lambda item: Path(item["input"]).relative_to(base).parts)


def list_image_files(paths: str | os.PathLike | Iterable[str]) -> list[dict]:
    """A text file with one path per line (blank lines and # comments ignored), or a list of paths.

    Relative lines are relative to the list file's folder. The id is the path as listed: stems alone
    collide across folders. Paths are not checked here: a missing one is counted as `missing` by
    the ingest workers, so it appears in the manifest instead of disappearing.
    """
    if isinstance(paths, (str, os.PathLike)):
        listing = Path(paths)
        if not listing.is_file():
            raise FileNotFoundError(f"ingest.input: file list not found: {paths}")
        lines = [ln.strip() for ln in listing.read_text().splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        base = listing.parent
        return [{"input": e if os.path.isabs(e) else str(base / e), "id": e, "labels": []} for e in entries]
    return [{"input": str(p), "id": str(p), "labels": []} for p in paths]
