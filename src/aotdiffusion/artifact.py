"""The on-disk format of an exported pipeline: one manifest block, read and checked in one place.

Layout of an exported folder::

    model_index.json            diffusers' index plus an "aotdiffusion" block (pipeline class, shapes)
    scheduler/ tokenizer/       saved by diffusers / transformers, loaded by them
    <component>/config.json     the original model config plus an "aotdiffusion" block (this module)
    <component>/compiled/       an AOTInductor package, stored unpacked: the shared library (code
                                only) and, beside it, ``*_weights.blob`` with the frozen weights

Format 2 stores the package unpacked so that a load opens the library and reads the weights in place;
format 1 kept one ``model.pt2`` zip that every load extracted to a temporary folder (seconds per GB).
The component block lists its compiled graphs (``graphs``) rather than holding one, so that a
component can later carry several static shapes, and it states where weights live (``weights``).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from . import checksums

MANIFEST_KEY = "aotdiffusion"
FORMAT_VERSION = 2
PACKAGE_DIR = "compiled"
CONFIG_FILE = "config.json"
MODEL_INDEX_FILE = "model_index.json"


class ArtifactError(ValueError):
    """An exported folder that cannot be used on this machine, with the reason and the fix."""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aotdiffusion")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def environment_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {
        "aotdiffusion": package_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def cpu_isa() -> str:
    """The widest vector ISA inductor generates code for on this CPU ("avx512 avx512_vnni", "avx2", ...).

    Export time only: inductor answers this by test-compiling a program.
    """
    from torch._inductor import cpu_vec_isa

    return str(cpu_vec_isa.pick_vec_isa()) or "none"


# The /proc/cpuinfo flags each inductor ISA's generated code executes (it compiles with -mavx512f
# -mavx512dq -mavx512vl -mavx512bw, -mamx-tile -mamx-bf16, -mavx2 -mfma...).
_ISA_FLAGS = {
    "avx2": ["avx2", "fma"],
    "avx512": ["avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"],
    "amx": ["avx512f", "avx512dq", "avx512vl", "avx512bw", "fma", "amx_tile", "amx_bf16"],
}


def required_cpu_flags(isa: str) -> list[str]:
    """Flags for an ISA string such as "avx512 avx512_vnni"; extension names are cpuinfo flags already."""
    if isa == "none":
        return []
    return sorted({flag for token in isa.split() for flag in _ISA_FLAGS.get(token, [token])})


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags, read without compiling anything (None where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def has_amx() -> bool:
    """Whether bf16 matrix multiplications have AMX tiles (assumed where the flags cannot be read)."""
    flags = cpu_flags()
    return flags is None or {"amx_tile", "amx_bf16"} <= flags


def machine_id() -> str:
    """A short, stable identifier of this machine, recorded in every export (not the raw machine id)."""
    text = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            break
    text = text or platform.node()
    return hashlib.sha256(f"aotdiffusion:{text}".encode()).hexdigest()[:16]


def check_origin(block: dict[str, Any], where: str | Path, trust_remote_code: bool) -> None:
    """Refuses compiled code made elsewhere unless the caller opted in: loading it runs native code.

    An export made on this machine loads as it is; one downloaded, copied from another machine, or
    whose manifest does not say where it was made needs ``trust_remote_code=True``.
    """
    made_on = block.get("exported_on")
    if trust_remote_code or made_on == machine_id():
        return
    origin = f"on another machine ({made_on})" if made_on else "somewhere it does not record"
    raise ArtifactError(
        f"{where} holds compiled native code that was exported {origin}; loading it runs that code with your "
        "permissions. If you trust where it came from, pass trust_remote_code=True (CLI: --trust-remote-code); "
        "otherwise export the model on this machine."
    )


def place_package(files: list[str], target: Path) -> None:
    """Lays AOTInductor's output ``files`` out in ``target`` as torch's ``.pt2`` zip holds them, unzipped: what
    its package loader opens as a folder. Each file is moved out of inductor's output folder: a rename where both
    are on one file system (the weights blob is gigabytes: no copy, no read). Not a hard link: inductor names the
    files after the code alone, so compiling other weights of the same architecture rewrites that same file."""
    from torch.export.pt2_archive import constants

    model = target / constants.AOTINDUCTOR_DIR / "model"
    model.mkdir(parents=True, exist_ok=True)
    for file in files:
        if not isinstance(file, str):  # in-memory weights: only when constants are packaged in the library's way
            raise ArtifactError(f"AOTInductor returned {type(file).__name__} where a file was expected.")
        if not file:
            continue
        destination = model / Path(file).name
        destination.unlink(missing_ok=True)
        shutil.move(file, destination)
    (target / constants.ARCHIVE_FORMAT_PATH).write_text(constants.ARCHIVE_FORMAT_VALUE)
    (target / constants.ARCHIVE_VERSION_PATH).write_text(constants.ARCHIVE_VERSION_VALUE)
    (target / "byteorder").write_text(sys.byteorder)


def package_files(folder: Path) -> list[Path]:
    """Every file of a component's unpacked package, relative to the component folder, in a stable order."""
    return sorted(path.relative_to(folder) for path in (folder / PACKAGE_DIR).rglob("*") if path.is_file())


