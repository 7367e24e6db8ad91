"""``aotdiffusion bench``: every variant measured one after another on the same machine, in one run.

Timings are only compared as ratios within one run: the variants run sequentially (never two at once
on the same cores), each in a fresh process, and the report prints each next to the others.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import artifact
from ..export.deep_cache import SHALLOW_COMPONENT as SHALLOW
from .variants import DEFAULT_VARIANTS, VARIANTS, cache_interval, is_int8


@dataclass
class BenchConfig:
    task: str = "stable-diffusion"
    model: str | None = None  # a diffusers folder or hub id; None builds the random-weight one
    full_size: bool = True
    height: int | None = None
    width: int | None = None
    steps: int = 20
    guidance_scale: float = 7.5
    runs: int = 3
    e2e_runs: int = 2
    seed: int = 0
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    aot_dir: str | None = None  # an existing export to reuse; exported into the output folder otherwise
    # The int8 variants' export (--quantize int8); default: beside the float one, its name + "-int8".
    aot_int8_dir: str | None = None
    auto_cast: str = "auto"  # with the export's default --auto-cast-type auto: the type is measured
    compile_mode: str | None = None
    output_dir: str = "bench-results"


def _report(results, config: BenchConfig, model, shapes, exports, out: Path, unet_flops, peaks) -> dict:
    reference = results.get("eager-fp32")
    for variant, r in results.items():
        r["unet_tflops"] = unet_flops / r["unet_step"]["median"] / 1e12
        # What starting costs on top of generating: imports, loading, compiling, first-call warm-up.
        if r["end_to_end"]["runs"]:
            r["startup_overhead_s"] = r["cold_start_s"] - r["end_to_end"]["median"]
        if reference is not None:
            r["psnr_vs_eager_fp32_db"] = _psnr(np.load(out / f"{variant}.npy"), np.load(out / "eager-fp32.npy"))
    report = {
        "hardware": hardware(),
        "versions": versions(),
        "shapes": {**shapes, "steps": config.steps, "guidance_scale": config.guidance_scale},
        "model": model,
        "aot_dir": exports["float"][0],
        "aot_export_s": exports["float"][1],
        "aot_int8_dir": exports["int8"][0],
        "aot_int8_export_s": exports["int8"][1],
        "unet_step_tflop": unet_flops / 1e12,
        "peak_tflops": peaks,
        "command": " ".join(["aotdiffusion", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    _write_csv(report, out / "results.csv")
    (out / "results.md").write_text(render_markdown(report))
    return report


def run(config: BenchConfig) -> dict[str, Any]:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants:
        raise ValueError(f"Unknown variants {unknown or '(none given)'}; choose from {', '.join(VARIANTS)}.")
    model = config.model or _random_model(config, out)
    shapes = _shapes(model, config)
    floats = [v for v in config.variants if v.startswith("aotdiffusion") and not is_int8(v)]
    int8s = [v for v in config.variants if is_int8(v)]
    aot_dir, export_s = _aot_artifact(model, config, shapes, out, floats) if floats else (None, None)
    int8_dir, int8_export_s = _aot_artifact(model, config, shapes, out, int8s, int8=True) if int8s else (None, None)

    unet_flops = _unet_flops(model, shapes)
    peaks = _peaks(quick=not config.full_size)
    results: dict[str, Any] = {}
    for variant in config.variants:
        print(f"[bench] {variant}: {VARIANTS[variant]}", flush=True)
        folder = int8_dir if is_int8(variant) else aot_dir
        results[variant] = _measure_in_fresh_process(variant, model, folder, shapes, config, out)
        r = results[variant]
        print(
            f"[bench] {variant}: UNet step {r['unet_step']['median']:.3f}s, "
            f"VAE decode {r['vae_decode']['median']:.3f}s, "
            f"end-to-end {r['end_to_end']['median'] if r['end_to_end']['runs'] else float('nan'):.2f}s, "
            f"cold start {r['cold_start_s']:.1f}s, peak RSS {r['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
        # Rewritten after each variant, so a long run that is stopped still leaves its results.
        exports = {"float": (aot_dir, export_s), "int8": (int8_dir, int8_export_s)}
        report = _report(results, config, model, shapes, exports, out, unet_flops, peaks)
    print(render_markdown(report))
    return report


# ------------------------------------------------------------------------------ preparation
def _random_model(config: BenchConfig, out: Path) -> str:
    from ..random_models import save_tiny

    kind = {"stable-diffusion": "sd", "stable-diffusion-xl": "sdxl"}[config.task]
    folder = out / f"model-{kind}{'-full' if config.full_size else '-tiny'}"
    if not (folder / "model_index.json").exists():
        print(f"[bench] writing the {'full-size' if config.full_size else 'tiny'} {kind} architecture, random weights")
        save_tiny(kind, folder, full_size=config.full_size)
    return str(folder)


def _shapes(model: str, config: BenchConfig) -> dict[str, int]:
    """The model's own default resolution unless --height/--width say otherwise (diffusers' rule)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(model, subfolder="unet")
    vae_factor = 2 ** (len(AutoencoderKL.load_config(model, subfolder="vae")["block_out_channels"]) - 1)
    sample = unet["sample_size"] if isinstance(unet["sample_size"], int) else unet["sample_size"][0]
    return {"height": config.height or sample * vae_factor, "width": config.width or sample * vae_factor}


