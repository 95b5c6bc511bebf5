"""EPIC-KITCHENS-100: videos or `rgb_frames` -> one ingest item per sampled frame.

Layouts under `ingest.input` (the dataset root, or one participant's `videos`/`rgb_frames` folder):
  videos      P01/videos/P01_01.MP4                      decoded with PyAV (`loader: video`)
  rgb_frames  P01/rgb_frames/P01_01.tar                  members ./frame_0000000001.jpg (`loader: tar`)
              P01/rgb_frames/P01_01/frame_0000000001.jpg plain files
One frame convention everywhere: `frame` is the 1-based rgb_frames number, the number EPIC_100_*.csv
start/stop frames use; decoded video frame i (0-based) is frame i + 1. Frames 1, 1 + stride, ... are
sampled, plus every frame VISOR annotates. A frame inside [start_frame, stop_frame] (inclusive) of
an action gets that action (the one that started last when actions overlap); a frame outside every
action keeps none. VISOR polygons give boxes (their extent, in VISOR's 1920x1080 frame, rescaled to
the stored frame by the shard writer) labelled with the entity name.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from pipeline import console
from pipeline.config import ConfigError, IngestConfig, InputError
from pipeline.data.schema import BadImage
from pipeline.data.sources.frames import tar_frame_members, video_frame_count
from pipeline.storage import join, list_dir, read_bytes

VIDEO_SUFFIXES = (".mp4", ".MP4")
CSV_COLUMNS = (
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
)
NEEDED_COLUMNS = ("narration_id", "video_id", "start_frame", "stop_frame", "narration", "verb", "noun")
FRAME_NUMBER = re.compile(r"frame_(\d+)\.(?:jpg|png)$")


def _warn(message: str) -> None:
    console.note(f"ingest epic_kitchens: {message}")


# -- actions (EPIC_100_train.csv) -------------------------------------------------------------------


class ActionIndex:
    """Per video, the actions sorted by start frame, for "which action contains frame f" lookups."""

    def __init__(self, csv_uri: str):
        import pandas as pd

        try:
            table = pd.read_csv(io.BytesIO(read_bytes(csv_uri)))
        except FileNotFoundError:
            raise FileNotFoundError(f"ingest.epic.annotations_csv: file not found: {csv_uri}") from None
        absent = [c for c in NEEDED_COLUMNS if c not in table.columns]
        if absent:
            raise InputError(
                f"{csv_uri}: missing columns {absent}; an EPIC_100 annotations csv has {list(CSV_COLUMNS)}"
            )
        table["start_frame"] = pd.to_numeric(table["start_frame"], errors="coerce")
        table["stop_frame"] = pd.to_numeric(table["stop_frame"], errors="coerce")
        bad = table["start_frame"].isna() | table["stop_frame"].isna() | (table["start_frame"] > table["stop_frame"])
        if bad.any():
            _warn(
                f"{int(bad.sum())} rows of {csv_uri} have unusable start/stop frames and are ignored: "
                f"{list(table.loc[bad, 'narration_id'][:5])}"
            )
        table = table[~bad].reset_index(drop=True)
        self.videos: dict[str, tuple[np.ndarray, np.ndarray, list[dict]]] = {}
        for video_id, rows in table.groupby("video_id", sort=False):
            rows = rows.sort_values("start_frame", kind="stable")
            actions = [self._action(r) for r in rows.to_dict("records")]
            self.videos[str(video_id)] = (
                rows["start_frame"].to_numpy(np.int64),
                rows["stop_frame"].to_numpy(np.int64),
                actions,
            )

    @staticmethod
    def _action(row: dict) -> dict[str, Any]:
        action = {
            "narration_id": str(row["narration_id"]),
            "verb": str(row["verb"]),
            "noun": str(row["noun"]),
            "narration": str(row["narration"]),
        }
        for key in ("verb_class", "noun_class"):
            if key in row and row[key] == row[key]:  # present and not NaN
                action[key] = int(row[key])
        return action

    def at(self, video_id: str, frame: int) -> dict[str, Any] | None:
        """The action whose [start_frame, stop_frame] holds `frame` (latest start wins), or None."""
        if video_id not in self.videos:
            return None
        starts, stops, actions = self.videos[video_id]
        hits = np.flatnonzero((starts <= frame) & (frame <= stops))
        return dict(actions[hits[-1]]) if len(hits) else None


# -- VISOR boxes ------------------------------------------------------------------------------------


def polygon_box(segments: Any) -> list[float] | None:
    """Extent [x0, y0, x1, y1] of all polygon points of one VISOR entity; None when it has no area."""
    points = [p for polygon in segments or [] for p in polygon or [] if isinstance(p, (list, tuple)) and len(p) >= 2]
    if not points:
        return None
    xy = np.asarray([[float(p[0]), float(p[1])] for p in points])
    if not np.isfinite(xy).all():
        return None
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    if x1 <= x0 or y1 <= y0:
        return None
    return [float(x0), float(y0), float(x1), float(y1)]


def _visor_files(uri: str) -> list[str]:
    if uri.endswith(".json"):
        return [uri]
    return [join(uri, info.base_name) for info in list_dir(uri) if info.base_name.endswith(".json")]


def load_visor(epic) -> dict[str, dict[int, dict[str, Any]]]:
    """{video_id: {frame number: {boxes, labels, dropped}}} from VISOR sparse annotation json(s)."""
    mapping: dict[str, dict[str, str]] = {}
    if epic.visor_frame_mapping:
        mapping = json.loads(read_bytes(epic.visor_frame_mapping))
    out: dict[str, dict[int, dict[str, Any]]] = {}
    unmapped = 0
    for uri in _visor_files(epic.visor_json):
        try:
            entries = json.loads(read_bytes(uri))["video_annotations"]
        except FileNotFoundError:
            raise FileNotFoundError(f"ingest.epic.visor_json: file not found: {uri}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{uri}: not a VISOR annotation file (expected {{'video_annotations': [...]}}): {exc}"
            ) from None
        for entry in entries:
            image = entry.get("image", {}) if isinstance(entry, dict) else {}
            name = str(image.get("name", ""))
            video_id = str(image.get("video") or "_".join(name.split("_")[:2]))
            if mapping:
                name = mapping.get(video_id, {}).get(name, "")
            match = FRAME_NUMBER.search(name)
            if not match:
                unmapped += 1
                continue
            frame = out.setdefault(video_id, {}).setdefault(
                int(match.group(1)), {"boxes": [], "labels": [], "dropped": 0}
            )
            for ann in entry.get("annotations", []):
                box = polygon_box(ann.get("segments"))
                if box is None:
                    frame["dropped"] += 1
                else:
                    frame["boxes"].append(box)
                    frame["labels"].append(str(ann.get("name", "")))
    if unmapped:
        _warn(
            f"{unmapped} VISOR frames have no rgb_frames number (name not parseable or absent from the frame mapping); "
            "ignored"
        )
    return out


# -- where the frames are ---------------------------------------------------------------------------


def _containers(root: str, layout: str) -> list[tuple[str, str, str]]:
    """[(video_id, uri, kind)] with kind video|tar|dir, from the dataset root or one layout folder."""
    entries = list_dir(root)

    def own(entries_, base):
        found = []
        for info in entries_:
            path = join(base, info.base_name)
            stem = PurePosixPath(info.base_name).stem
            if layout == "videos" and info.base_name.endswith(VIDEO_SUFFIXES):
                found.append((stem, path, "video"))
            elif layout == "rgb_frames" and info.base_name.endswith(".tar"):
                found.append((stem, path, "tar"))
            elif layout == "rgb_frames" and info.type.name == "Directory" and not info.base_name.startswith("."):
                found.append((info.base_name, path, "dir"))
        return found

    found, layout_dirs = [], 0
    for info in entries:  # the dataset root: <root>/<participant>/<layout>/...
        if info.type.name == "Directory":
            sub = join(root, info.base_name, layout)
            try:
                found += own(list_dir(sub), sub)
                layout_dirs += 1
            except FileNotFoundError:
                continue
    if not layout_dirs:  # or the layout folder itself
        found = own(entries, root)
    tars = {vid for vid, _, kind in found if kind == "tar"}
    found = [f for f in found if not (f[2] == "dir" and f[0] in tars)]  # a tar and its extracted folder: one video
    if not found:
        raise FileNotFoundError(
            f"ingest.input: no {layout} found in {root} (expected {root}/P01/{layout}/... or the {layout} folder "
            "itself)"
        )
    return sorted(found)


def _frames_of(uri: str, kind: str) -> tuple[int, dict[int, str]]:
    """(number of frames, {frame number: member/file name}) of one container."""
    if kind == "video":
        return video_frame_count(uri), {}
    if kind == "tar":
        members = tar_frame_members(uri)
    else:
        members = {
            int(m.group(1)): info.base_name for info in list_dir(uri) if (m := FRAME_NUMBER.search(info.base_name))
        }
    return (max(members) if members else 0), members


def _frame_item(video_id: str, uri: str, kind: str, number: int, members: dict[int, str]) -> dict[str, Any]:
    name = f"frame_{number:010d}.jpg"
    item: dict[str, Any] = {"id": f"{video_id}/{name[:-4]}", "video": video_id, "frame": number}
    if kind == "video":
        item.update(input=uri, loader="video", frame_index=number - 1)
    elif kind == "tar":
        item.update(input=uri, loader="tar", member=members.get(number, f"./{name}"))
    else:
        item.update(input=join(uri, members.get(number, name)))
    return item


def list_items(cfg: IngestConfig) -> list[dict[str, Any]]:
    """Items for every sampled frame of every video under `ingest.input`, in (video, frame) order."""
    epic = cfg.epic
    if not cfg.input:
        raise ConfigError("ingest.input is required for epic_kitchens (the dataset root or a videos/rgb_frames folder)")
    if epic.layout not in ("videos", "rgb_frames"):
        raise ConfigError(f"ingest.epic.layout must be 'videos' or 'rgb_frames', got {epic.layout!r}")
    if epic.frame_stride < 1:
        raise ConfigError(f"ingest.epic.frame_stride must be >= 1, got {epic.frame_stride}")
    actions = ActionIndex(epic.annotations_csv) if epic.annotations_csv else None
    visor = load_visor(epic) if epic.visor_json else {}
    items: list[dict[str, Any]] = []
    for video_id, uri, kind in _containers(cfg.input, epic.layout):
        try:
            count, members = _frames_of(uri, kind)
        except BadImage as exc:  # an unreadable video/tar: one counted item, never a crash or a silent gap
            items.append({"input": uri, "id": video_id, "video": video_id, "skip": [exc.reason, exc.detail]})
            continue
        annotated = visor.get(video_id, {})
        for number in sorted(set(range(1, count + 1, epic.frame_stride)) | set(annotated)):
            item = _frame_item(video_id, uri, kind, number, members)
            counts = {"frames_with_action": 0, "frames_without_action": 0}
            action = actions.at(video_id, number) if actions else None
            if action:
                item["action"] = action
            counts["frames_with_action" if action else "frames_without_action"] = 1
            if number in annotated:
                entry = annotated[number]
                item.update(
                    boxes=entry["boxes"], labels=entry["labels"], box_frame=[epic.visor_width, epic.visor_height]
                )
                counts.update(
                    visor_frames=1, visor_boxes_kept=len(entry["boxes"]), visor_boxes_dropped_empty=entry["dropped"]
                )
            item["counts"] = counts
            items.append(item)
    return items
