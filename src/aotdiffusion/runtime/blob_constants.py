"""Loads a compiled graph's weights blob into the memory its code reads, without the mapped file held beside it.

AOTInductor's CPU loader (``update_constant_buffer_from_blob``, ``model_base.h`` ``load_constants``) maps the blob
and copies every constant into memory it allocates, and its Python binding holds the GIL throughout: at the end the
process holds the blob twice, once copied and once as mapped file pages (full-size SD 1.5's fp32 UNet with
Winograd: a 6.6 GiB blob, a 13.5 GiB peak RSS, on the AMD EPYC Zen 2; that load was the export's peak).

Here the same loader code runs through the model library's C interface, which ctypes calls without the GIL, into
a container of our own, while a thread drops the pages of the mapping every few milliseconds (a shared read-only
mapping of the file: the page cache keeps the bytes, and a page dropped before it was read is read again). The
loaded constants, oneDNN-prepacked ones included, then go to the runner's container without a copy.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from pathlib import Path

import torch

from .. import artifact
from .memory import map_file, unmap_file, unmap_pages

# Seconds between two drops of the mapping's pages: the loader copies about 1-2 GB/s, so at most a few tens of
# megabytes are mapped at once.
_DROP_EVERY_S = 0.01


class _Entry(ctypes.Structure):  # AOTInductorConstantMapEntry, aoti_runtime/interface.h
    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


class BlobConstants:
    """The constants of one weights blob, loaded into a model container of their own, which owns their memory:
    keep this object alive as long as anything reads :attr:`tensors` (by the compiled code's internal names)."""

    def __init__(self, library: Path, blob: Path):
        self._library = ctypes.CDLL(str(library))  # already open in the runner: the same handle
        self._handle = ctypes.c_void_p()
        self._check(
            self._library.AOTInductorModelContainerCreateWithDevice(
                ctypes.byref(self._handle), ctypes.c_size_t(1), b"cpu", None
            ),
            blob,
        )
        self._load(blob)
        self.tensors = self._extract()

    def _load(self, blob: Path) -> None:
        load = self._library.AOTInductorModelUpdateConstantsFromBlob
        load.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        address, size = map_file(blob)
        done = threading.Event()

        def drop_pages() -> None:
            while not done.wait(_DROP_EVERY_S):
                unmap_pages(address, size)

        dropper = threading.Thread(target=drop_pages, name="aotdiffusion-blob-pages", daemon=True)
        dropper.start()
        try:
            code = load(self._handle, ctypes.c_void_p(address))
        finally:
            done.set()
            dropper.join()
            unmap_file(address, size)
        self._check(code, blob)

    def _extract(self) -> dict[str, torch.Tensor]:
        extract = self._library.AOTInductorModelContainerExtractConstantsMapEntries
        extract.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.POINTER(_Entry)),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_bool,
        ]
        entries, count = ctypes.POINTER(_Entry)(), ctypes.c_size_t()
        self._check(extract(self._handle, ctypes.byref(entries), ctypes.byref(count), False), None)
        # The entries are every loaded constant in the library's order, named by the name it was traced from, which
        # several constants can share (an int8 graph's scales): matched to the internal names by that order.
        names = self._loaded_names()
        if len(names) != count.value or any(entries[i].name != fqn for i, (_, fqn) in enumerate(names)):
            raise RuntimeError("AOTInductor listed its loaded constants in an order this loader does not know.")
        # The entries' handles stay the container's: each tensor gets a handle of its own on the same memory.
        new_handle = _libtorch().aoti_torch_new_tensor_handle
        tensors = {}
        for i, (name, _) in enumerate(names):
            handle = ctypes.c_void_p()
            if new_handle(entries[i].handle, ctypes.byref(handle)) != 0:
                raise RuntimeError(f"AOTInductor could not hand over the constant {name!r}.")
            tensors[name] = torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(_capsule(handle.value))
        return tensors

    def _loaded_names(self) -> list[tuple[str, bytes]]:
        """(internal name, original name) of each constant loaded from a blob (not computed at load), in order."""
        library, handle, check = self._library, self._handle, self._check
        count, folded = ctypes.c_size_t(), ctypes.c_bool()
        name, fqn = ctypes.c_char_p(), ctypes.c_char_p()
        check(library.AOTInductorModelContainerGetNumConstants(handle, ctypes.byref(count)), None)
        names = []
        for i in range(count.value):
            index = ctypes.c_size_t(i)
            check(library.AOTInductorModelContainerGetConstantFromFolded(handle, index, ctypes.byref(folded)), None)
            if folded.value:
                continue
            check(library.AOTInductorModelContainerGetConstantName(handle, index, ctypes.byref(name)), None)
            check(library.AOTInductorModelContainerGetConstantOriginalFQN(handle, index, ctypes.byref(fqn)), None)
            names.append((name.value.decode(), fqn.value))
        return names

    def _check(self, code: int, blob: Path | None) -> None:
        if code != 0:
            where = f" from {blob}" if blob is not None else ""
            raise artifact.ArtifactError(
                f"AOTInductor could not load the compiled constants{where} (error {code}): the folder is damaged or "
                "was written by another torch; export it again."
            )

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.value:
            self.tensors = {}
            self._library.AOTInductorModelContainerDelete(handle)
            self._handle = None


def available() -> bool:
    """Whether this loader can run here: Linux (its page dropping) on a CPU build with the C interface."""
    return sys.platform.startswith("linux") and hasattr(torch._C._aoti, "alloc_tensor_by_stealing_from_void_ptr")


@functools.cache
def _libtorch() -> ctypes.CDLL:
    library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    library.aoti_torch_new_tensor_handle.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    return library


_PyCapsule_New = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi)
)


def _capsule(address: int) -> object:
    """A nameless capsule around ``address``: what ``alloc_tensor_by_stealing_from_void_ptr`` takes."""
    return _PyCapsule_New(address, None, None)
