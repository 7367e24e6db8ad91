"""Atomic exports: an export killed with SIGKILL at any moment, or stopped by a full disk, leaves either no
export at the target or the complete previous one, never a half export; the next export cleans up."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import cli, run_pipe

from aotdiffusion.export import staging

# Runs an export of the tiny model in a fresh process that SIGKILLs itself at one moment of the export (a
# real SIGKILL: no cleanup code runs), reached through the export's own functions.
KILLER = textwrap.dedent(
    """
    import os, signal, sys, threading
    moment, model, target = sys.argv[1:4]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    import torch
    from aotdiffusion import AOTStableDiffusionPipeline, artifact
    from aotdiffusion.export import compile as compile_module, pipeline, staging

    if moment == "tracing":  # inside torch.export of the first component
        real_export = torch.export.export
        torch.export.export = lambda *a, **k: die()
    elif moment == "compiling":  # while AOTInductor compiles the first component
        real_compile = torch._inductor.aot_compile
        def compile_then_die(*a, **k):
            threading.Timer(1.0, die).start()
            real_compile(*a, **k)
            die()
        torch._inductor.aot_compile = compile_then_die
    elif moment == "writing weights":  # half of the first weights blob in the export's folder
        real_move = artifact.shutil.move
        def move(source, destination):
            if str(source).endswith("_weights.blob"):
                with open(source, "rb") as f, open(destination, "wb") as out:
                    data = f.read()
                    out.write(data[: len(data) // 2])
                    out.flush()
                die()
            return real_move(source, destination)
        artifact.shutil.move = move
    elif moment == "validating":
        pipeline.validate_component = lambda *a, **k: die()
    elif moment == "moving into place":  # the previous export moved aside, the new one not yet in
        real_rename = os.rename
        def rename(source, destination):
            real_rename(source, destination)
            if ".old-" in str(destination):
                die()
        staging.os.rename = rename
    # The moments up to writing the weights need a compile; later ones take the session's cached packages.
    AOTStableDiffusionPipeline.export(
        model, target, height=64, width=64, auto_cast="none", overwrite=True,
        compile_cache=moment not in ("tracing", "compiling", "writing weights"),
    )
    """
)

MOMENTS = ["tracing", "compiling", "writing weights", "validating", "moving into place"]


def _killed_export(moment: str, model, target) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILLER, moment, str(model), str(target)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == -signal.SIGKILL, f"{moment}: exit {result.returncode}\n{result.stderr[-3000:]}"


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _leftovers(target) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_a_killed_export_leaves_the_previous_export_whole_and_the_next_one_cleans_up(sd_fp32, tiny_sd, tmp_path, load):
    target = tmp_path / "export"
    shutil.copytree(sd_fp32, target)
    before = _snapshot(target)
    for moment in MOMENTS:
        _killed_export(moment, tiny_sd, target)
        if moment == "moving into place":
            assert not target.exists() and any(".old-" in name for name in _leftovers(target))
        else:
            assert _snapshot(target) == before, moment  # the previous export, untouched
            assert any(".partial-" in name for name in _leftovers(target)), moment
    # The next export puts the previous export back (a swap was killed) and removes every partial folder.
    staging.clean_leftovers(target)
    assert _leftovers(target) == [] and _snapshot(target) == before
    expected = run_pipe(load(target), height=64, width=64)
    # A complete export replaces it only with --overwrite.
    refused = cli("export", "--model", str(tiny_sd), "--height", "64", "--width", "64", str(target), check=False)
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--overwrite" in refused.stderr
    _killed_export("compiling", tiny_sd, target)
    cli("export", "--model", str(tiny_sd), "--height", "64", "--width", "64", "--auto-cast", "none", "--overwrite",
        str(target))  # fmt: skip
    assert _leftovers(target) == [] and _snapshot(target) != before
    np.testing.assert_allclose(run_pipe(load(target), height=64, width=64), expected, atol=1e-4)


def test_a_killed_first_export_leaves_no_export_and_its_leftovers_are_cleaned(tiny_sd, tmp_path, load):
    target = tmp_path / "new"
    _killed_export("validating", tiny_sd, target)
    assert not target.exists() and len(_leftovers(target)) == 1
    with pytest.raises(FileNotFoundError):
        load(target)
    staging.clean_leftovers(target)
    assert list(tmp_path.iterdir()) == []


def _limit_file_size():
    # Every file this process (and the compiler it runs) writes stops at 1 MiB: writes past it fail with
    # EFBIG, the way they fail with ENOSPC on a full disk. The weights blobs are larger than that.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_full_disk_is_a_clear_error_and_writes_nothing(tiny_sd, tmp_path):
    target = tmp_path / "out"
    command = [sys.executable, "-m", "aotdiffusion.cli", "export", "--model", str(tiny_sd), "--height", "64",
               "--width", "64", "--auto-cast", "none", str(target)]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size, env=dict(os.environ)
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: The disk filled up while writing the export" in result.stderr
    assert f"Nothing was written to {target}" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists() and _leftovers(target) == []