def weights_file(folder: Path) -> Path | None:
    """The frozen weights AOTInductor wrote beside the library (relative to ``folder``), if any."""
    return next((path for path in package_files(folder) if path.name.endswith("_weights.blob")), None)


def generated_code(folder: Path) -> str:
    """The C++ AOTInductor generated for a component (kept beside the library: what tests and int8 checks read)."""
    return "".join((folder / path).read_text() for path in package_files(folder) if path.name.endswith(".wrapper.cpp"))


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"Missing {path}: the folder is incomplete; export (or download) it again.")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON ({error}): the export is damaged; export it again.") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, not an object: the export is damaged.")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def read_pipeline_index(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (model_index, its aotdiffusion block); errors explain what the folder is instead."""
    index_path = folder / MODEL_INDEX_FILE
    if not index_path.is_file():
        raise ArtifactError(f"{folder} has no {MODEL_INDEX_FILE}: it is not an exported aotdiffusion pipeline.")
    index = read_json(index_path)
    block = index.get(MANIFEST_KEY)
    if block is None:
        raise ArtifactError(
            f"{folder} is a diffusers pipeline that has not been compiled. Compile it with "
            f"`aotdiffusion export --model {folder} OUT/` or `from_pretrained({str(folder)!r}, export=True)`."
        )
    _check_format(block, index_path)
    return index, block


def read_component(folder: Path, *, verify_checksums: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (original model config, manifest block) for one compiled component.

    Checks everything that would otherwise fail deep inside the compiled code: the format version,
    the device, the CPU's vector ISA, the files' sizes and their sha256. A file's sha256 is read on
    its first load and remembered (see ``checksums``); ``verify_checksums=True`` reads every byte again.
    """
    config_path = folder / CONFIG_FILE
    config = read_json(config_path)
    manifest = config.pop(MANIFEST_KEY, None)
    if manifest is None:
        raise ArtifactError(f"{config_path} has no `{MANIFEST_KEY}` block: {folder.name} was not exported here.")
    _check_format(manifest, config_path)
    check_device(manifest, folder.name)
    expected = {}
    for name, record in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the exported folder is incomplete; export it again.")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ArtifactError(
                f"{path} has {size} bytes but was exported with {record['bytes']}: the file is truncated or "
                "was replaced. Download or export it again."
            )
        expected[path] = record["sha256"]
    bad = checksums.unverified(expected, always=verify_checksums)
    if bad:
        raise ArtifactError(
            f"{bad[0]} does not match the sha256 its export recorded: the file is corrupt, was altered or comes "
            "from another export. Download or export it again."
        )
    return config, manifest


def _check_format(block: dict[str, Any], where: Path) -> None:
    found = block.get("format_version")
    if found == FORMAT_VERSION:
        return
    source = block.get("source") or "MODEL_ID_OR_FOLDER"
    folder = where.parent if where.name == MODEL_INDEX_FILE else where.parent.parent
    hint = " (format 1 kept code and weights in one .pt2 that every load extracted)" if found == 1 else ""
    raise ArtifactError(
        f"{where} uses artifact format {found}{hint}; this aotdiffusion ({package_version()}) reads format "
        f"{FORMAT_VERSION}. Export the model again: `aotdiffusion export --model {source} {folder}-v{FORMAT_VERSION}`."
    )


def check_device(manifest: dict[str, Any], name: str) -> None:
    import torch

    device = manifest["device"]
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ArtifactError(
                f"{name} was compiled for {device}, but CUDA is not available here. Export for this machine "
                "with `--device cpu`."
            )
        return
    have = cpu_flags()
    missing = sorted(set(manifest.get("cpu_flags", [])) - have) if have is not None else []
    if missing:
        raise ArtifactError(
            f"{name} was compiled for CPUs with {manifest['cpu_isa']!r} instructions, and this CPU lacks "
            f"{', '.join(missing)}. Running it would crash (illegal instruction): export again on this machine "
            "or one of the same CPU family."
        )
