"""Atomic exports: an export is written into a hidden folder beside its target and moved into place only
when complete, so a killed or failed export never leaves a half export that loads.

A target holds either nothing, or a complete export (the previous one until the new one is complete).
The hidden folders are named after the target and the exporting process (``.NAME.partial-PID`` while
writing, ``.NAME.old-PID`` for the previous export during the swap); the next export to the same target
removes those of processes that no longer run, and puts back a previous export a kill left aside.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large", "File size limit exceeded")


class DiskFullError(OSError):
    """The disk filled up during an export; nothing was written to the target."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def check_target(output: Path, overwrite: bool) -> None:
    """Refuses a target that holds something unless ``overwrite`` (checked before minutes of compiling)."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} is a file, not a folder; choose a folder to export to.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output} is not empty; choose a new output folder, or pass overwrite=True (CLI: --overwrite) to "
            "replace what it holds once the new export is complete."
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_leftovers(output: Path) -> list[Path]:
    """Removes what killed exports to ``output`` left beside it; returns what was removed or restored.

    A previous export moved aside by a swap that was killed is put back when the target is empty.
    """
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(partial|old)-(\d+)$")
    handled = []
    if not output.parent.is_dir():
        return handled
    for path in sorted(output.parent.iterdir()):
        match = pattern.match(path.name)
        if match is None:
            continue
        kind, pid = match.group(1), int(match.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            raise FileExistsError(
                f"Another export to {output} is running (process {pid}, writing {path}); wait for it or "
                "export to another folder."
            )
        if kind == "old" and not output.exists():
            os.rename(path, output)
        else:
            shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


@contextmanager
def staged(output: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields the folder to write the export into; moves it to ``output`` when the block completes.

    On any error the partial folder is removed and ``output`` is untouched; a full disk is reported as
    :class:`DiskFullError` with the free space left.
    """
    check_target(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(output)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        cause = _disk_full(error)
        if cause is not None:
            free = shutil.disk_usage(output.parent).free / 2**30
            raise DiskFullError(
                f"The disk filled up while writing the export ({cause}); {free:.2f} GiB free now. Nothing was "
                f"written to {output}: free some space (a full-size SD 1.5 export takes about 4 GiB in fp32, 8 with "
                "Winograd) or export to another disk.",
            ) from error
        raise
    _move_into_place(staging, output)


def _move_into_place(staging: Path, output: Path) -> None:
    old = None
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    elif output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
    os.rename(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _disk_full(error: BaseException | None) -> str | None:
    """What says the disk is full in an error or one it was raised from (inductor and the C++ compiler wrap
    them), as one short line; None when nothing does."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return os.strerror(error.errno)
        line = next((line for line in str(error).splitlines() if any(t in line for t in _DISK_FULL_TEXT)), None)
        if line is not None:
            return line.strip()[:200]
        error = error.__cause__ or error.__context__
    return None
