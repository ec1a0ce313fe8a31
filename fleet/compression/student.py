"""The student: one shared recurrent backbone + a tiny head per campaign, heads as stacked rows (pure torch).

A campaign's head is a flat parameter vector; the heads of C campaigns are one ``Tensor[C, P]``,
never C modules. :func:`head_logits` evaluates a batch in which row ``b`` uses its own head row,
so a mixed-campaign batch is ``head_logits(design, h, heads[campaign_index], rank)``. The head formulas
(:func:`head_logits` without ``index``, :func:`head_logits_cross`) also take float32 numpy arrays and then
compute in numpy: serving's per-request path (:mod:`fleet.serve.serving`) runs them without torch dispatch.
See ``docs/compression.md`` for the designs and why they look like this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fleet.compression.data import last_valid

#: The backbone's recurrent cell (``StudentConfig.arch``); :data:`ARCHS` are its values, in this order.
Arch = Literal["gru", "lstm"]
ARCHS: tuple[Arch, ...] = get_args(Arch)
#: The per-campaign head design (``StudentConfig.head``); :data:`HEAD_DESIGNS` are its values, in this order.
HeadDesign = Literal["film", "lowrank", "linear", "film_pool"]
HEAD_DESIGNS: tuple[HeadDesign, ...] = get_args(HeadDesign)
#: The capacity ladder: a campaign whose head fails its gate at 16 bits is refitted with the next design.
#: Each larger design holds every segment of the smaller one, and its extra segments are off at 0: a smaller
#: row widened with zeros (:func:`widen_heads`) is the same head.
HEAD_LADDER = {"film": "film_pool"}
#: Designs whose head reads the backbone's pooled view too: features ``(B, 2H)`` = last state ++ mean state.
POOLED_DESIGNS = ("film_pool",)

FakeQuant = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StudentConfig:
    """Shape of the student: shared backbone and per-campaign head design.

    Args:
        num_event_types: size of the event-type vocabulary (ids in ``[0, num_event_types)``).
        num_features: numeric features per event (``F``).
        arch: recurrent cell of the backbone, ``"gru"`` or ``"lstm"``.
        hidden_size: backbone state size ``H``; the head sees this many features.
        embed_dim: size of the event-type embedding, concatenated with the numeric features.
        num_layers: stacked recurrent layers.
        head: per-campaign head design: ``"film"`` (default, ``3H+1`` params), ``"lowrank"``
            (rank-``head_rank`` adapter, ``2*H*head_rank+H+1``), ``"linear"`` (``H+1``, a baseline) or
            ``"film_pool"`` (FiLM that also reads the mean of the backbone's states, ``4H+1``).
        head_rank: rank of the ``"lowrank"`` adapter; must be 1 for the other designs.
    """

    num_event_types: int
    num_features: int
    arch: Arch = "gru"
    hidden_size: int = 64
    embed_dim: int = 16
    num_layers: int = 1
    head: HeadDesign = "film"
    head_rank: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.head not in HEAD_DESIGNS:
            raise ValueError(f"head must be one of {HEAD_DESIGNS}, got {self.head!r}")
        for name in ("num_event_types", "hidden_size", "embed_dim", "num_layers", "head_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.num_features) < 0:
            raise ValueError(f"num_features must be >= 0, got {self.num_features!r}")
        if self.head != "lowrank" and self.head_rank != 1:
            raise ValueError(
                f"head_rank applies to head='lowrank' only, got head_rank={self.head_rank} with head={self.head!r}"
            )

    def to_dict(self) -> dict:
        """Plain dict (JSON-safe) of the config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StudentConfig:
        """Inverse of :meth:`to_dict`; an unknown key is a ``ValueError`` (not silently dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown StudentConfig keys: {unknown}")
        return cls(**data)


# ----------------------------------------------------------------------------------------------
# backbone


class SharedBackbone(nn.Module):
    """Embedding of event type ++ numeric features -> RNN -> hidden state at the last valid step.

    ``forward(event_types (B, T), features (B, T, F), lengths (B,)) -> (B, H)``. The RNN is causal
    and we read step ``lengths - 1``, so whatever follows ``lengths`` (padding) cannot change the
    output; no packing is needed.
    """

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.num_event_types, config.embed_dim)
        rnn_cls = nn.GRU if config.arch == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            input_size=config.embed_dim + config.num_features,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
        )

    def forward(
        self, event_types: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor, pooled: bool = False
    ) -> torch.Tensor:
        """Backbone features ``(B, H)`` of a padded batch; with ``pooled``, ``(B, 2H)``: the last valid
        state ++ the mean of the valid states (what :data:`POOLED_DESIGNS` read)."""
        x = torch.cat([self.embedding(event_types), features.to(self.embedding.weight.dtype)], dim=-1)  # (B, T, E+F)
        outputs, _ = self.rnn(x)  # (B, T, H)
        last = last_valid(outputs, lengths)  # (B, H)
        if not pooled:
            return last
        valid = torch.arange(outputs.shape[1])[None, :] < lengths[:, None]  # (B, T)
        mean = (outputs * valid.unsqueeze(-1)).sum(1) / lengths.clamp(min=1).unsqueeze(-1).to(outputs.dtype)  # (B, H)
        return torch.cat([last, mean], dim=-1)  # (B, 2H)


def quantizable_weights(module: nn.Module) -> list[str]:
    """Names of the parameters a fake-quant hook applies to: weight matrices (embedding, input and
    recurrent weights, head rows), not biases."""
    return [name for name, p in module.named_parameters() if p.ndim >= 2 and "bias" not in name.rsplit(".", 1)[-1]]


def backbone_forward(
    backbone: SharedBackbone,
    event_types: torch.Tensor,
    features: torch.Tensor,
    lengths: torch.Tensor,
    *,
    fake_quant: FakeQuant | None = None,
    pooled: bool = False,
) -> torch.Tensor:
    """``backbone(event_types, features, lengths, pooled) -> (B, H)`` (``(B, 2H)`` when ``pooled``), with
    ``fake_quant`` applied to every weight matrix (recurrent weights included, see :func:`quantizable_weights`)
    when given.

    The module's own parameters are not changed: the transformed tensors are swapped in for this
    call only (``torch.func.functional_call``), so gradients flow through ``fake_quant`` (use a
    straight-through estimator there) to the float weights.
    """
    if fake_quant is None:
        return backbone(event_types, features, lengths, pooled)
    params = dict(backbone.named_parameters())
    swapped = {name: fake_quant(params[name]) for name in quantizable_weights(backbone)}
    return functional_call(backbone, swapped, (event_types, features, lengths, pooled), strict=False)


# ----------------------------------------------------------------------------------------------
# heads: flat parameter rows


def head_layout(design: str, hidden_size: int, rank: int = 1) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Named segments of a head row, in storage order: ``((name, shape), ...)``.

    - ``film``: ``gamma (H)``, ``beta (H)``, ``w (H)``, ``b (1)``
    - ``lowrank``: ``u (H, r)``, ``v (H, r)``, ``w (H)``, ``b (1)``
    - ``linear``: ``w (H)``, ``b (1)``
    - ``film_pool``: ``gamma (H)``, ``beta (H)``, ``w (H)``, ``g (H)``, ``b (1)``: ``film``'s segments plus ``g``

    Every layout ends with the readout bias ``b``, so that with ``H`` a multiple of the quantization group
    size ``b`` is a group of its own (stored to float16 precision whatever the bits).
    """
    h = int(hidden_size)
    if design == "film":
        return (("gamma", (h,)), ("beta", (h,)), ("w", (h,)), ("b", (1,)))
    if design == "film_pool":
        return (("gamma", (h,)), ("beta", (h,)), ("w", (h,)), ("g", (h,)), ("b", (1,)))
    if design == "lowrank":
        return (("u", (h, rank)), ("v", (h, rank)), ("w", (h,)), ("b", (1,)))
    if design == "linear":
        return (("w", (h,)), ("b", (1,)))
    raise ValueError(f"head design must be one of {HEAD_DESIGNS}, got {design!r}")


def _num_params(design: str, hidden_size: int, rank: int) -> int:
    total = 0
    for _, shape in head_layout(design, hidden_size, rank):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def head_num_params(config: StudentConfig) -> int:
    """Parameters ``P`` of one head row (193 for the default FiLM head at ``H = 64``)."""
    return _num_params(config.head, config.hidden_size, config.head_rank)


def feature_width(config: StudentConfig) -> int:
    """Width of the backbone features ``config.head`` reads: ``H``, or ``2H`` for :data:`POOLED_DESIGNS`."""
    return config.hidden_size * (2 if config.head in POOLED_DESIGNS else 1)


def bias_position(config: StudentConfig) -> int:
    """Index of the readout bias ``b`` in a head row: the last (see :func:`head_layout`)."""
    return head_num_params(config) - 1


def ladder_config(config: StudentConfig) -> StudentConfig | None:
    """The student config of the next rung of :data:`HEAD_LADDER` above ``config.head`` (None at the top)."""
    bigger = HEAD_LADDER.get(config.head)
    return None if bigger is None else dataclasses.replace(config, head=bigger, head_rank=1)


def widen_heads(heads: torch.Tensor, config: StudentConfig, wider: StudentConfig) -> torch.Tensor:
    """Heads ``(C, P)`` of ``config.head`` as heads ``(C, P')`` of the ladder's ``wider.head``: every segment
    copied by name, the segments only ``wider`` has at 0 (off), so the logits are the same."""
    if config.head == wider.head and config.head_rank == wider.head_rank:
        return heads
    small = dict(head_layout(config.head, config.hidden_size, config.head_rank))
    if HEAD_LADDER.get(config.head) != wider.head or config.hidden_size != wider.hidden_size:
        raise ValueError(f"{wider.head!r} is not the capacity ladder's next design above {config.head!r}")
    source = _split(config.head, heads, config.hidden_size, config.head_rank)
    out = torch.zeros(heads.shape[0], head_num_params(wider), dtype=heads.dtype)  # (C, P')
    target = _split(wider.head, out, wider.hidden_size, wider.head_rank)  # views into out
    for name in small:
        target[name].copy_(source[name])
    return out


def _split(design: str, params: torch.Tensor, hidden_size: int, rank: int) -> dict[str, torch.Tensor]:
    """Views of the segments of ``params (B, P)``: each ``(B, *shape)``."""
    out, start = {}, 0
    for name, shape in head_layout(design, hidden_size, rank):
        n = 1
        for s in shape:
            n *= s
        out[name] = params[:, start : start + n].reshape(params.shape[0], *shape)
        start += n
    return out


def _gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]`` for ``rows (C, *shape)``: ``(B, *shape)``.

    ``gather`` rather than ``index_select``: its backward is ``scatter_add``, which stays fast with
    several CPU threads where ``index_add`` (``index_select``'s backward) can be 50x slower.
    """
    flat = rows.reshape(rows.shape[0], -1)  # (C, S)
    out = flat.gather(0, index.unsqueeze(1).expand(-1, flat.shape[1]))  # (B, S)
    return out.view(index.shape[0], *rows.shape[1:])


def init_heads(config: StudentConfig, num_campaigns: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial head rows ``(C, P)``: every row is the same, so a campaign's start point (and its fit)
    does not depend on which other campaigns share its batch.

    The readout ``w, b`` starts at 0 and FiLM at the identity (``gamma = beta = 0``). The low-rank
    adapter starts like LoRA: ``u = 0``, ``v`` random (std ``1/sqrt(H)``, drawn once from
    ``generator``, seed 0 when None), so the adapter is off at first but its gradient is not.
    """
    if num_campaigns < 0:
        raise ValueError(f"num_campaigns must be >= 0, got {num_campaigns}")
    h, r = config.hidden_size, config.head_rank
    row = torch.zeros(1, head_num_params(config))  # (1, P)
    if config.head == "lowrank":
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        v = torch.randn(h, r, generator=generator) / h**0.5  # (H, r)
        _split("lowrank", row, h, r)["v"].copy_(v.unsqueeze(0))
    return row.expand(num_campaigns, -1).clone()  # (C, P)


def head_logits(
    design: str,
    features: torch.Tensor,
    params: torch.Tensor,
    rank: int = 1,
    *,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``(B,)`` of backbone ``features (B, H)`` where row ``b`` uses head row ``params[b]``.

    ``params`` is ``(B, P)`` (a 1-D ``(P,)`` row is broadcast to every row). With ``index (B,)``,
    ``params`` is the stacked ``(C, P)`` heads and row ``b`` uses ``params[index[b]]``: the same
    result as ``head_logits(design, features, params[index], rank)`` but each segment is gathered
    on its own, which keeps the backward pass small (use this form when training). Designs:

    - ``film``:    ``z = tanh(h * (1 + gamma) + beta)``, logit ``= w . z + b``
    - ``lowrank``: ``z = tanh(h + u (v^T h))`` (rank-r adapter), logit ``= w . z + b``
    - ``linear``:  logit ``= w . h + b``
    - ``film_pool``: features are ``(B, 2H)`` = last state ``h`` ++ mean state ``m``;
      ``z = tanh(h * (1 + gamma) + beta + g * m)``, logit ``= w . z + b`` (``g = 0``: exactly ``film``)

    Numpy ``features`` and ``params`` (float32, ``index`` None) give numpy logits by the same formulas.
    """
    pooled = None
    if design in POOLED_DESIGNS:
        features, pooled = _halves(features)  # (B, H) each
    batch, hidden = features.shape
    if params.ndim == 1:
        params = params.unsqueeze(0)  # (1, P)
        index = torch.zeros(batch, dtype=torch.long, device=features.device)
    expected = _num_params(design, hidden, rank)
    rows = batch if index is None else params.shape[0]
    if params.ndim != 2 or params.shape != (rows, expected):
        raise ValueError(
            f"head {design!r} (H={hidden}, rank={rank}) needs params of shape ({rows}, {expected}), got {tuple(params.shape)}"
        )
    if index is not None and index.shape != (batch,):
        raise ValueError(f"index must have shape ({batch},), got {tuple(index.shape)}")
    p = _segments(design, params, hidden, rank)  # each (rows, *shape)
    if index is not None:
        p = {name: _gather_rows(seg, index) for name, seg in p.items()}  # each (B, *shape)
    return _design_logits(design, features, pooled, p)  # (B,)


def head_logits_cross(design: str, features: torch.Tensor, params: torch.Tensor, rank: int = 1) -> torch.Tensor:
    """Logits ``(B, K)`` of every backbone row ``features (B, H)`` (``(B, 2H)`` for :data:`POOLED_DESIGNS`)
    under every head row ``params (K, P)``: entry ``[b, k]`` is ``head_logits(design, features[b:b+1],
    params[k], rank)`` (the same formulas, :func:`head_logits`), computed in one broadcast ``(B, K, H)``
    evaluation. Used to score one user against many campaigns (``FleetModel.score_campaigns``). Torch
    tensors or float32 numpy arrays (then numpy logits)."""
    pooled = None
    if design in POOLED_DESIGNS:
        features, pooled = _halves(features)  # (B, H) each
        pooled = pooled[:, None]  # (B, 1, H)
    hidden = features.shape[1]
    expected = _num_params(design, hidden, rank)
    if params.ndim != 2 or params.shape[1] != expected:
        raise ValueError(
            f"head {design!r} (H={hidden}, rank={rank}) needs params of shape (K, {expected}), "
            f"got {tuple(params.shape)}"
        )
    p = {name: seg[None] for name, seg in _segments(design, params, hidden, rank).items()}  # (1, K, *shape)
    return _design_logits(design, features[:, None], pooled, p)  # (B, K)


def head_logits_vjp(
    design: str, features: torch.Tensor, params: torch.Tensor, rank: int = 1
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Logits ``(C, L)`` of campaign blocks and their vector-Jacobian product in the head parameters.

    ``features (C, L, H)`` (``(C, L, 2H)`` for :data:`POOLED_DESIGNS`) holds up to ``L`` rows of each of ``C``
    campaigns, and row ``[c, l]`` uses head row ``params[c]`` of ``params (C, P)``: the formulas of
    :func:`head_logits`, each head broadcast over its campaign's rows (no per-row copy of the parameters).
    Returns ``(logits, vjp)`` where ``vjp(grad_logits (C, L)) -> (C, P)`` is ``d(sum grad_logits * logits) /
    d(params)``, written out per design (the head fit's hot loop: half the time of autograd on the same
    formulas; tests/test_student.py checks both against :func:`head_logits` and autograd).
    """
    pooled = None
    width = features.shape[-1]
    hidden = width // 2 if design in POOLED_DESIGNS else width
    expected = _num_params(design, hidden, rank)
    if features.ndim != 3 or params.shape != (features.shape[0], expected):
        raise ValueError(
            f"head {design!r} (H={hidden}, rank={rank}) needs features (C, L, H) and params (C, {expected}), "
            f"got {tuple(features.shape)} and {tuple(params.shape)}"
        )
    if design in POOLED_DESIGNS:
        features, pooled = features[..., :hidden], features[..., hidden:]  # (C, L, H) each
    p = _split(design, params, hidden, rank)  # each (C, *shape)
    if design == "linear":
        z = features  # (C, L, H)
    elif design == "lowrank":
        projected = torch.bmm(features, p["v"])  # (C, L, r)  v^T h
        z = torch.tanh(torch.baddbmm(features, projected, p["u"].transpose(1, 2)))  # (C, L, H)
    else:
        u = torch.addcmul(p["beta"][:, None], features, (1.0 + p["gamma"])[:, None])  # (C, L, H)
        if design == "film_pool":
            u = u.addcmul_(pooled, p["g"][:, None])
        z = torch.tanh(u)  # (C, L, H)
    logits = torch.baddbmm(p["b"][:, :, None], z, p["w"][:, :, None]).squeeze(-1)  # (C, L)

    def vjp(grad_logits: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros_like(params)  # (C, P)
        g = _split(design, grad, hidden, rank)  # views into grad
        g["b"].copy_(grad_logits.sum(1, keepdim=True))
        g["w"].copy_(torch.bmm(grad_logits[:, None, :], z).squeeze(1))
        if design == "linear":
            return grad
        grad_u = (1.0 - z * z).mul_(grad_logits[..., None]).mul_(p["w"][:, None])  # (C, L, H) through tanh
        if design == "lowrank":
            g["u"].copy_(torch.bmm(grad_u.transpose(1, 2), projected))  # (C, H, r)
            g["v"].copy_(torch.bmm(features.transpose(1, 2), torch.bmm(grad_u, p["u"])))  # (C, H, r)
            return grad
        g["beta"].copy_(grad_u.sum(1))
        g["gamma"].copy_((grad_u * features).sum(1))
        if design == "film_pool":
            g["g"].copy_((grad_u * pooled).sum(1))
        return grad

    return logits, vjp


def _halves(features):
    """``(last (B, H), mean (B, H))`` views of pooled features ``(B, 2H)`` (torch or numpy)."""
    half = features.shape[1] // 2
    return features[:, :half], features[:, half:]


def _np_addcmul(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a + b * c``: :func:`torch.addcmul` for numpy arrays."""
    out = b * c
    out += a
    return out


def _segments(design: str, params: torch.Tensor, hidden_size: int, rank: int) -> dict[str, torch.Tensor]:
    """:func:`_split` with FiLM's scale at the identity when ``gamma = 0`` (``1 + gamma``)."""
    p = _split(design, params, hidden_size, rank)  # segments, each (rows, *shape)
    if design in ("film", "film_pool"):
        p["gamma"] = 1.0 + p["gamma"]
    return p


def _design_logits(
    design: str, features: torch.Tensor, pooled: torch.Tensor | None, p: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The head formulas of :func:`head_logits` (the one place they live): ``features (..., H)`` (and
    ``pooled (..., H)`` for a pooled design) against segments ``p`` of shapes ``(..., *shape)`` that
    broadcast with them; logits ``(...)``. Torch tensors, or numpy arrays (computed with numpy)."""
    tanh, addcmul = (torch.tanh, torch.addcmul) if isinstance(features, torch.Tensor) else (np.tanh, _np_addcmul)
    if design == "film":
        z = tanh(addcmul(p["beta"], features, p["gamma"]))  # (..., H)
    elif design == "film_pool":
        z = tanh(addcmul(addcmul(p["beta"], features, p["gamma"]), pooled, p["g"]))  # (..., H)
    elif design == "lowrank":
        s = (p["v"] * features[..., None]).sum(-2)  # (..., r)  v^T h
        z = tanh(features + (p["u"] * s[..., None, :]).sum(-1))  # (..., H)
    else:
        z = features  # (..., H)
    return (z * p["w"]).sum(-1) + p["b"].squeeze(-1)  # (...)


# ----------------------------------------------------------------------------------------------
# the whole student, for backbone training


class Student(nn.Module):
    """Backbone + stacked heads ``nn.Parameter (C, P)``; used to train the backbone (phase a).

    ``forward(event_types, features, lengths, campaign_index (B,)) -> logits (B,)``.
    """

    def __init__(self, config: StudentConfig, num_campaigns: int, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.backbone = SharedBackbone(config)
        self.heads = nn.Parameter(init_heads(config, num_campaigns, generator))

    @property
    def num_campaigns(self) -> int:
        return int(self.heads.shape[0])

    def forward(
        self,
        event_types: torch.Tensor,
        features: torch.Tensor,
        lengths: torch.Tensor,
        campaign_index: torch.Tensor,
        *,
        fake_quant: FakeQuant | None = None,
    ) -> torch.Tensor:
        """Logits ``(B,)``; ``fake_quant`` (optional) is applied to the backbone's weight matrices."""
        h = backbone_forward(
            self.backbone,
            event_types,
            features,
            lengths,
            fake_quant=fake_quant,
            pooled=self.config.head in POOLED_DESIGNS,
        )  # (B, H) or (B, 2H)
        return head_logits(self.config.head, h, self.heads, self.config.head_rank, index=campaign_index)  # (B,)
