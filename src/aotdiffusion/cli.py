"""``aotdiffusion`` command line: export, generate, serve, bench, tiny."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from .bench.variants import DEFAULT_VARIANTS, VARIANTS
from .export.staging import DiskFullError

TASKS = [
    "auto", "stable-diffusion", "stable-diffusion-xl", "latent-consistency", "instruct-pix2pix",
    "stable-diffusion-xl-instruct-pix2pix", "pixart-sigma", "stable-diffusion-3",
]  # fmt: skip


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Adds ``--a-b`` with optimum-cli's ``--a_b`` spelling as an alias, so existing commands carry over."""
    spellings = dict.fromkeys([f"--{name}", f"--{name.replace('-', '_')}"])
    parser.add_argument(*spellings, **kwargs)


def _ray_flags(parser: argparse.ArgumentParser, what: str) -> None:
    _flag(parser, "ray", action="store_true", help=what + " (needs the ray extra)")
    _flag(parser, "num-cpus", type=float, default=1.0, help="with --ray: CPUs each replica reserves (default 1)")
    _flag(parser, "num-gpus", type=float, default=0.0, help="with --ray: GPUs each replica reserves (default 0)")
    _flag(parser, "ray-address", default=os.environ.get("RAY_ADDRESS"), help="with --ray: cluster to join "
          "(default $RAY_ADDRESS; none: start a local one)")  # fmt: skip


