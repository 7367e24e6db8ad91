"""ControlNet pipelines compiled (one ControlNet and several) against eager diffusers with the same ControlNets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cli, run_pipe
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)
from test_family import close, load, mask, picture, png_close, refused

from aotdiffusion import (
    AOTDiffusionPipeline,
    AOTStableDiffusionControlNetImg2ImgPipeline,
    AOTStableDiffusionControlNetInpaintPipeline,
    AOTStableDiffusionControlNetPipeline,
    AOTStableDiffusionXLControlNetImg2ImgPipeline,
    AOTStableDiffusionXLControlNetInpaintPipeline,
    AOTStableDiffusionXLControlNetPipeline,
)


def eager_controlnet(tiny, *kinds: str, cls=StableDiffusionControlNetPipeline, model: str = "sd"):
    nets = [ControlNetModel.from_pretrained(tiny(kind)) for kind in kinds]
    extra = {} if model == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(tiny(model), controlnet=nets[0] if len(nets) == 1 else nets, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeds(*values: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(v) for v in values]


def test_controlnet_matches_eager(sd_controlnet_export, tiny):
    pipe = AOTDiffusionPipeline.from_pretrained(sd_controlnet_export)  # the class the export was made with
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, AOTStableDiffusionControlNetPipeline)
    reference = eager_controlnet(tiny, "controlnet")
    calls = [
        {},
        {"controlnet_conditioning_scale": 0.5, "control_guidance_start": 0.25, "control_guidance_end": 0.75},
        {"guess_mode": True, "guidance_scale": 3.0},  # the ControlNet on the conditional half, scales ramped
    ]
    for call in calls:
        close(run_pipe(pipe, image=picture(), **call), run_pipe(reference, image=picture(), **call))
    # The scale is a graph input, not a constant: off, the image is the plain UNet's.
    off = run_pipe(pipe, image=picture(), controlnet_conditioning_scale=0.0)
    assert np.abs(off - run_pipe(pipe, image=picture())).max() > 1e-2
    close(off, run_pipe(reference, image=picture(), controlnet_conditioning_scale=0.0))
    # Two prompts, a conditioning image each: chunks of the compiled batch, each with its image.
    two = {"prompt": ["a red house", "a blue car"], "image": [picture(seed=1), picture(seed=2)]}
    two.update(num_inference_steps=3, output_type="np")
    close(pipe(**two, generator=seeds(0, 1)).images, reference(**two, generator=seeds(0, 1)).images)
    with pytest.raises(
        ValueError, match=r"`image` is 32x32 \(width x height\) but this pipeline was compiled for 64x64"
    ):
        run_pipe(pipe, image=picture(size=32))


@pytest.mark.parametrize(
    ("aot_cls", "eager_cls", "inputs"),
    [
        (AOTStableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetImg2ImgPipeline, {"strength": 0.7}),
        (AOTStableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetInpaintPipeline, {"mask_image": mask()}),
    ],
    ids=["img2img", "inpaint"],
)
def test_controlnet_img2img_and_inpaint_match_eager(sd_controlnet_export, tiny, aot_cls, eager_cls, inputs):
    """The same export's compiled parts as diffusers' ControlNet image-to-image and inpainting pipelines: the input
    image is `image`, the condition `control_image`."""
    pipe = load(aot_cls, sd_controlnet_export)
    reference = eager_controlnet(tiny, "controlnet", cls=eager_cls)
    call = {"image": picture(seed=3), "control_image": picture(), **inputs}
    for extra in ({}, {"controlnet_conditioning_scale": 0.5, "guess_mode": True, "guidance_scale": 3.0}):
        close(run_pipe(pipe, **call, **extra), run_pipe(reference, **call, **extra))
    # Two prompts, an input image and a condition each: split into chunks together.
    two = {**call, "prompt": ["a red house", "a blue car"], "num_inference_steps": 3, "output_type": "np"}
    two.update(image=[picture(seed=3), picture(seed=4)], control_image=[picture(seed=1), picture(seed=2)])
    close(pipe(**two, generator=seeds(0, 1)).images, reference(**two, generator=seeds(0, 1)).images)
    with pytest.raises(
        ValueError, match=r"`control_image` is 32x32 \(width x height\) but this pipeline was compiled for 64x64"
    ):
        run_pipe(pipe, **{**call, "control_image": picture(size=32)})


def test_sdxl_controlnet_matches_eager(sdxl_controlnet_export, tiny):
    """An SDXL ControlNet takes the UNet's micro-conditioning (text_embeds, time_ids) as graph inputs; one export runs
    text-to-image, image-to-image and inpainting as diffusers' SDXL ControlNet pipelines do."""
    pipe = AOTDiffusionPipeline.from_pretrained(sdxl_controlnet_export)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, AOTStableDiffusionXLControlNetPipeline)
    reference = eager_controlnet(tiny, "controlnet-sdxl", cls=StableDiffusionXLControlNetPipeline, model="sdxl")
    for call in ({}, {"controlnet_conditioning_scale": 0.5, "guess_mode": True, "guidance_scale": 3.0}):
        close(run_pipe(pipe, image=picture(), **call), run_pipe(reference, image=picture(), **call))
    call = {"image": picture(seed=3), "control_image": picture()}
    for aot_cls, eager_cls, extra in (
        (AOTStableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetImg2ImgPipeline, {}),
        (
            AOTStableDiffusionXLControlNetInpaintPipeline,
            StableDiffusionXLControlNetInpaintPipeline,
            {"mask_image": mask()},
        ),
    ):
        sibling = pipe.sibling(aot_cls)
        eager = eager_controlnet(tiny, "controlnet-sdxl", cls=eager_cls, model="sdxl")
        close(run_pipe(sibling, **call, **extra), run_pipe(eager, **call, **extra))
    with pytest.raises(ValueError, match=r"`image` is 32x32 \(width x height\) but this pipeline was compiled for"):
        run_pipe(pipe, image=picture(size=32))


