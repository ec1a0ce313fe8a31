"""The backbone as stored: ``backbone.safetensors`` (format ``fleet-backbone/1``), no I/O here.

Weight matrices (embedding, input and recurrent weights) are stored int8, symmetric, one scale per
output row (``<name>.int8`` int8 + ``<name>.scale`` float32); biases stay float32 (``<name>``).
The student config travels in the safetensors metadata, so a reader needs nothing else.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fleet.compression.quant import PerTensor, choose_qparams, dequantize, quantize
from fleet.compression.student import SharedBackbone, StudentConfig, quantizable_weights
from fleet.core.constants import BACKBONE_FORMAT
from fleet.core.errors import StoreError


def encode_backbone(backbone: SharedBackbone, bits: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata for ``backbone.safetensors`` (``bits`` 8, or 16/32 to keep floats)."""
    if bits not in (8, 16, 32):
        raise ValueError(f"backbone bits must be 8, 16 or 32, got {bits}")
    quantized = set(quantizable_weights(backbone)) if bits == 8 else set()
    tensors: dict[str, torch.Tensor] = {}
    for name, value in backbone.state_dict().items():
        value = value.detach().float()
        if name in quantized:
            rows = value.reshape(value.shape[0], -1)  # (out, in): one scale per output row
            scale, zero = choose_qparams(rows, 8, PerTensor())  # (out, 1)
            tensors[f"{name}.int8"] = quantize(rows, scale, zero, 8, PerTensor()).to(torch.int8).reshape(value.shape)
            tensors[f"{name}.scale"] = scale.squeeze(-1).contiguous()
        else:
            tensors[name] = value.half() if bits == 16 else value
    metadata = {"format": BACKBONE_FORMAT, "bits": str(bits), "student_config": json.dumps(backbone.config.to_dict())}
    return {k: v.contiguous() for k, v in tensors.items()}, metadata


def decode_backbone(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | None = None
) -> SharedBackbone:
    """Rebuild the (dequantized, float32, eval-mode) backbone from :func:`encode_backbone`'s output."""
    if metadata.get("format", "").split(".")[0] != BACKBONE_FORMAT:
        raise StoreError(
            f"unsupported backbone format {metadata.get('format')!r}; expected {BACKBONE_FORMAT}", path=path
        )
    try:
        config = StudentConfig.from_dict(json.loads(metadata["student_config"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"backbone metadata lacks a valid student_config ({exc})", path=path) from None
    backbone = SharedBackbone(config)
    state = {}
    for name, reference in backbone.state_dict().items():
        if f"{name}.int8" in tensors:
            q = tensors[f"{name}.int8"].to(torch.int32).reshape(reference.shape[0], -1)  # (out, in)
            scale = tensors[f"{name}.scale"].float().unsqueeze(-1)  # (out, 1)
            state[name] = dequantize(q, scale, torch.zeros_like(scale, dtype=torch.int32), 8, PerTensor()).reshape(
                reference.shape
            )
        elif name in tensors:
            state[name] = tensors[name].float()
        else:
            raise StoreError(f"backbone tensor {name!r} is missing", path=path)
    backbone.load_state_dict(state)
    return backbone.eval()


def backbone_to_bytes(backbone: SharedBackbone, bits: int = 8, head_prior: torch.Tensor | None = None) -> bytes:
    """``backbone.safetensors`` content; ``head_prior (P,)``, the mean trained head, rides along so
    later nights can fit new campaigns' heads from the same start point."""
    tensors, metadata = encode_backbone(backbone, bits)
    if head_prior is not None:
        tensors["head_prior"] = head_prior.detach().float().contiguous()
    return save_safetensors(tensors, metadata=metadata)


def backbone_from_bytes(data: bytes, path: str | None = None) -> tuple[SharedBackbone, torch.Tensor | None]:
    """``(backbone, head_prior or None)`` from ``backbone.safetensors`` content (never pickle)."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        tensors = load_safetensors(data)
    except (ValueError, SafetensorError) as exc:
        raise StoreError(f"not a readable safetensors backbone ({exc})", path=path) from None
    return decode_backbone(tensors, metadata, path), tensors.get("head_prior")
