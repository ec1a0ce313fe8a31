"""Packed teachers (``fleet-teacher-pack/1``) and the batched teacher pass (torch math apart from I/O).

A pack holds many teachers of one architecture: ``<root>/packs/<pack>/config.json`` (the shared config:
``fleet-teacher/1``'s minus ``campaign_id``), ``weights.safetensors`` (every tensor of the module's
``state_dict`` stacked on a leading slot axis ``[K, ...]``) and ``index.parquet`` (``campaign_id``,
``slot``, ``sha256`` of that campaign's slices). A teacher root may hold campaign directories, packs, or
both (:func:`locate_teachers`). A campaign's slices are read by byte range, so a stage-1 batch reads
only its own slots, and each slot is checked like a directory teacher: one bad slot quarantines its
campaign only.

The batched pass (:func:`teacher_logits`) runs reference :class:`~fleet.formats.teachers.TeacherRNN` teachers of
one architecture together: their parameters stacked ``[G, ...]``, every matrix product a grouped
``bmm`` over the ``G`` teachers (:func:`stacked_forward`, also what :mod:`fleet.synthetic.synth` trains per-user
teachers with). Custom teachers (a ``"loader"``) run one at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn

from fleet.compression.data import SequenceBatch, _bucket_bounds, map_minibatches
from fleet.core.constants import NAME_PATTERN, PACK_FORMAT, TEACHER_FORMAT
from fleet.core.errors import FleetError, TeacherFormatError
from fleet.formats.teachers import (
    CONFIG_FILE,
    LoadedTeacher,
    TeacherRNN,
    _check_symlinks,
    _protocols,
    build_teacher_model,
    load_teacher,
)

PACKS_DIR = "packs"  # <root>/packs/<pack>/: a teacher root's packs (so no campaign directory may be named so)
PACK_WEIGHTS_FILE = "weights.safetensors"
INDEX_FILE = "index.parquet"
DEFAULT_PACK_SIZE = 1024  # `fleet pack-teachers --pack-size`, `fleet synth --entities user --pack-size`
INDEX_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("slot", pa.int32(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)
_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
_ARCH_FIELDS = ("arch", "num_event_types", "embed_dim", "num_features", "hidden_size", "num_layers")
#: the batched pass evaluates at most this many (teacher x row x step) x width floats at once (memory bound)
STACKED_FLOAT_BUDGET = 1 << 25
STACKED_BATCH_ROWS = 128  # rows per teacher per round of the batched pass (length-sorted chunks)


@dataclass(frozen=True)
class PackSlot:
    """Where a packed campaign's teacher is: ``<root>/packs/<pack>``, slot ``slot``, slices' ``sha256``."""

    pack: str
    slot: int
    sha256: str


@dataclass
class TeacherCatalog:
    """Every campaign of a teacher root: ``campaigns`` (sorted), where each packed one is (``packed``) and
    the campaigns whose teacher is ambiguous (``conflicts``: a reason; in two packs, or a pack and a
    directory), which stage 1 quarantines."""

    campaigns: list[str]
    packed: dict[str, PackSlot] = field(default_factory=dict)
    conflicts: dict[str, str] = field(default_factory=dict)

    def plan_entries(self) -> dict[str, list]:
        """``{campaign: [pack, slot, sha256]}`` of the packed campaigns (JSON, for ``plan.json`` and jobs)."""
        return {c: [s.pack, s.slot, s.sha256] for c, s in self.packed.items()}


def _pack_uri(root_uri: str, pack: str) -> str:
    return f"{root_uri.rstrip('/')}/{PACKS_DIR}/{pack}"


def pack_config_uri(root_uri: str, pack: str) -> str:
    """URI of a pack's shared ``config.json``."""
    return f"{_pack_uri(root_uri, pack)}/{CONFIG_FILE}"


