"""``fleet bench``'s outputs: results.json, results.md and the PNGs (:func:`write_outputs`), the MLflow run
(:func:`log_to_mlflow`), the end-of-run summary table, and the generated section of docs/benchmarks.md from a run's
results.json (:func:`write_docs`, ``fleet bench --write-docs``). Every number comes from the results."""

from __future__ import annotations

import io
import json
import math
import os
import time

import numpy as np
from rich.filesize import decimal
from rich.table import Table

from fleet.bench.common import EXPERIMENT
from fleet.bench.methods import METHOD_ORDER
from fleet.bench.serving import render_serving_targets
from fleet.core.constants import BENCH_RESULTS_FORMAT
from fleet.core.errors import FleetError
from fleet.storage.store import json_safe


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _human(n: float) -> str:
    """Bytes in SI units (rich's formatter: ``950 bytes``, ``1.2 kB``, ``3.4 MB``)."""
    return decimal(round(n))


def render_markdown(results: dict, plots_prefix: str = "") -> str:
    """The side-by-side tables of ``results`` (every number from results.json)."""
    m = results["methods"]
    n = results["campaigns"]
    lines = [
        f"### Methods side by side (N = {n} campaigns, same teachers, same hold-out rows)",
        "",
        (
            "| method | bytes / campaign | total bytes | ratio vs fp32 | campaigns with AUC | AUC median "
            "| AUC diff median / p10 / worst | mean abs(p - p_teacher) median / p90 / worst | wall time |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in METHOD_ORDER:
        if key not in m:
            continue
        r, f = m[key], m[key]["fidelity"]
        ext = " (extrapolated)" if r["extrapolated"] else ""
        lines.append(
            f"| {r['label']} | {_human(r['bytes_per_campaign'])}{ext} | {_human(r['bytes_total'])}{ext} "
            f"| {_ratio(r['compression_ratio'])} | {f['campaigns_with_auc']} of {f['campaigns']} | {_fmt(f['auc_median'], '.4f')} "
            f"| {_fmt(f['auc_diff_median'], '+.4f')} / {_fmt(f['auc_diff_p10'], '+.4f')} / {_fmt(f['auc_diff_worst'], '+.4f')} "
            f"| {_fmt(f['mean_abs_diff_median'], '.4f')} / {_fmt(f['mean_abs_diff_p90'], '.4f')} / "
            f"{_fmt(f['mean_abs_diff_worst'], '.4f')} | {r['time_s']:,.1f} s{ext} |"
        )
    c = m["independent_students"]
    lines += [
        "",
        (
            f"AUCs are computed only where a campaign's hold-out rows hold at least "
            f"{results['bench_config']['compress'].get('min_auc_class_count', 1)} positives and negatives (the real run's "
            f"rule, applied to every method); mean abs(p - p_teacher) covers every campaign. "
            f"Fidelity columns cover every campaign with a defined hold-out AUC "
            f"({m['fleet_auto']['fidelity']['campaigns_with_auc']} of {m['fleet_auto']['fidelity']['campaigns']} for the "
            f"real run); peer (c) covers its {c['subset_size']} random campaigns only. On those same campaigns the real "
            f"run's AUC diff median / p10 is {_fmt(c['fleet_auto_on_same_subset']['auc_diff_median'], '+.4f')} / "
            f"{_fmt(c['fleet_auto_on_same_subset']['auc_diff_p10'], '+.4f')} (peer (c): "
            f"{_fmt(c['fidelity']['auc_diff_median'], '+.4f')} / {_fmt(c['fidelity']['auc_diff_p10'], '+.4f')})."
        ),
        "",
    ]
    lines += ["How each figure was measured:", ""]
    for key in METHOD_ORDER[:4]:
        if key in m:
            lines.append(f"- **{m[key]['label']}**: size: {m[key]['bytes_note']}; time: {m[key]['time_note']}.")
    variants = [k for k in METHOD_ORDER[4:] if k in m]
    if variants:
        lines.append(
            "- **(d) variants**: size as the real run (each variant written as its own version and measured); "
            "time = stage 1 of the real run (shared) + backbone + their own heads: "
            + "; ".join(
                f"{k}: backbone {m[k]['backbone_seconds']:.1f} s ({m[k]['backbone_note']}), heads "
                f"{m[k]['heads_seconds']:.1f} s"
                for k in variants
            )
            + "."
        )
    lines += head_codec_lines(results)
    rr = results["real_run"]
    lines += [
        "",
        "### The real run (one full `run_compress`, default config, bits auto)",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    for stage in ("soft_labels", "backbone", "heads"):
        if stage in rr["stage_seconds"]:
            lines.append(f"| {STAGE_NAMES[stage]} | {rr['stage_seconds'][stage]:,.1f} |")
    lines += [
        f"| finalize (write the version) + registration in MLflow + driver overhead | {rr['registration_and_overhead_seconds']:,.1f} |",
        f"| **total wall time** | **{rr['wall_seconds']:,.1f}** |",
        "",
        (
            f"Total wall time / floor (stage 1) = **{_fmt(rr['total_over_floor'], '.2f')}x** "
            f"(stages only, without registration: {_fmt(rr['run_over_floor'], '.2f')}x). "
            f"Bits chosen per campaign (1/2/4/8/16): "
            f"{' / '.join(str(m['fleet_auto']['bits_campaigns'][b]) for b in ('1', '2', '4', '8', '16'))}."
        ),
        "",
    ]
    s = results.get("serving")
    if s:
        lines += [
            "### Serving (real run's version, this machine)",
            "",
            "| path | p50 | p99 | notes |",
            "|---|---:|---:|---|",
            (
                f"| in-process warm (head cached, one sequence) | {s['warm']['p50_ms']:.3f} ms | {s['warm']['p99_ms']:.3f} ms "
                f"| {s['warm']['n']} calls, torch threads {s['in_process_torch_threads']} |"
            ),
            (
                f"| in-process cold (cache miss, head read from a Parquet row group) | {s['cold']['p50_ms']:.3f} ms "
                f"| {s['cold']['p99_ms']:.3f} ms | {s['cold']['n']} calls; a fresh FleetModel.open takes "
                f"{s['open_seconds_median'] * 1000:.1f} ms |"
            ),
            (
                f"| HTTP on loopback (uvicorn subprocess, httpx), 1 in flight | {s['http']['single']['p50_ms']:.3f} ms "
                f"| {s['http']['single']['p99_ms']:.3f} ms | {s['http']['single']['requests']} requests, one at a time |"
            ),
            (
                f"| HTTP on loopback (uvicorn subprocess, httpx) | {s['http']['p50_ms']:.3f} ms | {s['http']['p99_ms']:.3f} ms "
                f"| {s['http']['requests']} requests, {s['http']['concurrency']} concurrent, "
                f"{_fmt(s['http']['throughput_rps'], ',.0f')} req/s, {s['http']['errors']} errors |"
            ),
            "",
            (
                f"Serving process RSS (HTTP server, this fleet): {s['http']['server_rss_after_load']['rss_mb']:.0f} MB after "
                f"the load (peak {s['http']['server_rss_after_load']['peak_rss_mb']:.0f} MB)."
            ),
            "",
        ]
    tp = results.get("teacher_pass")
    if tp:
        t = tp["teacher"]
        lines += [
            "### Teacher pass (stage 1): batched vs one at a time",
            "",
            "| mode | seconds | sequences/s |",
            "|---|---:|---:|",
            *(
                f"| {mode.replace('_', ' ')} | {tp['seconds'][mode]:.2f} | {tp['sequences_per_second'][mode]:,.0f} |"
                for mode in ("one_at_a_time", "batched")
            ),
            "",
            (
                f"{tp['teachers']} teachers ({t['num_layers']}-layer {str(t['arch']).upper()} h={t['hidden_size']}), "
                f"{tp['sequences']:,} sequences, torch threads {tp['torch_threads']}: batched = "
                f"**{tp['speedup']:.2f}x** one at a time; largest logit difference {tp['max_abs_logit_diff']:.1e}."
            ),
            "",
        ]
    sc = results.get("scale")
    if sc:
        lines += [
            "### Scale — SIMULATED (random heads of the real shape and bit mix, real backbone, real store format)",
            "",
            (
                "| campaigns | heads bytes / campaign | parts | build (write + index) | open (no verify / verify) "
                "| cold predict p50 / p99 | serving RSS (peak) | RSS before open (imports only) |"
            ),
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, r in sc.items():
            lines.append(
                f"| {int(key):,} | {r['bytes_per_campaign']:.1f} B | {r['parts']} | {r['build_seconds']:.1f} s "
                f"| {r['open_seconds'] * 1000:.0f} ms / {r['open_verify_seconds'] * 1000:.0f} ms "
                f"| {r['cold']['p50_ms']:.2f} / {r['cold']['p99_ms']:.2f} ms "
                f"| {r['rss_mb']:.0f} MB ({r['peak_rss_mb']:.0f} MB) | {r['rss_before_open_mb']:.0f} MB |"
            )
        lines.append("")
    st = results.get("serving_targets")
    if st:
        lines += [
            "### Serving targets (issue 12), side by side with the K-teacher peer",
            "",
            *render_serving_targets(st),
        ]
    lines += ["### DESIGN.md targets", "", "| figure | target | measured | | source |", "|---|---|---:|---|---|"]
    for t in results["targets"]:
        v = t["value"]
        val = "n/a" if v is None else (f"{v:+.4f}" if "AUC" in t["figure"] else f"{v:,.2f}")
        lines.append(
            f"| {t['figure']} | {t['target']} | {val} | {'pass' if t['passed'] else '**miss**'} | {t['source']} |"
        )
    lines.append("")
    if plots_prefix is not None:
        lines += ["### Plots", ""]
        for name, title in PLOTS.items():
            lines.append(f"![{title}]({plots_prefix}{name})")
        lines.append("")
    return "\n".join(lines)


def head_codec_lines(results: dict) -> list[str]:
    """Markdown rows comparing the fleet methods' heads: bytes, fidelity and the per-head read cost
    (:func:`head_latencies`); methods without ``head_latency`` (older results) are left out."""
    m = results["methods"]
    keys = [k for k in METHOD_ORDER if k in m and "head_latency" in m[k]]
    if not keys:
        return []
    lines = [
        "",
        "### Heads per codec: bytes, fidelity, read cost per head (same run)",
        "",
        (
            "| method | codec | bytes / campaign | mean abs(p - p_teacher) median / p90 | AUC diff median "
            "| decode one head p50 / p99 | cold lookup p50 / p99 | decode all, per head |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in keys:
        r, f, lat = m[k], m[k]["fidelity"], m[k]["head_latency"]
        lines.append(
            f"| {r['label']} | {lat['codec']} | {_human(r['bytes_per_campaign'])} "
            f"| {_fmt(f['mean_abs_diff_median'], '.4f')} / {_fmt(f['mean_abs_diff_p90'], '.4f')} "
            f"| {_fmt(f['auc_diff_median'], '+.4f')} | {lat['decode']['p50_ms']:.3f} / {lat['decode']['p99_ms']:.3f} ms "
            f"| {lat['cold_lookup']['p50_ms']:.3f} / {lat['cold_lookup']['p99_ms']:.3f} ms "
            f"| {lat['decode_all_per_head_ms'] * 1000:.1f} us |"
        )
    lines.append("")
    return lines


PLOTS = {
    "size_vs_fidelity.png": "bytes per campaign vs fidelity, one point per method",
    "auc_diff_vs_size.png": "per-campaign AUC difference vs campaign size",
    "latency_cdf.png": "latency CDFs",
    "stage_times.png": "stage-time breakdown",
}
STAGE_NAMES = {
    "soft_labels": "stage 1: teacher soft labels (the floor)",
    "backbone": "stage 2: backbone",
    "heads": "stages 3-5: heads, quantization, fidelity",
}


def write_outputs(results: dict, out: str) -> None:
    """results.json, results.md and the PNGs under ``out``."""
    for name, data in make_plots(results).items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(json_safe(results), f, indent=1, sort_keys=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# fleet bench, N = {results['campaigns']} ({results['created_at']})\n\n")
        f.write(render_markdown(results))


def make_plots(results: dict) -> dict[str, bytes]:
    """The four figures as PNG bytes (matplotlib Figure API, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure(w=7.5, h=4.8, ncols=1):
        fig = Figure(figsize=(w, h), dpi=100)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(1, ncols)

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()

    m = results["methods"]
    out = {}
    fig, ax = figure()
    colors = __import__("matplotlib").colormaps["tab20"].colors
    for i, key in enumerate(k for k in METHOD_ORDER if k in m):
        r, f = m[key], m[key]["fidelity"]
        y = f["auc_diff_median"] if f["auc_diff_median"] is not None else 0.0
        lo = y - (f["auc_diff_p10"] if f["auc_diff_p10"] is not None else y)
        ax.errorbar(
            [r["bytes_per_campaign"]],
            [y],
            yerr=[[lo], [0]],
            fmt="s" if key.startswith("fleet") else "o",
            capsize=3,
            color=colors[(2 * i) % 20 if i < 10 else 2 * (i - 10) + 1],
            label=r["label"] + (" *" if r["extrapolated"] else ""),
        )
    ax.set_xscale("log")
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(-0.005, color="tab:red", lw=0.8, ls="--")
    ax.axhline(-0.02, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel("bytes on storage per campaign (log)")
    ax.set_ylabel("AUC diff vs teacher: median (bar down to p10)")
    ax.set_title(f"Size vs fidelity, N={results['campaigns']} (targets dashed/dotted; * extrapolated)")
    ax.legend(fontsize=6.5, loc="lower right")
    out["size_vs_fidelity.png"] = png(fig)

    fig, ax = figure()
    for key, color in (
        ("fleet_auto", "tab:blue"),
        ("teacher_int8_dynamic", "tab:orange"),
        ("independent_students", "tab:green"),
        ("fleet_bits1", "tab:gray"),
    ):
        rows = [r for r in m[key]["per_campaign"] if r.get("auc_diff") is not None and r.get("n_rows")]
        if rows:
            ax.scatter(
                [r["n_rows"] for r in rows],
                [r["auc_diff"] for r in rows],
                s=10 if key != "independent_students" else 30,
                alpha=0.6,
                color=color,
                label=m[key]["label"],
                linewidths=0,
            )
    ax.set_xscale("log")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("campaign size (sequences, log)")
    ax.set_ylabel("student AUC - teacher AUC (hold-out)")
    ax.set_title("Per-campaign AUC difference vs campaign size")
    ax.legend(fontsize=7)
    out["auc_diff_vs_size.png"] = png(fig)

    fig, ax = figure()
    curves = []
    s = results.get("serving")
    if s:
        curves += [
            ("in-process warm", s["warm"]),
            ("in-process cold (Parquet)", s["cold"]),
            ("HTTP loopback (1 in flight)", s["http"]["single"]),
            (f"HTTP loopback ({s['http']['concurrency']} in flight)", s["http"]),
        ]
    for key, r in results.get("scale", {}).items():
        curves.append((f"cold, SIMULATED {int(key):,} campaigns", r["cold"]))
    for label, lat in curves:
        x = np.sort(np.asarray(lat["samples_ms"]))
        ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{label} (p99 {lat['p99_ms']:.2f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Predict latency CDFs (one sequence per request)")
    ax.legend(fontsize=7, loc="lower right")
    out["latency_cdf.png"] = png(fig)

    fig, (ax1, ax2) = figure(w=11, h=4.5, ncols=2)
    rr = results["real_run"]
    order = ["soft_labels", "backbone", "heads"]
    stages_ = [(k, rr["stage_seconds"][k]) for k in order if k in rr["stage_seconds"]]
    stages_ += [("finalize + registration + overhead", rr["registration_and_overhead_seconds"])]
    left = 0.0
    for (name, secs), color in zip(
        stages_, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    ):
        ax1.barh(["real run"], [secs], left=left, color=color, label=f"{name} {secs:.1f} s")
        left += secs
    ax1.set_xlabel("seconds")
    ax1.set_title("fleet real run: stage times")
    ax1.legend(fontsize=7)
    names = [k for k in METHOD_ORDER if k in m and k != "teacher_fp32"]
    ax2.barh(
        [m[k]["label"] + (" *" if m[k]["extrapolated"] else "") for k in names],
        [m[k]["time_s"] for k in names],
        color=["tab:green" if m[k]["extrapolated"] else "tab:blue" for k in names],
    )
    ax2.axvline(rr["floor_seconds"], color="black", ls="--", lw=0.8, label="floor (stage 1)")
    ax2.set_xscale("log")
    ax2.tick_params(axis="y", labelsize=6.5)
    ax2.set_xlabel("wall seconds (log; * extrapolated)")
    ax2.set_title("wall time per method")
    ax2.legend(fontsize=7)
    out["stage_times.png"] = png(fig)
    return out


def log_to_mlflow(results: dict, out: str, tracking_uri: str) -> str:
    """One run in the experiment ``fleet-bench``: params, flat numeric metrics, results and plots as artifacts."""
    from mlflow.tracking import MlflowClient

    from fleet.storage.runs import sanitize_key

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        exp_id = experiment.experiment_id
    else:
        location = None
        if tracking_uri.startswith("sqlite:///"):  # artifacts next to the database, not in ./mlruns
            db = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
            location = os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts", EXPERIMENT)
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=location)
    run = client.create_run(
        exp_id,
        run_name=f"bench-n{results['campaigns']}-{results['created_at']}",
        tags={"fleet.bench": BENCH_RESULTS_FORMAT},
    )
    run_id = run.info.run_id
    metrics: dict[str, float] = {}
    for key, r in results["methods"].items():
        for name in ("bytes_per_campaign", "bytes_total", "compression_ratio", "time_s"):
            metrics[f"{key}.{name}"] = r[name]
        for name, v in r["fidelity"].items():
            metrics[f"{key}.{name}"] = v
    rr = results["real_run"]
    metrics.update(
        {
            "real_run.wall_seconds": rr["wall_seconds"],
            "real_run.total_over_floor": rr["total_over_floor"],
            "real_run.floor_seconds": rr["floor_seconds"],
        }
    )
    serving = results.get("serving", {})
    for part, lat in (
        ("warm", serving.get("warm")),
        ("cold", serving.get("cold")),
        ("http", serving.get("http")),
        ("http_single", serving.get("http", {}).get("single")),
    ):
        for q in ("p50_ms", "p99_ms"):
            metrics[f"serving.{part}.{q}"] = (lat or {}).get(q)
    for size, r in results.get("scale", {}).items():
        for name in ("bytes_per_campaign", "build_seconds", "open_seconds", "rss_mb"):
            metrics[f"scale_sim.{size}.{name}"] = r[name]
        metrics[f"scale_sim.{size}.cold_p99_ms"] = r["cold"]["p99_ms"]
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    clean = [
        Metric(sanitize_key(k), float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and math.isfinite(float(v))
    ]
    params = {
        "campaigns": results["campaigns"],
        "fleet_dir": results["bench_config"]["fleet_dir"],
        "peer_subset": results["bench_config"]["peer_subset"],
        "scale_campaigns": json.dumps(results["bench_config"]["scale_campaigns"]),
        **{f"synth.{k}": v for k, v in results["bench_config"]["synth"].items()},
        **{
            f"compress.{k}": json.dumps(v) if isinstance(v, dict) else v
            for k, v in results["bench_config"]["compress"].items()
        },
    }
    plist = [Param(sanitize_key(k), str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(clean), 1000):
        client.log_batch(run_id, metrics=clean[i : i + 1000])
    for i in range(0, len(plist), 100):
        client.log_batch(run_id, params=plist[i : i + 100])
    for name in ["results.json", "results.md", *PLOTS]:
        client.log_artifact(run_id, os.path.join(out, name))
    client.set_terminated(run_id)
    return run_id


def _ratio(v) -> str:
    return "n/a" if v is None else (f"{v:,.2f}x" if v < 10 else f"{v:,.0f}x")


def summary_table(results: dict):
    """The end-of-run summary printed by ``fleet bench``: methods, then the DESIGN.md targets."""
    from rich.console import Group

    m = results["methods"]
    methods = Table(title=f"fleet bench, N={results['campaigns']} (* extrapolated from K campaigns)")
    for col in ("method", "B/campaign", "vs fp32", "AUC diff med", "p10", "|dp| med", "wall s"):
        methods.add_column(col, justify="left" if col == "method" else "right")
    for key in METHOD_ORDER:
        if key not in m:
            continue
        r, f = m[key], m[key]["fidelity"]
        star = "*" if r["extrapolated"] else ""
        methods.add_row(
            key + star,
            _human(r["bytes_per_campaign"]),
            _ratio(r["compression_ratio"]),
            _fmt(f["auc_diff_median"], "+.4f"),
            _fmt(f["auc_diff_p10"], "+.4f"),
            _fmt(f["mean_abs_diff_median"], ".4f"),
            f"{r['time_s']:,.1f}{star}",
        )
    targets = Table(title="DESIGN.md targets")
    for col in ("figure", "target", "measured", ""):
        targets.add_column(col, justify="right" if col == "measured" else "left")
    for t in results["targets"]:
        v = t["value"]
        targets.add_row(
            t["figure"], t["target"], "n/a" if v is None else f"{v:,.4g}", "pass" if t["passed"] else "[red]MISS[/red]"
        )
    return Group(methods, targets)


#: The line of docs/benchmarks.md that ends the section :func:`write_docs` writes (``fleet bench --write-docs``):
#: what stands above it is rewritten, what follows it (sections written by hand or copied from other commands) is kept.
DOCS_END = (
    "<!-- end of the section `fleet bench --write-docs` writes: the text above is rewritten, the text below kept -->"
)
#: The prose :func:`write_docs` takes (``fleet bench --docs-prose``).
DOCS_PROSE = ("status", "why", "notes", "shared")


def write_docs(
    results_path: str,
    docs_path: str,
    plots_dir: str,
    *,
    status: str = "",
    why: dict | None = None,
    notes: str = "",
    shared: str = "",
) -> None:
    """Write the generated section of ``docs_path`` (everything above its :data:`DOCS_END` line; a page that is
    not there yet is created) from a run's ``results.json`` (every number comes from it) and copy its PNGs into
    ``plots_dir``. ``status`` / ``notes`` / ``why`` (target figure prefix -> explanation) are prose; ``shared``
    names what else ran on the machine during the run (empty: nothing). FleetError, before anything is written,
    when a PNG is missing next to ``results_path`` or the page has no :data:`DOCS_END` line."""
    import shutil

    with open(results_path) as f:
        results = json.load(f)
    src = os.path.dirname(os.path.abspath(results_path))
    missing = [name for name in PLOTS if not os.path.isfile(os.path.join(src, name))]
    if missing:
        raise FleetError(f"no {', '.join(missing)} next to the results (fleet bench writes them there)", path=src)
    kept = DOCS_END + "\n"
    if os.path.exists(docs_path):
        with open(docs_path) as f:
            page = f.read()
        if DOCS_END not in page:
            raise FleetError(
                f"no line {DOCS_END!r} in the page: where the generated section ends is not known, so "
                "nothing is written",
                path=docs_path,
            )
        kept = page[page.index(DOCS_END) :]
    os.makedirs(plots_dir, exist_ok=True)
    for name in PLOTS:
        shutil.copyfile(os.path.join(src, name), os.path.join(plots_dir, name))
    rel = os.path.relpath(plots_dir, os.path.dirname(os.path.abspath(docs_path))) + "/"
    mach = results["machine"]
    argv = results.get("argv") or []
    command = "fleet " + " ".join(argv[1:]) if argv and argv[0].endswith("fleet") else "(not recorded)"
    m = results["methods"]
    fa, b, c = m["fleet_auto"], m["teacher_int8_dynamic"], m["independent_students"]
    rr = results["real_run"]
    la0, la1 = mach.get("load_average_at_start"), mach.get("load_average_at_end")
    loads = (
        f"load average at start {', '.join(f'{x:.1f}' for x in la0) if la0 else 'n/a'}, at end "
        f"{', '.join(f'{x:.1f}' for x in la1) if la1 else 'n/a'} on {mach['cpus']} cores"
    )
    load = (
        f"**Shared**: {shared} ran at the same time ({loads}), so every wall time and latency here is pessimistic "
        "and noisy; sizes and fidelity do not depend on the load."
        if shared
        else f"Nothing else ran on the machine ({loads}; the benchmark's own Ray workers and servers included)."
    )
    lines = [
        "# Benchmarks",
        "",
        (
            "<!-- generated by `fleet bench --write-docs` from the run's results.json; numbers are never typed by "
            "hand -->"
        ),
        "",
        (
            f"`fleet bench` on a synthetic fleet of **N = {results['campaigns']}** campaigns "
            f"({results['bench_config']['synth']['num_layers']}-layer {results['bench_config']['synth']['arch'].upper()} "
            f"teachers, hidden {results['bench_config']['synth']['hidden_size']}, seed {results['bench_config']['synth']['seed']}), "
            f"run {results['created_at']}; the whole benchmark took {results['bench_seconds'] / 60:.1f} min."
        ),
        "",
    ]
    if status:
        lines += [f"> {status}", ""]
    lines += [
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        (
            f"Fleet: {results['fleet']['how']}. Outputs: `results.json`, `results.md`, the PNGs below; the run is "
            f"logged to MLflow (experiment `{EXPERIMENT}`, run `{results.get('mlflow_run_id')}`)."
        ),
        "",
        "## Machine",
        "",
        f"{mach['cpus']} CPU cores, {mach['memory_gib']:.0f} GiB memory, no GPU ({mach['platform']}, Python "
        f"{mach['python']}, torch {mach['torch']}). " + load,
        "",
        "## Results",
        "",
        render_markdown(results, plots_prefix=rel),
        "## Reading",
        "",
    ]
    k = c["subset_size"]
    speed = c["time_s"] / fa["time_s"] if fa["time_s"] else None
    sub = c["fleet_auto_on_same_subset"]
    lines += [
        (
            f"- **Size.** A fleet campaign costs {fa['bytes_per_campaign']:,.0f} B of heads Parquet; with the shared "
            f"backbone the whole fleet is {_ratio(fa['compression_ratio'])} smaller than the fp32 teachers, where torch's "
            f"dynamic int8 gives {_ratio(b['compression_ratio'])} and independent students {_ratio(c['compression_ratio'])}."
        ),
        (
            f"- **Fidelity.** Median / p10 AUC diff vs the teacher: fleet {_fmt(fa['fidelity']['auc_diff_median'], '+.4f')} / "
            f"{_fmt(fa['fidelity']['auc_diff_p10'], '+.4f')}, dynamic int8 {_fmt(b['fidelity']['auc_diff_median'], '+.4f')} / "
            f"{_fmt(b['fidelity']['auc_diff_p10'], '+.4f')}; on the {k} campaigns of peer (c), independent students "
            f"{_fmt(c['fidelity']['auc_diff_median'], '+.4f')} / {_fmt(c['fidelity']['auc_diff_p10'], '+.4f')} vs fleet "
            f"{_fmt(sub['auc_diff_median'], '+.4f')} / {_fmt(sub['auc_diff_p10'], '+.4f')} (AUCs defined on "
            f"{c['fidelity']['campaigns_with_auc']} of those {k}); mean |p - p_teacher| median on the same {k}: independent "
            f"{_fmt(c['fidelity']['mean_abs_diff_median'], '.4f')}, fleet {_fmt(sub['mean_abs_diff_median'], '.4f')}. "
            f"Mean |p - p_teacher| median over all campaigns: "
            f"fleet {_fmt(fa['fidelity']['mean_abs_diff_median'], '.4f')}, int8 {_fmt(b['fidelity']['mean_abs_diff_median'], '.4f')}, "
            f"independent {_fmt(c['fidelity']['mean_abs_diff_median'], '.4f')}."
        ),
        (
            f"- **Time.** The full fleet run took {fa['time_s']:,.1f} s, {_fmt(rr['total_over_floor'], '.2f')}x its floor "
            f"(stage 1, {rr['floor_seconds']:,.1f} s); independent students would take {c['time_s']:,.0f} s "
            f"(EXTRAPOLATED from {k} campaigns), {_fmt(speed, ',.1f')}x fleet's time."
        ),
    ]
    misses = [t for t in results["targets"] if not t["passed"]]
    passes = [t for t in results["targets"] if t["passed"]]
    if passes:
        lines.append(
            "- **Targets met:** "
            + "; ".join(f"{t['figure']} ({_target_value(t)} vs {t['target']})" for t in passes)
            + "."
        )
    if misses:
        lines += ["", "**Targets missed, and why:**", ""]
        said: set[str] = set()
        for t in misses:
            reason = next((v for key, v in (why or {}).items() if t["figure"].startswith(key)), "")
            if reason in said:
                reason = "Same cause as above."
            said.add(reason)
            lines.append(
                f"- {t['figure']}: {_target_value(t)} (target {t['target']}; {t['source']}). {reason}".rstrip()
            )
    if notes:
        lines += ["", notes]
    lines += ["", kept]
    with open(docs_path, "w") as f:
        f.write("\n".join(lines))


def _target_value(t: dict) -> str:
    v = t["value"]
    if v is None:
        return "n/a"
    return f"{v:+.4f}" if "AUC" in t["figure"] else f"{v:,.2f}"
