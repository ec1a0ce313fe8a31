"""``fleet bench`` end to end on a tiny fleet: every output exists, every method has finite sizes and
fidelity keys, the cached fleet is reused (and a different one refused). No timing assertions."""

import json
import math
import pathlib

import pytest

from fleet.bench.cli import add_arguments, config_from_args
from fleet.bench.methods import LABELS, contiguous_jobs, head_latencies, retarget_backbone
from fleet.bench.report import DOCS_END, PLOTS, head_codec_lines
from fleet.bench.run import prepare_fleet
from fleet.bench.serving import SCORE_K, SERVING_TARGETS, SLOW_REQUESTS
from fleet.cli.main import main
from fleet.core.errors import FleetError

TINY = [
    "--campaigns",
    "20",
    "--seed",
    "3",
    "--hidden",
    "16",
    "--layers",
    "1",
    "--min-sequences",
    "100",
    "--max-sequences",
    "400",
    "--max-epochs",
    "2",
    "--peer-subset",
    "3",
    "--scale-campaigns",
    "2000",
    "--backbone-steps",
    "60",
    "--head-steps",
    "40",
    "--warm-requests",
    "100",
    "--cold-requests",
    "50",
    "--http-requests",
    "100",
    "--http-concurrency",
    "4",
]
METHODS = {
    "teacher_fp32",
    "teacher_int8_dynamic",
    "independent_students",
    "fleet_auto",
    "fleet_bits8",
    "fleet_bits4",
    "fleet_bits2",
    "fleet_bits1",
    "fleet_weightless",
    "fleet_auto_lowrank",
    "fleet_auto_linear",
    "fleet_auto_class_distance",
}
FIDELITY_KEYS = {
    "auc_median",
    "auc_diff_median",
    "auc_diff_p10",
    "auc_diff_worst",
    "mean_abs_diff_median",
    "mean_abs_diff_p90",
    "mean_abs_diff_worst",
    "campaigns",
    "campaigns_with_auc",
}


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.slow
def test_bench_smoke(ray_local, tmp_path, sqlite_tracking_uri):
    out, fleet_dir = tmp_path / "out", tmp_path / "fleet"
    code = main(
        ["bench", *TINY, "--fleet-dir", str(fleet_dir), "--out", str(out), "--tracking-uri", sqlite_tracking_uri]
    )
    assert code == 0
    for name in ("results.json", "results.md", *PLOTS):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((fleet_dir / "synth.json").read_text())["campaigns"] == 20

    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == METHODS
    for key, method in results["methods"].items():
        assert finite(method["bytes_per_campaign"]) and method["bytes_per_campaign"] > 0, key
        assert finite(method["bytes_total"]) and method["bytes_total"] > 0, key
        assert finite(method["compression_ratio"]), key
        assert finite(method["time_s"]), key
        assert FIDELITY_KEYS <= set(method["fidelity"]), key
        assert method["fidelity"]["mean_abs_diff_median"] is not None, key
        assert method["per_campaign"], key
    assert results["methods"]["independent_students"]["extrapolated"] is True
    assert len(results["methods"]["independent_students"]["per_campaign"]) == 3
    assert len(results["methods"]["fleet_auto"]["per_campaign"]) == 20
    # fleet's heads are far smaller than any teacher file, measured
    assert (
        results["methods"]["fleet_auto"]["bytes_per_campaign"]
        < results["methods"]["teacher_int8_dynamic"]["bytes_per_campaign"]
    )
    serving = results["serving"]
    for part in (serving["warm"], serving["cold"], serving["http"], serving["http"]["single"]):
        assert finite(part["p50_ms"]) and finite(part["p99_ms"]) and part["n"] > 0
    assert serving["http"]["errors"] == 0
    assert finite(serving["http"]["server_rss_after_load"]["rss_mb"])
    scale = results["scale"]["2000"]
    assert scale["simulated"] is True and finite(scale["bytes_per_campaign"]) and finite(scale["rss_mb"])
    assert {t["figure"] for t in results["targets"]} and all("passed" in t for t in results["targets"])
    assert results.get("mlflow_run_id")
    md = (out / "results.md").read_text()
    assert "extrapolated" in md and "SIMULATED" in md

    # a second bench on the same dir reuses the fleet; another seed is refused, nothing is overwritten
    info = prepare_fleet(config_from_args(_args(fleet_dir, out)).synth, str(fleet_dir))
    assert info["reused"] and "synth.json" in info["how"]
    other = config_from_args(_args(fleet_dir, out, seed="4")).synth
    with pytest.raises(FleetError, match="seed"):
        prepare_fleet(other, str(fleet_dir))