def locate_teachers(root_uri: str, storage_options: dict | None = None) -> TeacherCatalog:
    """List a teacher root: its campaign directories (one listing, no per-campaign request) and the
    campaigns of every pack's ``index.parquet`` (one read per pack). A pack whose index cannot be read
    stops the listing (:class:`TeacherFormatError` naming it): its campaigns are unknown."""
    fs, path = fsspec.core.url_to_fs(root_uri, **(storage_options or {}))
    if not fs.exists(path):
        raise TeacherFormatError("teacher root does not exist", path=root_uri)
    directories = set()
    has_packs = False
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" and not entry.get("islink"):
            continue  # a symlink is listed like a directory, so that load_teacher refuses (quarantines) it
        if name == PACKS_DIR and not entry.get("islink"):
            has_packs = True
        else:
            directories.add(name)
    places: dict[str, list[str]] = {c: ["a directory"] for c in directories}
    packed: dict[str, PackSlot] = {}
    if has_packs:
        packs = sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in fs.ls(f"{path}/{PACKS_DIR}", detail=True)
            if e.get("type") == "directory"
        )
        for pack in packs:
            for campaign_id, slot, sha in read_pack_index(root_uri, pack, storage_options):
                places.setdefault(campaign_id, []).append(f"pack {pack!r} slot {slot}")
                packed.setdefault(campaign_id, PackSlot(pack, slot, sha))
    conflicts = {c: f"teacher found in {' and in '.join(p)}; keep one" for c, p in places.items() if len(p) > 1}
    return TeacherCatalog(sorted(places), {c: s for c, s in packed.items() if c not in conflicts}, conflicts)


def read_pack_index(root_uri: str, pack: str, storage_options: dict | None = None) -> list[tuple[str, int, str]]:
    """``(campaign_id, slot, sha256)`` rows of a pack's ``index.parquet`` (ids not yet validated)."""
    uri = f"{_pack_uri(root_uri, pack)}/{INDEX_FILE}"
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    try:
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    except FileNotFoundError:
        raise TeacherFormatError("file is missing", path=uri) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise TeacherFormatError(f"not a readable Parquet file ({exc})", path=uri) from None
    missing = [f.name for f in INDEX_SCHEMA if f.name not in table.column_names]
    if missing:
        raise TeacherFormatError(f"index lacks column(s) {missing}", path=uri)
    try:
        table = table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise TeacherFormatError(f"index columns do not match {INDEX_SCHEMA} ({exc})", path=uri) from None
    return list(zip(*(table[k].to_pylist() for k in INDEX_SCHEMA.names)))


def slot_sha256(config_bytes: bytes, slices: dict[str, bytes]) -> str:
    """sha256 of one campaign's teacher in a pack: the pack's ``config.json`` bytes, ``\\0``, then for every
    tensor in name order its name, ``\\0`` and the raw (little-endian) bytes of its slice."""
    digest = hashlib.sha256(config_bytes + b"\0")
    for name in sorted(slices):
        digest.update(name.encode() + b"\0")
        digest.update(slices[name])
    return digest.hexdigest()


def pack_config(config: dict) -> dict:
    """The shared ``config.json`` of a pack of teachers with per-campaign config ``config``."""
    return {**{k: v for k, v in config.items() if k not in ("campaign_id", "format")}, "format": PACK_FORMAT}


