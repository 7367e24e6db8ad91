"""A cache of compiled packages: exporting the same graph with the same weights, options, torch version and CPU
ISA again copies the compiled code and frozen weights instead of compiling (minutes for a full-size UNet).

The key hashes everything the compiled package depends on: the exported graph's code and signature, every
weight and constant (names, dtypes, shapes and bytes: freezing folds the weights into the package), the
example input shapes, the compiler and packaging options, and the torch, aotdiffusion and CPU ISA versions.
Entries live in ``$AOTDIFFUSION_CACHE_DIR/compiled/<key>/`` (see ``checksums.cache_dir``), each written
atomically with a record of its files' sha256, which a hit checks before copying (a cache entry altered on
disk is dropped and compiled again). The oldest entries are removed once the cache holds more than
``$AOTDIFFUSION_COMPILE_CACHE_GB`` (default 20) GiB.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import artifact, checksums

RECORD = "files.json"


def root() -> Path:
    return checksums.cache_dir() / "compiled"


def key(program: torch.export.ExportedProgram, inputs: dict[str, torch.Tensor], settings: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(program.graph_module.code.encode())
    digest.update(str(program.graph_signature).encode())
    tensors = {**program.state_dict, **program.constants}
    for name in sorted(tensors):
        value = tensors[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().data)
        else:  # a script object (quantization parameters): its repr carries them
            digest.update(repr(value).encode())
    shapes = {name: (str(t.dtype), tuple(t.shape)) for name, t in inputs.items()}
    versions = {"torch": torch.__version__, "aotdiffusion": artifact.package_version(), "isa": artifact.cpu_isa()}
    digest.update(json.dumps([shapes, settings, versions], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def fetch(cache_key: str, target: Path) -> dict[str, str] | None:
    """Copies a cached package to ``target`` and returns its files' sha256 (by path relative to the package);
    None when there is none (or it no longer matches its record)."""
    entry = root() / cache_key
    try:
        record = json.loads((entry / RECORD).read_text())
    except (OSError, ValueError):
        return None
    files = {entry / name: digest for name, digest in record.items()}
    if not all(path.is_file() for path in files) or checksums.unverified(files):
        shutil.rmtree(entry, ignore_errors=True)
        return None
    for path in files:
        destination = target / path.relative_to(entry)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    os.utime(entry)  # recently used: evicted last
    return record


def store(cache_key: str, package: Path, digests: dict[str, str]) -> None:
    """Copies a freshly compiled package, whose files have the sha256 ``digests``, into the cache (best effort:
    a full or read-only cache is skipped)."""
    entry = root() / cache_key
    partial = root() / f".{cache_key}.partial-{os.getpid()}"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(package, partial)
        (partial / RECORD).write_text(json.dumps(digests))
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(partial, entry)
        checksums.remember({entry / name: digest for name, digest in digests.items()})
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        return
    _evict(limit=float(os.environ.get("AOTDIFFUSION_COMPILE_CACHE_GB", "20")) * 2**30)


def _evict(limit: float) -> None:
    entries = [path for path in root().iterdir() if path.is_dir() and not path.name.startswith(".")]
    sizes = {path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for path in entries}
    total = sum(sizes.values())
    for path in sorted(entries, key=lambda p: p.stat().st_mtime):  # oldest use first
        if total <= limit:
            break
        shutil.rmtree(path, ignore_errors=True)
        total -= sizes[path]
