"""Fleet versions and run work dirs on any fsspec filesystem (local path, ``memory://``, ``s3://``).

Layout (see ``docs/storage.md``)::

    <store>/<fleet>/versions/<version_id>/backbone.safetensors
                                         heads/part-00000.parquet ...   (sorted by campaign_id)
                                         rejects.parquet
                                         report.html                    (optional: the run report)
                                         manifest.json                  (written last)
    <store>/<fleet>/runs/<run_id>/plan.json, backbone.safetensors ...   (RunDir: every name in it)
                                  <stage>/<shard>.parquet
                                  <stage>/_done/<shard>                 (written after the data)

A version without ``manifest.json`` does not exist for readers; a committed version is never
rewritten. Everything goes through fsspec: nothing touches the driver's local disk unless the
store itself is a local path.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from fleet.core.constants import (
    ENV_STORAGE_OPTIONS,
    ENV_STORE_ROOT,
    HEADS_FORMAT,
    NAME_PATTERN,
    REJECTS_FORMAT,
    VERSION_FORMAT,
)
from fleet.core.errors import StoreError
from fleet.core.ids import validate_campaign_id
from fleet.core.jsonobj import parse_json_object
from fleet.core.redact import scrub, scrub_obj, secret_values
from fleet.formats.codec import (
    REJECTS_SCHEMA,
    HeadRow,
    block_spans,
    check_format,
    check_head_row,
    check_heads_format,
    conform_heads_table,
    head_row_at,
    rejects_to_table,
    validate_heads_table,
)

MANIFEST = "manifest.json"
BACKBONE = "backbone.safetensors"
REJECTS = "rejects.parquet"
#: The version's run report (``fleet.versions.report``): one self-contained HTML page, listed and checksummed in the
#: manifest like every other file; optional (versions written before it, or by other writers, lack it).
REPORT = "report.html"
HEADS_DIR = "heads"

_HASH_CHUNK = 8 * 2**20
#: Names of the temporary files :func:`_put` writes on a local disk before renaming them.
_TEMP_RE = re.compile(r"\..+\.tmp-[0-9a-f]{32}")
#: A temporary file of :func:`_put` older than this belongs to an interrupted write, not a live one
#: (one ``_put`` is one write of bytes already in memory): :func:`remove_stale_temp_files` deletes it.
TEMP_FILE_MAX_AGE_S = 15 * 60
#: Parquet footer tail: a 4-byte little-endian footer length, then the magic ``PAR1``.
_PARQUET_TAIL = 8
# Statistics only where they help a reader prune; binary columns would just bloat the footer.
_STATS_COLUMNS = ["campaign_id", "bits", "group_size", "status"]
# Dictionary encoding only for columns whose values repeat: a dictionary of unique values (ids, codes, hashes,
# figures) stores each one twice. Float columns are byte-stream split (their sign/exponent bytes then compress).
# Measured on the 100,000-user version's heads (docs/storage.md): 180.6 -> 151.6 bytes per head, lossless.
_DICTIONARY_COLUMNS = ["bits", "group_size", "status", "shape", "codec", "split"]
#: zstd level of the store's Parquet files, versions and work dirs (6: 100,000 heads in 0.4 s; 9 saves 1 byte a head
#: for 1.5x the time).
PARQUET_ZSTD_LEVEL = 6


# ----------------------------------------------------------------------------- helpers


def relocated(manifest_uri: str, store_root: str | None = None) -> str:
    """``manifest_uri`` (``<store>/<fleet>/versions/<id>/manifest.json``) under ``store_root`` (default:
    ``$FLEET_STORE_ROOT``): ``<store_root>/<fleet>/versions/<id>/manifest.json``; unchanged when no root is set.

    A version's files are named relative to its manifest, so a copied or moved store is served from its new
    root by this one substitution; a reader that checks the manifest's sha256 still refuses another version.
    """
    root = os.environ.get(ENV_STORE_ROOT) if store_root is None else store_root
    if not root:
        return manifest_uri
    parts = manifest_uri.rstrip("/").rsplit("/", 4)
    if len(parts) != 5 or parts[2] != "versions" or parts[4] != MANIFEST:
        raise StoreError(
            f"cannot relocate {manifest_uri!r} under ${ENV_STORE_ROOT}: not <store>/<fleet>/versions/<id>/{MANIFEST}",
            path=manifest_uri,
        )
    return "/".join([root.rstrip("/"), *parts[1:]])


def storage_options_from_env(env_name: str = ENV_STORAGE_OPTIONS) -> dict | None:
    """fsspec storage options from ``$env_name`` (a JSON object), or None if unset."""
    text = os.environ.get(env_name)
    if not text:
        return None
    return parse_json_object(text, f"${env_name}")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def teachers_digest(pairs) -> str:
    """Hex sha256 over ``(campaign_id, teacher_sha256)`` pairs sorted by campaign id: the UTF-8
    lines ``"<campaign_id>\\t<teacher sha256 hex>\\n"``. ``teacher_sha256`` may be raw bytes or hex."""
    h = hashlib.sha256()
    for cid, sha in sorted(pairs):
        h.update(f"{cid}\t{sha.hex() if isinstance(sha, bytes) else sha}\n".encode())
    return h.hexdigest()


def join_uri(base: str, *parts: str) -> str:
    """Join ``base`` (a path or URI) and relative ``parts`` with ``/``: ``join_uri("s3://b/x/", "v")``
    is ``"s3://b/x/v"``."""
    stripped = base.rstrip("/")
    out = stripped if stripped and not stripped.endswith(":") else base  # keep "memory://", "/"
    for part in parts:
        part = part.strip("/")
        if part:
            out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute (Ray workers may run elsewhere than the driver's cwd)."""
    return uri if "://" in uri else os.path.abspath(uri)