def write_pack(
    root_uri: str,
    pack: str,
    config: dict,
    campaign_ids: Sequence[str],
    tensors: dict[str, torch.Tensor],
    storage_options: dict | None = None,
) -> list[str]:
    """Write pack ``pack``: ``tensors`` name -> ``[K, ...]`` (slot ``k`` is ``campaign_ids[k]``'s teacher),
    ``config`` a teacher config dict (``campaign_id`` and ``format`` are dropped). Weights first, then the
    index, ``config.json`` last (its presence means complete). Returns each slot's sha256."""
    for campaign_id in campaign_ids:
        if not isinstance(campaign_id, str) or not NAME_PATTERN.fullmatch(campaign_id):
            raise ValueError(f"invalid campaign id {campaign_id!r}")
    if len(set(campaign_ids)) != len(campaign_ids):
        raise ValueError("a campaign appears twice in one pack")
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    for name, tensor in tensors.items():
        if tensor.shape[0] != len(campaign_ids):
            raise ValueError(f"tensor {name!r} has {tensor.shape[0]} slots, not {len(campaign_ids)}")
    config_bytes = json.dumps(pack_config(config), indent=2, sort_keys=True).encode()
    shas = [
        slot_sha256(config_bytes, {n: t[k].numpy().tobytes() for n, t in tensors.items()})
        for k in range(len(campaign_ids))
    ]
    prefix = _pack_uri(root_uri, pack)
    fs, path = fsspec.core.url_to_fs(prefix, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/{PACK_WEIGHTS_FILE}", save_safetensors(tensors, metadata={"format": PACK_FORMAT}))
    index = pa.table(
        {"campaign_id": list(campaign_ids), "slot": list(range(len(campaign_ids))), "sha256": shas}, schema=INDEX_SCHEMA
    )
    sink = io.BytesIO()
    pq.write_table(index, sink)
    fs.pipe_file(f"{path}/{INDEX_FILE}", sink.getvalue())
    fs.pipe_file(f"{path}/{CONFIG_FILE}", config_bytes)
    return shas


def pack_complete(root_uri: str, pack: str, config: dict, storage_options: dict | None = None) -> bool:
    """Whether pack ``pack`` is completely written (its ``config.json``, written last, exists) with ``config``."""
    fs, path = fsspec.core.url_to_fs(pack_config_uri(root_uri, pack), **(storage_options or {}))
    return fs.exists(path) and json.loads(fs.cat_file(path)) == pack_config(config)


def load_teachers(
    root_uri: str,
    campaigns: Iterable[str],
    packed: dict[str, list] | None = None,
    storage_options: dict | None = None,
    *,
    allow_loaders: Iterable[str] = (),
    untrusted_roots: Iterable[str] = (),
    conflicts: dict[str, str] | None = None,
    unchanged: dict[str, str] | None = None,
) -> dict[str, LoadedTeacher | TeacherFormatError]:
    """Load the teachers of ``campaigns`` (valid ids): a packed one (``packed``: ``{campaign: [pack, slot,
    sha256]}``, :meth:`TeacherCatalog.plan_entries`) from its slot, read by byte range (one header read
    per pack), any other from its directory (:func:`fleet.formats.teachers.load_teacher`). A problem is returned
    as the campaign's :class:`TeacherFormatError` (naming campaign, file and, for a pack, the slot), never
    raised: the others still load.

    ``unchanged`` (``{campaign: sha256}``, an incremental run's parent hashes): a packed campaign whose index
    sha256 equals its entry there is not loaded: its :class:`LoadedTeacher` has ``model`` None and the pack's
    config (read and checked as for any slot), its slot's bytes from the weights header; its slices are
    neither read nor checked (a caller that then needs the model loads it without ``unchanged``)."""
    packed, conflicts, unchanged = packed or {}, conflicts or {}, unchanged or {}
    out: dict[str, LoadedTeacher | TeacherFormatError] = {}
    by_pack: dict[str, list[tuple[str, int, str, bool]]] = {}  # pack -> (campaign, slot, sha256, unchanged)
    for campaign_id in campaigns:
        if campaign_id in conflicts:
            out[campaign_id] = TeacherFormatError(conflicts[campaign_id], campaign_id=campaign_id, path=root_uri)
        elif campaign_id in packed:
            pack, slot, sha = packed[campaign_id]
            by_pack.setdefault(pack, []).append((campaign_id, int(slot), sha, unchanged.get(campaign_id) == sha))
        else:
            try:
                out[campaign_id] = load_teacher(
                    root_uri, campaign_id, storage_options, allow_loaders=allow_loaders, untrusted_roots=untrusted_roots
                )
            except TeacherFormatError as exc:
                out[campaign_id] = exc
    for pack, members in by_pack.items():
        out.update(
            _load_pack_slots(root_uri, pack, members, storage_options, tuple(allow_loaders), tuple(untrusted_roots))
        )
    return out


def _load_pack_slots(root_uri, pack, members, storage_options, allow_loaders, untrusted_roots):
    prefix = _pack_uri(root_uri, pack)
    config_uri, weights_uri = f"{prefix}/{CONFIG_FILE}", f"{prefix}/{PACK_WEIGHTS_FILE}"
    fs, path = fsspec.core.url_to_fs(prefix, **(storage_options or {}))
    out = {}
    try:
        if "file" in _protocols(fs):
            _check_symlinks(
                fsspec.core.url_to_fs(root_uri)[1],
                path,
                lambda reason, uri: TeacherFormatError(reason, path=uri),
                prefix,
            )
        config_bytes, config = _read_pack_config(fs, path, config_uri)
        header, data_start, num_slots = _read_header(fs, f"{path}/{PACK_WEIGHTS_FILE}", weights_uri)
    except TeacherFormatError as exc:
        reason = f"pack {pack!r}: {exc.reason}"
        return {c: TeacherFormatError(reason, campaign_id=c, path=exc.path) for c, *_ in members}
    slots = sorted({slot for _, slot, _, skip in members if 0 <= slot < num_slots and not skip})
    slices = _read_slots(fs, f"{path}/{PACK_WEIGHTS_FILE}", header, data_start, num_slots, slots)
    campaign_config = {k: v for k, v in config.items() if k != "format"}
    slot_bytes = sum((info["data_offsets"][1] - info["data_offsets"][0]) // num_slots for info in header.values())
    for campaign_id, slot, sha, skip in members:
        where = f"{weights_uri} slot {slot}"

        def fail(reason: str, uri: str, campaign_id=campaign_id, slot=slot) -> TeacherFormatError:
            return TeacherFormatError(f"pack {pack!r} slot {slot}: {reason}", campaign_id=campaign_id, path=uri)

        try:
            if not 0 <= slot < num_slots:
                raise fail(f"slot out of range (the pack holds {num_slots})", weights_uri)
            if skip:
                out[campaign_id] = LoadedTeacher(
                    campaign_id,
                    None,
                    {**campaign_config, "campaign_id": campaign_id, "format": TEACHER_FORMAT},
                    sha,
                    slot_bytes,
                )
                continue
            raw = {name: slices[name][slot] for name in header}
            if slot_sha256(config_bytes, raw) != sha:
                raise fail("sha256 of the slot's slices does not match index.parquet", where)
            state = {}
            for name, info in header.items():
                tensor = torch.frombuffer(bytearray(raw[name]), dtype=_DTYPES[info["dtype"]]).reshape(info["shape"][1:])
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise fail(f"tensor {name!r} holds NaN or inf values", where)
                state[name] = tensor
            teacher_config = {**campaign_config, "campaign_id": campaign_id, "format": TEACHER_FORMAT}
            model = build_teacher_model(
                teacher_config,
                state,
                fail,
                config_uri,
                where,
                allow_loaders=allow_loaders,
                untrusted_roots=(root_uri, *untrusted_roots),
            )
            model.eval()
            out[campaign_id] = LoadedTeacher(campaign_id, model, teacher_config, sha, sum(len(b) for b in raw.values()))
        except TeacherFormatError as exc:
            out[campaign_id] = exc
    return out


def _read_pack_config(fs, path: str, config_uri: str) -> tuple[bytes, dict]:
    try:
        config_bytes = fs.cat_file(f"{path}/{CONFIG_FILE}")
    except FileNotFoundError:
        raise TeacherFormatError("file is missing", path=config_uri) from None
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherFormatError(f"config.json is not valid JSON ({exc})", path=config_uri) from None
    if not isinstance(config, dict):
        raise TeacherFormatError("config.json must hold a JSON object", path=config_uri)
    value = config.get("format")
    if not isinstance(value, str) or not value.startswith("fleet-teacher-pack/"):
        raise TeacherFormatError(f"missing or foreign 'format' {value!r}; expected {PACK_FORMAT!r}", path=config_uri)
    if value.split("/", 1)[1].split(".", 1)[0] != PACK_FORMAT.split("/")[1]:
        raise TeacherFormatError(f"unsupported format {value!r}: this fleet reads {PACK_FORMAT} only", path=config_uri)
    if "campaign_id" in config:
        raise TeacherFormatError("a pack's config.json must not name a campaign (index.parquet does)", path=config_uri)
    return config_bytes, config


def _read_header(fs, path: str, uri: str) -> tuple[dict, int, int]:
    """A safetensors header: ``{name: {dtype, shape, data_offsets}}``, where the data starts, the slot count."""
    try:
        with fs.open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TeacherFormatError("not a readable safetensors file (shorter than its header)", path=uri)
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:
                raise TeacherFormatError(f"not a readable safetensors file (header of {size} bytes)", path=uri)
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise TeacherFormatError("file is missing", path=uri) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherFormatError(f"not a readable safetensors file ({exc})", path=uri) from None
    if not isinstance(header, dict):
        raise TeacherFormatError("not a readable safetensors file (header is not an object)", path=uri)
    header.pop("__metadata__", None)
    counts = set()
    for name, info in header.items():
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in _DTYPES
            and isinstance(info.get("shape"), list)
            and len(info["shape"]) >= 1
            and isinstance(info.get("data_offsets"), list)
        )
        if not ok:
            raise TeacherFormatError(f"tensor {name!r}: unsupported dtype or no [K, ...] shape", path=uri)
        counts.add(info["shape"][0])
    if len(counts) != 1:
        raise TeacherFormatError(f"tensors disagree on the slot count: {sorted(counts)}", path=uri)
    return header, 8 + size, counts.pop()


def _read_slots(fs, path: str, header: dict, data_start: int, num_slots: int, slots: list[int]) -> dict:
    """``{name: {slot: bytes}}``: the slices of ``slots``, one byte-range read per tensor and run of
    consecutive slots."""
    runs: list[list[int]] = []
    for slot in slots:
        if runs and slot == runs[-1][-1] + 1:
            runs[-1].append(slot)
        else:
            runs.append([slot])
    names = list(header)
    starts, ends, what = [], [], []
    for name in names:
        begin, end = header[name]["data_offsets"]
        stride = (end - begin) // num_slots
        for run in runs:
            starts.append(data_start + begin + run[0] * stride)
            ends.append(data_start + begin + (run[-1] + 1) * stride)
            what.append((name, run, stride))
    blobs = fs.cat_ranges([path] * len(starts), starts, ends) if starts else []
    out: dict[str, dict[int, bytes]] = {name: {} for name in names}
    for (name, run, stride), blob in zip(what, blobs):
        if isinstance(blob, Exception):
            raise blob
        for i, slot in enumerate(run):
            out[name][slot] = bytes(blob[i * stride : (i + 1) * stride])
    return out


# ---------------------------------------------------------------------------------------------
# the batched teacher pass


def _arch_key(teacher: LoadedTeacher) -> tuple | None:
    """Teachers with equal keys stack; ``None`` for a custom (loader) teacher: run alone."""
    if type(teacher.model) is not TeacherRNN or teacher.config.get("loader") is not None:
        return None
    return tuple(teacher.config.get(k) for k in _ARCH_FIELDS)


def stack_states(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """``{name: [G, ...]}``: the state dicts of ``models`` (one architecture) stacked on a leading axis."""
    states = [m.state_dict() for m in models]
    return {name: torch.stack([s[name] for s in states]) for name in states[0]}


def stacked_forward(
    params: dict[str, torch.Tensor],
    arch: str,
    num_layers: int,
    event_types: torch.Tensor,
    features: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """G :class:`~fleet.formats.teachers.TeacherRNN` teachers at once, each on its own rows.

    ``params``: a TeacherRNN ``state_dict`` with every tensor stacked ``[G, ...]``; ``event_types``
    ``(G, B, T)`` long, ``features`` ``(G, B, T, F)``, ``lengths`` ``(G, B)`` (right padding after them).
    Returns logits ``(G, B)``. Rows are sorted longest first, so step ``t`` runs only the leading rows
    still within their length (no work on padding beyond the longest row of any teacher at that rank).
    Differentiable (fleet.synthetic.synth trains with it).
    """
    g, b, t = event_types.shape
    order = torch.argsort(lengths, dim=1, descending=True, stable=True)  # (G, B) longest rows first
    lengths = lengths.gather(1, order)  # (G, B)
    event_types = event_types.gather(1, order[:, :, None].expand(-1, -1, t))  # (G, B, T)
    features = features.gather(1, order[:, :, None, None].expand(-1, -1, t, features.shape[-1]))  # (G, B, T, F)
    active = (lengths[:, :, None] > torch.arange(t)).sum(1).amax(0).tolist()  # rows still running at each step
    table = params["embedding.weight"]  # (G, V, E)
    rows = event_types + (torch.arange(g) * table.shape[1])[:, None, None]  # (G, B, T) rows of the (G * V, E) table
    embedded = F.embedding(rows, table.reshape(-1, table.shape[-1]))  # (G, B, T, E); a cheap backward, unlike indexing
    steps = [x[:, :n] for x, n in zip(torch.cat([embedded, features], dim=-1).unbind(2), active)]  # T x (G, b_t, I)
    for layer in range(num_layers):
        w_ih = params[f"rnn.weight_ih_l{layer}"].transpose(1, 2)  # (G, I, nH)
        w_hh = params[f"rnn.weight_hh_l{layer}"].transpose(1, 2)  # (G, H, nH)
        b_ih = params[f"rnn.bias_ih_l{layer}"][:, None, :]  # (G, 1, nH)
        b_hh = params[f"rnn.bias_hh_l{layer}"][:, None, :]  # (G, 1, nH)
        hidden = w_hh.shape[1]
        h = steps[0].new_zeros(g, b, hidden)  # (G, B, H)
        c = torch.zeros_like(h)
        outputs = []
        for x, n in zip(steps, active):
            h, c = h[:, :n], c[:, :n]  # (G, b_t, H): the rows past their end are no longer needed
            gates_in = torch.baddbmm(b_ih, x, w_ih)  # (G, b_t, nH)
            gates_h = torch.baddbmm(b_hh, h, w_hh)  # (G, b_t, nH)
            if arch == "lstm":
                gates = gates_in + gates_h  # (G, b_t, 4H): input, forget, cell, output
                i, f, _, o = torch.sigmoid(gates).chunk(4, dim=-1)  # (G, b_t, H) each; one call for all gates
                c = f * c + i * torch.tanh(gates[..., 2 * hidden : 3 * hidden])
                h = o * torch.tanh(c)
            else:  # gru: reset, update, new (the new gate's hidden part is scaled by the reset gate)
                r_in, z_in, n_in = gates_in.chunk(3, dim=-1)
                r_h, z_h, n_h = gates_h.chunk(3, dim=-1)
                r, z = torch.sigmoid(r_in + r_h), torch.sigmoid(z_in + z_h)
                h = (1 - z) * torch.tanh(n_in + r * n_h) + z * h
            outputs.append(h)
        steps = outputs
    # each row's state at its last valid step: rows ending at step s are rows active[s + 1] .. active[s] - 1 (per
    # teacher some of them may end later or be shorter; the mask picks exactly the right step)
    final = steps[0].new_zeros(g, b, steps[0].shape[-1])  # (G, B, H)
    ends = lengths - 1  # (G, B)
    for step, h in enumerate(steps):
        n = h.shape[1]
        mask = (ends[:, :n] == step)[:, :, None]  # (G, b_t, 1)
        if mask.any():
            final = torch.cat([torch.where(mask, h, final[:, :n]), final[:, n:]], dim=1)
    logits = torch.baddbmm(params["readout.bias"][:, None, :], final, params["readout.weight"].transpose(1, 2))
    return torch.empty_like(logits.squeeze(-1)).scatter(1, order, logits.squeeze(-1))  # (G, B) in input row order


def pad_stack(batches: Sequence[SequenceBatch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G batches as ``(G, B, T)`` types, ``(G, B, T, F)`` features and ``(G, B)`` lengths, right-padded to
    the largest ``B`` and ``T`` (a padding row has length 1 and zero events)."""
    rows = max(len(b) for b in batches)
    steps = max(int(b.lengths.max()) if len(b) else 1 for b in batches)
    num_features = batches[0].num_features
    types = torch.zeros(len(batches), rows, steps, dtype=torch.long)
    feats = torch.zeros(len(batches), rows, steps, num_features)
    lengths = torch.ones(len(batches), rows, dtype=torch.long)
    for k, batch in enumerate(batches):
        n, width = len(batch), int(batch.lengths.max()) if len(batch) else 0
        types[k, :n, :width] = batch.event_types
        feats[k, :n, :width] = batch.features
        lengths[k, :n] = batch.lengths
    return types, feats, lengths


@torch.no_grad()
def stacked_logits(
    params: dict[str, torch.Tensor],
    arch: str,
    num_layers: int,
    batches: Sequence[SequenceBatch],
    batch_size: int = STACKED_BATCH_ROWS,
) -> list[torch.Tensor]:
    """Logits ``(len(batches[g]),)`` of teacher ``g`` (``params`` stacked ``[G, ...]``) on its own rows.

    Each teacher's rows are sorted by length and cut into chunks (:meth:`SequenceBatch.minibatches`'s
    buckets); round ``r`` runs chunk ``r`` of every teacher that has one (so teachers with different row
    counts drop out of later rounds), in groups that keep ``G x B x T x width`` under
    :data:`STACKED_FLOAT_BUDGET`."""
    hidden = params["rnn.weight_hh_l0"].shape[-1]
    width = max(params["rnn.weight_ih_l0"].shape[1], params["rnn.weight_ih_l0"].shape[2], hidden * num_layers)
    orders = [torch.argsort(b.lengths, stable=True) for b in batches]
    bounds = [_bucket_bounds(b.lengths[o].numpy(), batch_size) for b, o in zip(batches, orders)]
    outputs = [torch.empty(len(b)) for b in batches]
    for r in range(max((len(x) for x in bounds), default=0)):
        chunks = [(g, orders[g][slice(*bounds[g][r])]) for g in range(len(batches)) if r < len(bounds[g])]
        chunks.sort(key=lambda item: int(batches[item[0]].lengths[item[1]].max()))  # similar lengths together
        group: list = []
        rows = steps = 0  # the current group's largest chunk and longest row
        for item in [*chunks, None]:
            if item is not None:
                g, index = item
                wider = (max(rows, len(index)), max(steps, int(batches[g].lengths[index].max())))
                if not group or (len(group) + 1) * wider[0] * wider[1] * width <= STACKED_FLOAT_BUDGET:
                    group.append(item)
                    rows, steps = wider
                    continue
            members = torch.tensor([g for g, _ in group])
            subs = [batches[g].select(i) for g, i in group]
            logits = stacked_forward({k: v[members] for k, v in params.items()}, arch, num_layers, *pad_stack(subs))
            for k, (g, index) in enumerate(group):
                outputs[g][index] = logits[k, : len(index)]
            group = [item] if item is not None else []
            rows, steps = (len(item[1]), int(batches[item[0]].lengths[item[1]].max())) if item is not None else (0, 0)
    return outputs


def teacher_logits(
    teachers: Sequence[LoadedTeacher], batches: Sequence[SequenceBatch], *, batched: bool = True
) -> list[torch.Tensor | Exception]:
    """Each teacher's logits ``(len(batches[k]),)`` on its own rows, or the exception its forward raised.

    With ``batched``, reference teachers of one architecture run together (:func:`stacked_logits`); a
    custom teacher, a lone one, or a group whose stacked pass fails runs one at a time
    (:func:`fleet.compression.data.map_minibatches`), so a failing teacher is reported alone."""
    results: list[torch.Tensor | Exception | None] = [None] * len(teachers)
    groups: dict[tuple, list[int]] = {}
    for k, teacher in enumerate(teachers):
        key = _arch_key(teacher) if batched else None
        groups.setdefault(key if key is not None else ("alone", k), []).append(k)
    for key, members in groups.items():
        if len(members) > 1:
            try:
                params = stack_states([teachers[k].model for k in members])
                logits = stacked_logits(params, key[0], key[-1], [batches[k] for k in members])
            except Exception:  # noqa: BLE001  fall back to one at a time, which names the failing teacher
                logits = None
            if logits is not None:
                for k, value in zip(members, logits):
                    results[k] = value
                continue
        for k in members:
            try:
                with torch.no_grad():
                    results[k] = map_minibatches(teachers[k].model, batches[k]).float()
            except Exception as exc:  # noqa: BLE001  a custom teacher may fail in any way
                results[k] = exc
    return results


# ---------------------------------------------------------------------------------------------
# fleet pack-teachers


def pack_teachers(
    src_uri: str,
    dst_uri: str,
    pack_size: int = DEFAULT_PACK_SIZE,
    storage_options: dict | None = None,
    *,
    allow_loaders: Iterable[str] = (),
) -> dict:
    """``fleet pack-teachers``: every teacher of ``src_uri`` (directories or packs) into packs of at most
    ``pack_size`` teachers of one architecture under ``dst_uri/packs/`` (``pack-00000`` ...), in campaign
    order. A teacher that does not load is skipped and reported. ``dst_uri`` must hold no teachers.
    Returns ``{"packs": n, "packed": n, "skipped": {campaign: reason}}``."""
    if pack_size < 1:
        raise ValueError("pack_size must be >= 1")
    fs, path = fsspec.core.url_to_fs(dst_uri, **(storage_options or {}))
    if fs.exists(path) and fs.ls(path, detail=False):
        raise FleetError("destination is not empty; pick an empty or new directory", path=dst_uri)
    catalog = locate_teachers(src_uri, storage_options)
    skipped: dict[str, str] = {}
    pending: dict[tuple, tuple[dict, list[str], list[dict]]] = {}
    written = packed = 0

    def flush(key: tuple) -> None:
        nonlocal written, packed
        config, ids, states = pending.pop(key)
        tensors = {name: torch.stack([s[name] for s in states]) for name in states[0]}
        write_pack(dst_uri, f"pack-{written:05d}", config, ids, tensors, storage_options)
        written, packed = written + 1, packed + len(ids)

    plan = catalog.plan_entries()
    for start in range(0, len(catalog.campaigns), 256):  # bounded memory: a chunk of teachers at a time
        chunk = [c for c in catalog.campaigns[start : start + 256] if NAME_PATTERN.fullmatch(c)]
        skipped.update(
            {c: "invalid campaign id" for c in catalog.campaigns[start : start + 256] if not NAME_PATTERN.fullmatch(c)}
        )
        loaded = load_teachers(
            src_uri, chunk, plan, storage_options, allow_loaders=allow_loaders, conflicts=catalog.conflicts
        )
        for campaign_id in chunk:
            teacher = loaded[campaign_id]
            if isinstance(teacher, Exception):
                skipped[campaign_id] = str(teacher)
                continue
            config = {k: v for k, v in teacher.config.items() if k not in ("campaign_id", "format")}
            key = tuple(sorted((k, json.dumps(v)) for k, v in config.items()))
            entry = pending.setdefault(key, (config, [], []))
            entry[1].append(campaign_id)
            entry[2].append({k: v.detach().contiguous() for k, v in teacher.model.state_dict().items()})
            if len(entry[1]) == pack_size:
                flush(key)
    for key in list(pending):
        flush(key)
    return {"packs": written, "packed": packed, "skipped": skipped}