def test_multi_controlnet_matches_eager(sd_multi_controlnet_export, tiny):
    pipe = load(AOTStableDiffusionControlNetPipeline, sd_multi_controlnet_export)
    reference = eager_controlnet(tiny, "controlnet", "controlnet-2")
    images = [picture(seed=1), picture(seed=2)]  # one per ControlNet
    for call in ({}, {"controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_start": [0.0, 0.3],
                      "control_guidance_end": [1.0, 0.8]}):  # fmt: skip
        close(run_pipe(pipe, image=images, **call), run_pipe(reference, image=images, **call))
    # Two prompts: `image` stays one per ControlNet, for both.
    two = {"prompt": ["a red house", "a blue car"], "image": images, "num_inference_steps": 3, "output_type": "np"}
    close(pipe(**two, generator=seeds(0, 1)).images, reference(**two, generator=seeds(0, 1)).images)


def test_generate_with_a_control_image(sd_controlnet_export, tiny, tmp_path):
    picture().save(tmp_path / "edges.png")
    out = tmp_path / "out"
    cli("generate", str(sd_controlnet_export), "a red house", "--control-image", str(tmp_path / "edges.png"),
        "--controlnet-conditioning-scale", "0.8", "--steps", "4", "--output", str(out))  # fmt: skip
    expected = eager_controlnet(tiny, "controlnet")(
        "a red house", image=picture(), num_inference_steps=4, controlnet_conditioning_scale=0.8,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    png_close(out / "seed0-0.png", expected)
    # With --image (and --mask-image): ControlNet image-to-image (inpainting), the condition still --control-image.
    picture(seed=3).save(tmp_path / "photo.png")
    mask().save(tmp_path / "mask.png")
    inpaint = ["--mask-image", str(tmp_path / "mask.png")]
    for flags, eager_cls, inputs in (
        ([], StableDiffusionControlNetImg2ImgPipeline, {}),
        (inpaint, StableDiffusionControlNetInpaintPipeline, {"mask_image": mask()}),
    ):
        cli("generate", str(sd_controlnet_export), "a red house", "--image", str(tmp_path / "photo.png"), *flags,
            "--control-image", str(tmp_path / "edges.png"), "--steps", "4", "--output", str(out))  # fmt: skip
        expected = eager_controlnet(tiny, "controlnet", cls=eager_cls)(
            "a red house", image=picture(seed=3), control_image=picture(), num_inference_steps=4,
            generator=torch.Generator().manual_seed(0), **inputs,
        ).images[0]  # fmt: skip
        png_close(out / "seed0-0.png", expected)
    refusals = [
        ([], r"This export has 1 ControlNet\(s\): pass --control-image once per ControlNet, got it 0 time"),
        (["--image", str(tmp_path / "edges.png")], r"pass --control-image once per ControlNet, got it 0 time"),
    ]
    refused(sd_controlnet_export, "a red house", refusals)
