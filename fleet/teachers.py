"""Teachers: the reference per-campaign RNN and the ``fleet-teacher/1`` format on any fsspec URL.

Layout under a teacher root URI: ``<root>/<campaign_id>/config.json`` + ``<root>/<campaign_id>/model.safetensors``.
Only safetensors is read, never pickle. A ``"loader": "package.module:function"`` entry in
``config.json`` brings other teacher classes: fleet calls ``function(config, state_dict) -> nn.Module``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from fleet.data import last_valid
from fleet.errors import TeacherFormatError
from fleet.ids import validate_campaign_id

TEACHER_FORMAT = "fleet-teacher/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ header, zip container of torch.save


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
        loader: optional ``"package.module:function"`` building a custom teacher class.
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


def save_teacher(
    root_uri: str, model: nn.Module, config: TeacherConfig, storage_options: dict | None = None
) -> None:
    """Write ``model`` as ``<root>/<campaign_id>/{config.json, model.safetensors}`` (weights first, config last)."""
    prefix = _campaign_prefix(root_uri, config.campaign_id)
    fs, path = fsspec.core.url_to_fs(prefix, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fs.pipe_file(f"{path}/{WEIGHTS_FILE}", save_safetensors(state, metadata={"format": config.format}))
    fs.pipe_file(f"{path}/{CONFIG_FILE}", json.dumps(config.to_json(), indent=2).encode())


@dataclass
class LoadedTeacher:
    """A teacher ready to run: the module (eval mode), its config dict and the sha256 of its files."""

    campaign_id: str
    model: nn.Module
    config: dict[str, Any]
    sha256: str
    num_bytes: int


def list_teacher_campaigns(root_uri: str, storage_options: dict | None = None) -> list[str]:
    """Names of the campaign prefixes under ``root_uri``, sorted (not yet validated: invalid ones are reported
    by :func:`load_teacher` so the pipeline can quarantine them)."""
    fs, path = fsspec.core.url_to_fs(root_uri, **(storage_options or {}))
    if not fs.exists(path):
        raise TeacherFormatError("teacher root does not exist", path=root_uri)
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    return sorted(name for name in names if fs.isdir(f"{path}/{name}"))


def load_teacher(root_uri: str, campaign_id: str, storage_options: dict | None = None) -> LoadedTeacher:
    """Read and check one teacher; raise :class:`TeacherFormatError` naming the campaign, file and reason."""
    validate_campaign_id(campaign_id, path=root_uri)
    prefix = _campaign_prefix(root_uri, campaign_id)
    config_uri, weights_uri = f"{prefix}/{CONFIG_FILE}", f"{prefix}/{WEIGHTS_FILE}"
    fs, path = fsspec.core.url_to_fs(prefix, **(storage_options or {}))

    def fail(reason: str, uri: str) -> TeacherFormatError:
        return TeacherFormatError(reason, campaign_id=campaign_id, path=uri)

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

    model = _build_model(config, state_dict, fail, config_uri, weights_uri)
    model.eval()
    digest = hashlib.sha256(config_bytes + b"\0" + weights_bytes).hexdigest()
    return LoadedTeacher(campaign_id, model, config, digest, len(weights_bytes))


def _build_model(config: dict, state_dict: dict, fail, config_uri: str, weights_uri: str) -> nn.Module:
    loader = config.get("loader")
    if loader is not None:
        function = _import_loader(loader, fail, config_uri)
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


def _import_loader(spec: str, fail, config_uri: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise fail(f"loader must look like 'package.module:function', got {spec!r}", config_uri)
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise fail(f"cannot import loader {spec!r}: {exc}", config_uri) from None
    if not callable(function):
        raise fail(f"loader {spec!r} is not callable", config_uri)
    return function


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