def _aot_artifact(
    model: str, config: BenchConfig, shapes: dict, out: Path, variants: list[str], *, int8: bool = False
) -> tuple[str, float | None]:
    """The export ``variants`` run (reused when it exists), and how long exporting it took."""
    base = Path(config.aot_dir or out / "aot")
    folder = base
    if int8:
        folder = Path(config.aot_int8_dir) if config.aot_int8_dir else base.with_name(base.name + "-int8")
    caching = any(cache_interval(v) > 1 for v in variants)
    if (folder / "model_index.json").exists():
        if caching and not (folder / SHALLOW).is_dir():
            raise ValueError(
                f"The step-caching variants need an export made with --deep-cache; {folder} has none. "
                "Export again with --deep-cache, or remove it to export here."
            )
        print(f"[bench] reusing the export in {folder}")
        return str(folder), None
    auto_cast = config.auto_cast
    quantize = ["--quantize", "int8"] if int8 else []
    print(
        f"[bench] exporting with --auto-cast {auto_cast} --auto-cast-type auto {' '.join(quantize)} into {folder} "
        "(not part of any timing)",
        flush=True,
    )
    command = [
        sys.executable, "-m", "aotdiffusion.cli", "export", "--model", model, "--task", config.task,
        "--height", str(shapes["height"]), "--width", str(shapes["width"]), "--auto-cast", auto_cast, *quantize,
        str(folder),
    ]  # fmt: skip
    if caching:
        command.insert(-1, "--deep-cache")
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return str(folder), time.perf_counter() - start


def _measure_in_fresh_process(variant, model, aot_dir, shapes, config: BenchConfig, out: Path) -> dict[str, Any]:
    result_file = out / f"{variant}.json"
    child = {
        "variant": variant,
        "model": model,
        "aot_dir": aot_dir,
        "height": shapes["height"],
        "width": shapes["width"],
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "runs": config.runs,
        "e2e_runs": config.e2e_runs,
        "seed": config.seed,
        "compile_mode": config.compile_mode,
        "output": str(result_file),
        "spawned_at": time.time(),
    }
    subprocess.run([sys.executable, "-m", "aotdiffusion.bench.measure", json.dumps(child)], check=True)
    return json.loads(result_file.read_text())


