"""An export of new weights that reuses another export's compiled code: no tracing, no compiling.

Each component's compiled library is copied as it is, and its weights blob is written from the new checkpoint
through the refit program the first export recorded (export/refit.py): the same prepacking and Winograd
transforms freezing applied, replayed on the new weights. The new checkpoint must have the compiled one's
architecture (every tensor's name, shape and dtype); the shapes, types and kernels are the first export's.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .. import artifact
from ..runtime.compiled import CompiledComponent
from ..shapes import PipelineShapes
from . import refit, sizes, staging
from .compile import blob_weights, save_extra_state, write_manifest
from .lora import FUSED_ATTRIBUTE
from .pipeline import (
    COMPILED_ATTRIBUTES,
    ComponentResult,
    component_specs,
    remember_checksums,
    save_uncompiled_parts,
    summary_table,
)
from .precision import Precision, PrecisionWrapper, low_precision_weights
from .validate import validate_component


def reuse_compiled(
    pipe: DiffusionPipeline,
    compiled: str | Path,
    output_dir: str | Path,
    *,
    validate: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[ComponentResult]:
    """Writes to ``output_dir`` an export of ``pipe``'s weights running the code compiled in ``compiled``.

    ``validate`` compares each component with eager PyTorch on the new weights, as an export does.
    """
    log = log or partial(print, flush=True)
    compiled, output = Path(compiled), Path(output_dir)
    index, block = artifact.read_pipeline_index(compiled)
    names = block["components"]
    shapes = PipelineShapes.from_dict(block["shapes"])
    manifests = {name: artifact.read_component(compiled / name)[1] for name in names}
    for name, manifest in manifests.items():
        record = manifest.get("refit") or refit.summary(compiled / name / artifact.PACKAGE_DIR)
        if not record.get("available"):
            raise refit.RefitError(
                f"{compiled / name} cannot take new weights without compiling: {record.get('reason')}. "
                "Export the new model in full: aotdiffusion export --model NEW OUT."
            )
    precision = Precision(block["precision"]["auto_cast"], block["precision"]["auto_cast_type"])
    specs = component_specs(
        pipe, shapes, precision, vae_encoder="vae_encoder" in names, deep_cache="unet_deep_cache" in names
    )
    if sorted(spec.name for spec in specs) != sorted(names):
        raise refit.RefitError(
            f"{compiled} compiled {names}, but the new model gives {[spec.name for spec in specs]}: "
            "another pipeline needs its own export."
        )
    log(
        f"Exporting {type(pipe).__name__} to {output} with the code compiled in {compiled}: "
        f"{shapes.height}x{shapes.width}, batch {shapes.batch_size}, no compiling"
    )
    results, hashed = [], {}
    with staging.staged(output, overwrite=overwrite) as folder:
        pipe.set_progress_bar_config(disable=True)
        for i, spec in enumerate(specs, 1):
            step = f"[{i}/{len(specs)}] {spec.name}"
            start = time.perf_counter()
            manifest = manifests[spec.name]
            component_precision = Precision(**manifest["precision"])
            _refit_component(spec.module, component_precision, compiled / spec.name, folder / spec.name, manifest)
            # The main graph is written and validated first; its manifest names the other sizes once they exist.
            size_records = manifest.pop("sizes", [])
            other_sizes = [record for record in size_records if record["folder"] != "."]
            manifest["extra_state"] = save_extra_state(spec, folder / spec.name, manifest["files"])
            written = time.perf_counter()
            report = None
            manifest["validation"] = None
            manifest["timings"] = {"refit_s": round(written - start, 2)}
            manifest["compile_cache"] = "not compiled: code reused"
            write_manifest(folder / spec.name, spec.config, manifest)
            if validate:
                log(f"{step}: validating against eager PyTorch")
                runner = CompiledComponent(folder / spec.name, device=manifest["device"])
                report = validate_component(spec, runner, component_precision)
                manifest["validation"] = report.to_dict()
                del runner
                write_manifest(folder / spec.name, spec.config, manifest)
            hashed[spec.name] = manifest["files"]
            for record in other_sizes:
                hashed[f"{spec.name}/{record['folder']}"] = _refit_size(
                    pipe, shapes, precision, names, spec.name, record, compiled, folder, validate, step, log
                )
            if size_records:
                manifest["sizes"] = size_records
                write_manifest(folder / spec.name, spec.config, manifest)
            size = sum(record["bytes"] for record in manifest["files"].values())
            results.append(ComponentResult(spec.name, 0.0, written - start, size, report))
            log(
                f"{step}: weights written in {written - start:.1f}s, {size / 2**20:.1f} MiB"
                + (f", max rel error {report.max_rel_error:.2e}" if report else ", not validated")
            )
        save_uncompiled_parts(pipe.components, folder)
        block = {
            **block,
            "source": getattr(pipe, "name_or_path", None),
            "loras": getattr(pipe, FUSED_ATTRIBUTE, []),
            # The compiled code is the first export's: where it was compiled stays what the trust check reads.
            "code_from": {"export": str(compiled.resolve()), "source": block.get("source")},
        }
        for key, value in pipe.config.items():  # the parts saved by their own library are the new model's
            if not key.startswith("_") and key not in COMPILED_ATTRIBUTES:
                index[key] = list(value) if isinstance(value, tuple) else value
        artifact.write_json(folder / artifact.MODEL_INDEX_FILE, {**index, artifact.MANIFEST_KEY: block})
    remember_checksums(output, hashed)
    log(summary_table(results))
    return results


def _refit_size(pipe, shapes: PipelineShapes, precision: Precision, names: list[str], name: str,
                record: dict[str, Any], compiled: Path, folder: Path, validate: bool, step: str,
                log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Writes one extra image size of a component (export/sizes.py) from the new weights: its blob in full, then
    shared with the new main graph's constants again; returns its manifest's file records."""
    height, width = record["height"], record["width"]
    specs = component_specs(
        pipe, replace(shapes, height=height, width=width), precision, vae_encoder="vae_encoder" in names,
        deep_cache="unet_deep_cache" in names,
    )  # fmt: skip
    spec = next(spec for spec in specs if spec.name == name)
    source, target = compiled / name / record["folder"], folder / name / record["folder"]
    manifest = artifact.read_component(source)[1]
    component_precision = Precision(**manifest["precision"])
    _refit_component(spec.module, component_precision, source, target, manifest)
    weights = sizes.share_constants(folder / name, target, log)
    if weights:
        manifest["weights"], manifest["files"] = weights, sizes.package_records(target)
    manifest["validation"] = None
    manifest["compile_cache"] = "not compiled: code reused"
    write_manifest(target, spec.config, manifest)
    if validate:
        log(f"{step} at {height}x{width}: validating against eager PyTorch")
        main = CompiledComponent(folder / name, device=manifest["device"])
        runner = CompiledComponent(target, device=manifest["device"], main=main)
        manifest["validation"] = validate_component(spec, runner, component_precision).to_dict()
        del runner, main
        write_manifest(target, spec.config, manifest)
    return manifest["files"]


