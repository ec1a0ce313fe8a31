"""numpy vs torch backbone for serving (issue 12 §3): one-sequence latency, import time and RSS, for
choosing ``fleet.serve.serving.DEFAULT_BACKEND`` (docs/serving.md, "Backbone backend").

    python infra/sizing/measure_numpy_backbone.py [--calls 2000] [--seq-len 50] [--out result.json]

Latency (one process, one thread for torch and for numpy's BLAS, warm): for each arch (GRU, LSTM) a random
backbone of the typical serving shape (H=64, E=16, F=8, 100 event types, one layer, int8 round trip) and
one sequence of ``--seq-len`` events:

- ``forward``: the backbone alone on ready inputs (torch: ``SharedBackbone`` under ``inference_mode`` on
  tensors; numpy: ``NumpyBackbone.forward_ragged`` on the arrays, padding-free);
- ``predict``: ``FleetModel.predict(campaign, [sequence])`` end to end on a real version (8-bit FiLM heads,
  resident), ``backend="torch"`` vs ``"numpy"``;
- ``batch64``: the backbone on 64 sequences of lengths 1..100 (serving's batched path, for throughput).

``--calls`` timed calls each, after 200 warm-up calls, torch and numpy interleaved in blocks of 100 so that
a change of machine load hits both; p50 / p99 in microseconds. Import: fresh processes (5 each, median)
that import only ``numpy + fleet.compression.numpy_backbone``, only ``torch``, ``fleet.serve.serving`` (today's serving
imports), and a torch-free process that also loads a backbone from ``backbone.safetensors`` bytes and runs
one forward; seconds and VmRSS / VmHWM (MB). The 1-minute load average (``/proc/loadavg``) is recorded
next to every figure: the numbers are only comparable at similar load.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V, E, F, H = 100, 16, 8, 64


def load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _build(store: str, arch: str):
    """A real version: random backbone (int8), 20 FiLM heads at 8 bits. Returns (manifest uri, torch backbone)."""
    import torch

    from fleet.compression.quant import quantize_rows
    from fleet.compression.student import SharedBackbone, StudentConfig, head_num_params
    from fleet.formats.backbone_codec import decode_backbone, encode_backbone
    from fleet.formats.codec import HeadRow, heads_to_table
    from fleet.storage.store import VersionWriter

    torch.manual_seed(0)
    config = StudentConfig(num_event_types=V, num_features=F, arch=arch, hidden_size=H, embed_dim=E)
    tensors, metadata = encode_backbone(SharedBackbone(config).eval())
    p = head_num_params(config)
    rows = []
    for i in range(20):
        qv = quantize_rows(torch.randn(1, p) * 0.3, 8, group_size=64)[0]
        rows.append(HeadRow(campaign_id=f"c{i:03d}", bits=8, shape=(p,), group_size=64, packed=qv.packed,
                            scales=qv.scales, mask=None, teacher_sha256=bytes(32), data_fingerprint=bytes(16),
                            teacher_auc=0.7, student_auc=0.7, mean_abs_diff=0.0, agreement=1.0, n_train=1,
                            n_holdout=1, status="ok"))
    writer = VersionWriter(store, "bench", f"v-{arch}")
    writer.write_backbone(tensors, metadata)
    writer.write_heads(heads_to_table(rows))
    uri = writer.commit(config={"student": config.to_dict()}, metrics={"campaigns": len(rows)})
    backbone = decode_backbone(tensors, metadata)
    backbone.requires_grad_(False)
    return uri, backbone


def _timed(fns: dict, calls: int, block: int = 100) -> dict:
    """p50 / p99 (us) of each callable, interleaved in blocks."""
    for fn in fns.values():
        for _ in range(200):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    perf = time.perf_counter
    done = 0
    while done < calls:
        n = min(block, calls - done)
        for name, fn in fns.items():
            out = times[name]
            for _ in range(n):
                t0 = perf()
                fn()
                out.append(perf() - t0)
        done += n
    return {k: {"p50_us": round(float(np.percentile(v, 50)) * 1e6, 1), "p99_us": round(float(np.percentile(v, 99)) * 1e6, 1)}
            for k, v in times.items()}


def latency(calls: int, seq_len: int) -> dict:
    import torch

    from fleet.compression.data import collate
    from fleet.compression.numpy_backbone import NumpyBackbone
    from fleet.serve.serving import FleetModel

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    types = rng.integers(0, V, seq_len)
    feats = rng.normal(size=seq_len * F).astype(np.float32)
    seq = {"event_types": types.tolist(), "features": feats.tolist()}
    many_t = [rng.integers(0, V, n) for n in rng.integers(1, 101, 64)]
    many_f = [rng.normal(size=len(t) * F).astype(np.float32) for t in many_t]
    results = {}
    with tempfile.TemporaryDirectory() as store:
        for arch in ("gru", "lstm"):
            uri, backbone = _build(store, arch)
            nb = NumpyBackbone.from_state_dict(backbone.state_dict())
            tt, tf, tl = torch.from_numpy(types)[None], torch.from_numpy(feats).reshape(1, seq_len, F), torch.tensor([seq_len])

            def torch_forward(backbone=backbone, tt=tt, tf=tf, tl=tl):
                with torch.inference_mode():
                    return backbone(tt, tf, tl)

            def torch_batch(backbone=backbone):
                with torch.inference_mode():
                    b = collate(many_t, many_f, F)
                    return backbone(b.event_types, b.features, b.lengths)

            m_t, m_n = FleetModel.open(uri, backend="torch"), FleetModel.open(uri, backend="numpy")
            assert np.allclose(m_t.predict("c000", [seq]), m_n.predict("c000", [seq]), atol=1e-6)
            row = {"load_before": load()}
            row["forward"] = _timed({"torch": torch_forward, "numpy": lambda nb=nb: nb.forward_ragged([types], [feats])},
                                    calls)
            row["predict"] = _timed({"torch": lambda m=m_t: m.predict("c000", [seq]),
                                     "numpy": lambda m=m_n: m.predict("c000", [seq])}, calls)
            row["batch64"] = _timed({"torch": torch_batch, "numpy": lambda nb=nb: nb.forward_ragged(many_t, many_f)},
                                    max(calls // 10, 50))
            row["load_after"] = load()
            results[arch] = row
    return results


PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
{imports}
seconds = time.perf_counter() - t0
{extra}
out = {{"seconds": seconds}}
for line in open("/proc/self/status"):
    if line.startswith(("VmRSS:", "VmHWM:")):
        out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
out["torch_loaded"] = "torch" in sys.modules
print(json.dumps(out))
"""

