"""Images that are not files of their own: frames of a video (PyAV) and members of a tar.

Both readers take *all* the wanted frames/members of one container at once and walk it forward a
single time: a shard task that needs 30 frames of one video decodes sequentially (seeking only over
long gaps), instead of opening and seeking the video 30 times from scratch.

Frame indices here are 0-based decode order; EPIC's 1-based frame numbers are the caller's business.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator
from fractions import Fraction

import numpy as np
from PIL import Image

from pipeline.data.schema import CORRUPT, MISSING, TOO_LARGE, BadImage
from pipeline.storage import filesystem

# Decoding forward is cheaper than a seek (which restarts at a keyframe) for gaps up to a few GOPs.
SEEK_GAP = 300
FRAME_NAME = re.compile(r"(?:^|/)frame_(\d+)\.jpg$")


def _open_input(uri: str):
    """A seekable binary file for local paths and any storage URI (PyAV and tarfile both seek)."""
    fs, path = filesystem(uri)
    return fs.open_input_file(path)


def _open_video(uri: str):
    import av

    try:
        handle = _open_input(uri)
    except (FileNotFoundError, OSError) as exc:
        raise BadImage(MISSING, f"{uri}: {exc}") from None
    try:
        container = av.open(handle)
    except Exception as exc:  # av.error.* for anything that is not a playable video
        handle.close()
        raise BadImage(CORRUPT, f"{uri}: {type(exc).__name__}: {exc}") from None
    if not container.streams.video:
        container.close()
        handle.close()
        raise BadImage(CORRUPT, f"{uri}: no video stream")
    return handle, container, container.streams.video[0]


def video_frame_count(uri: str) -> int:
    """Frames in the first video stream: the header's count, else counted from packets (no decode)."""
    handle, container, stream = _open_video(uri)
    try:
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)
    except Exception as exc:
        raise BadImage(CORRUPT, f"{uri}: {type(exc).__name__}: {exc}") from None
    finally:
        container.close()
        handle.close()


def iter_video_frames(uri: str, indices: Iterable[int]) -> Iterator[tuple[int, np.ndarray | BadImage]]:
    """(index, RGB uint8 array or BadImage) for each wanted 0-based index, in increasing order.

    The index of a decoded frame comes from its timestamp (pts × time_base × frame rate), so it is
    right after a seek too. Frames past the end come back as `missing`, a decoder failure as
    `corrupt` for every frame not yet delivered.
    """
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return
    try:
        handle, container, stream = _open_video(uri)
    except BadImage as exc:
        for index in wanted:
            yield index, exc
        return
    delivered = 0
    try:
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > Image.MAX_IMAGE_PIXELS:
            raise BadImage(
                TOO_LARGE, f"{uri}: {width}x{height} frames exceed Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels"
            )
        stream.thread_type = "AUTO"
        rate = Fraction(stream.average_rate or stream.guessed_rate or 0)
        start = stream.start_time or 0
        time_base = stream.time_base
        can_seek = rate > 0 and time_base is not None
        position = -1  # index of the last decoded frame
        frames, sought = None, -1
        while delivered < len(wanted):
            target = wanted[delivered]
            if frames is None or (can_seek and target - position > SEEK_GAP and sought != target):
                sought = target  # one seek per target: it lands on the keyframe before, decode from there
                if can_seek and target > SEEK_GAP:
                    container.seek(
                        start + int(target / rate / time_base), stream=stream, backward=True, any_frame=False
                    )
                elif frames is not None:
                    container.seek(start, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                position = -1
            frame = next(frames, None)
            if frame is None:
                break
            if frame.pts is not None and can_seek:
                position = round((frame.pts - start) * time_base * rate)
            else:
                position += 1
            while delivered < len(wanted) and wanted[delivered] < position:
                # a wanted index the stream skipped (timestamps jump): never silently lost
                yield wanted[delivered], BadImage(MISSING, f"{uri}: no frame with index {wanted[delivered]}")
                delivered += 1
            if delivered < len(wanted) and wanted[delivered] == position:
                yield position, frame.to_ndarray(format="rgb24")
                delivered += 1
        for index in wanted[delivered:]:
            yield (
                index,
                BadImage(MISSING, f"{uri}: frame index {index} is past the video's end (last decoded: {position})"),
            )
        delivered = len(wanted)
    except BadImage as exc:
        for index in wanted[delivered:]:
            yield index, exc
    except Exception as exc:  # a broken stream mid-way: the rest of this video is corrupt, not lost
        detail = BadImage(CORRUPT, f"{uri}: {type(exc).__name__}: {exc}")
        for index in wanted[delivered:]:
            yield index, detail
    finally:
        container.close()
        handle.close()


def tar_frame_members(uri: str) -> dict[int, str]:
    """{frame number: member name} for the `frame_0000000001.jpg` members of an rgb_frames tar."""
    try:
        with _open_input(uri) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            names = tar.getnames()
    except (FileNotFoundError, OSError, tarfile.TarError) as exc:
        raise BadImage(CORRUPT if isinstance(exc, tarfile.TarError) else MISSING, f"{uri}: {exc}") from None
    found = {}
    for name in names:
        match = FRAME_NAME.search(name)
        if match:
            found[int(match.group(1))] = name
    return found


def _member_key(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def iter_tar_members(uri: str, names: Iterable[str]) -> Iterator[tuple[str, bytes | BadImage]]:
    """(name, bytes or BadImage) for each wanted member, reading the tar front to back once."""
    wanted = {_member_key(n): n for n in names}
    try:
        with _open_input(uri) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                key = _member_key(member.name)
                if key in wanted and member.isfile():
                    yield wanted.pop(key), tar.extractfile(member).read()
                    if not wanted:
                        return
    except (FileNotFoundError, OSError, tarfile.TarError) as exc:
        reason = CORRUPT if isinstance(exc, tarfile.TarError) else MISSING
        for name in wanted.values():
            yield name, BadImage(reason, f"{uri}: {exc}")
        return
    for name in wanted.values():
        yield name, BadImage(MISSING, f"{uri}: no member {name}")