def open_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``uri`` (wraps :func:`fsspec.core.url_to_fs`)."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise StoreError(f"invalid {kind} {value!r}: must match ^{NAME_PATTERN.pattern}$")
    return value


def _check_relpath(kind: str, value: str) -> str:
    """A relative path of ``/``-separated names (no ``..``, no absolute path, no URI)."""
    if not isinstance(value, str) or not value:
        raise StoreError(f"invalid {kind} {value!r}")
    for segment in value.split("/"):
        _check_name(kind, segment)
    return value


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` as one object. An object-store put is atomic; on a local disk we
    write a temporary file and rename it, so a crash never leaves a half-written marker/manifest."""
    if _is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def remove_stale_temp_files(
    store_uri: str, fleet: str, storage_options: dict | None = None, max_age_s: float = TEMP_FILE_MAX_AGE_S
) -> list[str]:
    """Delete the temporary files (``.<name>.tmp-<hex>``) that interrupted local writes left anywhere
    under ``<store_uri>/<fleet>/`` (versions and run work dirs), when older than ``max_age_s`` seconds
    (a younger one may belong to a write in progress). Returns the paths removed. Object stores
    have no temporary files (a put is atomic): nothing to do there."""
    fs, root = open_fs(join_uri(store_uri, _check_name("fleet name", fleet)), storage_options)
    if not _is_local(fs) or not os.path.isdir(root):
        return []
    now, removed = datetime.now(timezone.utc).timestamp(), []
    for parent, _, names in os.walk(root):
        for name in names:
            path = os.path.join(parent, name)
            if _TEMP_RE.fullmatch(name) and now - os.path.getmtime(path) > max_age_s:
                os.remove(path)
                removed.append(path)
    return removed


def _cat(fs, path: str, uri: str, missing: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StoreError(missing, path=uri) from None


def _exists(fs, path: str) -> bool:
    fs.invalidate_cache(path)  # another process may have written it since we last listed
    return fs.exists(path)


def json_safe(obj: Any) -> Any:
    """A JSON-ready copy: non-finite floats become ``null`` (JSON has no NaN), tuples lists, numpy/torch
    scalars Python numbers, bytes hex strings, other objects their ``str``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return json_safe(obj.item())
    return str(obj)


def _json_bytes(obj: Any, uri: str) -> bytes:
    try:
        return json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise StoreError(f"cannot write JSON: {err}", path=uri) from None


# Parquet is parsed on the calling thread, from bytes already in memory (or, for a sparse row-group read, a
# Python file object read without pre-buffering): never on Arrow's IO or CPU thread pools. A pool thread
# that holds the last reference to a buffer wrapping a Python object (bytes, or a Python file's read) must
# take the GIL to free it; when that happens after the interpreter began to exit, CPython ends the thread
# with pthread_exit, whose forced unwind through Arrow's noexcept code calls std::terminate: "terminate
# called without an active exception", exit 134 (issue 13, seen in `fleet inspect` with torch loaded,
# which holds the GIL through its exit). tests/test_cli.py checks that reading a version starts no thread.


def read_parquet_bytes(
    data: bytes, *, columns: Sequence[str] | None = None, page_checksum_verification: bool = False
) -> pa.Table:
    """The table of a Parquet file held in ``data`` (only ``columns`` when given), decoded on the calling
    thread (no Arrow thread pool)."""
    return pq.ParquetFile(
        pa.BufferReader(data), page_checksum_verification=page_checksum_verification, pre_buffer=False
    ).read(columns=None if columns is None else list(columns), use_threads=False)


def read_parquet_metadata(data: bytes) -> pq.FileMetaData:
    """The footer of a Parquet file (``data``: the whole file, or ``PAR1`` + its footer span)."""
    return pq.read_metadata(pa.BufferReader(data))


#: Rows per heads row group. A cold lookup reads one group (~100 kB at ~100 B a head); bigger groups
#: compress better and shrink the footer every server keeps per part. Measured on 1M simulated heads
#: (docs/storage.md): 256 -> 1024 rows cut 125 -> 105 bytes per campaign and serving RSS by ~20 MB,
#: with no worse cold-lookup latency.
HEADS_ROW_GROUP_ROWS = 1024


def _parquet_bytes(table: pa.Table, row_group_size: int, group_sizes: list[int] | None = None) -> bytes:
    """Parquet bytes of ``table``: row groups of ``row_group_size`` rows, or exactly ``group_sizes``."""
    buf = io.BytesIO()
    options = {
        "compression": "zstd",
        "compression_level": PARQUET_ZSTD_LEVEL,
        "use_dictionary": [c for c in _DICTIONARY_COLUMNS if c in table.column_names],
        "use_byte_stream_split": [f.name for f in table.schema if pa.types.is_floating(f.type)],
        "write_statistics": [c for c in _STATS_COLUMNS if c in table.column_names],
        "write_page_checksum": True,
    }  # CRC32 per page, checked on read (page_checksum_verification)
    if group_sizes is None:
        pq.write_table(table, buf, row_group_size=row_group_size, **options)
        return buf.getvalue()
    with pq.ParquetWriter(buf, table.schema, **options) as writer:
        offset = 0
        for size in group_sizes:  # one write_table call = one row group of exactly `size` rows
            writer.write_table(table.slice(offset, size), row_group_size=size)
            offset += size
    return buf.getvalue()


def _pack_spans(spans: list[int], limit: int) -> list[list[int]]:
    """Greedy groups of consecutive ``spans`` (sizes) of at most ``limit`` rows each (a larger span alone)."""
    groups: list[list[int]] = []
    total = 0
    for size in spans:
        if groups and total + size <= limit:
            groups[-1].append(size)
            total += size
        else:
            groups.append([size])
            total = size
    return groups


def _span(data: bytes, offset: int, size: int) -> dict:
    """``{"offset", "bytes", "sha256"}`` of ``data[offset:offset + size]`` (a manifest checksum entry)."""
    return {"offset": offset, "bytes": size, "sha256": sha256_bytes(data[offset : offset + size])}


def _parquet_checksums(data: bytes, meta: pq.FileMetaData) -> tuple[dict, list[dict]]:
    """The footer span (footer + length + magic) and each row group's span (from its first column
    chunk's first page to its last chunk's end) of a Parquet file, with their sha256."""
    footer_size = int.from_bytes(data[-_PARQUET_TAIL:-4], "little") + _PARQUET_TAIL
    groups = [_span(data, *_row_group_range(meta, i)) for i in range(meta.num_row_groups)]
    return _span(data, len(data) - footer_size, footer_size), groups


def _row_group_range(meta: pq.FileMetaData, group: int) -> tuple[int, int]:
    """``(offset, size)`` of a row group's bytes: from its first column chunk's first page to its last chunk's end."""
    rg = meta.row_group(group)
    chunks = [rg.column(j) for j in range(rg.num_columns)]
    starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
    end = max(s + c.total_compressed_size for s, c in zip(starts, chunks))
    return min(starts), end - min(starts)


class _RangeFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only ``data`` at ``offset`` is present: Parquet
    decodes a row group from its verified bytes alone; a read outside them raises OSError."""

    def __init__(self, size: int, offset: int, data: bytes):
        super().__init__()
        self._size, self._offset, self._data, self._pos = size, offset, data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + pos
        return self._pos

    def readinto(self, buffer) -> int:
        start, n = self._pos - self._offset, len(buffer)
        if start < 0 or start + n > len(self._data):
            raise OSError(f"read of {n} bytes at {self._pos} lies outside the checked row group")
        buffer[:n] = self._data[start : start + n]
        self._pos += n
        return n


def _read_footer(f, size: int) -> bytes:
    """The footer span (footer + its 4-byte length + ``PAR1``) of the Parquet file ``f`` of ``size`` bytes."""
    f.seek(size - _PARQUET_TAIL)
    tail = f.read(_PARQUET_TAIL)
    if len(tail) != _PARQUET_TAIL or tail[4:] != b"PAR1":
        raise OSError("not a Parquet file (no PAR1 at its end)")
    length = int.from_bytes(tail[:4], "little") + _PARQUET_TAIL
    if length > size:
        raise OSError(f"Parquet footer of {length} bytes in a file of {size}")
    f.seek(size - length)
    return f.read(length)


def created_at_now() -> str:
    """The current UTC time as a manifest's ``created_at``: fixed width, so it sorts as a string."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _versions_uri(store_uri: str, fleet: str) -> str:
    return join_uri(store_uri, _check_name("fleet name", fleet), "versions")


# ----------------------------------------------------------------------------- writer


class VersionWriter:
    """Writes one fleet version; nothing is visible to readers until :meth:`commit`.

    ``VersionWriter(store_uri, fleet, version_id)`` writes under
    ``<store_uri>/<fleet>/versions/<version_id>/``. Version ids must be unique per writer (e.g. a
    UTC timestamp + run id): a committed version is refused, two concurrent writers of the same
    uncommitted id are not detected. The manifest's ``config``, ``lineage`` and ``metrics`` and the
    rejects' reasons are scrubbed (:func:`fleet.core.redact.scrub`): URI credentials and the secret values
    of ``storage_options`` read ``***``.
    """

    def __init__(self, store_uri: str, fleet: str, version_id: str, storage_options: dict | None = None):
        self.fleet = _check_name("fleet name", fleet)
        self.version_id = _check_name("version id", version_id)
        self.uri = join_uri(_versions_uri(store_uri, fleet), version_id)
        self.manifest_uri = join_uri(self.uri, MANIFEST)
        self.fs, self._path = open_fs(self.uri, storage_options)
        self._secrets = secret_values(storage_options or {})
        self._files: dict[str, dict] = {}  # relative path -> {"path", "sha256", "bytes", ["rows"]}
        self._parts: list[dict] = []
        self._campaigns: dict = {"count": 0, "first": None, "last": None}
        self._teachers_sha256: str | None = None
        self._heads_format, self._heads_codec = HEADS_FORMAT, "packed"
        self._committed = False
        self._refuse_if_committed()

    def _refuse_if_committed(self) -> None:
        if self._committed or _exists(self.fs, self._p(MANIFEST)):
            raise StoreError(
                f"version {self.version_id!r} is already committed; versions are immutable", path=self.manifest_uri
            )

    def _p(self, rel: str) -> str:
        return join_uri(self._path, rel)

    def _write(self, rel: str, data: bytes, rows: int | None = None) -> None:
        self._refuse_if_committed()
        _put(self.fs, self._p(rel), data)
        entry = {"path": rel, "sha256": sha256_bytes(data), "bytes": len(data)}
        if rows is not None:
            entry["rows"] = rows
        self._files[rel] = entry

    def write_backbone(self, tensors: dict, metadata: dict[str, str] | None = None) -> None:
        """Write ``backbone.safetensors`` from a ``{name: torch.Tensor}`` dict and string metadata."""
        from safetensors.torch import (
            save,  # lazy: torch is only needed for the backbone
        )

        metadata = metadata or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise StoreError("backbone metadata must map str to str", path=join_uri(self.uri, BACKBONE))
        self.write_backbone_bytes(save(tensors, metadata=metadata))

    def write_backbone_bytes(self, data: bytes) -> None:
        """Write ``backbone.safetensors`` content as is (e.g. carried over from a parent version)."""
        self._write(BACKBONE, data)

    @property
    def files(self) -> dict[str, dict]:
        """The files written so far: relative path -> {"path", "sha256", "bytes", ["rows"]}."""
        return {k: dict(v) for k, v in self._files.items()}

    def write_heads(
        self, table: pa.Table, rows_per_part: int = 100_000, row_group_size: int = HEADS_ROW_GROUP_ROWS
    ) -> None:
        """Write the heads table as ``heads/part-NNNNN.parquet``: rows sorted by campaign id, part k
        holding a contiguous id range, row groups of ``row_group_size`` rows, zstd. Also records the
        part/row-group index for the manifest. Call once."""
        if self._parts:
            raise StoreError("write_heads called twice", path=self.uri)
        if rows_per_part < 1 or row_group_size < 1:
            raise StoreError("rows_per_part and row_group_size must be >= 1", path=self.uri)
        table = validate_heads_table(table)
        ids = table.column("campaign_id")
        n = table.num_rows
        v2 = "codec" in table.column_names  # fleet-heads/2.0: a bloomier block never straddles a row group
        self._heads_format = table.schema.metadata[b"format"].decode()
        self._heads_codec = (
            "bloomier" if v2 and pc.any(pc.equal(table.column("codec"), "bloomier")).as_py() else "packed"
        )
        if v2 and n:
            groups = [sum(g) for g in _pack_spans([size for _, size in block_spans(table)], row_group_size)]
            parts = _pack_spans(groups, rows_per_part)  # row group sizes of each part
        else:
            parts = [None] * len(range(0, max(n, 1), rows_per_part))  # an empty table still gets one (empty) part
        start = 0
        for k, group_sizes in enumerate(parts):
            size = rows_per_part if group_sizes is None else sum(group_sizes)
            part = table.slice(start, size)
            rel = f"{HEADS_DIR}/part-{k:05d}.parquet"
            data = _parquet_bytes(part, row_group_size, group_sizes)
            meta = read_parquet_metadata(data)
            firsts, offset = [], start
            for i in range(meta.num_row_groups if part.num_rows else 0):  # (an empty file has one empty group)
                firsts.append(ids[offset].as_py())
                offset += meta.row_group(i).num_rows
            footer, groups = _parquet_checksums(data, meta)
            self._write(rel, data, rows=part.num_rows)
            self._parts.append(
                {
                    "path": rel,
                    "rows": part.num_rows,
                    "first_campaign": firsts[0] if firsts else None,
                    "last_campaign": ids[start + part.num_rows - 1].as_py() if part.num_rows else None,
                    "row_groups": firsts,
                    "footer": footer,
                    "row_group_checksums": groups[: len(firsts)],
                }
            )
            start += part.num_rows
        if n:
            widest = pc.max(pc.list_flatten(table.column("shape"))).as_py()
            # num_params_max: the widest head row (larger than the backbone's head: the capacity ladder's heads)
            self._campaigns = {
                "count": n,
                "first": ids[0].as_py(),
                "last": ids[n - 1].as_py(),
                "num_params_max": widest,
            }
        self._teachers_sha256 = teachers_digest(zip(ids.to_pylist(), table.column("teacher_sha256").to_pylist()))

    def write_rejects(self, table: pa.Table) -> None:
        """Write ``rejects.parquet`` (``fleet-rejects/1``: campaign_id, stage, reason)."""
        try:
            table = table.select(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)
            reasons = [None if r is None else scrub(r, self._secrets) for r in table.column("reason").to_pylist()]
            table = table.set_column(
                REJECTS_SCHEMA.get_field_index("reason"),
                REJECTS_SCHEMA.field("reason"),
                pa.array(reasons, REJECTS_SCHEMA.field("reason").type),
            )
        except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise StoreError(
                f"rejects table does not match {REJECTS_FORMAT}: {err}", path=join_uri(self.uri, REJECTS)
            ) from None
        self._write(REJECTS, _parquet_bytes(table, 64 * 1024), rows=table.num_rows)

    def write_report(self, html: str) -> None:
        """Write ``report.html`` (the run report, :func:`fleet.versions.report.render_report`), UTF-8; before
        :meth:`commit`, so the manifest lists and checksums it."""
        self._write(REPORT, html.encode("utf-8"))

    def commit(
        self,
        config: dict | None = None,
        lineage: dict | None = None,
        metrics: dict | None = None,
        *,
        created_at: str | None = None,
    ) -> str:
        """Write ``manifest.json`` last (checksums of every file written, index, lineage) and return
        its URI. Needs :meth:`write_backbone` and :meth:`write_heads`; writes an empty rejects file
        if none was written. Refuses to overwrite a committed version."""
        self._refuse_if_committed()
        if BACKBONE not in self._files or not self._parts:
            raise StoreError("commit needs write_backbone() and write_heads() first", path=self.uri)
        if REJECTS not in self._files:
            self.write_rejects(rejects_to_table([]))
        for entry in self._files.values():  # the puts landed with the size we hashed
            size = self.fs.size(self._p(entry["path"]))
            if size != entry["bytes"]:
                raise StoreError(
                    f"wrote {entry['bytes']} bytes but found {size}", path=join_uri(self.uri, entry["path"])
                )
        lineage = {"parent_version": None, **(lineage or {})}
        given = lineage.setdefault("teachers_sha256", self._teachers_sha256)
        if given != self._teachers_sha256:
            raise StoreError("lineage.teachers_sha256 does not match the heads' teacher hashes", path=self.uri)
        manifest = {
            "format": VERSION_FORMAT,
            "fleet": self.fleet,
            "version_id": self.version_id,
            "created_at": created_at or created_at_now(),
            "heads_format": self._heads_format,
            "heads_codec": self._heads_codec,
            "files": [self._files[k] for k in sorted(self._files)],
            "config": scrub_obj(config or {}, self._secrets),
            "lineage": scrub_obj(lineage, self._secrets),
            "metrics": scrub_obj(metrics or {}, self._secrets),
            "campaigns": self._campaigns,
            "parts": self._parts,
        }
        _put(self.fs, self._p(MANIFEST), _json_bytes(manifest, self.manifest_uri))
        self._committed = True
        return self.manifest_uri


# ----------------------------------------------------------------------------- reader


class FleetVersion:
    """A committed fleet version, opened with :meth:`FleetVersion.open`."""

    def __init__(
        self, uri: str, manifest: dict, fs: fsspec.AbstractFileSystem, path: str, manifest_bytes: bytes | None = None
    ):
        self.uri = uri
        self.manifest_uri = join_uri(uri, MANIFEST)
        self.manifest = manifest
        #: the manifest exactly as stored (what the registry's ``manifest_sha256`` tag hashes)
        self.manifest_bytes = manifest_bytes
        self.version_id: str = manifest["version_id"]
        self.fs = fs
        self._path = path
        self._files = {f["path"]: f for f in manifest["files"]}
        self._parts = [p for p in manifest["parts"] if p["rows"]]
        self._part_firsts = [p["first_campaign"] for p in self._parts]
        self._part_by_path = {p["path"]: p for p in self._parts}
        self._footers: dict[str, pq.FileMetaData] = {}  # part path -> parsed footer (one per part)

    @classmethod
    def open(
        cls, uri: str, storage_options: dict | None = None, verify: bool = True, *, manifest_sha256: str | None = None
    ) -> FleetVersion:
        """Open a version from its directory URI or its ``manifest.json`` URI.

        Refuses a version without manifest (never committed or still being written), an unknown
        major format, a manifest whose sha256 is not ``manifest_sha256`` (when given: the registry's
        tag), and (``verify=True``) any file whose size or sha256 differs from the manifest. With
        ``verify=False`` the files read whole (backbone, heads, rejects) are checked as they are read,
        and a point lookup checks the footer and row group it reads (:meth:`read_head_row`).
        """
        uri = uri.rstrip("/")
        if uri.endswith("/" + MANIFEST):
            uri = uri[: -len(MANIFEST) - 1]
        fs, path = open_fs(uri, storage_options)
        manifest_uri = join_uri(uri, MANIFEST)
        raw = _cat(
            fs,
            join_uri(path, MANIFEST),
            manifest_uri,
            f"version {uri} has no {MANIFEST}: it was never committed or is still being written",
        )
        if manifest_sha256 is not None and sha256_bytes(raw) != manifest_sha256:
            raise StoreError(
                f"manifest does not match the sha256 {manifest_sha256} recorded in the registry "
                f"(found {sha256_bytes(raw)}): it was changed or corrupted",
                path=manifest_uri,
            )
        try:
            manifest = json.loads(raw)
            fmt = manifest["format"]
        except (ValueError, KeyError, TypeError):
            raise StoreError("manifest is not a fleet-version JSON object", path=manifest_uri) from None
        check_format(fmt, VERSION_FORMAT, path=manifest_uri)
        check_heads_format(manifest.get("heads_format"), path=manifest_uri)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if manifest.get("version_id") != name:
            raise StoreError(
                f"manifest names version {manifest.get('version_id')!r} but lies in {name!r}", path=manifest_uri
            )
        try:
            for entry in manifest["files"] + manifest["parts"]:
                _check_relpath("file path", entry["path"])
            version = cls(uri, manifest, fs, path, raw)
        except (KeyError, TypeError, AttributeError):
            raise StoreError("manifest lacks files/parts entries of fleet-version/1", path=manifest_uri) from None
        if verify:
            version.verify()
        return version

    def verify(self) -> None:
        """Stream every file of the manifest and check its size and sha256 (raises the first
        problem of :meth:`file_problems` as :class:`StoreError`)."""
        problems = self.file_problems(first_only=True)
        if problems:
            raise problems[0]

    def file_problems(self, first_only: bool = False) -> list[StoreError]:
        """Stream every file of the manifest and return a :class:`StoreError` per file that is
        missing, unreadable or whose size or sha256 differs from the manifest (empty: all good)."""
        problems = []
        for rel in self._files:
            h, size = hashlib.sha256(), 0
            try:
                with self.fs.open(self._p(rel), "rb") as f:
                    while chunk := f.read(_HASH_CHUNK):
                        h.update(chunk)
                        size += len(chunk)
                self._check(rel, size, h.hexdigest())
            except FileNotFoundError:
                problems.append(StoreError("file listed in the manifest is missing", path=join_uri(self.uri, rel)))
            except OSError as err:
                problems.append(StoreError(f"cannot read: {err}", path=join_uri(self.uri, rel)))
            except StoreError as err:
                problems.append(err)
            if problems and first_only:
                break
        return problems

    @property
    def manifest_sha256(self) -> str | None:
        """Hex sha256 of ``manifest.json`` as stored (the registry's ``manifest_sha256`` tag)."""
        return None if self.manifest_bytes is None else sha256_bytes(self.manifest_bytes)

    def _p(self, rel: str) -> str:
        return join_uri(self._path, rel)

    def _check(self, rel: str, size: int, sha: str) -> None:
        entry = self._files[rel]
        if size != entry["bytes"] or sha != entry["sha256"]:
            raise StoreError(
                f"checksum mismatch: manifest says {entry['bytes']} bytes sha256 {entry['sha256']}, "
                f"found {size} bytes sha256 {sha}",
                path=join_uri(self.uri, rel),
            )

    def _read_verified(self, rel: str) -> bytes:
        if rel not in self._files:
            raise StoreError("file is not listed in the manifest", path=join_uri(self.uri, rel))
        data = _cat(self.fs, self._p(rel), join_uri(self.uri, rel), "file listed in the manifest is missing")
        self._check(rel, len(data), sha256_bytes(data))
        return data

    def read_backbone_bytes(self) -> bytes:
        """The verified content of ``backbone.safetensors``."""
        return self._read_verified(BACKBONE)

    def read_backbone(self) -> tuple[dict, dict[str, str]]:
        """Return ``(tensors, metadata)`` of ``backbone.safetensors`` (checksum verified; never pickle)."""
        from safetensors.torch import load

        data = self._read_verified(BACKBONE)
        n = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__", {})
        return load(data), metadata

    def read_heads(self) -> pa.Table:
        """Return all heads as one table sorted by campaign id (every part checksum verified), in this
        fleet's :data:`~fleet.formats.codec.HEADS_SCHEMA`: parts of an older minor version (``fleet-heads/1``
        = 1.0) read with the columns added since as nulls (:func:`~fleet.formats.codec.conform_heads_table`)."""
        return pa.concat_tables(list(self.iter_heads()))

    def iter_heads(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Each heads part in turn, in campaign id order, as :meth:`read_heads` reads them (every part's
        checksum verified, conformed to :data:`~fleet.formats.codec.HEADS_SCHEMA`); with ``columns`` (names of
        that schema) only those columns are decoded. One part in memory at a time, decoded on the calling
        thread (:func:`read_parquet_bytes`)."""
        for part in self.manifest["parts"]:
            rel, uri = part["path"], join_uri(self.uri, part["path"])
            data = self._read_verified(rel)
            try:
                table = read_parquet_bytes(data, columns=columns, page_checksum_verification=True)
            except (OSError, ValueError, pa.ArrowException) as err:
                raise StoreError(f"cannot read heads part: {type(err).__name__}: {err}", path=uri) from None
            yield conform_heads_table(table, path=uri, columns=columns)

    def read_rejects(self) -> pa.Table:
        """Return ``rejects.parquet`` (campaign_id, stage, reason)."""
        return read_parquet_bytes(self._read_verified(REJECTS), page_checksum_verification=True)

    def read_report(self) -> bytes | None:
        """The verified bytes of ``report.html``, or None when the version has none (written before the run
        report existed, or by a writer that wrote none)."""
        return self._read_verified(REPORT) if REPORT in self._files else None

    def locate(self, campaign_id: str) -> tuple[str, int] | None:
        """Return ``(part path relative to the version, row group index)`` whose id range could
        hold ``campaign_id``, found by binary search over the manifest index (no file is opened),
        or None if no part covers it. A hit is a candidate: the id may still be absent.
        Raises :class:`InvalidCampaignIdError` for an invalid id."""
        validate_campaign_id(campaign_id)
        k = bisect.bisect_right(self._part_firsts, campaign_id) - 1
        if k < 0 or campaign_id > self._parts[k]["last_campaign"]:
            return None
        part = self._parts[k]
        return part["path"], bisect.bisect_right(part["row_groups"], campaign_id) - 1

    def read_head_row(self, campaign_id: str) -> HeadRow | None:
        """Read one campaign's head by range-reading ONE row group of one part, or None if absent.
        Raises :class:`InvalidCampaignIdError` for an invalid id, :class:`StoreError` when the part
        is missing or unreadable, fails a checksum, or holds a row that breaks the heads contract
        (:func:`~fleet.formats.codec.check_head_row`): never a wrong row.

        A ``fleet-version/1.1`` manifest holds the sha256 of each part's footer (read once, checked,
        then cached) and of each row group: the bytes of the row group are read in one ranged read and
        checked before they are decoded. Older manifests rely on the Parquet page checksums."""
        loc = self.locate(campaign_id)
        if loc is None:
            return None
        rel, group = loc
        uri = join_uri(self.uri, rel)
        try:
            table = self._read_row_group(rel, group)
            ids = table.column("campaign_id").to_pylist()
            i = bisect.bisect_left(ids, campaign_id)
            if i == len(ids) or ids[i] != campaign_id:
                return None
            row = head_row_at(table, i)  # a bloomier row comes with its block (first row of the block)
        except StoreError as err:
            raise StoreError(err.reason, campaign_id=campaign_id, path=err.path or uri) from None
        except FileNotFoundError:
            raise StoreError("file listed in the manifest is missing", campaign_id=campaign_id, path=uri) from None
        except (OSError, EOFError, ValueError, TypeError, KeyError, pa.ArrowException) as err:
            raise StoreError(
                f"cannot read row group {group}: {type(err).__name__}: {err}", campaign_id=campaign_id, path=uri
            ) from None
        check_head_row(row)
        return row

    def _read_row_group(self, rel: str, group: int) -> pa.Table:
        """One row group of a heads part, from one ranged read of its bytes (after the part's footer, read
        once and cached), decoded on this thread: never a read ahead on Arrow's IO pool (see
        :func:`read_parquet_bytes`)."""
        part = self._part_by_path[rel]
        path = self._p(rel)
        checksums = part.get("row_group_checksums")  # absent from a fleet-version/1.0 manifest
        size = self._files[rel]["bytes"]
        with self.fs.open(path, "rb", cache_type="none") as f:
            if rel not in self._footers:
                footer = self._read_span(f, rel, part["footer"], "footer") if checksums else _read_footer(f, size)
                self._footers[rel] = read_parquet_metadata(b"PAR1" + footer)
            if checksums:
                offset = checksums[group]["offset"]
                data = self._read_span(f, rel, checksums[group], f"row group {group}")
            else:  # 1.0: checked by nothing but the Parquet page checksums
                offset, length = _row_group_range(self._footers[rel], group)
                f.seek(offset)
                data = f.read(length)
        pf = pq.ParquetFile(
            _RangeFile(size, offset, data),
            metadata=self._footers[rel],
            pre_buffer=False,
            page_checksum_verification=True,
        )
        return pf.read_row_group(group, use_threads=False)

    def _read_span(self, f, rel: str, entry: dict, what: str) -> bytes:
        """Read the byte range of a manifest checksum entry from the open file ``f`` and check it."""
        f.seek(entry["offset"])
        data = f.read(entry["bytes"])
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            raise StoreError(
                f"checksum mismatch in the {what}: manifest says {entry['bytes']} bytes sha256 "
                f"{entry['sha256']} at offset {entry['offset']}, found {len(data)} bytes sha256 "
                f"{sha256_bytes(data)}",
                path=join_uri(self.uri, rel),
            )
        return data

    def __repr__(self) -> str:
        return f"FleetVersion({self.uri!r}, campaigns={self.manifest['campaigns']['count']})"


def list_versions(store_uri: str, fleet: str, storage_options: dict | None = None) -> list[str]:
    """Committed version ids of ``fleet`` (those with a manifest), sorted by created_at then id."""
    uri = _versions_uri(store_uri, fleet)
    fs, path = open_fs(uri, storage_options)
    fs.invalidate_cache(path)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    candidates = [join_uri(path, n, MANIFEST) for n in names if NAME_PATTERN.fullmatch(n)]
    found = []
    for p in candidates:
        try:
            raw = fs.cat_file(p)
        except FileNotFoundError:
            continue  # not committed (yet): invisible
        version_id = p.rsplit("/", 2)[-2]
        try:
            created_at = json.loads(raw)["created_at"]
        except (ValueError, KeyError, TypeError):
            raise StoreError(
                "manifest is not a fleet-version JSON object", path=join_uri(uri, version_id, MANIFEST)
            ) from None
        found.append((str(created_at), version_id))
    return [v for _, v in sorted(found)]


# ----------------------------------------------------------------------------- run work dir


#: The names in a run's work dir (docs/storage.md, "Run work dirs"), each read and written by one method of
#: :class:`RunDir`; its backbone is :data:`BACKBONE`, as in a version.
PLAN = "plan.json"
MLFLOW_RUN = "mlflow_run.json"
BACKBONE_STATS = "backbone_stats.json"
BACKBONE_PROGRESS = "backbone_progress.json"
RAY_TRAIN = "ray_train"
#: The work dir's shard sets (:class:`ShardSet`), one folder each.
SOFT_LABELS_SHARDS = "soft_labels"
CAMPAIGNS_SHARDS = "campaigns"
BACKBONE_SAMPLE_SHARDS = "backbone_sample"
HEADS_SHARDS = "heads"
BORROWED_POOL_SHARDS = "borrowed_pool"  # one shard, of the same name


class ShardSet:
    """One stage's shards in a run work dir, ``<stage>/<shard>.parquet``.

    A shard is done once its marker ``<stage>/_done/<shard>`` exists; the marker is written after
    the data and holds its size and sha256, so a crash between the two only redoes the shard.
    """

    def __init__(self, run_dir: RunDir, stage: str):
        self._dir, self.stage = run_dir, _check_name("stage", stage)

    def _rel(self, shard: str) -> tuple[str, str]:
        _check_name("shard", shard)
        return f"{self.stage}/{shard}.parquet", f"{self.stage}/_done/{shard}"

    def is_done(self, shard: str) -> bool:
        """Whether ``shard`` was completely written."""
        return _exists(self._dir.fs, self._dir._p(self._rel(shard)[1]))

    def done(self) -> set[str]:
        """Names of the shards that are done (one listing)."""
        path = self._dir._p(f"{self.stage}/_done")
        self._dir.fs.invalidate_cache(path)
        try:
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in self._dir.fs.ls(path, detail=False)}
        except FileNotFoundError:
            return set()

    def write(self, shard: str, table: pa.Table, row_group_size: int = 64 * 1024) -> None:
        """Write the shard's Parquet, then its done marker."""
        data_rel, marker_rel = self._rel(shard)
        data = _parquet_bytes(table, row_group_size)
        _put(self._dir.fs, self._dir._p(data_rel), data)
        marker = {"sha256": sha256_bytes(data), "bytes": len(data), "rows": table.num_rows}
        _put(self._dir.fs, self._dir._p(marker_rel), _json_bytes(marker, join_uri(self._dir.uri, marker_rel)))

    def read(self, shard: str) -> pa.Table:
        """Read a done shard, checked against the size and sha256 in its marker."""
        data_rel, marker_rel = self._rel(shard)
        fs, uri = self._dir.fs, join_uri(self._dir.uri, data_rel)
        marker = json.loads(_cat(fs, self._dir._p(marker_rel), uri, f"shard {self.stage}/{shard} is not done"))
        data = _cat(
            fs, self._dir._p(data_rel), uri, f"shard {self.stage}/{shard} is marked done but its data is missing"
        )
        if len(data) != marker["bytes"] or sha256_bytes(data) != marker["sha256"]:
            raise StoreError("checksum mismatch with the shard's done marker", path=uri)
        return read_parquet_bytes(data)

    def read_all(self, shards: Sequence[str]) -> pa.Table:
        """The done ``shards``, in order, as one table (a column an older shard lacks reads as nulls)."""
        return pa.concat_tables([self.read(s) for s in shards], promote_options="default")


class RunDir:
    """A run's work dir ``<store>/<fleet>/runs/<run_id>/``: what the stages of one ``fleet compress``
    hand to each other, so that a resumed run redoes only what is missing (docs/storage.md).

    Every intermediate has its reader and writer here (the plan, the MLflow run, the backbone with its
    stats and training progress, the borrowed pool) or is a :class:`ShardSet` (stage 1's soft labels,
    campaigns and backbone sample; stage 3's heads). A ``RunDir`` pickles as its arguments (a Ray task
    opens the same work dir).
    """

    def __init__(self, store_uri: str, fleet: str, run_id: str, storage_options: dict | None = None):
        self._args = (store_uri, fleet, run_id, storage_options)
        self.uri = join_uri(store_uri, _check_name("fleet name", fleet), "runs", _check_name("run id", run_id))
        self.fs, self._path = open_fs(self.uri, storage_options)

    def __reduce__(self):
        return RunDir, self._args

    def _p(self, rel: str) -> str:
        return join_uri(self._path, rel)

    # the run's intermediates

    @property
    def soft_labels(self) -> ShardSet:
        """Stage 1's soft labels (``fleet.run.stages.SOFT_LABELS_SCHEMA``), a batch's last shard: when it is done,
        the batch's stage 1 is."""
        return ShardSet(self, SOFT_LABELS_SHARDS)

    @property
    def campaigns(self) -> ShardSet:
        """Stage 1's verdict per campaign (status, hashes, rows, teacher bytes)."""
        return ShardSet(self, CAMPAIGNS_SHARDS)

    @property
    def backbone_sample(self) -> ShardSet:
        """Stage 1's rows of each batch that stage 2 trains the backbone on."""
        return ShardSet(self, BACKBONE_SAMPLE_SHARDS)

    @property
    def heads(self) -> ShardSet:
        """Stage 3's heads rows."""
        return ShardSet(self, HEADS_SHARDS)

    @property
    def plan_uri(self) -> str:
        """Where the plan is (for messages)."""
        return join_uri(self.uri, PLAN)

    def has_plan(self) -> bool:
        """Whether the run was planned."""
        return self.exists(PLAN)

    def read_plan(self) -> dict:
        """The plan's JSON object (``fleet.run.plan.Plan.read`` makes it a ``Plan``)."""
        return self.read_json(PLAN)

    def write_plan(self, plan: dict) -> None:
        """Write the plan's JSON object."""
        self.write_json(PLAN, plan)

    def read_mlflow_run(self) -> dict | None:
        """``{"run_id", "tracking_uri"}`` of the compress's MLflow run, or None before it started."""
        return self.read_json(MLFLOW_RUN) if self.exists(MLFLOW_RUN) else None

    def write_mlflow_run(self, run_id: str, tracking_uri: str) -> None:
        """Record the compress's MLflow run (``tracking_uri`` already scrubbed of credentials)."""
        self.write_json(MLFLOW_RUN, {"run_id": run_id, "tracking_uri": tracking_uri})

    def has_backbone(self) -> bool:
        """Whether stage 2 wrote the backbone."""
        return self.exists(BACKBONE)

    def read_backbone(self) -> bytes:
        """The backbone's ``backbone.safetensors`` content."""
        return self.read_bytes(BACKBONE)

    def write_backbone(self, data: bytes) -> None:
        """Write the backbone's ``backbone.safetensors`` content."""
        self.write_bytes(BACKBONE, data)

    def read_backbone_stats(self) -> dict | None:
        """Stage 2's training stats, or None when it trained none (an inherited backbone)."""
        return self.read_json(BACKBONE_STATS) if self.exists(BACKBONE_STATS) else None

    def write_backbone_stats(self, stats: dict) -> None:
        """Write stage 2's training stats."""
        self.write_json(BACKBONE_STATS, stats)

    def read_backbone_progress(self) -> dict:
        """The latest progress record of the backbone's training (:class:`StoreError` before the first)."""
        return self.read_json(BACKBONE_PROGRESS)

    def write_backbone_progress(self, record: dict) -> None:
        """Replace the backbone's training progress record."""
        self.write_json(BACKBONE_PROGRESS, record)

    def has_borrowed_pool(self) -> bool:
        """Whether the run's borrowed pool was written."""
        return ShardSet(self, BORROWED_POOL_SHARDS).is_done(BORROWED_POOL_SHARDS)

    def read_borrowed_pool(self) -> pa.Table:
        """The run's borrowed pool (``fleet.run.stages.borrowed_pool``)."""
        return ShardSet(self, BORROWED_POOL_SHARDS).read(BORROWED_POOL_SHARDS)

    def write_borrowed_pool(self, pool: pa.Table) -> None:
        """Write the run's borrowed pool."""
        ShardSet(self, BORROWED_POOL_SHARDS).write(BORROWED_POOL_SHARDS, pool)

    def ray_train_storage(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """``(filesystem, path)`` of the folder where Ray Train keeps its checkpoints."""
        return self.fs, self._p(RAY_TRAIN)

    # objects by relative name: what the methods above are made of

    def exists(self, name: str) -> bool:
        """Whether the object ``name`` (relative path) exists in the work dir."""
        return _exists(self.fs, self._p(_check_relpath("work dir name", name)))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` (relative path of ``[A-Za-z0-9_.-]`` names) in one put."""
        _put(self.fs, self._p(_check_relpath("work dir name", name)), data)

    def read_bytes(self, name: str) -> bytes:
        """Read ``name``; :class:`StoreError` if it does not exist."""
        rel = _check_relpath("work dir name", name)
        return _cat(self.fs, self._p(rel), join_uri(self.uri, rel), "no such object in the run work dir")

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as JSON to ``name`` (non-finite floats become null)."""
        self.write_bytes(name, _json_bytes(obj, join_uri(self.uri, name)))

    def read_json(self, name: str) -> Any:
        """Read the JSON object ``name``."""
        return json.loads(self.read_bytes(name))


__all__ = [
    "FleetVersion",
    "RunDir",
    "ShardSet",
    "VersionWriter",
    "join_uri",
    "list_versions",
    "open_fs",
    "remove_stale_temp_files",
    "sha256_bytes",
    "teachers_digest",
]
