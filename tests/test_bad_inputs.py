"""The checked-in bad-input corpus (tests/corpus/bad_inputs.json), run through the Python API, the CLI and
the HTTP server alike: every case gets the outcome the corpus states, on each surface that can express it."""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import LiveServer

from aotdiffusion import artifact

CORPUS = json.loads((Path(__file__).parent / "corpus" / "bad_inputs.json").read_text())["cases"]
STEPS = 2
TRUNCATION = "truncated because CLIP can only handle sequences up to 77 tokens"


def _cases(surface: str) -> list:
    return [pytest.param(case, id=case["id"]) for case in CORPUS if surface in case]


def test_the_corpus_covers_every_surface_and_names_known_recipes():
    ids = [case["id"] for case in CORPUS]
    assert len(ids) == len(set(ids)) >= 35
    for surface in ("api", "cli", "http"):
        assert len(_cases(surface)) >= 25, surface
    for case in CORPUS:
        assert case.get("image", "rgb") in IMAGES and case.get("mask", "rgb") in IMAGES, case["id"]
        assert case.get("export", "remove unet") in BREAKS, case["id"]


# ----------------------------------------------------------------------------------- file recipes
def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def _gradient(size=(64, 64)) -> np.ndarray:
    return np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)


def _bomb() -> bytes:
    """A PNG whose header claims 100000x100000 pixels (10 G pixels) in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _animated() -> bytes:
    frames = [Image.new("RGB", (64, 64), color) for color in ("red", "blue")]
    return _png(frames[0], format="GIF", save_all=True, append_images=frames[1:])


def _palette() -> bytes:
    image = Image.fromarray(_gradient()).convert("P")
    return _png(image, transparency=0)


def _rgba_mask() -> bytes:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[16:48, 16:48, 3] = 0  # OpenAI's rule: transparent = repaint
    return _png(Image.fromarray(rgba, "RGBA"))


IMAGES = {
    "rgb": lambda: _png(Image.fromarray(_gradient())),
    "truncated": lambda: _png(Image.fromarray(_gradient()))[:120],
    "empty": lambda: b"",
    "text": lambda: b"this is not an image\n",
    "zero-pixels": None,  # PIL cannot write one: the API gets Image.new("RGB", (0, 0))
    "one-pixel": lambda: _png(Image.new("RGB", (1, 1), "green")),
    "16-bit": lambda: _png(Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))),
    "cmyk": lambda: _png(Image.fromarray(_gradient()).convert("CMYK"), format="JPEG"),
    "palette": _palette,
    "animated": _animated,
    "bomb": _bomb,
    "small-mask": lambda: _png(Image.new("L", (32, 32), 255)),
    "rgba-mask": _rgba_mask,
}


def _image_bytes(recipe: str) -> bytes:
    return IMAGES[recipe]()


def _pil(recipe: str) -> Image.Image:
    if recipe == "zero-pixels":
        return Image.new("RGB", (0, 0))
    return Image.open(io.BytesIO(_image_bytes(recipe)))  # lazily, as a user opens a file


# ----------------------------------------------------------------------------------- broken exports
def _edit_component(folder: Path, component: str, **changes) -> None:
    path = folder / component / "config.json"
    config = json.loads(path.read_text())
    config["aotdiffusion"].update(changes)
    path.write_text(json.dumps(config))


def _component_file(folder: Path, component: str, suffix: str) -> Path:
    manifest = json.loads((folder / component / "config.json").read_text())["aotdiffusion"]
    return folder / component / next(name for name in manifest["files"] if name.endswith(suffix))


def _format_1(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index["aotdiffusion"]["format_version"] = 1
    (folder / "model_index.json").write_text(json.dumps(index))


BREAKS = {
    "remove unet": lambda f: shutil.rmtree(f / "unet"),
    "remove unet weights": lambda f: _component_file(f, "unet", "_weights.blob").unlink(),
    "truncate vae_decoder library": lambda f: _component_file(f, "vae_decoder", ".so").write_bytes(b"\0" * 1000),
    "format version 1": _format_1,
    "foreign cpu flags": lambda f: _edit_component(f, "unet", cpu_isa="sve256", cpu_flags=["sve", "sve2"]),
    "garbled model index": lambda f: (f / "model_index.json").write_text('{"_class_name": "StableDiff'),
}


@pytest.fixture
def broken(sd_fp32, tmp_path):
    def _broken(how: str) -> Path:
        folder = tmp_path / "broken"
        shutil.copytree(sd_fp32, folder)
        BREAKS[how](folder)
        return folder

    return _broken


# ----------------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def pipes(sd_fp32):
    from aotdiffusion import (
        AOTStableDiffusionImg2ImgPipeline,
        AOTStableDiffusionInpaintPipeline,
        AOTStableDiffusionPipeline,
    )

    text = AOTStableDiffusionPipeline.from_pretrained(sd_fp32)
    text.set_progress_bar_config(disable=True)
    return {
        "text": text,
        "image": text.sibling(AOTStableDiffusionImg2ImgPipeline),
        "mask": text.sibling(AOTStableDiffusionInpaintPipeline),
    }


class _Logged(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


def _api_call(case: dict, pipes: dict):
    import torch

    call = {"prompt": "a red fox", "num_inference_steps": STEPS, **case.get("call", {})}
    if call.get("generator") == "two generators":
        call["generator"] = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    else:
        call.setdefault("generator", torch.Generator().manual_seed(0))
    pipe = pipes["text"]
    if "image" in case:
        call["image"] = _pil(case["image"])
        pipe = pipes["image"]
    if "mask" in case:
        call["mask_image"] = _pil(case["mask"])
        pipe = pipes["mask"]
    return pipe, call


@pytest.mark.parametrize("case", _cases("api"))
def test_python_api(case, pipes, broken):
    from aotdiffusion import AOTStableDiffusionPipeline

    kind, text = case["api"]
    errors = {"ValueError": ValueError, "TypeError": TypeError, "ArtifactError": artifact.ArtifactError}
    if "export" in case:
        with pytest.raises(errors[kind]) as raised:
            AOTStableDiffusionPipeline.from_pretrained(broken(case["export"]))
        assert text in str(raised.value)
        return
    pipe, call = _api_call(case, pipes)
    if kind != "image":
        with pytest.raises(errors[kind]) as raised:
            pipe(**call)
        assert text in str(raised.value)
        return
    logged = _Logged()
    logger = logging.getLogger("diffusers")
    logger.addHandler(logged)
    try:
        images = pipe(**call).images
    finally:
        logger.removeHandler(logged)
    assert len(images) == 1 and images[0].size == (64, 64) and np.asarray(images[0]).std() > 0
    assert text in logged.text


# ----------------------------------------------------------------------------------- the CLI
def _cli_args(case: dict, folder: Path, tmp_path: Path) -> list[str]:
    call = {"prompt": "a red fox", "num_inference_steps": STEPS, **case.get("call", {})}
    args = ["generate", str(folder), call.pop("prompt"), "--output", str(tmp_path / "images")]
    flags = {"num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "strength": "--strength"}
    for name, value in call.items():
        if name == "resize_images":
            args.append("--resize")
        else:
            args += [flags[name], str(value)]
    for key, flag in (("image", "--image"), ("mask", "--mask-image")):
        if key in case:
            path = tmp_path / f"{key}.bin"
            path.write_bytes(_image_bytes(case[key]))
            args += [flag, str(path)]
    return args


@pytest.mark.parametrize("case", _cases("cli"))
def test_cli(case, sd_fp32, broken, tmp_path, capfd):
    from aotdiffusion.cli import main

    folder = broken(case["export"]) if "export" in case else sd_fp32
    status, text = case["cli"]
    logged = _Logged()  # diffusers' warnings: its handler holds the stderr of the test that imported it first
    logging.getLogger("diffusers").addHandler(logged)
    try:
        code = main(_cli_args(case, folder, tmp_path))
    finally:
        logging.getLogger("diffusers").removeHandler(logged)
    out, err = capfd.readouterr()
    assert code == status, err[-2000:]
    assert text in err + logged.text and "Traceback" not in err
    if status == 0:
        images = sorted((tmp_path / "images").glob("*.png"))
        assert len(images) == 1 and Image.open(images[0]).size == (64, 64) and "1 image(s)" in out


# ----------------------------------------------------------------------------------- the HTTP server
@pytest.fixture(scope="module")
def server(sd_fp32):
    from aotdiffusion.serve import create_app

    with LiveServer(create_app([f"sd={sd_fp32}"], max_wait_ms=0)) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client


def _http_request(case: dict, client: httpx.Client) -> httpx.Response:
    body = {"prompt": "a red fox", "num_inference_steps": STEPS, "size": "64x64", "seed": 0, **case.get("call", {})}
    if "resize_images" in body:
        body["resize"] = body.pop("resize_images")
    if "image" not in case:
        content = json.dumps(body)  # allow_nan: NaN/Infinity reach the server as written
        return client.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    files = {"image": ("image.png", _image_bytes(case["image"]), "image/png")}
    if "mask" in case:
        files["mask"] = ("mask.png", _image_bytes(case["mask"]), "image/png")
    form = {key: (json.dumps(value) if isinstance(value, bool) else str(value)) for key, value in body.items()}
    return client.post("/v1/images/edits", data=form, files=files)


@pytest.mark.parametrize("case", _cases("http"))
def test_http(case, server, broken):
    from aotdiffusion.serve import create_app

    status, text = case["http"]
    if "export" in case:
        assert status == "refused to start"
        with pytest.raises(artifact.ArtifactError) as raised:
            create_app([f"sd={broken(case['export'])}"])
        assert text in str(raised.value)
        return
    response = _http_request(case, server)
    assert response.status_code == status, response.text[:2000]
    if status == 200:
        (item,) = response.json()["data"]
        assert Image.open(io.BytesIO(__import__("base64").b64decode(item["b64_json"]))).size == (64, 64)
        return
    error = response.json()["error"]
    assert text in f"{error['message']} {error['param']}"
    assert server.get("/health").status_code == 200  # and the server still answers