def _refit_component(
    module: torch.nn.Module, precision: Precision, source: Path, target: Path, manifest: dict[str, Any]
) -> None:
    """Copies the compiled code of ``source`` to ``target`` and writes its weights blob, in full, from ``module``
    (an extra image size's too: export/sizes.py shares it with the main size's afterwards)."""
    package, new_package = source / artifact.PACKAGE_DIR, target / artifact.PACKAGE_DIR
    program, fixed = refit.read_program(package)
    weights = manifest["weights"]
    blob = Path(weights.get("blob") or weights["file"])
    read = sizes.constant_reader(source, weights)
    dropped = {blob.name, sizes.UNSHARED_FILE}
    with low_precision_weights(module, precision):
        wrapper = PrecisionWrapper(module, precision)
        # Tied weights under every name (T5's encoder.embed_tokens is its shared embedding): the compiled program
        # may have recorded either.
        tensors = {
            **dict(wrapper.named_parameters(remove_duplicate=False)),
            **dict(wrapper.named_buffers(remove_duplicate=False)),
        }
        tensors = {name: tensor.detach().to(manifest["device"]) for name, tensor in tensors.items()}
        refit.check_inputs(program, tensors, source.name)
        shutil.copytree(package, new_package, ignore=lambda _, files: [f for f in files if f in dropped])
        with torch.no_grad():
            digest = refit.write_blob(program, fixed, tensors, read, target / blob)
    manifest["weights"] = blob_weights(blob)
    manifest["files"] = {
        **{
            name: record
            for name, record in manifest["files"].items()
            if name.startswith(f"{artifact.PACKAGE_DIR}/") and Path(name).name not in dropped
        },
        str(blob): {"sha256": digest, "bytes": (target / blob).stat().st_size},
    }
