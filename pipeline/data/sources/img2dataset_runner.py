"""Drive img2dataset behind one function, so the downloader can be swapped without touching the rest.

img2dataset fetches (threads x processes, or one Ray task per shard), honours X-Robots-Tag opt-outs,
filters by size and resizes the longest side. One guard is put in front of its OpenCV decoder:
Pillow reads the header first, so a decompression bomb is refused before any pixel buffer is
allocated (OpenCV would allocate up to its own 2^30-pixel cap, gigabytes, before img2dataset's size
checks run), and an undecodable file is counted with our precise reason (`truncated`, `not_image`,
...) where OpenCV only says "Image decoding error".
"""

from __future__ import annotations

import contextlib
import importlib
import re
import signal

from img2dataset.resizer import Resizer

from pipeline.config import IngestConfig
from pipeline.data.schema import BadImage, decode_rgb
from pipeline.data.sources.img2dataset_shards import GUARD_PREFIX

ADDITIONAL_COLUMNS = ["abpipe_key"]  # carried through img2dataset into its per-shard parquet


class GuardedResizer(Resizer):
    """img2dataset's Resizer, after a Pillow check of the downloaded bytes (draft-scale decode: cheap)."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            decode_rgb(img_stream.getvalue(), min_side=1, draft_to=1)
        except BadImage as exc:
            detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", exc.detail)
            return None, None, None, None, None, f"{GUARD_PREFIX}{exc.reason}: {detail}"[:500]
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


@contextlib.contextmanager
def _guarded_download():
    """img2dataset.download builds its own Resizer: hand it ours; restore its SIGINT hijack afterwards."""
    i2d_main = importlib.import_module("img2dataset.main")  # the module (the package re-exports a `main` function)
    original, sigint = i2d_main.Resizer, signal.getsignal(signal.SIGINT)
    i2d_main.Resizer = GuardedResizer
    try:
        yield i2d_main.download
    except SystemExit:  # its Ctrl-C handler exits with status 0: make an interruption look like one
        raise KeyboardInterrupt("img2dataset interrupted; re-run the same command to resume") from None
    finally:
        i2d_main.Resizer = original
        signal.signal(signal.SIGINT, sigint)


def shard_digits(num_shards: int) -> int:
    """img2dataset's shard-name width (its `oom_shard_count`): at least 5, as it defaults to."""
    return max(5, len(str(max(0, num_shards - 1))))


def download(url_list_uri: str, raw_dir: str, ing: IngestConfig, num_shards: int) -> None:
    """Fetch the prepared parquet (url, caption, abpipe_key) into img2dataset webdataset shards in `raw_dir`.

    `incremental` mode: shards that already have their `_stats.json` are not fetched again.
    """
    cc = ing.cc12m
    with _guarded_download() as download_fn:
        download_fn(
            url_list=url_list_uri,
            output_folder=raw_dir,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=list(ADDITIONAL_COLUMNS),
            output_format="webdataset",
            image_size=ing.max_side,
            resize_mode="keep_ratio_largest",
            resize_only_if_bigger=True,
            skip_reencode=True,  # a small enough JPEG keeps its bytes: re-encoded at most once
            encode_format="jpg",
            encode_quality=ing.jpeg_quality,
            min_image_size=ing.min_side,
            number_sample_per_shard=ing.samples_per_shard,
            oom_shard_count=shard_digits(num_shards),
            processes_count=cc.processes,
            thread_count=cc.threads,
            distributor=cc.distributor,
            retries=cc.retries,
            timeout=cc.timeout,
            user_agent_token=cc.user_agent_token or None,
            disallowed_header_directives=list(cc.disallowed_header_directives),
            incremental_mode="incremental",
            max_shard_retry=cc.max_shard_retry,
            extract_exif=False,
            compute_hash=None,
            enable_wandb=False,
        )
