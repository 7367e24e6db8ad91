"""Export: validation, the manifest, and the checks a reload makes before touching compiled code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aotdiffusion import artifact, checksums
from aotdiffusion.export.choose_precision import REMEMBERED
from aotdiffusion.export.compile import CompilerOptions, compile_component
from aotdiffusion.export.pipeline import default_shapes, export_pipeline
from aotdiffusion.export.precision import Precision
from aotdiffusion.export.validate import ValidationError


def compile_corrupted(spec, options, folder):
    """Compiles a copy whose first weight is perturbed: the artifact no longer computes the model."""
    module = spec.module
    spec.module = __import__("copy").deepcopy(module)
    with torch.no_grad():
        next(spec.module.parameters()).add_(0.5)
    try:
        return compile_component(spec, options, folder)
    finally:
        spec.module = module


def test_validation_catches_a_corrupted_component(eager_sd, tmp_path):
    shapes = default_shapes(eager_sd, height=64, width=64)
    with pytest.raises(ValidationError, match=r"text_encoder does not match eager PyTorch: .*relative error .* > "):
        export_pipeline(
            eager_sd, tmp_path / "out", shapes, CompilerOptions(Precision("none")),
            pipeline_class="AOTStableDiffusionPipeline", compile_fn=compile_corrupted, log=lambda _: None,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # a failed export leaves neither the target nor its partial folder


def test_manifest_records_what_a_reload_needs(sd_fp32, tiny_sd):
    index = json.loads((sd_fp32 / "model_index.json").read_text())
    block = index["aotdiffusion"]
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert block["pipeline_class"] == "AOTStableDiffusionPipeline"
    assert block["shapes"] == {
        "batch_size": 1, "height": 64, "width": 64, "num_images_per_prompt": 1,
        "classifier_free_guidance": True, "split_guidance_batch": False, "sequence_length": 77, "guidance_copies": 2,
    }  # fmt: skip
    assert block["components"] == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    unet = json.loads((sd_fp32 / "unet" / "config.json").read_text())
    manifest = unet.pop("aotdiffusion")
    assert unet["_class_name"] == "UNet2DConditionModel" and unet["cross_attention_dim"] == 32  # original config kept
    assert manifest["static"]["batch_size"] == 2  # the guidance batch, recorded
    assert [i["name"] for i in manifest["graphs"][0]["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert manifest["graphs"][0]["inputs"][1] == {"name": "timestep", "shape": [2], "dtype": "float32"}
    assert manifest["graphs"][0]["file"] == "compiled"
    weights = manifest["weights"]
    assert weights["storage"] == "external" and weights["file"].endswith("_weights.blob")
    library = [name for name in manifest["files"] if name.endswith(".so")]
    assert len(library) == 1 and weights["file"] in manifest["files"]  # code and weights: separate files
    # Code only: the weights are not inside the library (the fp32 UNet's weights are several times its size).
    assert (sd_fp32 / "unet" / library[0]).stat().st_size < manifest["files"][weights["file"]]["bytes"]
    assert manifest["precision"] == {"auto_cast": "none", "auto_cast_type": "auto"}
    assert manifest["cpu_isa"] == artifact.cpu_isa()
    assert set(manifest["cpu_flags"]) == set(artifact.required_cpu_flags(artifact.cpu_isa())) <= artifact.cpu_flags()
    assert set(manifest["versions"]) >= {"torch", "diffusers", "transformers", "aotdiffusion"}
    record = manifest["files"][weights["file"]]
    assert record["sha256"] == checksums.sha256_file(sd_fp32 / "unet" / weights["file"])
    source = Path(index["aotdiffusion"]["source"])  # the model exported (under xdist: another worker's copy, maybe)
    assert index["aotdiffusion"]["format_version"] == 2 and source.name == tiny_sd.name
    assert (source / "model_index.json").read_text() == (tiny_sd / "model_index.json").read_text()
    assert manifest["validation"]["passed"] and manifest["validation"]["max_rel_error"] < 1e-3
    text = json.loads((sd_fp32 / "text_encoder" / "config.json").read_text())["aotdiffusion"]
    assert "final_layer_norm.safetensors" in text["files"]
    assert (sd_fp32 / "scheduler" / "scheduler_config.json").is_file() and (sd_fp32 / "tokenizer").is_dir()


def test_export_refuses_a_non_empty_folder(eager_sd, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_pipeline(eager_sd, tmp_path, default_shapes(eager_sd), CompilerOptions(), pipeline_class="X")


@pytest.fixture
def copy_of(sd_fp32, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(sd_fp32, target)
    return target


def _edit_manifest(folder, component, **changes):
    path = folder / component / "config.json"
    config = json.loads(path.read_text())
    config["aotdiffusion"].update(changes)
    path.write_text(json.dumps(config))


def _component_file(folder, component, suffix):
    manifest = json.loads((folder / component / "config.json").read_text())["aotdiffusion"]
    return folder / component / next(name for name in manifest["files"] if name.endswith(suffix))


def test_truncated_weights_are_reported(copy_of, load):
    weights = _component_file(copy_of, "unet", "_weights.blob")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(artifact.ArtifactError, match=rf"{weights.name} has 1000 bytes but was exported with"):
        load(copy_of)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    return stat


def test_altered_file_is_caught_by_its_sha256_on_the_next_load(copy_of, load):
    weights = _component_file(copy_of, "vae_decoder", "_weights.blob")
    _flip_a_byte(weights)  # same size, new mtime: the remembered check no longer applies
    with pytest.raises(artifact.ArtifactError, match=rf"{weights.name} does not match the sha256 its export recorded"):
        load(copy_of)


def test_sha256_is_read_once_then_remembered_by_size_and_mtime(copy_of, load, monkeypatch):
    library = _component_file(copy_of, "unet", ".so")
    hashed = []
    sha256_file = checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda path, *a: hashed.append(path.name) or sha256_file(path, *a))
    load(copy_of)  # a copy: new paths, each file hashed on its first load
    assert library.name in hashed
    hashed.clear()
    load(copy_of)
    assert hashed == []  # remembered: nothing read again
    # Altered with size and mtime put back, the remembered check cannot see it; verify_checksums=True reads all.
    stat = _flip_a_byte(library)
    os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(artifact.ArtifactError, match=rf"{library.name} does not match the sha256"):
        load(copy_of, verify_checksums=True)


def test_a_file_taken_from_another_export_is_refused(copy_of, sd_bf16_cli, load):
    ours, theirs = (_component_file(folder, "vae_decoder", ".so") for folder in (copy_of, sd_bf16_cli[0]))
    if ours.name != theirs.name:  # another graph compiles to another library name: put it under ours
        ours.unlink()
    shutil.copy(theirs, ours)
    shutil.copystat(copy_of / "unet" / "config.json", ours)
    with pytest.raises(artifact.ArtifactError, match=rf"{ours.name} (has .* bytes|does not match the sha256)"):
        load(copy_of)


def test_foreign_cpu_isa_is_refused(copy_of, load):
    _edit_manifest(copy_of, "unet", cpu_isa="sve256", cpu_flags=["sve", "sve2"])
    message = r"compiled for CPUs with 'sve256' instructions, and this CPU lacks sve, sve2.*illegal instruction"
    with pytest.raises(artifact.ArtifactError, match=message):
        load(copy_of)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_artifact_on_a_cpu_machine_is_refused(copy_of, load):
    _edit_manifest(copy_of, "unet", device="cuda")
    with pytest.raises(artifact.ArtifactError, match="compiled for cuda, but CUDA is not available.*--device cpu"):
        load(copy_of)


def test_other_format_version_is_refused(copy_of, load):
    _edit_manifest(copy_of, "text_encoder", format_version=99)
    with pytest.raises(artifact.ArtifactError, match="uses artifact format 99.*Export the model again"):
        load(copy_of)


def test_a_format_1_export_names_its_version_and_the_command_that_re_exports_it(copy_of, load, tiny_sd):
    index = json.loads((copy_of / "model_index.json").read_text())
    index["aotdiffusion"]["format_version"] = 1
    (copy_of / "model_index.json").write_text(json.dumps(index))
    source = index["aotdiffusion"]["source"]  # the model it was exported from (another test worker's copy, maybe)
    assert Path(source).name == tiny_sd.name
    command = f"`aotdiffusion export --model {source} {copy_of}-v2`"
    with pytest.raises(artifact.ArtifactError, match=r"uses artifact format 1 \(format 1 kept code and weights in one"):
        load(copy_of)
    with pytest.raises(artifact.ArtifactError) as raised:
        load(copy_of)
    assert command in str(raised.value)


def test_plain_diffusers_folder_says_how_to_export(tiny_sd, load):
    with pytest.raises(artifact.ArtifactError, match=r"has not been compiled.*aotdiffusion export --model"):
        load(tiny_sd)


def _no_side_effect_payloads(marker):
    """Manifest edits that would run a command (creating `marker`) if the loader imported what they name."""
    command = ["touch", str(marker)]
    return [
        ("text_encoder", {"output_class": "os.system"}),
        ("text_encoder", {"extra_state": {"final_layer_norm": {
            "file": "final_layer_norm.safetensors", "class": "subprocess.Popen", "args": {"args": command}}}}),
        ("text_encoder", {"extra_state": {"final_layer_norm": {
            "file": "final_layer_norm.safetensors", "class": "torch.nn.modules.normalization.LayerNorm",
            "args": {"normalized_shape": [32], "device": "meta", "bias": False, "dtype": "os.system"}}}}),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(3))
def test_a_crafted_manifest_cannot_run_code(copy_of, load, tmp_path, case):
    marker = tmp_path / "pwned"
    component, changes = _no_side_effect_payloads(marker)[case]
    _edit_manifest(copy_of, component, **changes)
    with pytest.raises(artifact.ArtifactError, match="refusing|only .* are accepted"):
        load(copy_of)
    assert not marker.exists()


@pytest.mark.parametrize(
    "entry",
    [["os", "system"], ["subprocess", "Popen"], ["builtins", "eval"], ["diffusers", "StableDiffusionPipeline"],
     ["transformers", "pipeline"], ["diffusers", "../../x"]],
)  # fmt: skip
def test_model_index_names_only_schedulers_and_tokenizers(copy_of, load, entry, monkeypatch):
    import importlib

    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    index = json.loads((copy_of / "model_index.json").read_text())
    index["scheduler"] = entry
    (copy_of / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(artifact.ArtifactError, match="(?i)refusing"):
        load(copy_of)
    # Only the two libraries' own namespaces are looked into; a module the entry names is never imported.
    assert entry[0] in ("diffusers", "transformers") or entry[0] not in imported, imported


def test_unknown_pipeline_class_is_an_artifact_error(copy_of):
    from aotdiffusion import AOTDiffusionPipeline

    index = json.loads((copy_of / "model_index.json").read_text())
    index["aotdiffusion"]["pipeline_class"] = "os.system"
    (copy_of / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(artifact.ArtifactError, match="names the pipeline class 'os.system'"):
        AOTDiffusionPipeline.from_pretrained(copy_of)


def test_auto_type_compiles_the_fastest_measured_type_that_validates(eager_sd, tmp_path, load):
    """The default export times the candidates, compiles the fastest, and falls back when it fails validation."""

    def compile_first_text_encoder_broken(spec, options, folder):
        # The text encoder's first (fastest) choice compiles a perturbed copy, so its validation fails.
        if spec.name == "text_encoder" and not broken:
            broken.append(options.precision.describe())
            return compile_corrupted(spec, options, folder)
        return compile_component(spec, options, folder)

    broken, lines = [], []
    shapes = default_shapes(eager_sd, height=64, width=64)
    export_pipeline(
        eager_sd, tmp_path / "auto", shapes, CompilerOptions(Precision()),
        pipeline_class="AOTStableDiffusionPipeline", compile_fn=compile_first_text_encoder_broken, log=lines.append,
    )  # fmt: skip
    log = "\n".join(lines)
    index = json.loads((tmp_path / "auto" / "model_index.json").read_text())["aotdiffusion"]
    assert index["precision"]["auto_cast_type"] == "auto"
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        manifest = json.loads((tmp_path / "auto" / name / "config.json").read_text())["aotdiffusion"]
        choice = manifest["precision_choice"]
        assert set(choice["seconds"]) >= {"fp32", "bf16"} and all(s > 0 for s in choice["seconds"].values())
        # Fastest first (ties possible: the manifest rounds to nanoseconds; a tiny model's shapes take microseconds).
        ranked_seconds = [choice["seconds"][c] for c in choice["ranked"]]
        assert set(choice["ranked"]) == set(choice["seconds"]) and ranked_seconds == sorted(ranked_seconds)
        # What is compiled in turn: each type fastest first, a low type every op in it first (--auto-cast auto).
        tries = [p.to_dict() for kind in choice["ranked"] for p in Precision("auto", kind).compiled_in()]
        expected = tries[1] if name == "text_encoder" else tries[0]
        assert choice["chosen"] == manifest["precision"]["auto_cast_type"] == index["precision"]["chosen"][name]
        assert manifest["precision"] == expected, (name, choice, manifest["precision"])
        # (an earlier export in this run may have measured the same shapes: then the line says so at its end)
        said = [line.removesuffix(REMEMBERED) for line in lines if f"] {name}: " in line]
        assert any(line.endswith(f"-> {choice['ranked'][0]}") for line in said), log
        assert manifest["validation"]["passed"]
    assert f"text_encoder: {broken[0]} fails validation" in log and "trying the next candidate" in log
    # The VAE of this model sets force_upcast: fp16 is never one of its candidates, and the log says why.
    vae = json.loads((tmp_path / "auto" / "vae_decoder" / "config.json").read_text())["aotdiffusion"]
    assert (
        "fp16" not in vae["precision_choice"]["seconds"]
        and "force_upcast" in vae["precision_choice"]["skipped"]["fp16"]
    )
    image = load(tmp_path / "auto")("a cat", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def _set_origin(folder, made_on):
    index = json.loads((folder / "model_index.json").read_text())
    if made_on is None:
        index["aotdiffusion"].pop("exported_on")
    else:
        index["aotdiffusion"]["exported_on"] = made_on
    (folder / "model_index.json").write_text(json.dumps(index))


def test_an_export_from_elsewhere_needs_trust_remote_code(copy_of, load):
    assert (
        json.loads((copy_of / "model_index.json").read_text())["aotdiffusion"]["exported_on"] == artifact.machine_id()
    )
    for made_on, says in (("0123456789abcdef", "on another machine"), (None, "somewhere it does not record")):
        _set_origin(copy_of, made_on)
        with pytest.raises(artifact.ArtifactError, match=f"exported {says}.*trust_remote_code=True"):
            load(copy_of)
        assert load(copy_of, trust_remote_code=True).static_shapes.height == 64


def test_a_hub_export_is_not_downloaded_without_trust(copy_of, load, monkeypatch):
    import huggingface_hub

    from aotdiffusion import AOTDiffusionPipeline

    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: downloads.append(repo) or copy_of)
    for loader in (load, AOTDiffusionPipeline.from_pretrained):
        with pytest.raises(artifact.ArtifactError, match="is a Hub repository: .*trust_remote_code=True"):
            loader("someone/sd15-aot")
    assert downloads == []
    _set_origin(copy_of, "0123456789abcdef")  # as a download from elsewhere would be
    assert load("someone/sd15-aot", trust_remote_code=True).static_shapes.width == 64
    assert downloads == ["someone/sd15-aot"]


def test_cli_needs_trust_remote_code_for_a_foreign_export(copy_of, tmp_path):
    from conftest import cli

    _set_origin(copy_of, "0123456789abcdef")
    images = tmp_path / "images"
    refused = cli("generate", str(copy_of), "a cat", "--steps", "2", "--output", str(images), check=False)
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr and not images.exists()
    cli("generate", str(copy_of), "a cat", "--steps", "2", "--output", str(images), "--trust-remote-code")
    assert (images / "seed0-0.png").is_file()


def test_the_compile_cache_reuses_an_identical_compile_and_drops_an_altered_entry(eager_sd, tmp_path, monkeypatch):
    from aotdiffusion.export import compile_cache
    from aotdiffusion.export.pipeline import component_specs
    from aotdiffusion.runtime.compiled import CompiledComponent

    monkeypatch.setenv("AOTDIFFUSION_CACHE_DIR", str(tmp_path / "cache"))
    specs = component_specs(eager_sd, default_shapes(eager_sd, height=64, width=64), Precision("none"))
    spec = next(s for s in specs if s.role == "text_encoder")
    options = CompilerOptions(Precision("none"), fp32_linear="onednn")
    first = compile_component(spec, options, tmp_path / "first")
    second = compile_component(spec, options, tmp_path / "second")
    assert (first["compile_cache"], second["compile_cache"]) == ("miss", "hit")
    assert second["files"] == first["files"]  # the same library and weights, byte for byte
    assert second["timings"]["compile_s"] < first["timings"]["compile_s"] / 2
    ids = spec.example_inputs()["input_ids"]
    outputs = [CompiledComponent(tmp_path / name)(input_ids=ids) for name in ("first", "second")]
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    assert compile_component(spec, options, tmp_path / "off", cache=False)["compile_cache"] == "off"
    # Other options are another key; an entry altered on disk is dropped and compiled again.
    assert compile_component(spec, CompilerOptions(Precision("none"), fp32_linear="mkl"), tmp_path / "mkl")[
        "compile_cache"] == "miss"  # fmt: skip
    ours = {record["sha256"] for record in first["files"].values()}
    (entry,) = [
        p for p in compile_cache.root().iterdir() if set(json.loads((p / "files.json").read_text()).values()) <= ours
    ]
    blob = next(entry.rglob("*_weights.blob"))
    _flip_a_byte(blob)
    assert compile_component(spec, options, tmp_path / "again")["compile_cache"] == "miss"
    assert compile_component(spec, options, tmp_path / "third")["compile_cache"] == "hit"
