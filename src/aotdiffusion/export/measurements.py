"""Timings an export measured on this machine, remembered so that an identical export makes the same choice.

``--auto-cast-type auto`` and ``--fp32-linear auto`` time a component's largest operation shapes; two
candidates within a few percent can swap places from one run to the next, and then an export of the same
model would compile different code (and miss the compile cache). The ranking measured for the same shapes,
candidates, device, CPU model and torch version is kept in ``$AOTDIFFUSION_CACHE_DIR/measurements.json``
and reused by the next export (``--no-cache`` measures again and replaces it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from typing import Any

import torch

from .. import checksums

FILE = "measurements.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def key(kind: str, ops: list, candidates: list[str], skipped: dict[str, str], device: str) -> str:
    machine = [_cpu_model(), os.cpu_count(), torch.get_num_threads(), torch.__version__, device]
    text = json.dumps([kind, [repr(op) for op in ops], candidates, sorted(skipped), machine], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def recall(measurement_key: str) -> dict[str, Any] | None:
    return checksums.read_cache_file(FILE).get(measurement_key)


def remember(measurement_key: str, value: dict[str, Any]) -> None:
    data = checksums.read_cache_file(FILE)
    data[measurement_key] = {k: v for k, v in value.items() if k != "remembered"}
    checksums.write_cache_file(FILE, data)
