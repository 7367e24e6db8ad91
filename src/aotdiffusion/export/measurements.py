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
import tempfile
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


def _read() -> dict[str, Any]:
    try:
        with open(checksums.cache_dir() / FILE) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recall(measurement_key: str) -> dict[str, Any] | None:
    return _read().get(measurement_key)


def remember(measurement_key: str, value: dict[str, Any]) -> None:
    folder = checksums.cache_dir()
    data = {**_read(), measurement_key: {k: v for k, v in value.items() if k != "remembered"}}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".measurements-")
        with os.fdopen(handle, "w") as out:
            json.dump(data, out)
        os.replace(temporary, folder / FILE)
    except OSError:
        pass