def _args(fleet_dir, out, seed="3"):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = list(TINY)
    argv[argv.index("--seed") + 1] = seed
    return parser.parse_args([*argv, "--fleet-dir", str(fleet_dir), "--out", str(out)])


def test_retarget_backbone_keeps_weights_and_drops_a_foreign_head_prior():
    import torch

    from fleet.compression.student import SharedBackbone, StudentConfig
    from fleet.formats.backbone_codec import backbone_from_bytes, backbone_to_bytes

    torch.manual_seed(0)
    backbone = SharedBackbone(StudentConfig(num_event_types=8, num_features=2, hidden_size=8, embed_dim=4))
    data = backbone_to_bytes(backbone, 8, head_prior=torch.ones(25))
    assert retarget_backbone(data, "film", 1) == data
    for design in ("lowrank", "linear"):
        moved, prior = backbone_from_bytes(retarget_backbone(data, design, 1))
        assert moved.config.head == design and prior is None
        same, _ = backbone_from_bytes(data)
        for (name, a), (_, b) in zip(moved.state_dict().items(), same.state_dict().items()):
            assert torch.equal(a, b), name


def test_weightless_variant_jobs_are_contiguous_and_head_latencies_cover_both_codecs(tmp_path):
    """The bench's Weightless rows: the real run's interleaved shard jobs regrouped as contiguous id ranges (the
    bloomier plan), and per-head read costs measured the same way on a bloomier and a packed version."""
    import pyarrow as pa
    import torch
    from test_weightless import _mixed_rows

    from fleet.formats.codec import heads_to_table
    from fleet.storage.store import VersionWriter

    def soft(ids):
        return pa.table({"campaign_id": [c for c in ids for _ in range(2)], "row": [0, 1] * len(ids)})

    jobs = [
        {"campaigns": ["a", "c", "e"], "hashes": {c: [c, c] for c in "ace"}, "soft": soft("ace")},
        {"campaigns": ["b", "d"], "hashes": {c: [c, c] for c in "bd"}, "soft": soft("bd")},
    ]
    regrouped = contiguous_jobs(jobs, block_rows=2)
    assert [j["campaigns"] for j in regrouped] == [["a", "b"], ["c"], ["d", "e"]]  # <= 2 each, sizes even
    assert sorted(regrouped[2]["soft"]["campaign_id"].to_pylist()) == ["d", "d", "e", "e"]
    assert regrouped[0]["hashes"] == {"a": ["a", "a"], "b": ["b", "b"]}

    rows, _, _ = _mixed_rows()
    results = {"methods": {}}
    for name, picked in (("fleet_weightless", rows), ("fleet_bits4", rows[21:])):
        writer = VersionWriter(str(tmp_path), "f", name.replace("_", "-"))
        writer.write_backbone({"x": torch.zeros(1)})
        writer.write_heads(heads_to_table(picked), row_group_size=8)
        lat = head_latencies(writer.commit(), [r.campaign_id for r in picked], count=10)
        assert lat["codec"] == ("bloomier" if name == "fleet_weightless" else "packed")
        assert lat["cold_lookup"]["n"] == min(10, len(picked)) and finite(lat["decode"]["p99_ms"])
        assert finite(lat["decode_all_per_head_ms"])
        fid = {k: 0.01 for k in FIDELITY_KEYS}
        results["methods"][name] = {
            "label": LABELS[name],
            "bytes_per_campaign": 70.0,
            "fidelity": fid,
            "head_latency": lat,
        }
    lines = head_codec_lines(results)
    assert sum("| (d) fleet" in line for line in lines) == 2 and "bloomier" in "\n".join(lines)
    assert lines.index(next(line for line in lines if "int4" in line)) < lines.index(
        next(line for line in lines if "Weightless" in line)
    )  # METHOD_ORDER


