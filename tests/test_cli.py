"""The command line as a user runs it: tiny -> export -> generate in fresh processes."""

from __future__ import annotations

import json
import textwrap

from conftest import cli
from PIL import Image


def test_tiny_writes_a_diffusers_folder(tmp_path):
    out = tmp_path / "tiny"
    result = cli("tiny", "sd", str(out))
    assert str(out) in result.stdout
    # transformers' notice about image processors without torchvision, and torchao's about its CUDA-only
    # extensions (diffusers imports torchao when it is installed), concern nothing aotdiffusion runs.
    output = result.stderr + result.stdout
    for notice in ("requires torchvision", "Could not load this library", "Enum subclass", "`torchao` Tensor"):
        assert notice not in output, notice
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.tokenize("a photo of an astronaut") == ["a</w>", "photo</w>", "of</w>", "an</w>", "astronaut</w>"]


def test_export_prints_progress_and_summary(sd_bf16_cli):
    folder, stdout = sd_bf16_cli
    for i, name in enumerate(["text_encoder", "unet", "vae_encoder", "vae_decoder"], 1):
        assert f"[{i}/4] {name}: tracing and compiling" in stdout
        assert f"[{i}/4] {name}: done in" in stdout
    assert "component     trace s  compile s  size MiB  max abs err  max rel err" in stdout
    assert "peak memory:" in stdout
    assert "to choose its type" not in stdout  # an explicit --auto-cast-type is obeyed, nothing is timed
    manifest = json.loads((folder / "unet" / "config.json").read_text())["aotdiffusion"]
    assert manifest["precision"] == {"auto_cast": "matmul", "auto_cast_type": "bf16"}


def test_generate_in_a_fresh_process_without_a_compiler(sd_bf16_cli, tmp_path):
    # No C/C++ compiler on PATH and every compile entry point booby-trapped: a reload that tried to
    # compile anything would fail here.
    guard = tmp_path / "sitecustomize.py"
    guard.write_text(
        textwrap.dedent("""
        import torch, torch._inductor, torch._inductor.compile_fx as cf
        from torch._inductor import cpp_builder
        def refuse(*a, **k):
            raise SystemExit("compilation attempted during generate")
        torch._inductor.aot_compile = refuse
        cf.compile_fx = refuse
        cpp_builder.CppBuilder.build = refuse
    """)
    )
    env = {"PYTHONPATH": str(tmp_path), "CC": "/bin/false", "CXX": "/bin/false"}
    out = tmp_path / "images"
    result = cli("generate", str(sd_bf16_cli[0]), "a photo of an astronaut", "--steps", "5", "--guidance-scale",
                 "7.5", "--seed", "0", "--output", str(out), env=env)  # fmt: skip
    path = out / "seed0-0.png"
    assert f"  {path}" in result.stdout
    image = Image.open(path)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert "5/5" in result.stderr  # diffusers' progress bar over the steps


def test_generate_with_a_swapped_scheduler(sd_bf16_cli, tmp_path):
    result = cli("generate", str(sd_bf16_cli[0]), "a cat", "--steps", "3", "--scheduler", "EulerDiscreteScheduler",
                 "--output", str(tmp_path))  # fmt: skip
    assert (tmp_path / "seed0-0.png").is_file() and "1 image(s)" in result.stdout


def test_cli_errors_are_short_and_actionable(sd_bf16_cli, tmp_path):
    result = cli("generate", str(sd_bf16_cli[0]), "a cat", "--guidance-scale", "1.0", "--output", str(tmp_path),
                 check=False)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: guidance_scale=1.0 turns classifier-free")
