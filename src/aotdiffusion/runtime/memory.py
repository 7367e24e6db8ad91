"""Keeps freed memory in the process so that compiled graphs do not page-fault on every call.

A compiled UNet step allocates and frees the same activation buffers each call. glibc hands buffers
over 32 MiB (the GEGLU projection of SD 1.5 writes 84 MiB) straight back to the kernel with
``munmap`` and trims the heap top, so the next call touches fresh pages: about 200k page faults per
SD 1.5 UNet step on a 2-core VM, and the GEGLU matmul ran at half speed. Telling glibc to serve
everything from its heap and never trim it keeps those pages mapped (the effect jemalloc has, without
``LD_PRELOAD``). The process then keeps its peak footprint, which a server wants anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# mallopt parameters from <malloc.h>, and glibc's defaults for the two
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536

_ENV = "AOTDIFFUSION_KEEP_FREED_MEMORY"
_applied = False


def keep_freed_memory() -> bool:
    """Applies the glibc settings once per process; returns whether they are in effect.

    Off with ``AOTDIFFUSION_KEEP_FREED_MEMORY=0``; a no-op where the C library is not glibc.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _applied = _keep(mallopt)
    return _applied


def _keep(mallopt) -> bool:
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """While open, glibc's defaults apply even where :func:`keep_freed_memory` is in effect (large blocks mapped
    and unmapped, the heap's top trimmed), and the heap is trimmed on entry and on exit.

    An export validates each component by loading it, which applies :func:`keep_freed_memory`; the next
    component's compile then allocates and frees gigabytes of transient tensors (freezing's folded and
    prepacked weights, the serialised constants), and a heap that is never trimmed held them: full-size SD 1.5
    on the AMD EPYC Zen 4, RSS during the UNet's validation about 17 GiB, 13-15 GiB with this (the export's
    peak, inside the compile, did not move). Compiling is not a hot loop, so the page faults cost nothing
    that matters there.

    Inside, a block freed below a live one stays resident until the exit's trim (glibc gives back only the
    heap's top; only ``malloc_trim`` releases free blocks inside it): a gigabyte the heap kept before entry and
    reused inside, say. A thread trimming every 0.25 s returned such blocks at once but did not lower the peak:
    full-size SD 1.5's fp32 export on the AMD EPYC Zen 3 (measured timings reused) peaked at 8.93 GiB with it,
    8.86 without, and took 752 s instead of 725 (2237 trims, 16.8 s inside ``malloc_trim``, which locks the heap).
    """
    if not _applied:
        yield
        return
    libc = _libc()
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    # The threshold too: glibc raises it (up to 32 MiB) each time a mapped block is freed before
    # keep_freed_memory froze it, and blocks below it come from a heap whose top a small live object can pin.
    libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        _keep(libc.mallopt)


def return_freed_memory() -> None:
    """Hands the heap's free pages back to the kernel now (glibc's ``malloc_trim``; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            _libc().malloc_trim(0)
        except (OSError, AttributeError):
            pass


@functools.cache
def _libc() -> ctypes.CDLL:
    # Cached: find_library runs ldconfig in a subprocess, a fork of a process that may hold gigabytes.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def map_file(path: Path) -> tuple[int, int]:
    """Maps all of ``path`` read-only and shared (its pages are the page cache's); returns (address, bytes).

    Python's ``mmap`` gives no address of a read-only mapping, which C code reading it (and :func:`unmap_pages`)
    needs. Release it with :func:`unmap_file`.
    """
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc().mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"could not map {path}")
    return address, size


def unmap_file(address: int, size: int) -> None:
    _libc().munmap(address, size)


# From <linux/mman.h> (MADV_PAGEOUT: Linux 5.4+); Python 3.11's mmap module does not name it.
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21


def page_out(tensors: Iterable[torch.Tensor]) -> None:
    """Asks the kernel to reclaim the pages of ``tensors`` now (``madvise(MADV_PAGEOUT)``).

    Pages of a file mapping (weights safetensors mapped from disk, or the export's offloaded weights) leave the
    process and are read from the file again if used; pages nothing else can hold (anonymous memory, without
    swap) stay. No data is lost either way. A no-op where the kernel does not know the advice.
    """
    if not sys.platform.startswith("linux"):
        return
    seen = set()
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.is_mkldnn or tensor.numel() == 0:
            continue
        try:
            storage = tensor.untyped_storage()
            start = storage.data_ptr()
        except (NotImplementedError, RuntimeError):  # a tensor subclass or layout with no plain storage
            continue
        if start in seen:
            continue
        seen.add(start)
        _madvise(start, storage.nbytes(), _MADV_PAGEOUT)  # a page shared with a neighbour is read back if used


def unmap_pages(address: int, count: int) -> None:
    """Drops the pages of ``count`` bytes at ``address`` from this process (``madvise(MADV_DONTNEED)``, pages
    rounded outward). Only for a shared file mapping, whose bytes the page cache keeps: private or anonymous
    memory would read back as the file's bytes or zeros."""
    if sys.platform.startswith("linux"):
        _madvise(address, count, _MADV_DONTNEED)


def _madvise(address: int, count: int, advice: int) -> None:
    """``madvise`` over the whole pages holding ``count`` bytes at ``address`` (it takes a page-aligned start)."""
    first = address // mmap.PAGESIZE * mmap.PAGESIZE
    _libc().madvise(first, address + count - first, advice)