# ---------------------------------------------------------------------------- measurements
def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _unet_flops(model: str, shapes: dict) -> float:
    """FLOPs of one UNet call at the guidance batch, counted on the meta device (no weights, no compute)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(model, subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        h, w = shapes["height"] // 8, shapes["width"] // 8  # the SD-family VAE factor
        added = None
        if unet.config.addition_embed_type == "text_time":
            text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.empty(2, text_dim), "time_ids": torch.empty(2, 6)}
        args = (torch.empty(2, unet.config.in_channels, h, w), torch.empty(2))
        hidden = torch.empty(2, 77, unet.config.cross_attention_dim)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(*args, encoder_hidden_states=hidden, added_cond_kwargs=added)
    return float(counter.get_total_flops())


def _peaks(quick: bool) -> dict[str, float]:
    """Measured GEMM (linear) and 3x3 convolution throughput per type (TFLOP/s): the roofline the UNet is
    compared with. Timed with the same kernels and budget as the export's type choice, so a type this CPU
    runs 100x slower (bf16 without bf16 instructions) costs seconds, not minutes."""
    from ..export.choose_precision import _DTYPES, Op, _runner, _seconds

    n, c, hw = (512, 64, 32) if quick else (2048, 320, 64)
    ops = {
        "gemm": Op("linear", ((n, n), (n, n)), 2 * n**3),
        "conv3x3": Op("conv", ((2, c, hw, hw), (c, c, 3, 3), (1, 1), (1, 1), (1, 1), 1), 2 * 2 * c * c * 9 * hw * hw),
    }
    peaks = {}
    with torch.no_grad():
        for kind, op in ops.items():
            for name, dtype in _DTYPES.items():
                peaks[f"{kind} {name}"] = op.flops / _seconds(_runner(op, dtype, "cpu"), "cpu") / 1e12
    return peaks


def hardware() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "amx": artifact.has_amx(),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import openvino

        versions["openvino"] = openvino.__version__.split("-")[0]
    except ImportError:
        pass
    return versions


# --------------------------------------------------------------------------------- reporting
_COLUMNS = ("text_encoder", "unet_step", "vae_decode", "end_to_end")


def _cell(entry: dict | None) -> str:
    if not entry or not entry.get("runs"):
        return "-"
    return f"{entry['median']:.3f} ({entry['min']:.3f}-{entry['max']:.3f})"


def render_markdown(report: dict[str, Any]) -> str:
    hw, shapes = report["hardware"], report["shapes"]
    lines = [
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['threads']} threads, ISA {hw['isa']}, AMX {hw['amx']}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        f"Shapes: {shapes['height']}x{shapes['width']}, batch 1, guidance batch 2, {shapes['steps']} steps, "
        f"guidance {shapes['guidance_scale']}. UNet step = {report['unet_step_tflop']:.3f} TFLOP; measured peaks "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["peak_tflops"].items())
        + " TFLOP/s. Seconds: median (min-max). Cold start: new process to first image (same call); startup "
        "overhead: cold start minus the warm end-to-end median.",
        "",
        "| variant | precision | text encoder s | UNet step s | VAE decode s | end-to-end s | cold start s | "
        "startup overhead s | peak RSS GiB | UNet TFLOP/s | PSNR vs eager fp32 dB |",
        "|---" * 11 + "|",
    ]
    for variant, r in report["results"].items():
        psnr = r.get("psnr_vs_eager_fp32_db")
        psnr_text = "-" if psnr is None else ("ref" if variant == "eager-fp32" else f"{psnr:.1f}")
        lines.append(
            f"| {variant} | {r['precision']} | "
            + " | ".join(_cell(r.get(c)) for c in _COLUMNS)
            + f" | {r['cold_start_s']:.1f} | {r.get('startup_overhead_s', float('nan')):.1f} | {r['peak_rss_gib']:.2f}"
            + f" | {r['unet_tflops']:.3f} | {psnr_text} |"
        )
    ours = report["results"].get("aotdiffusion")
    if ours:
        lines += ["", "aotdiffusion's speed-up over each variant (their time / ours; above 1 is faster):", ""]
        header = "| vs | text encoder | UNet step | VAE decode | end-to-end | cold start | startup overhead |"
        lines += [header, "|---" * 7 + "|"]
        for variant, r in report["results"].items():
            if variant == "aotdiffusion":
                continue
            cells = [_ratio(r.get(c), ours.get(c)) for c in _COLUMNS]
            cells.append(f"{r['cold_start_s'] / ours['cold_start_s']:.2f}x")
            overheads = r.get("startup_overhead_s"), ours.get("startup_overhead_s")
            cells.append("-" if None in overheads else f"{overheads[0] / overheads[1]:.2f}x")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        fastest = _fastest_peer(report["results"])
        if fastest:
            cells = [
                f"{_ratio(fastest[c][1], ours.get(c))} ({fastest[c][0]})" if c in fastest else "-" for c in _COLUMNS
            ]
            lines.append("| **fastest peer** | " + " | ".join(cells) + " | - | - |")
    lines += _levers_table(report["results"])
    verdicts = _targets(report["results"])
    if verdicts:
        lines += ["", "Targets (issues #4 and #8), as ratios in this run:", ""]
        lines += [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in verdicts]
    if report.get("aot_export_s"):
        lines += ["", f"aotdiffusion export (once, not in any timing above): {report['aot_export_s']:.0f} s."]
    if report.get("aot_int8_export_s"):
        seconds = report["aot_int8_export_s"]
        lines += [f"aotdiffusion int8 export (calibration included, not in any timing above): {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def _levers_table(results: dict[str, Any]) -> list[str]:
    """The opt-in levers (int8, step caching) against the fastest float peer and OpenVINO's int8."""
    levers = [v for v in results if v.startswith("aotdiffusion-")]
    fastest = _fastest_peer(results)
    if not levers or not fastest:
        return []
    int8_peer = results.get("openvino-int8")
    lines = ["", "The opt-in levers (they change the image: PSNR in the first table), their time / ours:", ""]
    header = "| lever | UNet step vs fastest float peer | end-to-end vs fastest float peer |"
    header += " UNet step vs openvino-int8 | end-to-end vs openvino-int8 |" if int8_peer else ""
    lines += [header, "|---" * (5 if int8_peer else 3) + "|"]
    for variant in levers:
        r = results[variant]
        cells = [f"{_ratio(fastest[c][1], r.get(c))} ({fastest[c][0]})" if c in fastest else "-"
                 for c in ("unet_step", "end_to_end")]  # fmt: skip
        if int8_peer:
            cells += [_ratio(int8_peer.get(c), r.get(c)) for c in ("unet_step", "end_to_end")]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


