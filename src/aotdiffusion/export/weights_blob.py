"""AOTInductor's weights blob built in its file, not in memory, while the C++ compiles.

torch 2.13's ``AotCodeCompiler.compile`` copies every constant into one ``bytearray`` the size of the blob before
it runs g++, and writes that to ``*_weights.blob`` after: the whole blob sits in memory beside the lowering through
both builds (full-size SD 1.5's UNet: 2.4 GB in bf16, 6.4 GB in fp32 with Winograd's transformed weights).
Inside :func:`blob_built_in_file` that buffer is a shared mapping of a file beside inductor's output instead: each
constant copied in (codecache's ``ctypes.memmove``) is unmapped from the process right away, its bytes left to the
page cache, which the kernel writes back; the mapping is closed when codecache asks its size (right after the copy,
before the builds), and the write of the blob becomes a rename of that file. So the copy never holds more than
one constant in this process, where the ``bytearray`` had the export's peak (the fp32 UNet: 6.5 GiB on top of the
constants themselves). The bytes are the same; the refit program's check reads the blob back and compares every
constant.
"""

from __future__ import annotations

import builtins
import ctypes
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class _MappedBlob(mmap.mmap):
    """A ``bytearray`` stand-in: writable through the buffer protocol until its length is asked for."""

    path: str
    size: int
    address: int

    def __len__(self) -> int:
        # codecache takes len() once, after every constant is copied in and its ctypes view is deleted: the last
        # use of the memory. Unmapping keeps the data (the pages are the file's) and takes them out of this
        # process's resident set.
        if not self.closed:
            self.close()
        return self.size


class _BlobTarget:
    """What ``open(path, "wb")`` gives codecache for the weights blob: writing the mapped blob moves its file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> _BlobTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, data: Any) -> int:
        if isinstance(data, _MappedBlob):
            shutil.move(data.path, self.path)  # a rename: the file was made in inductor's output folder
            return data.size
        with builtins.open(self.path, "wb") as file:
            return file.write(data)


@contextmanager
def blob_built_in_file() -> Iterator[None]:
    """AOTInductor compiles inside build each weights blob in a file mapping (module docstring)."""
    from torch._inductor import codecache
    from torch._inductor.runtime.runtime_utils import cache_dir

    from ..runtime.memory import unmap_pages

    made: list[str] = []
    live: list[_MappedBlob] = []
    memmove = ctypes.memmove

    def memmove_then_unmap(destination: Any, source: Any, count: int) -> Any:
        result = memmove(destination, source, count)
        if isinstance(destination, int):
            for blob in live:
                if not blob.closed and blob.address <= destination < blob.address + blob.size:
                    unmap_pages(destination, count)  # a shared file mapping: the bytes stay in the page cache
        return result

    def mapped_bytearray(*args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or kwargs or not isinstance(args[0], int) or args[0] <= 0:
            return builtins.bytearray(*args, **kwargs)
        size = args[0]
        descriptor, path = tempfile.mkstemp(dir=cache_dir(), suffix=".blob.partial")
        made.append(path)
        try:
            os.ftruncate(descriptor, size)
            blob = _MappedBlob(descriptor, size)
        finally:
            os.close(descriptor)  # the mapping keeps the file open
        view = ctypes.c_char.from_buffer(blob)
        blob.path, blob.size, blob.address = path, size, ctypes.addressof(view)
        del view  # an exported buffer would keep the mapping from closing
        live.append(blob)
        return blob

    def blob_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "wb" and not args and not kwargs and str(file).endswith("_weights.blob"):
            return _BlobTarget(str(file))
        return builtins.open(file, mode, *args, **kwargs)

    codecache.bytearray = mapped_bytearray
    codecache.open = blob_open
    ctypes.memmove = memmove_then_unmap  # codecache imports the module and looks the function up on each call
    try:
        yield
    finally:
        del codecache.bytearray, codecache.open
        ctypes.memmove = memmove
        for path in made:  # a compile that failed between the copy and the write
            Path(path).unlink(missing_ok=True)
