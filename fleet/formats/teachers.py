"""Teachers: the reference per-campaign RNN and the ``fleet-teacher/1`` format on any fsspec URL.

Layout under a teacher root URI: ``<root>/<campaign_id>/config.json`` + ``<root>/<campaign_id>/model.safetensors``.
Only safetensors is read, never pickle. A ``"loader"`` entry in ``config.json`` brings other teacher
classes: fleet calls ``function(config, state_dict) -> nn.Module``, but only for a loader the operator
allowed: the name of an installed entry point of group ``fleet.teacher_loaders``, or a
``"package.module:function"`` passed in ``allow_loaders`` (``fleet compress --allow-loader``). Any other
value is refused before anything is imported, and so is a loader module that would be imported from under
the teacher root (or another untrusted root), or a teacher directory with symlinks leading outside the root.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from fleet.compression.data import last_valid
from fleet.core.constants import TEACHER_FORMAT
from fleet.core.errors import TeacherFormatError
from fleet.core.ids import validate_campaign_id

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ header, zip container of torch.save
LOADER_ENTRY_POINTS = "fleet.teacher_loaders"  # entry point group: name -> "package.module:function"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
LOADER_SPEC_RE = re.compile(rf"^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$")
_PRINTABLE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


@dataclass
class TeacherConfig:
    """Contents of a teacher's ``config.json``.

    Args:
        campaign_id: the campaign this teacher was trained for.
        arch: ``"lstm"`` or ``"gru"``.
        num_event_types: size of the event-type vocabulary; event types are in ``[0, num_event_types)``.
        embed_dim: width of the event-type embedding.
        num_features: numeric features per event.
        hidden_size: RNN hidden width.
        num_layers: stacked RNN layers.
        loader: optional custom teacher class: the name of an entry point of group ``fleet.teacher_loaders``,
            or a ``"package.module:function"`` the operator allowed (``fleet compress --allow-loader``).
        format: ``"fleet-teacher/1"``; readers accept any ``fleet-teacher/1.x``.
    """

    campaign_id: str
    arch: str = "lstm"
    num_event_types: int = 64
    embed_dim: int = 16
    num_features: int = 8
    hidden_size: int = 256
    num_layers: int = 2
    loader: str | None = None
    format: str = TEACHER_FORMAT

    def __post_init__(self) -> None:
        validate_campaign_id(self.campaign_id)
        if self.loader is None and self.arch not in ("lstm", "gru"):
            raise ValueError(f"arch must be 'lstm' or 'gru', got {self.arch!r}")
        for name in ("num_event_types", "embed_dim", "num_features", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        """The ``config.json`` dict (``loader`` omitted when unset)."""
        data = asdict(self)
        if data["loader"] is None:
            del data["loader"]
        return data


class TeacherRNN(nn.Module):
    """Reference teacher: event-type embedding ++ numeric features -> LSTM/GRU -> last valid state -> logit.

    ``forward(event_types (B, T) long, features (B, T, F) float, lengths (B,) long) -> logits (B,)``.
    """

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        rnn_cls = nn.LSTM if config.arch == "lstm" else nn.GRU
        self.embedding = nn.Embedding(config.num_event_types, config.embed_dim)
        self.rnn = rnn_cls(
            config.embed_dim + config.num_features, config.hidden_size, num_layers=config.num_layers, batch_first=True
        )
        self.readout = nn.Linear(config.hidden_size, 1)

    def forward(self, event_types: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([self.embedding(event_types), features], dim=-1)  # (B, T, E + F)
        outputs, _ = self.rnn(inputs)  # (B, T, H); padding comes after the last valid step, so it never leaks back
        return self.readout(last_valid(outputs, lengths)).squeeze(-1)  # (B,)


def teacher_num_bytes(model: nn.Module) -> int:
    """fp32 bytes of a teacher's parameters (what it costs to store)."""
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def save_teacher(root_uri: str, model: nn.Module, config: TeacherConfig, storage_options: dict | None = None) -> None:
    """Write ``model`` as ``<root>/<campaign_id>/{config.json, model.safetensors}`` (weights first, config last)."""
    prefix = _campaign_prefix(root_uri, config.campaign_id)
    fs, path = fsspec.core.url_to_fs(prefix, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fs.pipe_file(f"{path}/{WEIGHTS_FILE}", save_safetensors(state, metadata={"format": config.format}))
    fs.pipe_file(f"{path}/{CONFIG_FILE}", json.dumps(config.to_json(), indent=2).encode())


@dataclass
class LoadedTeacher:
    """A teacher ready to run: the module (eval mode), its config dict and the sha256 of its files. ``model`` is
    None for a packed teacher that was not loaded because its index sha256 is one the caller already holds
    (:func:`fleet.formats.teacher_pack.load_teachers`'s ``unchanged``)."""

    campaign_id: str
    model: nn.Module | None
    config: dict[str, Any]
    sha256: str
    num_bytes: int


def list_teacher_campaigns(root_uri: str, storage_options: dict | None = None) -> list[str]:
    """Campaigns under ``root_uri``, sorted: its campaign directories and the campaigns of its packs
    (``fleet-teacher-pack/1``, :func:`fleet.formats.teacher_pack.locate_teachers`: one listing and one
    ``index.parquet`` read per pack, no request per campaign). Not yet validated: invalid ids are reported
    by :func:`load_teacher` so the pipeline can quarantine them."""
    # lazily: teacher_pack builds on this module
    from fleet.formats.teacher_pack import locate_teachers

    return locate_teachers(root_uri, storage_options).campaigns


def load_teacher(
    root_uri: str,
    campaign_id: str,
    storage_options: dict | None = None,
    *,
    allow_loaders: Iterable[str] = (),
    untrusted_roots: Iterable[str] = (),
) -> LoadedTeacher:
    """Read and check one teacher; raise :class:`TeacherFormatError` naming the campaign, file and reason.

    A ``"loader"`` in its config runs only if it names an installed ``fleet.teacher_loaders`` entry point or
    is one of ``allow_loaders`` (``"package.module:function"``); anything else is refused with
    ``loader not allowed: <value>`` before any import. Nothing is imported from under ``root_uri`` or
    ``untrusted_roots`` (e.g. the events root), and on a local root a teacher directory that is, or
    holds, a symlink leading outside the root is refused.
    """
    validate_campaign_id(campaign_id, path=root_uri)
    prefix = _campaign_prefix(root_uri, campaign_id)
    config_uri, weights_uri = f"{prefix}/{CONFIG_FILE}", f"{prefix}/{WEIGHTS_FILE}"
    fs, path = fsspec.core.url_to_fs(prefix, **(storage_options or {}))

    def fail(reason: str, uri: str) -> TeacherFormatError:
        return TeacherFormatError(reason, campaign_id=campaign_id, path=uri)

    if "file" in _protocols(fs):
        _check_symlinks(fsspec.core.url_to_fs(root_uri)[1], path, fail, prefix)
    config_bytes = _read_required(fs, f"{path}/{CONFIG_FILE}", fail, config_uri)
    weights_bytes = _read_required(fs, f"{path}/{WEIGHTS_FILE}", fail, weights_uri)
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"config.json is not valid JSON ({exc})", config_uri) from None
    if not isinstance(config, dict):
        raise fail("config.json must hold a JSON object", config_uri)
    _check_format(config.get("format"), fail, config_uri)
    if config.get("campaign_id") != campaign_id:
        raise fail(f"config.json names campaign {config.get('campaign_id')!r}, not its directory's", config_uri)
    if weights_bytes.startswith(_PICKLE_MAGIC):
        raise fail("weights look like a pickle/torch.save file; only safetensors is accepted", weights_uri)
    try:
        state_dict = load_safetensors(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise fail(f"not a readable safetensors file ({exc})", weights_uri) from None
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise fail(f"tensor {name!r} holds NaN or inf values", weights_uri)

    model = build_teacher_model(
        config,
        state_dict,
        fail,
        config_uri,
        weights_uri,
        allow_loaders=allow_loaders,
        untrusted_roots=(root_uri, *untrusted_roots),
    )
    model.eval()
    return LoadedTeacher(campaign_id, model, config, teacher_digest(config_bytes, weights_bytes), len(weights_bytes))


def teacher_digest(config_bytes: bytes, weights_bytes: bytes) -> str:
    """Hex sha256 of a teacher's two files (``LoadedTeacher.sha256``): an incremental run reuses a head only
    while its teacher's digest is unchanged."""
    return hashlib.sha256(config_bytes + b"\0" + weights_bytes).hexdigest()


def read_teacher_digest(root_uri: str, campaign_id: str, storage_options: dict | None = None) -> str:
    """:func:`teacher_digest` of ``campaign_id``'s teacher under ``root_uri``, from its files alone: nothing is
    parsed, built or imported (``nightly --dry-run``). Raises :class:`TeacherFormatError` naming the campaign
    and file for an invalid id or a missing file."""
    validate_campaign_id(campaign_id, path=root_uri)
    prefix = _campaign_prefix(root_uri, campaign_id)
    fs, path = fsspec.core.url_to_fs(prefix, **(storage_options or {}))

    def fail(reason: str, uri: str) -> TeacherFormatError:
        return TeacherFormatError(reason, campaign_id=campaign_id, path=uri)

    if "file" in _protocols(fs):  # as load_teacher: never read through a symlink leading outside the root
        _check_symlinks(fsspec.core.url_to_fs(root_uri)[1], path, fail, prefix)
    return teacher_digest(
        _read_required(fs, f"{path}/{CONFIG_FILE}", fail, f"{prefix}/{CONFIG_FILE}"),
        _read_required(fs, f"{path}/{WEIGHTS_FILE}", fail, f"{prefix}/{WEIGHTS_FILE}"),
    )


def build_teacher_model(
    config: dict,
    state_dict: dict,
    fail,
    config_uri: str,
    weights_uri: str,
    *,
    allow_loaders: Iterable[str] = (),
    untrusted_roots: Iterable[str] = (),
) -> nn.Module:
    """The module of a teacher's ``config`` dict and ``state_dict``: a :class:`TeacherRNN`, or what its allowed
    ``"loader"`` builds (policy as in :func:`load_teacher`; nothing is imported from ``untrusted_roots``).
    Problems raise ``fail(reason, uri)`` (a :class:`TeacherFormatError` naming the campaign)."""
    allow = (allow_loaders,) if isinstance(allow_loaders, str) else tuple(allow_loaders)
    loaders = _LoaderPolicy(allow, tuple(untrusted_roots))
    loader = config.get("loader")
    if loader is not None:
        function = loaders.resolve(loader, fail, config_uri)
        try:
            model = function(config, state_dict)
        except Exception as exc:  # a user's loader may raise anything; report it against this campaign
            raise fail(f"loader {loader!r} failed: {type(exc).__name__}: {exc}", config_uri) from exc
        if not isinstance(model, nn.Module):
            raise fail(f"loader {loader!r} returned {type(model).__name__}, not an nn.Module", config_uri)
        return model
    fields = {k: config[k] for k in TeacherConfig.__dataclass_fields__ if k in config}
    try:
        teacher_config = TeacherConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise fail(f"bad config: {exc}", config_uri) from None
    model = TeacherRNN(teacher_config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise fail(f"weights do not match the config: {reason}", weights_uri) from None
    return model


def validate_loader_spec(spec: object) -> str:
    """``spec`` if it reads ``"package.module:function"`` (identifiers only), else ValueError."""
    if not isinstance(spec, str) or LOADER_SPEC_RE.fullmatch(spec) is None:
        raise ValueError(f"a loader must look like 'package.module:function', got {spec!r}")
    return spec


@functools.lru_cache(maxsize=1)
def loader_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The installed ``fleet.teacher_loaders`` entry points by name (read once per process; the
    operator installs them, so they are allowed)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=LOADER_ENTRY_POINTS)}


