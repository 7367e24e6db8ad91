"""Several image sizes in one export: one compiled graph per size, one copy of the weights.

A component whose inputs depend on the image size (UNet, ControlNets, VAE) is compiled again for each extra size
into ``<component>/sizes/<H>x<W>/``, a complete component folder of its own (manifest, validation, refit program).
Its frozen constants are then compared with the main size's, constant by constant (bytes and layout): those that
are the same (all the prepacked weights, when oneDNN picks the same blocked format for both sizes) are not stored
again; the extra package keeps a list naming, for each, the main package's constant it equals, and the bytes of
the others. At load the extra graph is handed the main graph's constant tensors themselves (runtime/compiled.py),
so a second size costs its code and its differing constants, on disk and in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import artifact, checksums
from ..shapes import PipelineShapes
from . import refit

SIZES_DIR = "sizes"
UNSHARED_FILE = "unshared_constants.safetensors"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"768x512,512x768"`` (HEIGHTxWIDTH, as --height/--width) -> [(768, 512), (512, 768)]."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        height, sep, width = part.lower().partition("x")
        if not sep or not height.isdigit() or not width.isdigit():
            raise ValueError(
                f"--extra-sizes takes image sizes as HEIGHTxWIDTH in pixels, comma-separated (e.g. 768x512,512x768); "
                f"got {part!r}."
            )
        sizes.append((int(height), int(width)))
    return sizes


def check_sizes(shapes: PipelineShapes, extra: Sequence[tuple[int, int]] | str, vae_scale_factor: int,
                unet_downsampling: int) -> list[tuple[int, int]]:  # fmt: skip
    """The extra sizes (a list of (height, width), or the CLI's text), each valid for the model as --height/--width
    are and none given twice (the main size included)."""
    sizes = parse_sizes(extra) if isinstance(extra, str) else [tuple(size) for size in extra]
    seen = {(shapes.height, shapes.width)}
    for size in sizes:
        if len(size) != 2:
            raise ValueError(f"An extra size is (height, width) in pixels, e.g. (768, 512); got {size!r}.")
        replace(shapes, height=size[0], width=size[1]).check_divisible(vae_scale_factor, unet_downsampling)
        if size in seen:
            raise ValueError(
                f"{size[0]}x{size[1]} is given twice (--height/--width is the main size, --extra-sizes the others): "
                "list each size once."
            )
        seen.add(size)
    return sizes


def folder_name(height: int, width: int) -> str:
    return f"{SIZES_DIR}/{height}x{width}"


def share_constants(main: Path, extra: Path, log) -> dict[str, Any]:
    """Rewrites the extra size's package at ``extra`` (a component folder) to keep only the constants that differ
    from the main size's at ``main``; returns its manifest's new ``weights`` block. Needs both refit programs (the
    constants' layout); without them (int8) the extra size keeps its own weights blob."""
    try:
        main_program, _ = refit.read_program(main / artifact.PACKAGE_DIR)
        program, fixed = refit.read_program(extra / artifact.PACKAGE_DIR)
    except refit.RefitError as error:
        log(f"      {extra.name}: keeps its own weights ({error})")
        return {}
    main_blob, blob = main / artifact.weights_file(main), extra / artifact.weights_file(extra)
    by_key = {}
    with open(main_blob, "rb") as source:
        for entry in main_program["constants"]:
            source.seek(entry["offset"])
            by_key.setdefault(_key(entry, source.read(entry["nbytes"])), entry["name"])
    shared: dict[str, str] = {}
    unshared: dict[str, torch.Tensor] = {}
    with open(blob, "rb") as source:
        for entry in program["constants"]:
            source.seek(entry["offset"])
            data = source.read(entry["nbytes"])
            same = by_key.get(_key(entry, data))
            if same is not None:
                shared[entry["name"]] = same
            else:
                unshared[entry["name"]] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                    torch.empty(0, dtype=torch.uint8)  # fmt: skip
    total = sum(entry["nbytes"] for entry in program["constants"])
    kept = sum(t.numel() for t in unshared.values())
    save_file(unshared, extra / artifact.PACKAGE_DIR / UNSHARED_FILE)
    blob.unlink()
    log(
        f"      {extra.name}: {len(shared)} of {len(program['constants'])} constants are the main size's "
        f"({(total - kept) / 2**20:.1f} of {total / 2**20:.1f} MiB): stored once, {kept / 2**20:.1f} MiB of its own"
    )
    return {
        "storage": "shared",
        "shared_with": "../..",
        "blob": str(blob.relative_to(extra)),  # the name the compiled code's blob had (a refit writes it again)
        "shared": shared,
        "file": f"{artifact.PACKAGE_DIR}/{UNSHARED_FILE}",
        "format": "the main size's constants (by name) plus these bytes, laid out by the refit program",
        "shared_bytes": total - kept,
        "own_bytes": kept,
    }


def constant_reader(folder: Path, weights: dict[str, Any]) -> Callable[[dict[str, Any]], bytes]:
    """Reads, for a refit-program entry of the component at ``folder`` (whose manifest's ``weights`` block is
    ``weights``), the bytes its export stored: from its weights blob, or for an extra size from the main size's
    blob (a constant it shares) or its own file."""
    if weights.get("storage") != "shared":
        path = folder / weights["file"]

        def read_blob(entry: dict[str, Any]) -> bytes:
            with open(path, "rb") as blob:
                blob.seek(entry["offset"])
                return blob.read(entry["nbytes"])

        return read_blob
    main = folder / weights["shared_with"]
    main_weights = artifact.read_json(main / artifact.CONFIG_FILE)[artifact.MANIFEST_KEY]["weights"]
    read_main = constant_reader(main, main_weights)
    entries = {entry["name"]: entry for entry in refit.read_program(main / artifact.PACKAGE_DIR)[0]["constants"]}
    own = folder / weights["file"]

    def read(entry: dict[str, Any]) -> bytes:
        source = weights["shared"].get(entry["name"])
        if source is not None:
            return read_main(entries[source])
        with safe_open(own, "pt") as stored:
            return stored.get_tensor(entry["name"]).numpy().tobytes()

    return read


def package_records(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` records of a component's package as it now is."""
    return {str(path): checksums.file_record(folder / path) for path in artifact.package_files(folder)}


def _key(entry: dict[str, Any], data: bytes) -> tuple:
    """Two constants are interchangeable when their bytes and the layout the compiled code reads them in agree."""
    layout = (entry["mkldnn"], entry["nbytes"], entry.get("dtype"), tuple(entry.get("shape") or ()),
              tuple(entry.get("stride") or ()), entry.get("storage_offset"))  # fmt: skip
    return layout, hashlib.sha256(data).digest()
