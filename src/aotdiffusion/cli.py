"""``aotdiffusion`` command line: export, generate, tiny."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TASKS = {"auto": None, "stable-diffusion": "AOTStableDiffusionPipeline"}
# diffusers class named in a model's model_index.json -> the compiled pipeline that exports it
TASK_BY_DIFFUSERS_CLASS = {"StableDiffusionPipeline": "stable-diffusion"}


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Adds ``--a-b`` with optimum-cli's ``--a_b`` spelling as an alias, so existing commands carry over."""
    parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aotdiffusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="compile a diffusers pipeline ahead of time into a folder")
    export.add_argument("output", type=Path, help="folder to write the compiled pipeline to (must be new or empty)")
    _flag(export, "model", required=True, help="hub model id or local diffusers folder")
    _flag(
        export, "task", default="auto", choices=sorted(TASKS), help="pipeline family (default: from model_index.json)"
    )
    _flag(export, "batch-size", type=int, default=1, help="prompts per call (default 1)")
    _flag(export, "height", type=int, help="image height in pixels (default: the model's native size)")
    _flag(export, "width", type=int, help="image width in pixels (default: the model's native size)")
    _flag(export, "num-images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    _flag(
        export,
        "auto-cast",
        default="matmul",
        choices=["none", "matmul", "all"],
        help="which operations run in --auto-cast-type: none, matmul (matmul/conv/attention; default) or all",
    )
    _flag(export, "auto-cast-type", default="bf16", choices=["bf16", "fp16", "fp32"], help="default bf16")
    _flag(
        export,
        "classifier-free-guidance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the UNet for the guidance batch (default: on, off for LCM); "
        "--no-classifier-free-guidance for guidance_scale <= 1 (e.g. Turbo models)",
    )
    _flag(export, "device", default="cpu", help="cpu or cuda (default cpu)")
    _flag(export, "disable-validation", action="store_true", help="skip comparing each component with eager PyTorch")
    _flag(export, "no-vae-encoder", action="store_true", help="leave out the VAE encoder (text-to-image only)")
    _flag(export, "unet", help="hub id or folder of a UNet that replaces the model's before compiling")
    _flag(export, "revision", help="hub revision of --model")

    generate = commands.add_parser("generate", help="generate images with an exported pipeline")
    generate.add_argument("model", help="exported folder or hub repository")
    generate.add_argument("prompt")
    _flag(generate, "negative-prompt")
    _flag(generate, "steps", type=int, default=20, help="denoising steps (default 20)")
    _flag(generate, "guidance-scale", type=float, help="default: diffusers' default for the pipeline")
    _flag(generate, "seed", type=int, default=0)
    _flag(generate, "num-images-per-prompt", type=int, help="default: the exported number")
    _flag(generate, "scheduler", help="diffusers scheduler class to swap in, e.g. EulerDiscreteScheduler")
    _flag(generate, "output", type=Path, default=Path("images"), help="folder for the PNGs (default images/)")

    tiny = commands.add_parser("tiny", help="write a tiny random-weight diffusers pipeline (no network)")
    tiny.add_argument("kind", choices=["sd"])
    tiny.add_argument("output", type=Path)
    tiny.add_argument(
        "--full-size",
        action="store_true",
        help="the model's published full-size architecture (random weights) for benchmarks",
    )
    return parser


def _pipeline_class(task: str, model: str):
    import aotdiffusion

    if task == "auto":
        task = _detect_task(model)
    return getattr(aotdiffusion, TASKS[task])


def _detect_task(model: str) -> str:
    from . import artifact

    path = Path(model)
    if path.is_dir():
        index = artifact.read_json(path / artifact.MODEL_INDEX_FILE)
    else:
        from huggingface_hub import hf_hub_download

        index = artifact.read_json(Path(hf_hub_download(model, artifact.MODEL_INDEX_FILE)))
    found = index.get("_class_name")
    if found not in TASK_BY_DIFFUSERS_CLASS:
        raise SystemExit(
            f"error: cannot tell the task of {model} ({found}); pass --task with one of "
            f"{', '.join(t for t in TASKS if t != 'auto')}."
        )
    return TASK_BY_DIFFUSERS_CLASS[found]


def _export(args: argparse.Namespace) -> None:
    cls = _pipeline_class(args.task, args.model)
    hub = {"revision": args.revision} if args.revision else {}
    start = time.perf_counter()
    cls.from_pretrained(
        args.model,
        export=True,
        export_dir=args.output,
        device=args.device,
        auto_cast=args.auto_cast,
        auto_cast_type=args.auto_cast_type,
        validate=not args.disable_validation,
        vae_encoder=not args.no_vae_encoder,
        unet_id=args.unet,
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images_per_prompt,
        classifier_free_guidance=args.classifier_free_guidance,
        **hub,
    )
    print(f"Exported to {args.output} in {time.perf_counter() - start:.0f}s. Generate with:")
    print(f'  aotdiffusion generate {args.output} "a photo of an astronaut riding a horse on mars"')


def _generate(args: argparse.Namespace) -> None:
    import diffusers
    import torch

    from . import artifact
    from .pipelines.base import _local_or_download

    folder = _local_or_download(args.model, {})
    _, block = artifact.read_pipeline_index(folder)
    import aotdiffusion

    pipe = getattr(aotdiffusion, block["pipeline_class"]).from_pretrained(folder)
    if args.scheduler:
        scheduler_cls = getattr(diffusers, args.scheduler, None)
        if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
            raise SystemExit(f"error: {args.scheduler!r} is not a diffusers scheduler class.")
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    call = {"num_inference_steps": args.steps, "generator": torch.Generator().manual_seed(args.seed)}
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    if args.num_images_per_prompt is not None:
        call["num_images_per_prompt"] = args.num_images_per_prompt
    else:
        call["num_images_per_prompt"] = pipe.static_shapes.num_images_per_prompt
    prompts = [args.prompt] * pipe.static_shapes.batch_size
    negative = [args.negative_prompt] * len(prompts) if args.negative_prompt else None
    start = time.perf_counter()
    images = pipe(prompts, negative_prompt=negative, **call).images
    elapsed = time.perf_counter() - start
    args.output.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = args.output / f"seed{args.seed}-{i}.png"
        image.save(path)
        paths.append(path)
    print(f"{len(paths)} image(s) in {elapsed:.1f}s:")
    for path in paths:
        print(f"  {path}")


def _tiny(args: argparse.Namespace) -> None:
    from .random_models import save_tiny

    path = save_tiny(args.kind, args.output, full_size=args.full_size)
    print(f"{'Full-size' if args.full_size else 'Tiny'} random-weight pipeline written to {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"export": _export, "generate": _generate, "tiny": _tiny}[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
