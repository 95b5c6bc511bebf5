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
import re
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


# -- object storage: one clear line per failure ----------------------------------------------------


class StorageError(RuntimeError):
    """Storage that cannot be used (credentials refused, no such bucket, endpoint unreachable); the
    message is one line that names the URI and what to check."""


# (what pyarrow's S3 client / botocore say, what it means for the operator)
_CAUSES = (
    (
        (
            "INVALID_ACCESS_KEY_ID",
            "InvalidAccessKeyId",
            "SIGNATURE_DOES_NOT_MATCH",
            "SignatureDoesNotMatch",
            "EXPIRED_TOKEN",
            "ExpiredToken",
        ),
        "the storage service refused the credentials; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
        "(or the node's role)",
    ),
    (
        ("NO_SUCH_BUCKET", "NoSuchBucket", "To create buckets, enable"),
        "the bucket does not exist (abpipe never creates buckets: create it, or fix the URI)",
    ),
    (
        ("ACCESS_DENIED", "AccessDenied"),
        "access denied: the credentials are refused or lack permission for this bucket/prefix",
    ),
    (
        (
            "NETWORK_CONNECTION",
            "curlCode:",
            "Could not connect to server",
            "EndpointConnectionError",
        ),  # the S3 clients' words only:
        # a generic "Connection refused" may be torch.distributed's or MLflow's, not the storage's
        "the storage endpoint is unreachable",
    ),
)
_AWS_DETAIL = re.compile(r"AWS Error (\w+) during (\w+) operation")


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"


def explain(exc: BaseException, uri: str, doing: str = "") -> StorageError | None:
    """A StorageError for `exc` when it is a known object-storage failure (searched through the
    exception's causes, Ray task errors included), else None. Never echoes credentials: only the
    URI, the endpoint and the service's error code are named."""
    for err in _causes(exc):
        text = str(err)
        for markers, meaning in _CAUSES:
            if any(m in text for m in markers):
                detail = _AWS_DETAIL.search(text)
                code = f" ({detail.group(1)} during {detail.group(2)})" if detail else ""
                where = f" at {_endpoint()}" if "unreachable" in meaning else ""
                what = f" while {doing}" if doing else ""
                return StorageError(f"{_safe(uri)}: {meaning}{where}{code}{what}")
    return None


def _causes(exc: BaseException):
    seen: set[int] = set()
    todo = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        todo += [getattr(err, "cause", None), err.__cause__, err.__context__]


def _safe(uri: str) -> str:
    """The URI without any user:password@ part."""
    return re.sub(r"(://)[^/@\s]*@", r"\1", str(uri))


def check_access(uri: str, write: bool) -> None:
    """Fail early, in one line, when `uri` cannot be read (or written): before any Ray task starts.

    Writing is checked by writing and deleting a small marker object, the one test an object store
    answers truthfully (a listing may be allowed where a write is not), and the request whose error
    says why (a HEAD request's denial carries no reason)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return  # local paths fail with their own clear OSError
    doing = "checking that it can be written" if write else "checking that it can be read"
    try:
        if write:
            if not isinstance(fs, pafs.S3FileSystem):  # fsspec stores (simplecache::file, ...) need the folder
                fs.create_dir(path, recursive=True)  # an object store has none, and a missing bucket must show
            probe = posixpath.join(path, f".abpipe-write-check-{uuid.uuid4().hex[:8]}")
            with fs.open_output_stream(probe) as stream:
                stream.write(b"")
            fs.delete_file(probe)
        elif fs.get_file_info(path).type == pafs.FileType.NotFound:
            bucket = path.split("/", 1)[0]
            if "/" in path and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{_safe(uri)}: {_CAUSES[1][1]}")
            raise FileNotFoundError(f"not found: {_safe(uri)}")
    except OSError as exc:
        raise explain(exc, uri, doing) or exc from None


def copy_to_local(uri: str, destination: str) -> str:
    """Copy the folder `uri` (any supported storage) into the local folder `destination`."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"not a folder: {_safe(uri)}")
    os.makedirs(destination, exist_ok=True)
    pafs.copy_files(path, destination, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return destination


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], pafs.LocalFileSystem)
