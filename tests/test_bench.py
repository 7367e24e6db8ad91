"""``aotdiffusion bench --quick``: the variants run on the tiny model (compile-fp32 aside), so the bench cannot rot."""

from __future__ import annotations

import csv
import json

from conftest import cli

from aotdiffusion.bench.variants import VARIANTS

# compile-fp32 is compile-bf16's recipe in another dtype (the slowest variant to start: 75 s of torch.compile).
TESTED = [variant for variant in VARIANTS if variant != "compile-fp32"]


def test_bench_quick_runs_every_variant_side_by_side(tiny_sd, sd_deep_cache, sd_int8, tmp_path):
    out = tmp_path / "bench"
    variants = ",".join(TESTED)
    args = ["--quick", "--model", str(tiny_sd), "--aot-dir", str(sd_deep_cache), "--aot-int8-dir", str(sd_int8),
            "--variants", variants, str(out)]  # fmt: skip
    result = cli("bench", *args)
    report = json.loads((out / "results.json").read_text())
    results = report["results"]
    assert list(results) == TESTED
    for variant, r in results.items():
        for metric in ("text_encoder", "unet_step", "vae_decode", "end_to_end"):
            assert r[metric]["runs"] >= 1 and 0 < r[metric]["min"] <= r[metric]["median"] <= r[metric]["max"], variant
        assert r["ready_s"] < r["cold_start_s"] and r["peak_rss_gib"] > 0.1
        assert r["deterministic"], f"{variant}: the same call gave a different image"

    # Quality next to speed: fp32 variants compute eager's function (tiny model: rounding differences only);
    # bf16 ones are measurably further away but still the same image.
    psnr = {v: r["psnr_vs_eager_fp32_db"] for v, r in results.items()}
    assert psnr["eager-fp32"] == float("inf")
    for variant in ("aotdiffusion", "openvino-fp32"):
        assert psnr[variant] > 70, (variant, psnr)
    for variant in ("eager-bf16", "compile-bf16"):
        assert 25 < psnr[variant] < psnr["aotdiffusion"], (variant, psnr)
    assert results["eager-bf16"]["precision"] == "bfloat16" and results["aotdiffusion"]["precision"] == "float32"
    # Step caching skips work, so its image differs from the uncached one (2 steps: the second is shallow).
    for interval in (2, 3, 5):
        r = results[f"aotdiffusion-cache{interval}"]
        assert r["precision"] == f"float32, cache interval {interval}" and 10 < psnr[f"aotdiffusion-cache{interval}"]
    assert results["aotdiffusion-int8"]["precision"].startswith("int8 conv/linear")
    assert results["aotdiffusion-int8-cache3"]["precision"].endswith("cache interval 3")
    assert 20 < psnr["aotdiffusion-int8"] < psnr["aotdiffusion"], psnr
    assert "with the opt-in levers: end-to-end at least 2x faster than the fastest peer" in result.stdout

    # Loading an export compiles nothing; torch.compile compiles in every new process.
    assert results["aotdiffusion"]["cold_start_s"] < results["compile-bf16"]["cold_start_s"]
    assert report["unet_step_tflop"] > 0 and set(report["peak_tflops"]) == {
        f"{kind} {dtype}" for kind in ("gemm", "conv3x3") for dtype in ("fp32", "bf16", "fp16")
    }

    markdown = (out / "results.md").read_text()
    assert markdown in result.stdout
    assert "| aotdiffusion | float32 |" in markdown and "| vs | text encoder | UNet step" in markdown
    assert "UNet step at least 1.3x faster than OpenVINO" in markdown
    assert "| lever | UNet step vs fastest float peer | end-to-end vs fastest float peer |" in markdown
    assert "| aotdiffusion-int8-cache5 |" in markdown and "end-to-end vs openvino-int8" in markdown
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["variant"] for row in rows} == set(TESTED)
    assert any(row["metric"] == "unet_step" and float(row["median_s"]) > 0 for row in rows)