@dataclass(frozen=True)
class _LoaderPolicy:
    """Which ``"loader"`` values may run: installed entry point names and the operator's ``allow``
    specs; ``untrusted`` roots (URIs) no loader module may be imported from."""

    allow: tuple[str, ...]
    untrusted: tuple[str, ...]

    def resolve(self, value: object, fail, config_uri: str):
        if isinstance(value, str) and value in loader_entry_points():
            entry = loader_entry_points()[value]
            self._refuse_untrusted_module(entry.module, value, fail, config_uri)
            try:
                function = entry.load()
            except Exception as exc:  # an installed plugin may fail to import in any way
                raise fail(
                    f"cannot load loader entry point {value!r} ({entry.value}): {type(exc).__name__}: {exc}", config_uri
                ) from exc
        elif isinstance(value, str) and value in self.allow:
            function = self._import(value, fail, config_uri)
        else:
            shown = value if isinstance(value, str) and _PRINTABLE_RE.fullmatch(value) else repr(value)[:200]
            raise fail(f"loader not allowed: {shown}", config_uri)
        if not callable(function):
            raise fail(f"loader {value!r} is not callable", config_uri)
        return function

    def _import(self, spec: str, fail, config_uri: str):
        try:
            validate_loader_spec(spec)
        except ValueError as exc:
            raise fail(str(exc), config_uri) from None
        module_name, _, attr = spec.partition(":")
        self._refuse_untrusted_module(module_name, spec, fail, config_uri)
        try:
            target = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise fail(f"cannot import loader {spec!r}: {exc}", config_uri) from None
        return target

    def _refuse_untrusted_module(self, module_name: str, value: str, fail, config_uri: str) -> None:
        """Refuse, before it runs, a loader whose top-level package would come from an untrusted root
        (a ``sys.path`` entry inside the teacher or events root would make it importable)."""
        roots = [r for r in (_local_dir(u) for u in self.untrusted) if r]
        if not roots:
            return
        top = module_name.partition(".")[0]
        module = sys.modules.get(top)
        if module is not None:
            places = [getattr(module, "__file__", None), *list(getattr(module, "__path__", None) or [])]
        else:
            try:
                spec = importlib.util.find_spec(top)  # a top-level lookup: runs no code of the package
            except (ImportError, ValueError):
                return  # the import itself reports it
            if spec is None:
                return
            places = [spec.origin, *list(spec.submodule_search_locations or [])]
        for place in places:
            if place and any(_is_inside(os.path.realpath(place), root) for root in roots):
                raise fail(
                    f"loader {value!r} would be imported from {place}, inside the teacher or events root; "
                    "fleet never imports code from its inputs",
                    config_uri,
                )


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _local_dir(uri: str) -> str | None:
    """Real path of a local root URI (plain path or ``file://``), ``None`` for remote ones."""
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif "://" in uri:
        return None
    return os.path.realpath(uri)


