"""Property-based calls of the tiny compiled pipeline (hypothesis): whatever the arguments, a call returns
images of the compiled size in the asked output type or raises ValueError/TypeError with a message;
never another exception, never a hang."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CALL_TIMEOUT_S = 120  # the largest step count drawn runs in a few seconds on 2 cores

texts = st.text(max_size=120)
arguments = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(texts, st.lists(st.text(max_size=20), max_size=3), st.none(), st.integers()),
        "negative_prompt": st.one_of(texts, st.lists(st.text(max_size=10), max_size=3), st.none()),
        "num_inference_steps": st.one_of(
            st.integers(-3, 6), st.sampled_from([0, 1001, 10**9]), st.floats(), st.text(max_size=3), st.none()
        ),
        "guidance_scale": st.one_of(st.floats(width=32), st.integers(-5, 30), st.none()),
        "num_images_per_prompt": st.one_of(st.integers(-2, 3), st.none()),
        "height": st.one_of(st.sampled_from([-64, 0, 8, 63, 64, 128]), st.none()),
        "width": st.one_of(st.sampled_from([-64, 0, 8, 63, 64, 128]), st.none()),
        "eta": st.one_of(st.floats(), st.none()),
        "output_type": st.sampled_from(["pil", "np", "pt", "latent", "bogus"]),
        "generator": st.one_of(st.integers(0, 3), st.just("seed"), st.none()),
        "clip_skip": st.one_of(st.integers(-1, 3), st.none()),
    },
)


@pytest.fixture(scope="module")
def pipe(sd_fp32):
    from aotdiffusion import AOTStableDiffusionPipeline

    loaded = AOTStableDiffusionPipeline.from_pretrained(sd_fp32)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _generators(drawn):
    if isinstance(drawn, int):  # a list of that many generators (one per image, or an error)
        return [torch.Generator().manual_seed(i) for i in range(drawn)]
    return drawn  # "seed" (not a generator) or None


def _check_images(images, output_type: str, n: int) -> None:
    if output_type == "pil":
        assert len(images) == n and all(isinstance(i, PIL.Image.Image) and i.size == (64, 64) for i in images)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (n, 64, 64, 3) and np.isfinite(images).all()
    elif output_type == "pt":
        assert isinstance(images, torch.Tensor) and images.shape == (n, 3, 64, 64) and images.isfinite().all()
    else:  # latent
        assert isinstance(images, torch.Tensor) and images.shape == (n, 4, 8, 8)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arguments)
def test_any_call_gives_compiled_size_images_or_a_clear_error(pipe, call):
    kwargs = {**call, "generator": _generators(call.get("generator"))}
    pool = ThreadPoolExecutor(1)
    try:
        output = pool.submit(pipe, **kwargs).result(timeout=CALL_TIMEOUT_S)  # TimeoutError: a hang, the test fails
    except (ValueError, TypeError) as error:
        assert str(error).strip(), f"{type(error).__name__} without a message"
        return
    finally:
        pool.shutdown(wait=False)
    # Any number of prompts: as many images (the compiled batch is one; more run in chunks of it).
    prompt = call.get("prompt")
    _check_images(output.images, call.get("output_type", "pil"), len(prompt) if isinstance(prompt, list) else 1)