# (what, baseline variant, metric, the least speed-up that meets it)
TARGETS = (
    ("UNet step at least 1.3x faster than OpenVINO", "openvino", "unet_step", 1.3),
    ("UNet step at least 1.1x faster than torch.compile", "compile-bf16", "unet_step", 1.1),
    ("VAE decode at least 1.3x faster than OpenVINO", "openvino", "vae_decode", 1.3),
    ("end-to-end at least 6x faster than diffusers eager fp32", "eager-fp32", "end_to_end", 6.0),
    ("end-to-end faster than OpenVINO", "openvino", "end_to_end", 1.0),
    ("end-to-end at least 1.15x faster than the fastest peer (issue #8)", "fastest-peer", "end_to_end", 1.15),
    (
        "startup overhead (cold start minus a warm image) at most a fifth of torch.compile's",
        "compile-bf16",
        "startup_overhead_s",
        5.0,
    ),
)


def _fastest_peer(results: dict[str, Any]) -> dict[str, tuple[str, dict]]:
    """Per metric, the fastest float peer: eager, torch.compile or OpenVINO in fp32 or bf16 (issue #8's
    definition; the int8 peer is compared with aotdiffusion's int8 variants on their own lines)."""
    fastest = {}
    for metric in _COLUMNS:
        timed = [
            (v, r[metric])
            for v, r in results.items()
            if not v.startswith("aotdiffusion") and "int8" not in v and r.get(metric, {}).get("runs")
        ]
        if timed:
            fastest[metric] = min(timed, key=lambda item: item[1]["median"])
    return fastest


def _targets(results: dict[str, Any]) -> list[tuple[str, bool]]:
    ours = results.get("aotdiffusion")
    fastest = _fastest_peer(results)
    if "end_to_end" in fastest:
        results = {**results, "fastest-peer": {"end_to_end": fastest["end_to_end"][1]}}
    verdicts = []
    # The opt-in levers (step caching, int8): every aotdiffusion variant but the default export.
    levers = {v: r for v, r in results.items() if v.startswith("aotdiffusion-") and r["end_to_end"]["runs"]}
    if levers and "end_to_end" in fastest:
        best = min(levers, key=lambda v: levers[v]["end_to_end"]["median"])
        speedup = fastest["end_to_end"][1]["median"] / levers[best]["end_to_end"]["median"]
        text = f"with the opt-in levers: end-to-end at least 2x faster than the fastest peer ({best}: {speedup:.2f}x)"
        verdicts.append((text, speedup >= 2.0))
    for text, baseline, metric, least in TARGETS:
        theirs = results.get(baseline)
        if ours is None or theirs is None:
            continue
        if metric == "startup_overhead_s":
            if metric not in theirs or metric not in ours:
                continue
            speedup = theirs[metric] / ours[metric]
        elif theirs[metric]["runs"] and ours[metric]["runs"]:
            speedup = theirs[metric]["median"] / ours[metric]["median"]
        else:
            continue
        verdicts.append((f"{text} ({speedup:.2f}x)", speedup > least if least == 1.0 else speedup >= least))
    return verdicts


def _ratio(theirs: dict | None, ours: dict | None) -> str:
    if not theirs or not ours or not theirs.get("runs") or not ours.get("runs"):
        return "-"
    return f"{theirs['median'] / ours['median']:.2f}x"


_SCALARS = ("ready_s", "cold_start_s", "startup_overhead_s", "peak_rss_gib", "unet_tflops", "psnr_vs_eager_fp32_db")


def _write_csv(report: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "precision", "metric", "median_s", "min_s", "max_s", "runs"])
        for variant, r in report["results"].items():
            for metric in _COLUMNS:
                entry = r.get(metric)
                if entry and entry.get("runs"):
                    writer.writerow([variant, r["precision"], metric, entry["median"], entry["min"], entry["max"],
                                     entry["runs"]])  # fmt: skip
            for metric in _SCALARS:
                if r.get(metric) is not None:
                    writer.writerow([variant, r["precision"], metric, r[metric], "", "", ""])