def _is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_symlinks(root_path: str, campaign_path: str, fail, prefix_uri: str) -> None:
    """Refuse a local teacher directory that is, or contains, a symlink leading outside the teacher root."""
    root = os.path.realpath(root_path)
    real = os.path.realpath(campaign_path)
    if not _is_inside(real, root):
        raise fail(f"teacher directory is a symlink leading outside the teacher root (to {real})", prefix_uri)
    for dirpath, dirnames, filenames in os.walk(campaign_path, followlinks=False):
        for name in sorted(dirnames + filenames):
            entry = os.path.join(dirpath, name)
            if os.path.islink(entry) and not _is_inside(os.path.realpath(entry), root):
                rel = os.path.relpath(entry, campaign_path)
                raise fail(
                    f"{rel} is a symlink leading outside the teacher root (to {os.path.realpath(entry)})",
                    f"{prefix_uri}/{rel}",
                )


def _check_format(value: object, fail, config_uri: str) -> None:
    if not isinstance(value, str) or not value.startswith("fleet-teacher/"):
        raise fail(f"missing or foreign 'format' {value!r}; expected {TEACHER_FORMAT!r}", config_uri)
    major = value.split("/", 1)[1].split(".", 1)[0]
    if major != TEACHER_FORMAT.split("/")[1]:
        raise fail(f"unsupported format {value!r}: this fleet reads {TEACHER_FORMAT} only", config_uri)


def _read_required(fs, path: str, fail, uri: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise fail("file is missing", uri) from None


def _campaign_prefix(root_uri: str, campaign_id: str) -> str:
    return f"{root_uri.rstrip('/')}/{validate_campaign_id(campaign_id)}"
