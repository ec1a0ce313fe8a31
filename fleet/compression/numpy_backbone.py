"""The shared backbone's forward pass in pure numpy (no torch import): issue 12 §3, the lean inference path.

:class:`NumpyBackbone` computes exactly what :meth:`fleet.compression.student.SharedBackbone.forward` returns:
the RNN's state at each row's last valid step ``(B, H)``, or with ``pooled`` that state ++ the mean of
the valid states ``(B, 2H)`` (what ``film_pool`` heads read). GRU and LSTM, any number of layers,
torch's gate equations and gate order, float32 throughout. It is vectorised over the batch and loops
over time steps only.

Padding is handled as torch does it without packing: the RNN is causal, so a row's state at step
``lengths - 1`` does not depend on what follows. Rows are sorted longest first and step ``t`` updates
only the rows still running (a prefix of the batch), so nothing is computed for padding; a row of
length 0 reads the state after step 0, as ``fleet.compression.data.last_valid`` does, and its mean is 0.

Weights come from the decoded backbone state dict (``SharedBackbone.state_dict()`` as float32 numpy,
:meth:`NumpyBackbone.from_state_dict`) or straight from ``backbone.safetensors`` bytes without torch
(:func:`numpy_backbone_from_bytes`, the int8 rows dequantized as :func:`fleet.formats.backbone_codec.decode_backbone`
does: ``q * scale`` per output row). Outputs equal torch's to float32 rounding (tested to 1e-5).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence

import numpy as np

from fleet.core.constants import BACKBONE_FORMAT


class NumpyBackbone:
    """Pure-numpy forward of :class:`fleet.compression.student.SharedBackbone` (see the module docstring).

    ``forward(event_types (B, T), features (B, T, F), lengths (B,), pooled=False) -> float32 (B, H)``
    (``(B, 2H)`` with ``pooled``); :meth:`forward_ragged` takes a list of unpadded sequences.
    Thread-safe: a call allocates its own buffers.
    """

    def __init__(self, state: Mapping[str, np.ndarray], arch: str | None = None):
        state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
        try:
            self.embedding = np.ascontiguousarray(state["embedding.weight"])  # (V, E)
            w0 = state["rnn.weight_ih_l0"]
        except KeyError as exc:
            raise ValueError(f"backbone state lacks {exc.args[0]!r}") from None
        self.num_event_types, self.embed_dim = self.embedding.shape
        gates_h, width = w0.shape
        self.hidden_size = int(state["rnn.weight_hh_l0"].shape[1])
        gates = gates_h // self.hidden_size
        found = {3: "gru", 4: "lstm"}.get(gates)
        if found is None or gates * self.hidden_size != gates_h:
            raise ValueError(f"rnn.weight_ih_l0 has {gates_h} rows: not 3H (GRU) or 4H (LSTM) for H={self.hidden_size}")
        if arch is not None and arch != found:
            raise ValueError(f"arch {arch!r} does not match the weights (a {found.upper()})")
        self.arch = found
        self.num_features = width - self.embed_dim
        self.num_layers = 0
        while f"rnn.weight_ih_l{self.num_layers}" in state:
            self.num_layers += 1
        # Per layer: (W_ih^T (D, G*H), b (G*H,), W_hh^T (H, G*H), b_hn (H,) for GRU). Sigmoid gates are
        # pre-scaled by 0.5 (exact in float32) so sigmoid(x) = 0.5 * tanh(x') + 0.5 with x' = x / 2: tanh
        # never overflows and needs no errstate. LSTM rows are reordered i, f, o, g (sigmoids contiguous).
        h = self.hidden_size
        self._layers = []
        for layer in range(self.num_layers):
            w_ih = state[f"rnn.weight_ih_l{layer}"].copy()
            w_hh = state[f"rnn.weight_hh_l{layer}"].copy()
            b_ih = state[f"rnn.bias_ih_l{layer}"].copy()
            b_hh = state[f"rnn.bias_hh_l{layer}"].copy()
            if self.arch == "gru":  # rows r, z, n; b_hr, b_hz fold into the input side, b_hn stays inside r * (...)
                half = slice(0, 2 * h)
                for arr in (w_ih, w_hh, b_ih, b_hh):
                    arr[half] *= 0.5
                b = b_ih.copy()
                b[half] += b_hh[half]
                b_hn = b_hh[2 * h :].copy()
            else:  # rows i, f, g, o -> i, f, o, g
                perm = np.r_[0 : 2 * h, 3 * h : 4 * h, 2 * h : 3 * h]
                w_ih, w_hh, b_ih, b_hh = w_ih[perm], w_hh[perm], b_ih[perm], b_hh[perm]
                for arr in (w_ih, w_hh, b_ih, b_hh):
                    arr[: 3 * h] *= 0.5
                b, b_hn = b_ih + b_hh, None
            self._layers.append((np.ascontiguousarray(w_ih.T), b, np.ascontiguousarray(w_hh.T), b_hn))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object], arch: str | None = None) -> NumpyBackbone:
        """From ``SharedBackbone.state_dict()`` (torch tensors or numpy arrays; converted to float32 numpy)."""
        arrays = {}
        for name, value in state.items():
            if hasattr(value, "detach"):  # a torch tensor: no torch import needed to read it
                value = value.detach().cpu().float().numpy()
            arrays[name] = value
        return cls(arrays, arch)

    @property
    def feature_width(self) -> int:
        return self.hidden_size

    # ------------------------------------------------------------------ forward

    def forward(
        self, event_types: np.ndarray, features: np.ndarray, lengths: np.ndarray, pooled: bool = False
    ) -> np.ndarray:
        """Backbone features ``float32 (B, H)`` of a padded batch (``(B, 2H)`` with ``pooled``: last ++ mean),
        as ``SharedBackbone.forward``. ``event_types`` int ``(B, T)`` in ``[0, num_event_types)`` (padding
        included, as torch's embedding requires), ``features (B, T, F)``, ``lengths (B,)`` in ``[0, T]``."""
        types = np.asarray(event_types)
        feats = np.asarray(features, dtype=np.float32)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if types.ndim != 2 or feats.shape != (*types.shape, self.num_features) or lengths.shape != types.shape[:1]:
            raise ValueError(
                f"need event_types (B, T), features (B, T, {self.num_features}), lengths (B,); got "
                f"{types.shape}, {feats.shape}, {lengths.shape}"
            )
        b, t = types.shape
        if b and (lengths.min() < 0 or lengths.max() > t):
            raise ValueError(f"lengths must lie in [0, {t}]")
        if types.size and (types.min() < 0 or types.max() >= self.num_event_types):
            raise IndexError(f"event types must lie in [0, {self.num_event_types})")
        order = np.argsort(-lengths, kind="stable")  # longest first: running rows are a prefix
        steps = max(1, int(lengths.max())) if b else 0
        types_s = types[order, :steps].T  # (S, B) time-major
        feats_s = feats[order, :steps].transpose(1, 0, 2)  # (S, B, F)
        x = np.concatenate([self.embedding[types_s], feats_s], axis=-1)  # (S, B, E+F)
        with np.errstate(over="ignore", invalid="ignore"):  # enormous features: non-finite out, as torch
            out = self._run(x, lengths[order], pooled)
        result = np.empty_like(out)
        result[order] = out
        return result

    __call__ = forward

    def forward_ragged(
        self, event_types: Sequence[np.ndarray], features: Sequence[np.ndarray], pooled: bool = False
    ) -> np.ndarray:
        """Features ``(B, W)`` of unpadded sequences: ``event_types[i]`` ints ``(T_i,)``, ``features[i]``
        ``T_i * F`` floats (flat, the events contract) or ``(T_i, F)``; rows in input order. Values already
        validated (serving validates them): types in range, ``T_i >= 1``."""
        n = len(event_types)
        f_dim = self.num_features
        if n == 1:  # the single-sequence hot path: no padding, no sort
            t = np.asarray(event_types[0], dtype=np.int64)
            f = np.asarray(features[0], dtype=np.float32).reshape(len(t), f_dim)
            x = np.concatenate([self.embedding[t], f], axis=-1)[:, None, :]  # (T, 1, E+F)
            with np.errstate(over="ignore", invalid="ignore"):
                return self._run(x, np.array([len(t)], dtype=np.int64), pooled)
        lengths = np.fromiter((len(t) for t in event_types), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        steps = int(lengths.max()) if n else 0
        x = np.zeros((steps, n, self.embed_dim + f_dim), dtype=np.float32)  # (S, B, E+F), time-major
        picked = order.tolist()
        sorted_len = lengths[order]
        col = np.repeat(np.arange(n), sorted_len)  # each event's column (its row's rank)
        starts = np.cumsum(sorted_len) - sorted_len
        step_of = np.arange(len(col)) - np.repeat(starts, sorted_len)  # each event's time step
        x[step_of, col, : self.embed_dim] = self.embedding[
            np.concatenate([np.asarray(event_types[i], dtype=np.int64) for i in picked])
        ]
        x[step_of, col, self.embed_dim :] = np.concatenate(
            [np.asarray(features[i], dtype=np.float32).reshape(-1) for i in picked]
        ).reshape(len(col), f_dim)
        with np.errstate(over="ignore", invalid="ignore"):
            out = self._run(x, lengths[order], pooled)
        result = np.empty_like(out)
        result[order] = out
        return result

    def _run(self, x: np.ndarray, lengths: np.ndarray, pooled: bool) -> np.ndarray:
        """The RNN over ``x (S, B, D)`` time-major, rows sorted by ``lengths`` descending; ``(B, H)`` or ``(B, 2H)``."""
        steps, b = x.shape[:2]
        h_size = self.hidden_size
        # rows running at step t: those with max(length, 1) > t (a length-0 row reads step 0, as last_valid
        # does); rows whose mean counts step t: length > t. Both are prefixes of the sorted batch, and
        # constant over segments of steps, so each segment slices its views once.
        if steps == 0:
            segments = []
        elif lengths[0] == lengths[-1] and lengths[0] > 0:  # equal lengths (one sequence): one segment
            segments = [(0, steps, b, b if pooled else 0)]
        else:
            t_idx = np.arange(steps)[:, None]
            active = (np.maximum(lengths, 1)[None, :] > t_idx).sum(1)  # (S,)
            valid = (lengths[None, :] > t_idx).sum(1) if pooled else active  # (S,)
            cuts = np.flatnonzero((np.diff(active) != 0) | (np.diff(valid) != 0)) + 1
            bounds = [0, *cuts.tolist(), steps]
            segments = [
                (t0, t1, int(active[t0]), int(valid[t0]) if pooled else 0) for t0, t1 in itertools.pairwise(bounds)
            ]
        mean_sum = np.zeros((b, h_size), dtype=np.float64) if pooled else None
        h = np.zeros((b, h_size), dtype=np.float32)
        for layer, (w_ih_t, bias, w_hh_t, b_hn) in enumerate(self._layers):
            last_layer = layer == self.num_layers - 1
            gi = x @ w_ih_t  # (S, B, G*H), one matmul for every step
            gi += bias
            outs = None if last_layer else np.zeros((steps, b, h_size), dtype=np.float32)
            h = np.zeros((b, h_size), dtype=np.float32)
            step = self._gru if self.arch == "gru" else self._lstm
            step(gi, h, w_hh_t, b_hn, segments, outs, mean_sum if last_layer else None)
            x = outs
        if not pooled:
            return h
        mean = (mean_sum / np.maximum(lengths, 1)[:, None]).astype(np.float32)
        return np.concatenate([h, mean], axis=1)

    @staticmethod
    def _gru(gi, h, w_hh_t, b_hn, segments, outs, mean_sum) -> None:
        hs = h.shape[1]
        gh_buf = np.empty((h.shape[0], 3 * hs), dtype=np.float32)
        rz_buf = np.empty((h.shape[0], 2 * hs), dtype=np.float32)
        for t0, t1, a, m in segments:
            hv, gh, rz = h[:a], gh_buf[:a], rz_buf[:a]
            gh_rz, gh_n, d = gh[:, : 2 * hs], gh[:, 2 * hs :], gh[:, :hs]
            r, z = rz[:, :hs], rz[:, hs:]
            g_rz, g_n = gi[t0:t1, :a, : 2 * hs], gi[t0:t1, :a, 2 * hs :]
            sink = outs[t0:t1, :a] if outs is not None else [None] * (t1 - t0)
            acc, acc_h = (mean_sum[:m], h[:m]) if mean_sum is not None and m else (None, None)
            for gt_rz, gt_n, out in zip(g_rz, g_n, sink):
                np.matmul(hv, w_hh_t, out=gh)  # (a, 3H)
                np.add(gt_rz, gh_rz, out=rz)  # half the pre-activations of r, z
                np.tanh(rz, out=rz)
                rz += 1.0
                rz *= 0.5  # sigmoid
                gh_n += b_hn
                gh_n *= r  # r * (W_hn h + b_hn)
                gh_n += gt_n
                np.tanh(gh_n, out=gh_n)  # n
                np.subtract(hv, gh_n, out=d)
                d *= z
                np.add(gh_n, d, out=hv)  # h' = (1 - z) n + z h
                if out is not None:
                    out[...] = hv
                if acc is not None:
                    acc += acc_h

    @staticmethod
    def _lstm(gi, h, w_hh_t, b_hn, segments, outs, mean_sum) -> None:
        hs = h.shape[1]
        c = np.zeros_like(h)
        g_buf = np.empty((h.shape[0], 4 * hs), dtype=np.float32)
        for t0, t1, a, m in segments:
            hv, cv, gates = h[:a], c[:a], g_buf[:a]
            sig = gates[:, : 3 * hs]
            i, f, o, g = gates[:, :hs], gates[:, hs : 2 * hs], gates[:, 2 * hs : 3 * hs], gates[:, 3 * hs :]
            sink = outs[t0:t1, :a] if outs is not None else [None] * (t1 - t0)
            acc, acc_h = (mean_sum[:m], h[:m]) if mean_sum is not None and m else (None, None)
            for gt, out in zip(gi[t0:t1, :a], sink):
                np.matmul(hv, w_hh_t, out=gates)  # (a, 4H): i, f, o (halved), g
                gates += gt
                np.tanh(gates, out=gates)
                sig += 1.0
                sig *= 0.5
                cv *= f
                i *= g
                cv += i  # c' = f c + i g
                np.tanh(cv, out=g)
                np.multiply(o, g, out=hv)  # h' = o tanh(c')
                if out is not None:
                    out[...] = hv
                if acc is not None:
                    acc += acc_h


def decode_backbone_arrays(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> tuple[dict, dict]:
    """``(state dict of float32 numpy arrays, student config dict)`` of ``backbone.safetensors`` content read
    with ``safetensors.numpy``: int8 rows times their scale (``fleet.formats.backbone_codec.decode_backbone``'s
    dequantization, bit for bit), float16/float32 tensors as float32. ValueError for another format."""
    if str(metadata.get("format", "")).split(".")[0] != BACKBONE_FORMAT:
        raise ValueError(f"unsupported backbone format {metadata.get('format')!r}; expected {BACKBONE_FORMAT}")
    config = json.loads(metadata["student_config"])
    state: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name == "head_prior" or name.endswith(".scale"):
            continue
        if name.endswith(".int8"):
            base = name[: -len(".int8")]
            q = value.astype(np.int32).reshape(value.shape[0], -1).astype(np.float32)  # (out, in)
            scale = np.asarray(tensors[f"{base}.scale"], dtype=np.float32)[:, None]  # (out, 1)
            state[base] = (q * scale).reshape(value.shape)
        else:
            state[name] = np.asarray(value, dtype=np.float32)
    return state, config


def numpy_backbone_from_bytes(data: bytes) -> NumpyBackbone:
    """A :class:`NumpyBackbone` from ``backbone.safetensors`` content, without torch (``safetensors.numpy``)."""
    from safetensors.numpy import load as load_numpy

    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    state, config = decode_backbone_arrays(load_numpy(data), metadata)
    return NumpyBackbone(state, arch=config.get("arch"))


__all__ = ["NumpyBackbone", "decode_backbone_arrays", "numpy_backbone_from_bytes"]
