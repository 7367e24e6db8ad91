"""Step caching (DeepCache): the split is exact, the cached schedule matches eager, and it is a per-call switch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import STEPS, cli, psnr, run_pipe
from test_pipeline import FP32_ATOL

from aotdiffusion.export.deep_cache import FEATURE, _deep_blocks_skipped, deep_cache_specs
from aotdiffusion.export.pipeline import component_specs, default_shapes
from aotdiffusion.export.precision import Precision


def _unet_spec(pipe):
    shapes = default_shapes(pipe, height=64, width=64)
    return next(s for s in component_specs(pipe, shapes, Precision("none"), vae_encoder=False) if s.role == "unet")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_shallow_unet_on_its_own_feature_is_the_full_unet(tiny, kind):
    """The split is exact: the shallow graph fed the feature of the same step computes the full UNet."""
    from conftest import eager

    spec = _unet_spec(eager(kind, tiny))
    full, shallow = deep_cache_specs(spec)
    inputs = list(full.example_inputs(seed=3).values())
    with torch.no_grad():
        expected = spec.module(*inputs)[0]
        sample, feature = full.module(*inputs)
        again = shallow.module(*inputs, feature)[0]
        other = shallow.module(*inputs, torch.randn_like(feature))[0]
    assert torch.equal(sample, expected) and torch.equal(again, expected)
    assert not torch.allclose(other, expected, atol=1e-3)  # the feature really is used


class _EagerDeepCache:
    """DeepCache on the eager diffusers UNet, for reference: full pass every `interval` calls, shallow between."""

    def __init__(self, unet, interval):
        self.unet, self.interval, self.calls, self.feature = unet, interval, 0, None
        self.forward = type(unet).forward

    def __call__(self, *args, **kwargs):
        unet = self.unet
        if self.calls % self.interval == 0:
            kept = []
            hook = unet.up_blocks[-1].register_forward_pre_hook(
                lambda _m, a, kw: kept.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True
            )
            try:
                out = self.forward(unet, *args, **kwargs)
            finally:
                hook.remove()
            self.feature = kept[0]
        else:
            with _deep_blocks_skipped(unet, [self.feature]):
                out = self.forward(unet, *args, **kwargs)
        self.calls += 1
        return out


@pytest.mark.parametrize("interval", [2, 3])
def test_cached_steps_match_eager_deep_cache(sd_deep_cache, eager_sd, load, monkeypatch, interval):
    pipe = load(sd_deep_cache)
    calls = {"full": 0, "shallow": 0}

    def counting(name, runner):
        def run(*args):
            calls[name] += 1
            return runner(*args)

        return run

    for name, graph in (("full", pipe.unet.compiled), ("shallow", pipe.unet.shallow)):
        monkeypatch.setattr(graph, "_runner", counting(name, graph._runner))
    actual = run_pipe(pipe, cache_interval=interval, num_inference_steps=6)
    total = len(pipe.scheduler.timesteps)  # one UNet call per timestep (PNDM runs one more than the steps)
    assert total >= 6 and calls == {"full": -(-total // interval), "shallow": total - -(-total // interval)}

    monkeypatch.setattr(eager_sd.unet, "forward", _EagerDeepCache(eager_sd.unet, interval))
    expected = run_pipe(eager_sd, num_inference_steps=6)
    np.testing.assert_allclose(actual, expected, atol=FP32_ATOL, rtol=0)


def test_interval_one_is_the_uncached_pipeline(sd_deep_cache, sd_fp32, load):
    pipe = load(sd_deep_cache)
    uncached = run_pipe(pipe)
    assert np.array_equal(run_pipe(pipe, cache_interval=1), uncached)
    np.testing.assert_allclose(uncached, run_pipe(load(sd_fp32)), atol=FP32_ATOL, rtol=0)
    # Caching changes the image (it skips work), and a later uncached call is unaffected by an earlier cached one.
    cached = run_pipe(pipe, cache_interval=2)
    assert not np.array_equal(cached, uncached) and psnr(cached, uncached) > 15
    assert np.array_equal(run_pipe(pipe), uncached)


def test_manifest_and_bad_intervals(sd_deep_cache, sd_fp32, load):
    block = json.loads((sd_deep_cache / "model_index.json").read_text())["aotdiffusion"]
    assert block["components"] == ["text_encoder", "unet", "unet_deep_cache", "vae_decoder"]
    shallow = json.loads((sd_deep_cache / "unet_deep_cache" / "config.json").read_text())["aotdiffusion"]
    assert shallow["graphs"][0]["inputs"][-1]["name"] == FEATURE and shallow["validation"]["passed"]
    pipe = load(sd_deep_cache)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="`cache_interval` is how many denoising steps share one full UNet pass"):
            pipe("x", num_inference_steps=2, cache_interval=bad)
    with pytest.raises(ValueError, match=r"cache_interval=3 .* no shallow UNet graph. Export again with --deep-cache"):
        load(sd_fp32)("x", num_inference_steps=2, cache_interval=3)


def test_deep_cache_refuses_a_split_guidance_batch(eager_sd, tmp_path):
    from aotdiffusion.export.compile import CompilerOptions
    from aotdiffusion.export.pipeline import export_pipeline

    shapes = default_shapes(eager_sd, height=64, width=64, split_guidance_batch=True)
    with pytest.raises(ValueError, match="runs twice per step. Export with one of the two"):
        export_pipeline(eager_sd, tmp_path / "x", shapes, CompilerOptions(Precision("none")),
                        pipeline_class="AOTStableDiffusionPipeline", deep_cache=True, log=lambda _: None)  # fmt: skip


def test_cli_generates_with_a_cache_interval(sd_deep_cache, tmp_path):
    result = cli("generate", str(sd_deep_cache), "a cat", "--steps", str(STEPS), "--cache-interval", "2",
                 "--seed", "0", "--output", str(tmp_path))  # fmt: skip
    assert "1 image(s)" in result.stdout and (tmp_path / "seed0-0.png").is_file()