def _ray_init(args: argparse.Namespace) -> None:
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs the ray extra: pip install 'aotdiffusion[ray]'") from None
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aotdiffusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="compile a diffusers pipeline ahead of time into a folder")
    export.add_argument("output", type=Path, help="folder to write the compiled pipeline to (must be new or empty)")
    _flag(
        export,
        "overwrite",
        action="store_true",
        help="replace what OUTPUT holds; the old export stays until the new one is complete",
    )
    _flag(
        export,
        "no-cache",
        action="store_true",
        help="compile every component, even one the compile cache holds from an identical export",
    )
    _flag(export, "model", required=True, help="hub model id or local diffusers folder")
    _flag(
        export, "task", default="auto", choices=sorted(TASKS), help="pipeline family (default: from model_index.json)"
    )
    _flag(export, "batch-size", type=int, default=1, help="prompts per call (default 1)")
    _flag(export, "height", type=int, help="image height in pixels (default: the model's native size)")
    _flag(export, "width", type=int, help="image width in pixels (default: the model's native size)")
    _flag(
        export,
        "extra-sizes",
        help="more image sizes, HEIGHTxWIDTH comma-separated (e.g. 768x512,512x768): one more graph per size for "
        "the UNet and VAE, sharing one copy of the weights; generate --height/--width picks one",
    )
    _flag(export, "num-images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    _flag(
        export,
        "sequence-length",
        type=int,
        help="prompt length in tokens for T5 models (default the pipeline's max_sequence_length: PixArt-Σ 300, SD3 "
        "256): longer prompts are truncated to it",
    )
    _flag(
        export,
        "auto-cast",
        default="auto",
        choices=["auto", "none", "matmul", "all"],
        help="which operations run in --auto-cast-type: none, matmul (matmul/conv/attention), all, or auto "
        "(default): all, and matmul for a component that fails validation in all",
    )
    _flag(
        export,
        "auto-cast-type",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="auto (default): time fp32/bf16/fp16 on this machine and compile each component in the fastest "
        "type that passes validation",
    )
    _flag(
        export,
        "classifier-free-guidance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the UNet for the guidance batch (default: on, off for LCM); "
        "--no-classifier-free-guidance for guidance_scale <= 1 (e.g. Turbo models)",
    )
    _flag(
        export,
        "split-guidance-batch",
        action="store_true",
        help="compile the UNet for half the guidance batch (for data_parallel_mode='unet')",
    )
    _flag(
        export,
        "dynamic-batch-size",
        action="store_true",
        help="optimum-neuron's flag, accepted: every export runs calls of any number of prompts in chunks of "
        "--batch-size (nothing to switch on)",
    )
    _flag(export, "device", default="cpu", help="cpu or cuda (default cpu)")
    _flag(export, "disable-validation", action="store_true", help="skip comparing each component with eager PyTorch")
    _flag(export, "no-vae-encoder", action="store_true", help="leave out the VAE encoder (text-to-image only)")
    _flag(
        export,
        "deep-cache",
        action="store_true",
        help="also compile the shallow UNet for step caching (generate --cache-interval N)",
    )
    _flag(
        export,
        "quantize",
        default="none",
        choices=["none", "int8"],
        help="int8: the UNet's convolutions and linears in int8 (torchao, calibrated on built-in prompts; needs "
        "the int8 extra), kept only where timing shows it faster than the float type",
    )
    _flag(
        export,
        "fp32-linear",
        default="auto",
        choices=["auto", "onednn", "mkl"],
        help="who runs fp32 linears: auto (default: time oneDNN's prepacked kernel and MKL's sgemm per component), "
        "onednn or mkl",
    )
    _flag(
        export,
        "conv-algorithm",
        default="auto",
        choices=["auto", "direct", "winograd"],
        help="3x3 convolutions: auto (default: time oneDNN's direct kernel and Winograd F(2x2,3x3)/F(4x4,3x3) per "
        "fp32 shape, keep the faster; within 5%%, the smaller weights), direct, or winograd (every timed shape)",
    )
    _flag(
        export,
        "group-norm",
        default="channel-stats",
        choices=["channel-stats", "aten"],
        help="GroupNorm: channel-stats (default: per-channel statistics and scale/shift, which the compiler "
        "vectorises) or aten (PyTorch's group_norm as it is)",
    )
    _flag(
        export,
        "attention",
        default="auto",
        choices=["auto", "sdpa", "chunked"],
        help="long self-attention (1024+ tokens): auto (default: time PyTorch's SDPA kernel and chunked matmuls "
        "with softmax per component, keep the faster), sdpa, or chunked",
    )
    _flag(export, "unet", help="hub id or folder of a UNet that replaces the model's before compiling")
    _flag(export, "revision", help="hub revision of --model")
    _flag(
        export,
        "reuse-compiled",
        type=Path,
        metavar="EXPORT",
        help="compile nothing: run the code of EXPORT (an export of a model of the same architecture, e.g. the "
        "base of a fine-tune) with --model's weights, at EXPORT's shapes and compiler options",
    )
    _flag(
        export,
        "lora",
        action="append",
        default=[],
        metavar="PATH_OR_ID[:SCALE]",
        help="fuse this LoRA into the weights before compiling (repeatable; SCALE default 1); with --reuse-compiled "
        "nothing is compiled: the fused weights run the reused code",
    )
    _flag(
        export,
        "controlnet",
        action="append",
        default=[],
        metavar="ID_OR_DIR",
        help="compile this ControlNet with the pipeline (repeatable: multi-ControlNet); the export is then a "
        "ControlNet pipeline (generate --control-image)",
    )
    _flag(
        export,
        "ip-adapter",
        action="append",
        default=[],
        metavar="ID_OR_DIR",
        help="compile this IP-Adapter into the UNet, with its CLIP image encoder (repeatable: several adapters); "
        "generate --ip-adapter-image",
    )
    _flag(
        export,
        "ip-adapter-subfolder",
        action="append",
        metavar="DIR",
        help="the adapter's folder in its repository, e.g. models (h94/IP-Adapter's SD 1.5) or sdxl_models; once "
        "for all adapters or once each (default: the top)",
    )
    _flag(
        export,
        "ip-adapter-weight-name",
        action="append",
        metavar="FILE",
        help="the adapter's weights file, e.g. ip-adapter_sd15.safetensors; once for all adapters or once each",
    )
    _flag(
        export,
        "ip-adapter-image-encoder-folder",
        default="image_encoder",
        metavar="DIR",
        help="where the CLIP image encoder lies: a folder name under the adapter's subfolder, or a path with a / "
        "in the repository (diffusers' image_encoder_folder; default image_encoder)",
    )
    export.set_defaults(compiled_defaults={dest: export.get_default(dest) for dest in _COMPILED_FLAGS})

    generate = commands.add_parser("generate", help="generate images with an exported pipeline")
    generate.add_argument("model", help="exported folder or hub repository")
    generate.add_argument("prompt", nargs="?", help="the prompt (or --prompts FILE)")
    _flag(
        generate,
        "prompts",
        type=Path,
        help="a file of prompts, one per line (or JSONL): offline batch generation, here (one compiled batch after "
        "another) or with --ray on Ray Data",
    )
    _flag(generate, "replicas", type=int, default=1, help="with --ray: pipeline actors (default 1)")
    _ray_flags(generate, "run --prompts on Ray Data over an actor pool of compiled pipelines")
    _flag(generate, "negative-prompt")
    _flag(generate, "height", type=int, help="image height: one of the export's sizes (default: its first)")
    _flag(generate, "width", type=int, help="image width: one of the export's sizes (default: its first)")
    _flag(generate, "steps", type=int, default=20, help="denoising steps (default 20)")
    _flag(generate, "guidance-scale", type=float, help="default: diffusers' default for the pipeline")
    _flag(generate, "seed", type=int, default=0)
    _flag(generate, "num-images-per-prompt", type=int, help="default: the exported number")
    _flag(generate, "scheduler", help="diffusers scheduler class to swap in, e.g. EulerDiscreteScheduler")
    _flag(generate, "image", type=Path, help="input image: image-to-image, or inpainting with --mask-image")
    _flag(generate, "mask-image", type=Path, help="inpainting mask (white = repaint), same size as --image")
    _flag(generate, "strength", type=float, help="how much of --image to repaint, 0-1 (diffusers' default)")
    _flag(
        generate,
        "control-image",
        type=Path,
        action="append",
        default=[],
        help="a ControlNet export's conditioning image (repeatable: one per ControlNet, in export order)",
    )
    _flag(
        generate,
        "controlnet-conditioning-scale",
        type=float,
        action="append",
        help="how strongly each ControlNet steers (repeatable, one per ControlNet; default 1)",
    )
    _flag(
        generate,
        "ip-adapter-image",
        type=Path,
        action="append",
        default=[],
        help="an IP-Adapter export's image prompt (repeatable: one per adapter, in export order)",
    )
    _flag(
        generate,
        "ip-adapter-scale",
        type=float,
        action="append",
        help="how strongly each IP-Adapter's image steers (repeatable, one per adapter, or one for all; default 1)",
    )
    _flag(
        generate,
        "image-guidance-scale",
        type=float,
        help="InstructPix2Pix: how closely the edit keeps --image (default: diffusers' 1.5; >= 1 with guidance)",
    )
    _flag(generate, "resize", action="store_true", help="resize --image/--mask-image to the compiled size")
    _flag(
        generate,
        "trust-remote-code",
        action="store_true",
        help="load an export made on another machine or downloaded from the Hub (it runs its compiled code)",
    )
    _flag(
        generate,
        "cache-interval",
        type=int,
        default=1,
        help="step caching: one full UNet pass every N steps, shallow ones between (export --deep-cache); 1 = off",
    )
    _flag(
        generate,
        "lora",
        action="append",
        default=[],
        metavar="PATH_OR_ID[:SCALE]",
        help="apply this LoRA to the loaded compiled pipeline (repeatable; SCALE default 1): diffusers' "
        "load_lora_weights and set_adapters, the compiled weights changed in place, nothing compiled",
    )
    _flag(generate, "output", type=Path, default=Path("images"), help="folder for the PNGs (default images/)")

    serve = commands.add_parser("serve", help="serve exports over an OpenAI-compatible HTTP API with a web page")
    serve.add_argument(
        "exports", nargs="+", help="export folders; NAME=FOLDER names a model (same NAME: one model, several sizes)"
    )
    _flag(serve, "host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    _flag(serve, "port", type=int, default=8000)
    _flag(
        serve,
        "api-key",
        default=os.environ.get("AOTDIFFUSION_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 (default: $AOTDIFFUSION_API_KEY; none: open)",
    )
    _flag(serve, "replicas", type=int, default=1, help="pipeline replicas per export, each on its own cores or GPU")
    _flag(serve, "max-wait-ms", type=float, default=50.0, help="how long a partial batch waits for more requests")
    _flag(serve, "max-queue", type=int, default=64, help="requests waiting per export before 429 (default 64)")
    _flag(serve, "max-upload-mb", type=float, default=20.0, help="largest request body, in MiB (default 20)")
    _flag(serve, "max-steps", type=int, default=150, help="most denoising steps a request may ask for (default 150)")
    _flag(serve, "trust-remote-code", action="store_true", help="serve exports made on another machine")
    _flag(
        serve,
        "no-batching",
        action="store_true",
        help="one request per pipeline call (the baseline `aotdiffusion bench-serve` compares batching with)",
    )
    _ray_flags(
        serve, "deploy on Ray Serve: an ingress plus --replicas model replicas per export, anywhere on the cluster"
    )

    tiny = commands.add_parser("tiny", help="write a tiny random-weight diffusers pipeline (no network)")
    tiny.add_argument(
        "kind",
        choices=[
            "sd",
            "sd-inpaint",
            "sd-instruct-pix2pix",
            "lcm",
            "sdxl",
            "sdxl-refiner",
            "lcm-sdxl",
            "sdxl-instruct-pix2pix",
            "controlnet",
            "controlnet-2",
            "controlnet-sdxl",
            "ip-adapter",
            "ip-adapter-sdxl",
            "ip-adapter-full-sdxl",
            "pixart-sigma",
            "sd3",
        ],
    )
    tiny.add_argument("output", type=Path)
    tiny.add_argument(
        "--full-size",
        action="store_true",
        help="the model's published full-size architecture (random weights) for benchmarks",
    )
    bench = commands.add_parser(
        "bench",
        help="time diffusers eager, torch.compile, OpenVINO and aotdiffusion side by side in one run",
    )
    _flag(bench, "task", choices=["stable-diffusion", "stable-diffusion-xl"], default="stable-diffusion")
    _flag(bench, "model", help="diffusers folder or hub id (default: the full-size architecture, random weights)")
    _flag(bench, "quick", action="store_true", help="tiny model, 2 steps, 1 run: checks the benchmark itself")
    _flag(bench, "height", type=int)
    _flag(bench, "width", type=int)
    _flag(bench, "steps", type=int, default=20)
    _flag(bench, "guidance-scale", type=float, default=7.5)
    _flag(bench, "runs", type=int, default=3, help="timed runs per component, after one warm-up")
    _flag(bench, "e2e-runs", type=int, default=2, help="timed end-to-end images, after the cold first one")
    _flag(bench, "variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    _flag(bench, "aot-dir", help="reuse this export (else exported into the output folder first)")
    _flag(bench, "aot-int8-dir", help="the int8 variants' export (--quantize int8); default: AOT_DIR-int8")
    _flag(
        bench,
        "auto-cast",
        default="auto",
        choices=["auto", "none", "matmul", "all"],
        help="for the export (default: auto, as the export's; the type is chosen by measurement)",
    )
    _flag(bench, "compile-mode", help="torch.compile mode for the compile-* variants (e.g. max-autotune)")
    bench.add_argument("output", type=Path, nargs="?", default=Path("bench-results"))

    load = commands.add_parser(
        "bench-serve", help="load-test `serve`: dynamic batching against one request per call, same exports"
    )
    load.add_argument("exports", nargs="+", help="export folders served as one model (one per size)")
    _flag(load, "clients", type=int, default=16, help="concurrent clients (default 16)")
    _flag(load, "requests", type=int, default=200, help="requests in all (default 200)")
    _flag(load, "steps", type=int, default=4, help="denoising steps per request (default 4)")
    _flag(load, "max-wait-ms", type=float, default=100.0, help="the batching server's --max-wait-ms (default 100)")
    _flag(load, "max-n", type=int, help="images per request drawn from 1..MAX_N (default: the compiled batch)")
    _flag(
        load,
        "deployment",
        help="instead of the load test: start->health, start->first image and images/min for these replica "
        "counts, e.g. 1,2 (one export, full size)",
    )
    _flag(load, "output", type=Path, default=Path("bench-serve-results"))

    loading = commands.add_parser(
        "bench-load", help="time loading an export in a new process, page cache warm and cold, against format 1"
    )
    loading.add_argument("export", type=Path, help="an export folder")
    _flag(loading, "runs", type=int, default=3, help="timed loads per format and page-cache state (default 3)")
    _flag(loading, "output", type=Path, default=Path("bench-load-results"))
    return parser


def _pipeline_class(task: str, model: str, hub: dict):
    """The compiled class for ``--task``: the model's own class when it belongs to that family."""
    from .pipelines.auto import FAMILIES, pipeline_class_for

    try:
        own = pipeline_class_for(model, exported=False, **hub)
    except ValueError:
        if task == "auto":
            raise
        own = None
    if task == "auto" or (own is not None and own in FAMILIES[task]):
        return own
    return FAMILIES[task][0]


# export flags that decide what is compiled: with --reuse-compiled they come from the reused export.
_COMPILED_FLAGS = (
    "task", "batch_size", "height", "width", "num_images_per_prompt", "auto_cast", "auto_cast_type",
    "classifier_free_guidance", "split_guidance_batch", "device", "no_vae_encoder", "deep_cache", "quantize",
    "fp32_linear", "conv_algorithm", "unet", "no_cache", "extra_sizes", "group_norm", "attention", "ip_adapter",
    "ip_adapter_subfolder", "ip_adapter_weight_name", "ip_adapter_image_encoder_folder", "sequence_length",
)  # fmt: skip


def _export(args: argparse.Namespace) -> None:
    hub = {"revision": args.revision} if args.revision else {}
    if args.dynamic_batch_size:
        print(
            f"Note: --dynamic-batch-size changes nothing here: a call with any number of prompts runs in chunks of the "
            f"compiled batch (--batch-size {args.batch_size}), the last one padded.",
            flush=True,
        )
    start = time.perf_counter()
    common = {"lora": args.lora, "validate": not args.disable_validation, "overwrite": args.overwrite, **hub}
    if args.reuse_compiled is not None:
        given = [dest for dest, default in args.compiled_defaults.items() if getattr(args, dest) != default]
        if given:
            flags = ", ".join("--" + dest.replace("_", "-") for dest in given)
            raise ValueError(
                f"--reuse-compiled runs the code compiled in {args.reuse_compiled} with its shapes and compiler "
                f"options; {flags} cannot be set with it. Drop them, or export without --reuse-compiled."
            )
        from .pipelines.auto import pipeline_class_for

        cls = pipeline_class_for(args.reuse_compiled, exported=True)
        cls.export(args.model, args.output, reuse_compiled=args.reuse_compiled, **common)
    else:
        cls = _pipeline_class(args.task, args.model, hub)
        controlnet = {}
        if args.controlnet:
            from .pipelines.auto import FAMILIES, WITH_CONTROLNET, family_of

            family = family_of(cls)
            if family not in WITH_CONTROLNET:
                raise ValueError(
                    f"--controlnet compiles a Stable Diffusion 1.x/2.x or SDXL ControlNet pipeline; {args.model} "
                    f"exports as {cls.__name__}, which takes no ControlNet."
                )
            # The same task with ControlNets: an inpainting model exports as the ControlNet inpainting pipeline.
            task = FAMILIES[family].index(cls)
            cls, controlnet = FAMILIES[WITH_CONTROLNET[family]][task], {"controlnet": args.controlnet}
        cls.export(
            args.model,
            args.output,
            **controlnet,
            device=args.device,
            auto_cast=args.auto_cast,
            auto_cast_type=args.auto_cast_type,
            vae_encoder=not args.no_vae_encoder,
            deep_cache=args.deep_cache,
            quantize=args.quantize,
            fp32_linear=args.fp32_linear,
            conv_algorithm=args.conv_algorithm,
            group_norm=args.group_norm,
            attention=args.attention,
            unet_id=args.unet,
            batch_size=args.batch_size,
            height=args.height,
            width=args.width,
            num_images_per_prompt=args.num_images_per_prompt,
            classifier_free_guidance=args.classifier_free_guidance,
            split_guidance_batch=args.split_guidance_batch,
            extra_sizes=args.extra_sizes,
            sequence_length=args.sequence_length,
            compile_cache=not args.no_cache,
            ip_adapter=args.ip_adapter,
            ip_adapter_subfolder=args.ip_adapter_subfolder,
            ip_adapter_weight_name=args.ip_adapter_weight_name,
            ip_adapter_image_encoder_folder=args.ip_adapter_image_encoder_folder,
            **common,
        )
    how = ", no compiling" if args.reuse_compiled is not None else ""
    print(f"Exported to {args.output} in {time.perf_counter() - start:.0f}s{how}. Generate with:")
    print(f'  aotdiffusion generate {args.output} "a photo of an astronaut riding a horse on mars"')


def _generate(args: argparse.Namespace) -> None:
    import diffusers
    import torch

    from .export.lora import load_loras, parse_lora
    from .pipelines.auto import CONTROLNET_FAMILIES, EDITING, FAMILIES, family_of, pipeline_class_for
    from .pipelines.base import _local_or_download
    from .pipelines.images import decode_image

    if args.prompts is not None:
        return _generate_prompts(args)
    if args.prompt is None:
        raise ValueError("Give a prompt, or --prompts FILE for a file of them.")
    folder = _local_or_download(args.model, {}, args.trust_remote_code)
    exported_cls = pipeline_class_for(folder, exported=True)
    cls = exported_cls
    if args.mask_image is not None and args.image is None:
        raise ValueError("--mask-image needs --image: inpainting repaints the masked part of an image.")
    if family_of(exported_cls) in CONTROLNET_FAMILIES:
        _check_controlnet_flags(args, folder)
    elif args.control_image or args.controlnet_conditioning_scale:
        raise ValueError(
            f"--control-image is for ControlNet exports (export --controlnet); this is a {exported_cls.__name__}."
        )
    editing = family_of(exported_cls) in EDITING
    if editing:
        _check_editing_flags(args, exported_cls)
    elif args.image_guidance_scale is not None:
        raise ValueError("--image-guidance-scale is InstructPix2Pix's; this export is a " + exported_cls.__name__ + ".")
    if args.image is not None and not editing:
        task = family_of(exported_cls)
        cls = FAMILIES[task][2 if args.mask_image is not None else 1] or exported_cls
        if cls is exported_cls and exported_cls is FAMILIES[task][0]:
            raise ValueError(f"{exported_cls.__name__} exports do not take an input image (--image).")
    adapters = _check_ip_adapter_flags(args, folder)
    loras = [parse_lora(lora) for lora in args.lora]  # bad scales fail before anything loads
    pipe = cls.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    load_loras(pipe, loras)  # applied to the compiled weights in place (pipelines/lora.py)
    if args.scheduler:
        scheduler_cls = getattr(diffusers, args.scheduler, None)
        if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
            raise ValueError(f"{args.scheduler!r} is not a diffusers scheduler class.")
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    shapes = pipe.static_shapes
    call = {
        "num_inference_steps": args.steps,
        "generator": torch.Generator().manual_seed(args.seed),
        "num_images_per_prompt": args.num_images_per_prompt or shapes.num_images_per_prompt,
        "resize_images": args.resize,
        "cache_interval": args.cache_interval,
    }
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            call[name] = getattr(args, name)
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    elif not shapes.classifier_free_guidance and pipe._denoiser.config.get("time_cond_proj_dim") is None:
        call["guidance_scale"] = 0.0  # compiled without the guidance batch (e.g. Turbo)
    if args.image is not None:
        call["image"] = decode_image(args.image.read_bytes(), "--image")
    if args.mask_image is not None:
        call["mask_image"] = decode_image(args.mask_image.read_bytes(), "--mask-image")
    if args.strength is not None:
        call["strength"] = args.strength
    if args.image_guidance_scale is not None:
        call["image_guidance_scale"] = args.image_guidance_scale
    if args.control_image:
        images = [decode_image(path.read_bytes(), "--control-image") for path in args.control_image]
        call[cls.condition_argument] = images[0] if len(images) == 1 else images
    if args.controlnet_conditioning_scale:
        scales = args.controlnet_conditioning_scale
        call["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    if args.ip_adapter_image:
        images = [decode_image(path.read_bytes(), "--ip-adapter-image") for path in args.ip_adapter_image]
        call["ip_adapter_image"] = images
    if args.ip_adapter_scale:
        scales = args.ip_adapter_scale
        pipe.set_ip_adapter_scale(scales[0] if len(scales) == 1 else scales)
    elif adapters and not args.ip_adapter_image:
        print(f"No --ip-adapter-image: the {adapters} IP-Adapter(s) of this export add nothing.")
    prompts = [args.prompt] * shapes.batch_size
    if args.negative_prompt:
        call["negative_prompt"] = [args.negative_prompt] * len(prompts)
    start = time.perf_counter()
    images = pipe(prompts, **call).images
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


def _check_controlnet_flags(args: argparse.Namespace, folder: Path) -> None:
    """A ControlNet export takes one --control-image (and scale) per ControlNet; --image (and --mask-image) make
    it image-to-image (inpainting), the condition still from --control-image."""
    from . import artifact

    _, block = artifact.read_pipeline_index(folder)
    count = sum(1 for name in block["components"] if name.startswith("controlnet_"))
    scales = args.controlnet_conditioning_scale or []
    for flag, given in (("--control-image", args.control_image), ("--controlnet-conditioning-scale", scales)):
        if (given or flag == "--control-image") and len(given) != count:
            raise ValueError(
                f"This export has {count} ControlNet(s): pass {flag} once per ControlNet, got it {len(given)} time(s)."
            )


def _check_ip_adapter_flags(args: argparse.Namespace, folder: Path) -> int:
    """An IP-Adapter export takes one --ip-adapter-image per adapter, and one --ip-adapter-scale each or one for all;
    returns how many adapters it has."""
    from . import artifact

    _, block = artifact.read_pipeline_index(folder)
    unet = folder / "unet" / artifact.CONFIG_FILE
    manifest = (artifact.read_json(unet).get(artifact.MANIFEST_KEY) or {}) if "unet" in block["components"] else {}
    layout = (manifest.get("static") or {}).get("ip_adapter")
    count = len(layout["projections"]) if layout else 0
    scales = args.ip_adapter_scale or []
    if not count and (args.ip_adapter_image or scales):
        raise ValueError("--ip-adapter-image is for IP-Adapter exports (export --ip-adapter); this export has none.")
    if args.ip_adapter_image and len(args.ip_adapter_image) != count:
        raise ValueError(
            f"This export has {count} IP-Adapter(s): pass --ip-adapter-image once per adapter, got it "
            f"{len(args.ip_adapter_image)} time(s)."
        )
    if len(scales) not in (0, 1, count):
        raise ValueError(
            f"This export has {count} IP-Adapter(s): pass --ip-adapter-scale once for all or once per adapter, got it "
            f"{len(scales)} time(s)."
        )
    return count


def _check_editing_flags(args: argparse.Namespace, exported_cls: type) -> None:
    """InstructPix2Pix edits a whole input image as the prompt says: it needs --image, takes no mask or strength."""
    name = exported_cls.__name__
    if args.image is None:
        raise ValueError(f"{name} edits an input image as the prompt says (e.g. 'make it winter'): pass --image.")
    if args.mask_image is not None:
        raise ValueError(f"{name} edits the whole image and takes no --mask-image.")
    if args.strength is not None:
        raise ValueError(
            f"{name} has no --strength; --image-guidance-scale (default 1.5) says how closely to keep the image."
        )


def _serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .serve import create_app
    except ImportError as error:
        raise ValueError(
            f"serve needs the serve extra ({error.name} is missing): pip install 'aotdiffusion[serve]'"
        ) from None
    for name, value in (("--replicas", args.replicas), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise ValueError("--max-wait-ms must be >= 0 and --max-upload-mb > 0.")
    if args.ray:
        if args.no_batching:
            raise ValueError("--no-batching is for the local server; on Ray, Ray Serve's batching packs the calls.")
        return _serve_on_ray(args)
    start = time.perf_counter()
    app = create_app(args.exports, **_server_options(args), batching=not args.no_batching)
    models = app.state.registry.models
    served = ", ".join(f"{name} ({' '.join(model.sizes)})" for name, model in models.items())
    elapsed = time.perf_counter() - start
    print(f"Loaded {served} in {elapsed:.1f}s; serving on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _server_options(args: argparse.Namespace) -> dict:
    """What `serve` and `serve --ray` both pass on."""
    return {
        "replicas": args.replicas,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": args.max_queue,
        "max_upload_bytes": int(args.max_upload_mb * 2**20),
        "max_steps": args.max_steps,
        "api_key": args.api_key or None,
        "trust_remote_code": args.trust_remote_code,
    }


def _serve_on_ray(args: argparse.Namespace) -> None:
    _ray_init(args)
    from ray import serve

    from .serve import ray_serve

    start = time.perf_counter()
    ray_serve.run(
        args.exports, host=args.host, port=args.port, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
        **_server_options(args),
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    print(
        f"Deployed on Ray Serve in {elapsed:.1f}s; serving on http://{args.host}:{args.port}/ (Ctrl-C stops)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def _generate_prompts(args: argparse.Namespace) -> None:
    from .export.lora import parse_lora

    if args.prompt is not None:
        raise ValueError("Give either a prompt or --prompts FILE, not both.")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}.")
    if not args.ray and args.replicas != 1:
        raise ValueError(f"--replicas {args.replicas} runs pipeline actors on Ray: add --ray, or leave it out.")
    if args.ray and args.lora:
        raise ValueError(
            "--lora with --prompts --ray is not supported: write an export with the LoRA fused "
            "(aotdiffusion export --reuse-compiled EXPORT --lora LORA OUT) and generate from it."
        )
    if args.height is not None or args.width is not None:
        raise ValueError(
            "--prompts runs at the export's first compiled size; --height/--width are for one prompt. Drop them, or "
            "export the size you want first (--height/--width at export)."
        )
    loras = [parse_lora(lora) for lora in args.lora]  # bad scales fail before anything loads
    from .serve import offline

    # The same files and images.jsonl either way: Ray Data actors, or one compiled batch after another here.
    common = {
        "seed": args.seed,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "trust_remote_code": args.trust_remote_code,
    }
    if args.ray:
        _ray_init(args)
    start = time.perf_counter()
    if args.ray:
        records = offline.generate(
            args.model,
            args.prompts,
            args.output,
            replicas=args.replicas,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            **common,
        )
    else:
        records = offline.generate_here(
            args.model,
            args.prompts,
            args.output,
            loras=loras,
            progress=lambda done, total: print(f"{done}/{total} prompts", flush=True),
            **common,
        )
    count = sum(1 for _ in records.open())
    print(f"{count} image(s) in {time.perf_counter() - start:.1f}s; prompts, seeds and paths in {records}")


def _tiny(args: argparse.Namespace) -> None:
    from .random_models import save_tiny

    path = save_tiny(args.kind, args.output, full_size=args.full_size)
    print(f"{'Full-size' if args.full_size else 'Tiny'} random-weight pipeline written to {path}")


def _bench(args: argparse.Namespace) -> None:
    from .bench.run import BenchConfig, run

    quick = {"full_size": False, "steps": 2, "runs": 1, "e2e_runs": 1} if args.quick else {}
    config = BenchConfig(
        task=args.task,
        model=args.model,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        runs=args.runs,
        e2e_runs=args.e2e_runs,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        aot_dir=args.aot_dir,
        aot_int8_dir=args.aot_int8_dir,
        auto_cast=args.auto_cast,
        compile_mode=args.compile_mode,
        output_dir=str(args.output),
    )
    run(dataclasses.replace(config, **quick))


def _bench_load(args: argparse.Namespace) -> None:
    from .bench.load import run

    if args.runs < 1:
        raise ValueError(f"--runs must be at least 1, got {args.runs}.")
    run(args.export, runs=args.runs, output_dir=args.output)


def _bench_serve(args: argparse.Namespace) -> None:
    from .bench.serving import LoadConfig, run

    if args.clients < 1 or args.requests < 1:
        raise ValueError("--clients and --requests must be at least 1.")
    if args.deployment:
        from .bench.serving import deployment

        if len(args.exports) != 1:
            raise ValueError("--deployment measures one export; pass one folder.")
        counts = [int(c) for c in args.deployment.split(",")]
        deployment(str(args.exports[0]), replicas=counts, steps=args.steps, output_dir=str(args.output))
        return
    config = LoadConfig(
        exports=[str(e) for e in args.exports],
        clients=args.clients,
        requests=args.requests,
        steps=args.steps,
        max_wait_ms=args.max_wait_ms,
        max_n=args.max_n,
        output_dir=str(args.output),
    )
    run(config)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {
            "export": _export,
            "generate": _generate,
            "serve": _serve,
            "tiny": _tiny,
            "bench": _bench,
            "bench-serve": _bench_serve,
            "bench-load": _bench_load,
        }[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, DiskFullError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
