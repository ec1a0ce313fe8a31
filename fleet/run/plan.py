"""A run's plan (``plan.json`` in its work dir), fixed when the run starts so that a resumed run redoes exactly the
same shards: what it holds (:class:`Plan`), how a new run makes it (:func:`make_plan`), the settings a run id is
resumed with (:func:`run_settings`), and the stage jobs made from it (:class:`~fleet.run.stages.ShardJob`). No Ray.

``plan.json`` keeps the keys fleet always wrote (:meth:`Plan.to_json`), and ``format``: a plan without it (written
before it) or without the keys added since its run (``sizes``, ``packed``, ``teacher_conflicts``, ``inputs``,
``config_sha256``) reads with their defaults, so a run planned by an older fleet resumes.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from fleet.core.constants import NAME_PATTERN, PLAN_FORMAT
from fleet.core.errors import FleetError, StoreError
from fleet.core.redact import scrub
from fleet.formats.events import EventsDataset
from fleet.formats.teacher_pack import PACKS_DIR, TeacherCatalog, locate_teachers
from fleet.run.stages import CompressConfig, ShardJob
from fleet.storage.store import FleetVersion, RunDir, json_safe, open_fs, sha256_bytes


@dataclass(frozen=True)
class Plan:
    """What a run does: its campaigns cut into ``batches`` (work-dir shard ``shards[i]`` holds ``batches[i]``), the
    input space, each campaign's event rows (``sizes``), where packed teachers are and which ids are ambiguous, the
    parent version (``parent_manifest``, None for a full run) and the head hashes a campaign may reuse from it,
    whether the backbone is retrained, and the configuration the run goes on with (``config``, ``inputs`` and
    their hash ``config_sha256``: :func:`run_settings`; the hashes ``--force-config`` replaced in
    ``config_sha256_replaced``)."""

    all_campaigns: list[str]
    batches: list[list[str]]
    shards: list[str]
    num_event_types: int
    num_features: int
    config: dict
    parent_manifest: str | None = None
    parent_hashes: dict[str, list[str]] = field(default_factory=dict)
    retrain_backbone: bool = True
    sizes: dict[str, int] = field(default_factory=dict)
    packed: dict[str, list] = field(default_factory=dict)
    teacher_conflicts: dict[str, str] = field(default_factory=dict)
    inputs: dict | None = None
    config_sha256: str | None = None
    config_sha256_replaced: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The plan as ``plan.json`` holds it: every field under its name, and ``format``."""
        return {"format": PLAN_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, obj: dict, path: str | None = None) -> Plan:
        """The plan of ``plan.json``'s object (``path`` names it in errors): :class:`StoreError` for another
        format or a missing key that has no default; keys a later fleet may add are ignored."""
        if not isinstance(obj, dict):
            raise StoreError("plan.json is not a JSON object", path=path)
        if obj.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise StoreError(f"plan format {obj['format']!r} is not {PLAN_FORMAT}", path=path)
        fields = dataclasses.fields(cls)
        missing = [
            f.name
            for f in fields
            if f.name not in obj and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise StoreError(f"plan.json lacks {', '.join(missing)}", path=path)
        return cls(**{f.name: obj[f.name] for f in fields if f.name in obj})

    @classmethod
    def read(cls, run_dir: RunDir) -> Plan:
        """The plan in ``run_dir`` (:class:`StoreError` when it has none)."""
        return cls.from_json(run_dir.read_plan(), path=run_dir.plan_uri)

    def write(self, run_dir: RunDir) -> None:
        """Write the plan to ``run_dir`` (replacing the one there)."""
        run_dir.write_plan(self.to_json())

    def with_settings(self, settings: dict) -> Plan:
        """This plan going on with other ``settings`` (:func:`run_settings`; ``--force-config``): they replace its
        own, whose hash joins ``config_sha256_replaced``."""
        return dataclasses.replace(
            self,
            **_settings_record(settings),
            config_sha256_replaced=[*self.config_sha256_replaced, self.config_sha256],
        )

    def batches_of(self, shards: Iterable[str]) -> list[list[str]]:
        """The batches of ``shards`` (names of this plan's shards; others are ignored), in plan order."""
        wanted = set(shards)
        return [batch for name, batch in zip(self.shards, self.batches) if name in wanted]

    def shards_with(self, campaigns: set[str]) -> list[str]:
        """The shards holding any of ``campaigns``."""
        return [name for name, batch in zip(self.shards, self.batches) if any(c in campaigns for c in batch)]

    def soft_label_jobs(
        self, quotas: dict[str, int], parent_hashes: dict[str, list[str]], done: set[str]
    ) -> list[ShardJob]:
        """Stage 1's jobs: one per shard not ``done``, with its campaigns' backbone ``quotas`` and ``parent_hashes``."""
        return [
            ShardJob(
                batch,
                name,
                backbone_quota=_subset(quotas, batch),
                parent=_subset(parent_hashes, batch),
                packed=_subset(self.packed, batch),
                teacher_conflicts=_subset(self.teacher_conflicts, batch),
            )
            for name, batch in zip(self.shards, self.batches)
            if name not in done
        ]

    def head_jobs(self, hashes: dict[str, list[str]], done: set[str]) -> list[ShardJob]:
        """Stage 3's jobs for the shards not ``done`` holding a campaign to fit (a key of ``hashes``: its
        ``[teacher_sha, data_fp]``), with those campaigns only. Consecutive shards with few such campaigns (an
        incremental night: 1% changed leaves ~17 per shard at 100,000 users) are fitted together
        (``ShardJob.parts``): a task's fixed cost is paid per job, not per shard. A job takes at least half a
        batch of the plan's, or a quarter as many jobs as the plan has batches when fewer campaigns are left to
        fit (plans have at least 4 batches per CPU: every CPU keeps a job). A full run's shards are one job each."""
        pending = [(name, [c for c in batch if c in hashes]) for name, batch in zip(self.shards, self.batches)]
        pending = [(name, mine) for name, mine in pending if mine and name not in done]
        batches = max(1, len(self.batches))
        to_fit = sum(len(mine) for _, mine in pending)
        target = max(1, math.ceil(min(len(self.all_campaigns) / (2 * batches), 4 * to_fit / batches)))
        jobs, group = [], {}
        for name, mine in pending:
            group[name] = mine
            if sum(len(m) for m in group.values()) >= target:
                jobs.append(_head_job(group, hashes))
                group = {}
        if group:
            jobs.append(_head_job(group, hashes))
        return jobs


def _head_job(group: dict[str, list[str]], hashes: dict[str, list[str]]) -> ShardJob:
    """One stage-3 job for the campaigns ``group`` holds per shard (``parts`` only when there are several)."""
    campaigns = [c for mine in group.values() for c in mine]
    parts = group if len(group) > 1 else {}
    return ShardJob(campaigns, next(iter(group)), hashes=_subset(hashes, campaigns), parts=parts)


def _subset(mapping: dict, keys: list[str]) -> dict:
    return {k: mapping[k] for k in keys if k in mapping}


def make_plan(
    teachers_uri: str,
    events_uri: str,
    config: CompressConfig,
    settings: dict,
    *,
    parent: FleetVersion | None,
    retrain_backbone: bool,
    num_cpus: int,
    storage_options: dict | None = None,
) -> Plan:
    """A new run's plan with its ``settings`` (:func:`run_settings`): the campaigns of the teachers under
    ``teachers_uri`` cut into batches (:func:`plan_batches`, for ``num_cpus`` CPUs), the input space
    (:func:`input_space`), each campaign's event rows, and ``parent`` (None: a full run) with the head hashes a
    campaign may reuse from it."""
    catalog = locate_teachers(teachers_uri, storage_options)
    campaigns = catalog.campaigns
    if not campaigns:
        raise FleetError("no teachers found", path=teachers_uri)
    num_event_types, num_features = input_space(teachers_uri, catalog, config, storage_options)
    sizes = EventsDataset(events_uri, storage_options).campaign_sizes()
    batches = plan_batches(campaigns, sizes, config, num_cpus)
    parent_hashes = {}
    # bloomier: a filter block is a contiguous id range refitted whole, so no head is reused from the parent, and
    # a packed run does not reuse the rows of a bloomier parent either (a row decodes only within its block)
    if (
        parent is not None
        and not retrain_backbone
        and config.codec == "packed"
        and parent.manifest.get("heads_codec", "packed") == "packed"
    ):
        table = parent.read_heads().select(["campaign_id", "teacher_sha256", "data_fingerprint"])
        parent_hashes = {c: [t.hex(), d.hex()] for c, t, d in zip(*(table[k].to_pylist() for k in table.column_names))}
    return Plan(
        all_campaigns=campaigns,
        batches=batches,
        shards=[f"b{i:05d}" for i in range(len(batches))],
        num_event_types=num_event_types,
        num_features=num_features,
        packed=catalog.plan_entries(),
        teacher_conflicts=catalog.conflicts,
        sizes={c: int(sizes.get(c, 0)) for c in campaigns},
        parent_manifest=parent.uri if parent is not None else None,
        parent_hashes=parent_hashes,
        retrain_backbone=bool(retrain_backbone or parent is None),
        **_settings_record(settings),
    )


def input_space(
    teachers_uri: str, catalog: TeacherCatalog, config: CompressConfig, storage_options: dict | None
) -> tuple[int, int]:
    """``(num_event_types, num_features)`` of the fleet: the config's, else the first readable ``config.json`` of
    the teachers (of a pack or a teacher directory) under ``teachers_uri``."""
    if config.num_event_types and config.num_features:
        return config.num_event_types, config.num_features
    fs, path = open_fs(teachers_uri, storage_options)
    packs = sorted({slot.pack for slot in catalog.packed.values()})[:50]
    directories = [
        c
        for c in catalog.campaigns
        if NAME_PATTERN.fullmatch(c) and c not in catalog.packed and c not in catalog.conflicts
    ][:50]  # an id is no path yet
    for config_path in [f"{path}/{PACKS_DIR}/{p}/config.json" for p in packs] + [
        f"{path}/{c}/config.json" for c in directories
    ]:
        try:
            data = json.loads(fs.cat_file(config_path))
            return int(data["num_event_types"]), int(data["num_features"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise FleetError(
        "cannot read num_event_types/num_features from any of the first teachers' config.json; set them in the config",
        path=teachers_uri,
    )


def plan_batches(campaigns: list[str], sizes: dict[str, int], config: CompressConfig, num_cpus: int) -> list[list[str]]:
    """``campaigns`` cut into the run's batches, balanced by their cost in event rows (``sizes``): at least 4 batches
    per CPU, at most 2,000 campaigns and about 200k rows each (``campaigns_per_task`` set: that many campaigns
    each); contiguous id ranges for the bloomier codec (:func:`contiguous_batches`)."""
    cost = {c: float(min(sizes.get(c, 1), config.max_fit_rows + config.max_validation_rows) + 50) for c in campaigns}
    per_task = config.campaigns_per_task or 2000
    num_batches = max(4 * num_cpus, math.ceil(len(campaigns) / per_task), math.ceil(sum(cost.values()) / 200_000))
    if config.campaigns_per_task:
        num_batches = math.ceil(len(campaigns) / config.campaigns_per_task)
    if config.codec == "bloomier":
        return contiguous_batches(campaigns, num_batches, config.bloomier_block_rows)
    return contiguous_balanced_batches(cost, num_batches)


def contiguous_balanced_batches(costs: dict[str, float], num_batches: int) -> list[list[str]]:
    """The sorted ids of ``costs`` cut into at most ``num_batches`` contiguous runs of similar total cost (each
    cut where the running total is nearest a multiple of the mean batch cost). A batch is then a range of ids,
    which a stage reads from Parquet with row-group statistics pruning the rest (events written campaign by
    campaign); scattered ids made every batch's read scan every row group (a 100,000-user stage 1: ~10 s per
    batch of 1,700 users)."""
    ordered = sorted(costs)
    count = max(1, min(num_batches, len(ordered)))
    running = list(itertools.accumulate(costs[c] for c in ordered))  # (N,) cost up to and including each id
    cuts = [0]
    for k in range(1, count):
        target = running[-1] * k / count
        i = bisect.bisect_left(running, target)  # first id whose running total reaches the target
        i += 1 if i < len(running) and running[i] - target < target - (running[i - 1] if i else 0.0) else 0
        cuts.append(min(max(i, cuts[-1] + 1), len(ordered) - (count - k)))  # non-empty, room for the rest
    cuts.append(len(ordered))
    return [ordered[a:b] for a, b in itertools.pairwise(cuts)]


def contiguous_batches(campaigns: list[str], num_batches: int, max_size: int) -> list[list[str]]:
    """Sorted ``campaigns`` cut into contiguous runs of at most ``max_size``: ``num_batches`` runs of equal
    size (+-1) or more where ``max_size`` needs more. The ``bloomier`` codec's plan: one batch is one filter
    block, whose rows must be consecutive in the heads table."""
    ordered = sorted(campaigns)
    count = max(1, min(len(ordered), max(num_batches, math.ceil(len(ordered) / max_size))))
    bounds = [round(i * len(ordered) / count) for i in range(count + 1)]
    return [ordered[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def balanced_batches(costs: dict[str, float], num_batches: int) -> list[list[str]]:
    """Split items into at most ``num_batches`` batches of similar total cost (largest first, greedy,
    a heap of batch loads); each batch is sorted and the result is deterministic."""
    heap = [(0.0, i) for i in range(max(1, min(num_batches, len(costs))))]
    members: list[list[str]] = [[] for _ in heap]
    for item in sorted(costs, key=lambda k: (-costs[k], k)):
        load, i = heapq.heappop(heap)
        members[i].append(item)
        heapq.heappush(heap, (load + costs[item], i))
    return sorted((sorted(m) for m in members if m), key=lambda m: m[0])


def run_settings(
    config: CompressConfig,
    teachers_uri: str,
    events_uri: str,
    *,
    retrain_backbone: bool = False,
    no_parent: bool = False,
) -> dict:
    """What a run id is planned with and must be resumed with: every ``CompressConfig`` field, the teachers and
    events URIs (credentials scrubbed) and the two flags that shape the plan."""
    return {
        "config": json_safe(config.to_dict()),
        "inputs": {
            "teachers": scrub(teachers_uri),
            "events": scrub(events_uri),
            "retrain_backbone": bool(retrain_backbone),
            "no_parent": bool(no_parent),
        },
    }


def settings_sha256(settings: dict) -> str:
    """Hex sha256 of :func:`run_settings` as canonical JSON (sorted keys, no spaces): ``plan.json``'s ``config_sha256``."""
    return sha256_bytes(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())


def _settings_record(settings: dict) -> dict:
    return {"config": settings["config"], "inputs": settings["inputs"], "config_sha256": settings_sha256(settings)}
