"""Read a url+caption list (CC12M/CC3M TSV, CSV, parquet, JSON lines, or plain URLs) into fetchable rows.

Only http(s) URLs reach the downloader: file://, ftp://, data: and the like would let a list read
local files or talk to other services, so they are refused here, before img2dataset sees them, and
counted as `bad_url` - as are empty URLs and rows the parser cannot split. Every input row gets a
key (its position in the list), so the manifest has exactly one row per listed URL.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pipeline.config import ConfigError, UrlIngestConfig
from pipeline.data.schema import BAD_URL

FORMATS = ("tsv", "csv", "parquet", "jsonl", "txt")
FETCHABLE_SCHEMES = ("http", "https")


@dataclass
class UrlList:
    """The fetchable rows (key, url, caption, in input order) and the refused ones as manifest rows."""

    keys: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)  # {key, input, status, detail}

    @property
    def total(self) -> int:
        return len(self.keys) + len(self.refused)


def detect_format(path: str) -> str:
    name = posixpath.basename(str(path)).lower()
    name = name[:-3] if name.endswith(".gz") else name
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext == "json":
        ext = "jsonl"
    if ext not in FORMATS:
        raise ConfigError(
            f"ingest.input: cannot tell the format of {path}; set ingest.cc12m.input_format to one of "
            f"{', '.join(FORMATS)}"
        )
    return ext


def refusal(url: str | None) -> str | None:
    """Why this URL is not fetched, or None when it is a well-formed http(s) URL."""
    if url is None or not str(url).strip():
        return "empty URL"
    try:
        parts = urlsplit(str(url).strip())
        host = parts.hostname
    except ValueError as exc:
        return f"unparseable URL: {exc}"
    if parts.scheme.lower() not in FETCHABLE_SCHEMES:
        return f"scheme {parts.scheme.lower() or 'none'!r} refused: only http(s) URLs are fetched"
    if not host:
        return "no host in URL"
    return None


def _read_table(path: str, fmt: str, cfg: UrlIngestConfig, malformed: list[tuple[str, str]]):
    """The list as a pyarrow table of strings; rows the parser cannot split go to `malformed`."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    from pipeline.data.shards import filesystem

    fs, inner = filesystem(path)
    if fmt == "parquet":
        with fs.open_input_file(inner) as fh:
            return pq.read_table(fh)
    with fs.open_input_stream(inner, compression="detect") as stream:
        if fmt == "txt":
            lines = [ln.strip() for ln in stream.read().decode("utf-8", errors="replace").splitlines()]
            return pa.table({cfg.url_col: [ln for ln in lines if ln and not ln.startswith("#")]})
        if fmt == "jsonl":
            return pajson.read_json(stream)

        def keep_invalid(row) -> str:
            malformed.append(
                (
                    row.text[:500],
                    f"malformed row {row.number}: expected {row.expected_columns} columns, got {row.actual_columns}",
                )
            )
            return "skip"

        text_cols = {c: pa.string() for c in (cfg.url_col, cfg.caption_col) if c}
        return pacsv.read_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=list(cfg.columns) or None, use_threads=False),
            # TSV has no quoting convention: CC12M captions contain bare quotes.
            parse_options=pacsv.ParseOptions(
                delimiter="\t" if fmt == "tsv" else ",",
                quote_char=False if fmt == "tsv" else '"',
                invalid_row_handler=keep_invalid,
            ),
            convert_options=pacsv.ConvertOptions(column_types=text_cols, strings_can_be_null=True),
        )


def read_url_list(path: str, cfg: UrlIngestConfig) -> UrlList:
    """Split the list at `path` into fetchable rows and refused (`bad_url`) manifest rows."""
    import pyarrow.fs as pafs

    from pipeline.data.shards import filesystem

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise FileNotFoundError(f"ingest.input: url list not found: {path}")
    fmt = cfg.input_format or detect_format(path)
    if fmt not in FORMATS:
        raise ConfigError(f"ingest.cc12m.input_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    malformed: list[tuple[str, str]] = []
    table = _read_table(path, fmt, cfg, malformed)
    hint = (
        " (a headerless TSV such as cc12m.tsv needs ingest.cc12m.columns=[url,caption])"
        if fmt in ("tsv", "csv") and not cfg.columns
        else ""
    )
    if cfg.url_col not in table.column_names:
        raise ConfigError(
            f"ingest.cc12m.url_col: no column {cfg.url_col!r} in {path}; columns: {table.column_names}{hint}"
        )
    if fmt != "txt" and cfg.caption_col and cfg.caption_col not in table.column_names:
        raise ConfigError(
            f"ingest.cc12m.caption_col: no column {cfg.caption_col!r} in {path}; columns: {table.column_names} (set it "
            f"to '' for a list without captions){hint}"
        )
    urls = table.column(cfg.url_col).to_pylist()
    captions = (
        table.column(cfg.caption_col).to_pylist() if cfg.caption_col in table.column_names else [None] * len(urls)
    )

    out = UrlList()
    for index, (url, caption) in enumerate(zip(urls, captions)):
        key = f"{index:09d}"
        why = refusal(url)
        if why:
            out.refused.append({"key": key, "input": "" if url is None else str(url), "status": BAD_URL, "detail": why})
        else:
            out.keys.append(key)
            out.urls.append(str(url).strip())
            out.captions.append("" if caption is None else str(caption))
    for offset, (text, detail) in enumerate(malformed):
        out.refused.append({"key": f"{len(urls) + offset:09d}", "input": text, "status": BAD_URL, "detail": detail})
    return out
