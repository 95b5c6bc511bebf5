"""The one sample schema every source is normalised to, and the reasons a sample can be skipped.

A shard sample is a WebDataset entry with `jpg` (image bytes), `json` (metadata below) and an
optional `txt` (first caption). The manifest has one row per *input item*, kept or skipped, so no
input is ever lost without a counted reason.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# Manifest statuses. "ok" is kept; everything else is a counted skip reason.
OK = "ok"
MISSING = "missing"  # path does not exist / unreadable
EMPTY = "empty"  # zero bytes
NOT_IMAGE = "not_image"  # Pillow cannot identify it
CORRUPT = "corrupt"  # identified but decoding fails
TRUNCATED = "truncated"  # decoding stops early
TOO_SMALL = "too_small"  # below the minimum side
TOO_LARGE = "too_large"  # decompression-bomb guard (Pillow's limit)
# URL sources (img2dataset): why a listed URL yielded no sample.
BAD_URL = "bad_url"  # empty, unparseable, malformed input row, or not http(s) (file://, ftp://, data:)
DOWNLOAD_FAILED = "download_failed"  # HTTP error status, connection refused, DNS failure
TIMEOUT = "timeout"  # no complete response within ingest.cc12m.timeout
OPTED_OUT = "opted_out"  # X-Robots-Tag: noai / noindex / ... for our user agent
INCOMPLETE = "incomplete"  # its download shard did not finish: re-run the same command to fetch it
SKIP_REASONS = (
    MISSING,
    EMPTY,
    NOT_IMAGE,
    CORRUPT,
    TRUNCATED,
    TOO_SMALL,
    TOO_LARGE,
    BAD_URL,
    DOWNLOAD_FAILED,
    TIMEOUT,
    OPTED_OUT,
    INCOMPLETE,
)
# Annotated sources (COCO, EPIC-KITCHENS): the annotation entry naming this input is unusable.
BAD_ANNOTATION = "bad_annotation"  # e.g. a COCO image without file_name/width/height, or a duplicate id
SKIP_REASONS += (BAD_ANNOTATION,)
STATUSES = (OK,) + SKIP_REASONS
# Crop stage with text annotations (views.text): the sample lacks the annotation the method trains
# on. Counted in the crop stage's stats, never in an ingest manifest (ingest keeps such samples).
NO_CAPTION = "no_caption"  # views.text.source=captions: no non-empty string in json `captions` nor in `txt`
NO_BOXES = "no_boxes"  # views.text.source=boxes: json has no `boxes` / `labels`
# bad_annotation: unreadable json, boxes/labels that do not pair up
CROP_SKIP_REASONS = (
    NO_CAPTION,
    NO_BOXES,
    BAD_ANNOTATION,
)

MANIFEST_COLUMNS = ("key", "shard", "source", "status", "detail", "input")


class BadImage(Exception):
    """An input image that must be skipped; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SampleMeta:
    """The `json` member of a sample. Absent fields are omitted when serialised."""

    source: str
    id: str
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)  # pixel xyxy
    labels: list[Any] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    video: str | None = None
    frame: int | None = None
    action: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        data = {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}
        data["width"], data["height"] = self.width, self.height
        return json.dumps(data, sort_keys=True).encode()

    @staticmethod
    def from_json(raw: bytes | str | dict) -> "SampleMeta":
        data = raw if isinstance(raw, dict) else json.loads(raw)
        return SampleMeta(**data)


def decode_rgb(data: bytes, min_side: int = 1, draft_to: int | None = None) -> np.ndarray:
    """Decode image bytes to an RGB uint8 HWC array, or raise BadImage with the reason.

    `draft_to` lets libjpeg decode at a reduced DCT scale (1/2, 1/4, 1/8) when the image is much
    larger than needed: the cheapest way to cut decode time for large JPEGs.
    """
    if not data:
        raise BadImage(EMPTY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft_to and img.format == "JPEG":
                img.draft("RGB", (draft_to, draft_to))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(TOO_LARGE, str(exc)) from None
    except UnidentifiedImageError as exc:
        raise BadImage(NOT_IMAGE, str(exc)) from None
    except OSError as exc:
        msg = str(exc)
        reason = TRUNCATED if "truncated" in msg.lower() or "premature end" in msg.lower() else CORRUPT
        raise BadImage(reason, msg) from None
    except (ValueError, SyntaxError, EOFError, IndexError) as exc:
        raise BadImage(CORRUPT, str(exc)) from None
    if min(img.size) < min_side:
        raise BadImage(TOO_SMALL, f"{img.size[0]}x{img.size[1]} < {min_side}")
    return np.asarray(img.convert("RGB"))