@pytest.mark.slow
def test_bench_without_mlflow_writes_no_registry(ray_local, tmp_path, monkeypatch):
    """``--no-mlflow``: no tracking database, no MLflow run, the real run's version written but not registered."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "bench",
            *TINY,
            "--fleet-dir",
            str(tmp_path / "fleet"),
            "--out",
            str(out),
            "--no-mlflow",
            "--scale-campaigns",
            "100",
            "--peer-subset",
            "1",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["real_run"]["registered"] is None and "mlflow_run_id" not in results
    assert not [p for p in tmp_path.rglob("*") if p.name in ("mlflow.db", "mlruns", "mlartifacts")]


def test_serving_only_targets_table(tmp_path):
    """``fleet bench --serving-only``: every row of issue 12's targets table measured against a real version, its
    SIMULATED big sibling, a real HTTP server and K fp32 teachers (the peer, cycled when fewer than K exist); the
    scoring rows carry the peer and the ratio; JSON and markdown written. No timing assertions."""
    import pyarrow as pa
    from test_serving import NUM_EVENT_TYPES, NUM_FEATURES, build_version

    from fleet.formats.events import write_events
    from fleet.formats.teachers import TeacherConfig, TeacherRNN, save_teacher
    from fleet.synthetic.synth import SynthConfig, campaign_ids, generate

    built = build_version(str(tmp_path / "store"))
    fleet_dir, out = tmp_path / "fleet", tmp_path / "out"
    synth = SynthConfig(
        campaigns=3,
        num_event_types=NUM_EVENT_TYPES,
        num_features=NUM_FEATURES,
        min_sequences=100,
        max_sequences=120,
        seed=1,
    )
    write_events(str(fleet_dir / "events"), pa.concat_tables([generate(synth, i) for i in range(3)]))
    for cid in campaign_ids(3):
        config = TeacherConfig(
            cid,
            arch="lstm",
            num_event_types=NUM_EVENT_TYPES,
            embed_dim=8,
            num_features=NUM_FEATURES,
            hidden_size=16,
            num_layers=1,
        )
        save_teacher(str(fleet_dir / "teachers"), TeacherRNN(config), config)
    code = main(
        [
            "bench",
            "--serving-only",
            "--model",
            built.uri,
            "--fleet-dir",
            str(fleet_dir),
            "--out",
            str(out),
            "--scale-campaigns",
            "1500",
            "--warm-requests",
            "30",
            "--http-requests",
            "20",
        ]
    )
    assert code == 0
    st = json.loads((out / "serving-targets.json").read_text())["serving_targets"]
    assert [r["key"] for r in st["targets"]] == list(SERVING_TARGETS)
    for row in st["targets"]:
        assert finite(row["value"]) and row["value"] > 0 and isinstance(row["passed"], bool), row
        if row["key"] in ("score", "http_score"):
            assert finite(row["peer"]) and finite(row["ratio"]) and row["ratio"] > 0, row
        else:
            assert row["peer"] is None and row["ratio"] is None, row
    assert st["peer"]["k"] == SCORE_K and st["peer"]["teachers_loaded"] == 3
    assert st["score"]["n"] == 30 and st["score_all"]["n"] == SLOW_REQUESTS and st["http_errors"] == 0
    assert st["sim_campaigns"] == 1500 and st["probe"]["heads"]["size"] == 1500
    md = (out / "serving-targets.md").read_text()
    assert "K-teacher peer" in md and sum(line.startswith("| ") for line in md.splitlines()) == len(SERVING_TARGETS) + 1
    code = main(
        [
            "bench",
            "--serving-only",
            "--model",
            built.uri,
            "--fleet-dir",
            str(fleet_dir),
            "--out",
            str(out),
            "--scale-campaigns",
            "1500",
            "--warm-requests",
            "30",
            "--http-requests",
            "20",
        ]
    )
    assert code == 0 and len(list((out / "scale-store" / "sim-1500" / "versions").iterdir())) == 1  # reused


def test_serving_only_needs_a_model():
    assert main(["bench", "--serving-only", "--out", "unused", "--fleet-dir", "unused"]) != 0


# ----------------------------------------------------------------------------- fleet bench --write-docs

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _method(label: str, bytes_per_campaign: float, *, extrapolated: bool = False, **extra) -> dict:
    fidelity = {
        "campaigns": 4,
        "campaigns_with_auc": 2,
        "auc_median": 0.71,
        "auc_diff_median": -0.001,
        "auc_diff_p10": -0.01,
        "auc_diff_worst": -0.02,
        "mean_abs_diff_median": 0.01,
        "mean_abs_diff_p90": 0.02,
        "mean_abs_diff_worst": 0.05,
    }
    return {
        "label": label,
        "bytes_per_campaign": bytes_per_campaign,
        "bytes_total": 4 * bytes_per_campaign,
        "extrapolated": extrapolated,
        "compression_ratio": 3e5 / bytes_per_campaign,
        "time_s": 12.5,
        "fidelity": fidelity,
        "bytes_note": "measured",
        "time_note": "wall time",
        **extra,
    }


def _bench_results(run_dir: pathlib.Path) -> pathlib.Path:
    """A results.json of a (made-up) N=4 ``fleet bench`` run and placeholder PNGs next to it: its path."""
    run_dir.mkdir()
    subset = {"auc_diff_median": -0.002, "auc_diff_p10": -0.02, "mean_abs_diff_median": 0.01}
    results = {
        "campaigns": 4,
        "created_at": "20260101T000000Z",
        "bench_seconds": 600.0,
        "mlflow_run_id": None,
        "argv": ["/venv/bin/fleet", "bench", "--campaigns", "4", "--out", "bench-out/n4"],
        "fleet": {"how": "made by the benchmark"},
        "machine": {
            "cpus": 2,
            "memory_gib": 24.0,
            "platform": "Linux",
            "python": "3.11",
            "torch": "2.13",
            "load_average_at_start": [1.0, 1.0, 1.0],
            "load_average_at_end": [2.0, 1.5, 1.0],
        },
        "bench_config": {
            "synth": {"num_layers": 1, "arch": "lstm", "hidden_size": 16, "seed": 3},
            "compress": {"min_auc_class_count": 5},
        },
        "methods": {
            "teacher_fp32": _method("(a) teacher fp32", 3e5),
            "teacher_int8_dynamic": _method("(b) teacher int8", 8e4),
            "independent_students": _method(
                "(c) independent students", 7e3, extrapolated=True, subset_size=3, fleet_auto_on_same_subset=subset
            ),
            "fleet_auto": _method("(d) fleet auto", 130.0, bits_campaigns={"1": 0, "2": 1, "4": 2, "8": 1, "16": 0}),
        },
        "real_run": {
            "stage_seconds": {"soft_labels": 5.0, "backbone": 4.0, "heads": 2.0},
            "registration_and_overhead_seconds": 1.5,
            "wall_seconds": 12.5,
            "total_over_floor": 2.5,
            "run_over_floor": 2.2,
            "floor_seconds": 5.0,
        },
        "targets": [
            {
                "figure": "bytes per campaign",
                "target": "<= 128 B",
                "value": 130.0,
                "passed": False,
                "source": "real run",
            },
            {"figure": "AUC diff median", "target": ">= -0.005", "value": -0.001, "passed": True, "source": "real run"},
        ],
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    for name in PLOTS:
        (run_dir / name).write_bytes(b"PNG " + name.encode())
    return run_dir / "results.json"


def test_write_docs_rewrites_the_generated_section_only(tmp_path):
    """``fleet bench --write-docs RESULTS.json`` on a copy of docs/benchmarks.md: the section above its end line is
    rewritten from the results (with --docs-prose's prose), the rest is kept byte for byte, the PNGs are copied next
    to the page; nothing is run. A page without the end line is refused and left as it was; a new page is created.
    """
    real = ROOT / "docs" / "benchmarks.md"
    original = real.read_text()
    assert original.count(DOCS_END) == 1
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(original)
    results = _bench_results(tmp_path / "run")
    prose = tmp_path / "prose.json"
    prose.write_text(
        json.dumps({"status": "A made-up run.", "why": {"bytes per": "Too few campaigns."}, "notes": "Caveats."})
    )
    argv = ["bench", "--write-docs", str(results), "--docs", str(page), "--docs-prose", str(prose)]
    assert main(argv) == 0
    text = page.read_text()
    head, end, tail = text.partition(DOCS_END)
    assert end and tail == original.partition(DOCS_END)[2]
    assert "**N = 4** campaigns" in head and "N = 1000" not in head
    assert "fleet bench --campaigns 4 --out bench-out/n4" in head and "| (d) fleet auto | 130 bytes |" in head
    assert "> A made-up run." in head and "Too few campaigns." in head and "\nCaveats.\n" in head
    for name in PLOTS:
        assert (tmp_path / "docs" / "benchmarks" / name).read_bytes() == b"PNG " + name.encode()
    assert main(argv) == 0 and page.read_text() == text  # the kept part is kept again
    assert real.read_text() == original

    other = tmp_path / "other.md"
    other.write_text("# by hand\n")
    assert main(["bench", "--write-docs", str(results), "--docs", str(other)]) == 1
    assert other.read_text() == "# by hand\n" and not (tmp_path / "other").exists()
    new = tmp_path / "new.md"
    assert main(["bench", "--write-docs", str(results), "--docs", str(new)]) == 0
    assert new.read_text().endswith("\n" + DOCS_END + "\n") and (tmp_path / "new" / next(iter(PLOTS))).is_file()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"reasons": "?"}))
    assert main(["bench", "--write-docs", str(results), "--docs", str(new), "--docs-prose", str(bad)]) == 2
    assert main(["bench", "--write-docs", str(results), "--zoo", "--docs", str(new)]) == 2
    assert main(["bench", "--campaigns", "4"]) == 2  # --out is required but with --write-docs