TORCH_FREE_FORWARD = r"""
import numpy as np
nb = fleet.compression.numpy_backbone.numpy_backbone_from_bytes(open(sys.argv[1], "rb").read())
nb.forward_ragged([np.arange(50) % nb.num_event_types], [np.zeros(50 * nb.num_features, np.float32)])
"""


def imports(repeats: int) -> dict:
    import torch

    from fleet.compression.student import SharedBackbone, StudentConfig
    from fleet.formats.backbone_codec import backbone_to_bytes

    torch.manual_seed(0)
    data = backbone_to_bytes(SharedBackbone(StudentConfig(num_event_types=V, num_features=F, hidden_size=H,
                                                          embed_dim=E)))
    cases = {
        "numpy+fleet.compression.numpy_backbone": ("import numpy, fleet.compression.numpy_backbone", ""),
        "torch": ("import torch", ""),
        "fleet.serve.serving (today)": ("import fleet.serve.serving", ""),
        "torch-free backbone: import + load + 1 forward": ("import numpy, fleet.compression.numpy_backbone", TORCH_FREE_FORWARD),
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = {}
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        for name, (imp, extra) in cases.items():
            runs, before = [], load()
            for _ in range(repeats):
                code = PROBE.format(imports=imp, extra=extra)
                res = subprocess.run([sys.executable, "-c", code, f.name], check=True, capture_output=True, text=True,
                                     env=env, cwd=ROOT)
                runs.append(json.loads(res.stdout))
            out[name] = {"import_s": round(statistics.median(r["seconds"] for r in runs), 3),
                         "rss_mb": round(statistics.median(r["VmRSS"] for r in runs), 1),
                         "hwm_mb": round(statistics.median(r["VmHWM"] for r in runs), 1),
                         "torch_loaded": runs[0]["torch_loaded"], "load_before": before, "load_after": load()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per import case")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    result = {"calls": args.calls, "seq_len": args.seq_len, "H": H, "threads": 1, "cpus": os.cpu_count(),
              "latency": latency(args.calls, args.seq_len), "imports": imports(args.repeats)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
