"""The one home of fleet's contract constants: file-format names, the name grammar, fixed byte sizes, bit widths
and the environment variables fleet reads. Ground floor: imports nothing from fleet.

A format name is ``<name>/<major>[.<minor>]``; readers accept any minor of the major they know
(:func:`fleet.formats.codec.check_format`). Changing a constant here changes a contract with files already
written or with deployed configuration: bump the format's version and update ``docs/formats.md`` and
``docs/storage.md`` with it.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

# ----------------------------------------------------------------------------- format names

#: A teacher directory's ``config.json`` (``fleet.formats.teachers``; docs/formats.md).
TEACHER_FORMAT = "fleet-teacher/1"
#: A teacher pack, many teachers per directory (``fleet.formats.teacher_pack``; docs/formats.md).
PACK_FORMAT = "fleet-teacher-pack/1"
#: Heads tables of packed heads only (``fleet.formats.codec``; docs/storage.md).
HEADS_FORMAT = "fleet-heads/1.1"
#: Heads tables holding ``bloomier`` rows (``fleet.formats.codec.HEADS_SCHEMA_V2``).
HEADS_FORMAT_V2 = "fleet-heads/2.0"
#: A version's ``rejects.parquet`` (``fleet.formats.codec.REJECTS_SCHEMA``).
REJECTS_FORMAT = "fleet-rejects/1"
#: ``backbone.safetensors`` (``fleet.formats.backbone_codec``, read without torch by ``fleet.compression.numpy_backbone``).
BACKBONE_FORMAT = "fleet-backbone/1"
#: A version's ``manifest.json`` (``fleet.storage.store``). 1.1 added each heads part's ``footer`` and
#: ``row_group_checksums`` (sha256 of the byte ranges a cold lookup reads); 1.0 manifests are still read, their
#: point lookups checked by nothing but the Parquet page checksums (when the file has them). 1.2 added
#: ``heads_codec`` (absent: ``"packed"``).
VERSION_FORMAT = "fleet-version/1.2"
#: A run's ``plan.json`` (``fleet.run.plan.Plan``).
PLAN_FORMAT = "fleet-plan/1"
#: The MLflow pyfunc's data file :data:`PYFUNC_CONFIG_FILE` (written by ``fleet.storage.registry``, read by
#: ``fleet.serve.pyfunc``).
PYFUNC_FORMAT = "fleet-pyfunc/1"
#: The name of that data file in the logged model's data directory.
PYFUNC_CONFIG_FILE = "fleet_model.json"
#: ``fleet bench``'s ``results.json`` (``fleet.bench.common``).
BENCH_RESULTS_FORMAT = "fleet-bench/1"
#: ``fleet bench --scale``'s results (``fleet.bench.scale``).
BENCH_SCALE_FORMAT = "fleet-bench-scale/1"

# ----------------------------------------------------------------------------- names, sizes, bit widths

#: The one name grammar: campaign ids, fleet names, version ids, registered model names; validated before a
#: name ever becomes a path or an object key (``fleet.core.ids.validate_campaign_id``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: Bit widths a head may be stored with; 16 means float16 values (no codes, no scales).
SUPPORTED_BITS = (1, 2, 4, 8, 16)
#: Head codecs (a heads row's ``codec``, ``CompressConfig.codec``): ``packed`` (bit-packed integer codes,
#: ``fleet-heads/1.1``), ``bloomier`` (Weightless, ``fleet-heads/2.0``); :data:`CODECS` are its values, in order.
Codec = Literal["packed", "bloomier"]
#: The values of :data:`Codec`.
CODECS: tuple[Codec, ...] = get_args(Codec)
#: Bytes of a head row's ``teacher_sha256`` (a full sha256 of the teacher's files).
TEACHER_SHA256_BYTES = 32
#: Bytes of a campaign's data fingerprint (``fleet.formats.events.data_fingerprint``): a 128-bit sha256 prefix
#: is ample to detect changed data between nights (it is no security boundary) at half the bytes.
DATA_FINGERPRINT_BYTES = 16

# ----------------------------------------------------------------------------- environment variables

#: fsspec storage options as a JSON object (credentials), read when none are passed.
ENV_STORAGE_OPTIONS = "FLEET_STORAGE_OPTIONS"
#: Where a store has moved to: a saved manifest URI is read under this root instead (``fleet.storage.store.relocated``).
ENV_STORE_ROOT = "FLEET_STORE_ROOT"
#: ``fleet serve``'s admin token (else ``--admin-token-file``; neither: ``/admin/*`` is disabled).
ENV_ADMIN_TOKEN = "FLEET_ADMIN_TOKEN"
#: Seconds between two progress lines when stderr is not a terminal (a positive number; ``fleet.core.progress``).
ENV_PROGRESS_SECONDS = "FLEET_PROGRESS_SECONDS"
#: Crash-test hook: ``FLEET_FAULT_AFTER_STAGE=<stage>`` SIGKILLs the ``fleet compress`` driver once ``stage`` is done.
ENV_FAULT_AFTER_STAGE = "FLEET_FAULT_AFTER_STAGE"

__all__ = [
    "BACKBONE_FORMAT",
    "BENCH_RESULTS_FORMAT",
    "BENCH_SCALE_FORMAT",
    "CODECS",
    "DATA_FINGERPRINT_BYTES",
    "ENV_ADMIN_TOKEN",
    "ENV_FAULT_AFTER_STAGE",
    "ENV_PROGRESS_SECONDS",
    "ENV_STORAGE_OPTIONS",
    "ENV_STORE_ROOT",
    "HEADS_FORMAT",
    "HEADS_FORMAT_V2",
    "NAME_PATTERN",
    "PACK_FORMAT",
    "PLAN_FORMAT",
    "PYFUNC_CONFIG_FILE",
    "PYFUNC_FORMAT",
    "REJECTS_FORMAT",
    "SUPPORTED_BITS",
    "TEACHER_FORMAT",
    "TEACHER_SHA256_BYTES",
    "VERSION_FORMAT",
    "Codec",
]
