"""``aotdiffusion bench-load``: how long an export takes to load in a new process, page cache warm and cold.

Each run is a fresh Python process that imports aotdiffusion and calls ``from_pretrained`` (format 2:
each component's unpacked package opened in place). The baseline in the same run is the way format 1
loaded: the same compiled packages, each as one ``.pt2`` zip, loaded with ``aoti_load_package``, which
extracts the zip to a temporary folder on every load. Cold runs first drop the files' pages from the
page cache (``posix_fadvise(DONTNEED)``: no root needed), so the files are read from the disk again.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from .. import artifact


def _drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # dirty pages cannot be dropped
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _zip_packages(export: Path, out: Path) -> dict[str, Path]:
    """Each compiled component's package as one ``.pt2`` zip (stored, as AOTInductor writes them)."""
    zips = {}
    for component in artifact.read_pipeline_index(export)[1]["components"]:
        folder = export / component
        target = out / f"{component}.pt2"
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
            for relative in artifact.package_files(folder):
                archive.write(folder / relative, str(relative))
        zips[component] = target
    return zips


def _child(mode: str, target: str, spawned: float) -> dict[str, Any]:
    """Runs in the fresh process: times the load the way ``mode`` says."""
    import resource

    import torch

    from aotdiffusion import AOTDiffusionPipeline

    imported = time.time()  # this module's own imports already loaded torch, diffusers and aotdiffusion
    if mode == "format 2":
        pipe = AOTDiffusionPipeline.from_pretrained(target)
        pipe.set_progress_bar_config(disable=True)
    else:
        loaded = [torch._inductor.aoti_load_package(str(path)) for path in sorted(Path(target).glob("*.pt2"))]
        assert loaded
    done = time.time()
    return {
        "start_s": imported - spawned,
        "load_s": done - imported,
        "total_s": done - spawned,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _run(mode: str, target: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "aotdiffusion.bench.load", "--child", mode, str(target), repr(time.time())]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(export: str | Path, *, runs: int = 3, output_dir: str | Path = "bench-load-results") -> dict[str, Any]:
    from .run import hardware, versions

    export, out = Path(export), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [path for path in export.rglob("*") if path.is_file()]
    size = sum(path.stat().st_size for path in files)
    results: dict[str, Any] = {
        "export": str(export),
        "export_gib": size / 2**30,
        "hardware": hardware(),
        "versions": versions(),
        "runs": runs,
        "modes": {},
    }
    with tempfile.TemporaryDirectory(dir=out, prefix="zips-") as zips_dir:
        for mode in ("format 2", "format 1 (zip extracted per load)"):
            if mode == "format 2":
                mode_kind, target, its_files = "format 2", export, files
            else:  # written after format 2 is timed, and flushed: writing gigabytes would slow its loads
                mode_kind, target = "zip", Path(zips_dir)
                its_files = list(_zip_packages(export, target).values())
                os.sync()
            _run(mode_kind, target)  # warms the page cache (and Python's bytecode cache)
            warm = [_run(mode_kind, target) for _ in range(runs)]
            cold = []
            for _ in range(runs):
                _drop_from_page_cache(its_files)
                cold.append(_run(mode_kind, target))
            results["modes"][mode] = {
                cache: {key: _summary([r[key] for r in rows]) for key in rows[0]}
                for cache, rows in (("warm", warm), ("cold", cold))
            }
            print(f"{mode}: load warm {results['modes'][mode]['warm']['load_s']['median']:.2f} s, "
                  f"cold {results['modes'][mode]['cold']['load_s']['median']:.2f} s", flush=True)  # fmt: skip
    (out / "load.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "load.md").write_text(render_markdown(results))
    print(render_markdown(results))
    return results


def render_markdown(results: dict[str, Any]) -> str:
    hw = results["hardware"]
    lines = [
        f"Load of `{results['export']}` ({results['export_gib']:.2f} GiB) in a new process, {hw['cpu']}, "
        f"{hw['cores']} cores, torch {results['versions']['torch']}; median (min-max) of {results['runs']} runs, "
        "seconds. load = `from_pretrained` (format 1: `aoti_load_package` of each component's zip).",
        "",
        "| format | page cache | process start + imports | load | new process to loaded | peak RSS GiB |",
        "|---|---|---|---|---|---|",
    ]
    for mode, caches in results["modes"].items():
        for cache, row in caches.items():
            cells = [
                f"{row[key]['median']:.2f} ({row[key]['min']:.2f}-{row[key]['max']:.2f})"
                for key in ("start_s", "load_s", "total_s")
            ]
            lines.append(f"| {mode} | {cache} | " + " | ".join(cells) + f" | {row['peak_rss_gib']['median']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
