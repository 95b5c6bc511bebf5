"""One storage code path for every ingest/read: local paths, pyarrow URIs and fsspec protocols.

Everything that touches a file (listing a source, reading an input, writing a shard, reading shards
back with Ray Data) asks `filesystem(uri)` for a pyarrow filesystem and a path inside it. Local paths
and the URIs pyarrow understands natively (file://, s3://, gs://, hdfs://, ...) get pyarrow's own
filesystems; any other protocol fsspec knows (http://, memory://, chained ones such as
`simplecache::file://`) is wrapped as `PyFileSystem(FSSpecHandler(...))`, so callers never branch.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs


def _is_uri(uri: str) -> bool:
    return "://" in uri or "::" in uri


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path, a pyarrow URI or an fsspec URI."""
    uri = str(uri)
    if not _is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if "::" not in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # a scheme pyarrow does not know (or was built without): try fsspec
    import fsspec

    protocol = uri.split("::")[0].split("://")[0]
    if protocol not in fsspec.available_protocols():
        raise ValueError(f"{uri!r}: neither pyarrow nor fsspec knows the protocol {protocol!r}")
    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path (os.path) or a URI (always '/')."""
    base = str(base)
    if _is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts) if base.rstrip("/") else "/".join(parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dir(uri: str) -> list[pafs.FileInfo]:
    """Entries directly under a folder, sorted by name; FileNotFoundError naming it when absent."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"not a folder: {uri}")
    return sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.base_name)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write under a unique temporary name, then move into place: readers never see half a file."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as stream:
        stream.write(data)
    fs.move(tmp, path)
