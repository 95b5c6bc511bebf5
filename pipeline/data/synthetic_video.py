"""A tiny EPIC-KITCHENS-shaped dataset made on the spot (no downloads): for tests and benchmarks.

Every frame carries its own 0-based index as a row of black/white blocks (one per bit), big enough
to survive H.264 and JPEG, so a reader can check *which* frame it got, not only that it got one.
The same frames are written as an mp4 (PyAV) and in the official rgb_frames layouts (a tar with
`./frame_0000000001.jpg` members, or a folder of them; numbered from 1).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CODE_BITS = 12  # frame indices up to 4095


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """RGB frame `index`: a bit-code band on top, a frame-dependent colour gradient below."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [
            (xx / width * 200 + index * 7) % 256,
            (yy / height * 200 + index * 3) % 256,
            np.full_like(xx, (index * 11) % 256),
        ],
        axis=-1,
    )
    frame = rgb.astype(np.uint8)
    band = height // 3
    cell = width / CODE_BITS
    for bit in range(CODE_BITS):
        x0, x1 = int(round(bit * cell)), int(round((bit + 1) * cell))
        frame[:band, x0:x1] = 255 if (index >> bit) & 1 else 0
    return frame


def read_frame_code(rgb: np.ndarray) -> int:
    """The index `frame_pattern` drew into this (possibly resized, lossy) frame."""
    height, width = rgb.shape[:2]
    band = height // 3
    cell = width / CODE_BITS
    gray = rgb[:band, :, :].mean(axis=-1)
    code = 0
    for bit in range(CODE_BITS):
        x0, x1 = int(round(bit * cell)), int(round((bit + 1) * cell))
        inner = gray[band // 4 : 3 * band // 4, x0 + (x1 - x0) // 4 : x1 - (x1 - x0) // 4]
        code |= int(inner.mean() > 127) << bit
    return code


def write_video(path: str | os.PathLike, n_frames: int, width: int, height: int, fps: int = 50, gop: int = 25) -> Path:
    """An H.264 mp4 of frames 0..n_frames-1 (keyframe every `gop` frames, like camera footage)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "crf": "12", "preset": "veryfast"}
        for index in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(index, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _jpeg(index: int, width: int, height: int, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame_pattern(index, width, height)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_rgb_frames_tar(
    path: str | os.PathLike, n_frames: int, width: int, height: int, quality: int = 90, skip: tuple[int, ...] = ()
) -> Path:
    """EPIC's `PXX_YY.tar`: members `./frame_0000000001.jpg`, ... holding frames 0..n_frames-1."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for number in range(1, n_frames + 1):
            if number in skip:
                continue
            data = _jpeg(number - 1, width, height, quality)
            info = tarfile.TarInfo(f"./frame_{number:010d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_rgb_frames_dir(
    folder: str | os.PathLike, n_frames: int, width: int, height: int, quality: int = 90, skip: tuple[int, ...] = ()
) -> Path:
    """EPIC's extracted layout: `PXX_YY/frame_0000000001.jpg`, ... (numbers in `skip` left out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(1, n_frames + 1):
        if number not in skip:
            (folder / f"frame_{number:010d}.jpg").write_bytes(_jpeg(number - 1, width, height, quality))
    return folder
