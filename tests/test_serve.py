"""The HTTP server: OpenAI's Images API over dynamic batching, tested against a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import BF16_ATOL, BF16_MIN_PSNR, psnr
from PIL import Image
from serving import LiveServer, decode, metric, png

KEY = "sk-test-key"
SLOW_STEPS = 400  # long enough (seconds on the tiny model) to hold a replica busy while a test looks on


@pytest.fixture(scope="module")
def server(sd_batch4):
    from aotdiffusion.serve import create_app

    app = create_app(
        [f"sd={sd_batch4}"], max_wait_ms=400, max_queue=3, api_key=KEY, max_upload_bytes=2**20, max_steps=SLOW_STEPS
    )
    with LiveServer(app) as url:
        yield url, app


@pytest.fixture
def api(server):
    url, _ = server
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


def generate(api, **body):
    body.setdefault("prompt", "a red fox")
    body.setdefault("num_inference_steps", 3)
    return api.post("/v1/images/generations", json=body)


def error_of(response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    return error["message"]


def test_openai_client_unchanged(server, tmp_path):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    models = client.models.list()
    assert [m.id for m in models.data] == ["sd"]
    result = client.images.generate(
        model="sd", prompt="a lighthouse at dusk", n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 3, "negative_prompt": "blurry"},
    )  # fmt: skip
    assert len(result.data) == 2
    assert [image.model_extra["seed"] for image in result.data] == [11, 12]
    assert all(decode(image.b64_json).shape == (64, 64, 3) for image in result.data)
    source = tmp_path / "in.png"
    source.write_bytes(png(Image.new("RGB", (64, 64), (200, 40, 40))))
    with open(source, "rb") as image:
        edited = client.images.edit(
            model="sd", image=image, prompt="a blue square", n=1, size="64x64",
            extra_body={"seed": 1, "num_inference_steps": 4, "strength": 0.5},
        )  # fmt: skip
    assert decode(edited.data[0].b64_json).shape == (64, 64, 3)


def test_api_key(server):
    url, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, headers=headers)
        assert "API key" in error_of(response, 401)
    assert httpx.get(f"{url}/health").status_code == 200  # health checks need no key


def test_batched_images_equal_solo_images(api, server):
    """Requests packed into one call (and padded) give each image exactly what a call of its own gives (fp32)."""
    _, app = server
    before = metric(app.state.metrics.render().decode(), "aotdiffusion_batches_total", model="sd", size="64x64")
    requests = [dict(prompt="a red fox", seed=5, n=1), dict(prompt="a green car", seed=90, n=2),
                dict(prompt="a blue bird", seed=7, n=1, negative_prompt="fog")]  # fmt: skip
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda body: generate(api, **body), requests))
    after = metric(app.state.metrics.render().decode(), "aotdiffusion_batches_total", model="sd", size="64x64")
    assert after - before == 1, "the three requests (4 images) should fill one call of the batch-4 export"
    for body, response in zip(requests, together):
        assert response.status_code == 200, response.text
        for image in response.json()["data"]:
            solo = generate(api, **{**body, "n": 1, "seed": image["seed"]})
            assert np.array_equal(decode(image["b64_json"]), decode(solo.json()["data"][0]["b64_json"]))


def test_request_errors_in_openai_shape(api):
    assert "64x64" in error_of(generate(api, size="512x512"), 400, "size")
    assert "served: sd" in error_of(generate(api, model="dall-e-3"), 404, "model")
    assert "guidance" in error_of(generate(api, guidance_scale=1.0), 400, "guidance_scale")
    assert "b64_json" in error_of(generate(api, response_format="url"), 400, "response_format")
    assert "not a parameter" in error_of(generate(api, steps=3), 400, "steps")
    error_of(generate(api, n=11), 400, "n")
    error_of(generate(api, num_inference_steps=0), 400, "num_inference_steps")
    assert "--max-steps" in error_of(generate(api, num_inference_steps=SLOW_STEPS + 1), 400, "num_inference_steps")
    error_of(api.post("/v1/images/generations", content=b'{"prompt": "x", "guidance_scale": NaN}',
                      headers={"Content-Type": "application/json"}), 400, "guidance_scale")  # fmt: skip
    error_of(
        api.post("/v1/images/generations", content=b"{not json", headers={"Content-Type": "application/json"}), 400
    )
    error_of(api.get("/v1/nothing"), 404)
    big = png(Image.effect_noise((1024, 1024), 64).convert("RGB"))
    assert len(big) > 2**20
    response = api.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("big.png", big, "image/png")})
    assert "at most" in error_of(response, 413)


def test_edit_inputs(api):
    red = Image.new("RGB", (64, 64), (200, 40, 40))

    def edit(image: bytes, mask: bytes | None = None, **form):
        files = {"image": ("image.png", image, "image/png")}
        if mask is not None:
            files["mask"] = ("mask.png", mask, "image/png")
        form = {"prompt": "a cat", "num_inference_steps": "4", "seed": "3", **form}
        return api.post("/v1/images/edits", data=form, files=files)

    # OpenAI's mask (transparent = edit) and diffusers' (white = repaint) mean the same region.
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 32, 64))
    white = Image.new("L", (64, 64), 0)
    white.paste(255, (0, 0, 32, 64))
    openai_style, diffusers_style = edit(png(red), png(alpha)), edit(png(red), png(white))
    assert openai_style.status_code == diffusers_style.status_code == 200
    assert openai_style.json()["data"][0]["b64_json"] == diffusers_style.json()["data"][0]["b64_json"]
    # Converted, not refused: CMYK JPEG, 16-bit grey, palette.
    assert edit(png(red.convert("CMYK"), "JPEG")).status_code == 200
    assert edit(png(Image.new("I;16", (64, 64), 40000))).status_code == 200
    assert edit(png(red.convert("P"))).status_code == 200
    # Refused with the reason.
    assert "resize" in error_of(edit(png(Image.new("RGB", (80, 64)))), 400, "image")
    assert edit(png(Image.new("RGB", (80, 64))), resize="true").status_code == 200
    assert "not a readable image" in error_of(edit(png(red)[:100]), 400, "image")
    assert "empty" in error_of(edit(b""), 400, "image")
    assert "mask must have" in error_of(edit(png(red), png(Image.new("L", (32, 32)))), 400, "mask")
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    animated = png(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert "animated" in error_of(edit(animated), 400, "image")
    bomb = png(Image.new("1", (20000, 20000)))  # a few kB that decode to 400M pixels
    assert "pixels" in error_of(edit(bomb), 400, "image")
    assert "strength" in error_of(edit(png(red), strength="0.1", num_inference_steps="4"), 400, "strength")
    error_of(edit(png(red), strength="1.5"), 400, "strength")


def test_stream_reports_steps_then_images(api):
    body = {"prompt": "a fox", "seed": 2, "n": 2, "num_inference_steps": 3, "stream": True}
    with api.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    progress = [e for e in events if e["type"] == "image_generation.progress"]
    total = progress[0]["total"]  # the scheduler's step count: PNDM adds a warm-up step to 3
    assert total >= 3 and [e["step"] for e in progress] == list(range(1, total + 1))
    done = [e for e in events if e["type"] == "image_generation.completed"]
    assert [e["seed"] for e in done] == [2, 3]
    plain = generate(api, prompt="a fox", seed=2, n=2).json()["data"]
    assert [e["b64_json"] for e in done] == [image["b64_json"] for image in plain]


def test_health_answers_while_a_batch_runs_and_full_queue_is_429(api, server):
    url, app = server
    with ThreadPoolExecutor(4) as pool:
        slow = pool.submit(generate, api, n=4, num_inference_steps=SLOW_STEPS, seed=1)
        while api.get("/health").json()["busy_replicas"] == 0:
            time.sleep(0.02)
        start = time.monotonic()
        health = api.get("/health")
        assert health.status_code == 200 and time.monotonic() - start < 1.0
        queued = [pool.submit(generate, api, n=4, seed=s) for s in (2, 3, 4)]  # max_queue=3 requests wait
        while api.get("/health").json()["queued_requests"] < 3:
            time.sleep(0.02)
        full = generate(api, seed=9)
        assert "queue is full" in error_of(full, 429)
        assert int(full.headers["Retry-After"]) >= 1
        assert slow.result().status_code == 200
        assert all(f.result().status_code == 200 for f in queued)


def test_client_that_disconnects_frees_its_slots(api, server):
    url, app = server
    labels = {"model": "sd", "size": "64x64"}
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(generate, api, n=4, num_inference_steps=SLOW_STEPS, seed=1)
        while api.get("/health").json()["busy_replicas"] == 0:
            time.sleep(0.02)
        batches = metric(app.state.metrics.render().decode(), "aotdiffusion_batches_total", **labels)

        async def leave_early():
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as client:
                request = client.post("/v1/images/generations", json={"prompt": "gone", "n": 3})
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(request, timeout=0.5)

        asyncio.run(leave_early())
        deadline = time.monotonic() + 5
        while api.get("/health").json()["queued_requests"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert api.get("/health").json()["queued_requests"] == 0
        assert slow.result().status_code == 200
    text = app.state.metrics.render().decode()
    assert metric(text, "aotdiffusion_batches_total", **labels) == batches + 1, "the abandoned request must not run"
    assert metric(text, "aotdiffusion_queue_depth", **labels) == 0


def test_metrics(api, server):
    _, app = server
    text = app.state.metrics.render().decode()
    padded = metric(text, "aotdiffusion_padded_slots_total", model="sd", size="64x64")
    images = metric(text, "aotdiffusion_images_served_total", model="sd")
    assert generate(api, n=1, seed=4).status_code == 200  # 1 image in a call of 4: 3 padded slots
    text = api.get("/metrics").text
    assert metric(text, "aotdiffusion_padded_slots_total", model="sd", size="64x64") == padded + 3
    assert metric(text, "aotdiffusion_images_served_total", model="sd") == images + 1
    for name in (
        "aotdiffusion_queue_depth",
        "aotdiffusion_batch_fill_ratio_bucket",
        "aotdiffusion_request_seconds_bucket",
    ):
        assert name in text
    assert 'aotdiffusion_responses_total{endpoint="/v1/images/generations",status="200"}' in text


def test_models_and_health(api):
    card = api.get("/v1/models/sd").json()
    assert card["sizes"] == ["64x64"] and card["batch_size"] == 4
    assert card["tasks"] == ["text-to-image", "image-to-image", "inpainting"]
    assert api.get("/health").json()["status"] == "ok"


def test_replicas_run_side_by_side_and_a_killed_one_is_replaced(sd_batch4):
    """--replicas 2: two replica processes (one core each) behind one batcher; one killed mid-call is
    restarted and the call runs again on it, so the client still gets its images."""
    import os
    import signal

    from aotdiffusion.serve import create_app

    app = create_app([f"sd={sd_batch4}"], replicas=2, max_wait_ms=50, max_steps=SLOW_STEPS)
    pool = app.state.registry.models["sd"].exports["64x64"].pool
    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=300) as api:
        with ThreadPoolExecutor(2) as threads:
            both = list(threads.map(lambda s: generate(api, n=4, seed=s), (20, 20)))
        assert [r.status_code for r in both] == [200, 200]
        assert metric(app.state.metrics.render().decode(), "aotdiffusion_batches_total", model="sd", size="64x64") == 2
        # The same request on the two replicas: the same images.
        assert [d["b64_json"] for d in both[0].json()["data"]] == [d["b64_json"] for d in both[1].json()["data"]]

        old = list(pool.pids)
        with ThreadPoolExecutor(1) as threads:
            slow = threads.submit(generate, api, n=4, num_inference_steps=SLOW_STEPS, seed=3)
            while api.get("/health").json()["busy_replicas"] == 0:
                time.sleep(0.02)
            time.sleep(0.5)
            batcher = app.state.registry.models["sd"].exports["64x64"].batcher
            (busy,) = set(range(2)) - set(batcher._free)
            os.kill(old[busy], signal.SIGKILL)
            response = slow.result()
        assert response.status_code == 200, response.text
        assert pool.restarts == 1 and pool.pids[busy] != old[busy] and pool.pids[1 - busy] == old[1 - busy]
        assert generate(api, seed=4).status_code == 200


# Debian's chromium on a closed network: without the background-networking flags it keeps trying
# Google's hosts; as root it needs --no-sandbox.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"


def test_web_page_in_headless_chromium(server):
    """The page at / in a real browser: type a prompt, click Generate, see step progress, get the image."""
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#status.error")  # no key yet: the page shows the 401's message
            assert "API key" in page.inner_text("#status")
            page.fill("#key", KEY)
            page.press("#key", "Tab")  # change event: the models load with the key
            page.wait_for_function("document.querySelectorAll('#model option').length > 0")
            assert page.input_value("#size") == "64x64"
            page.fill("#prompt", "a small red house under a starry sky")
            page.fill("#steps", "60")
            page.fill("#seed", "42")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('Step')")
            image = page.wait_for_selector("img.result", timeout=120_000)
            size = page.evaluate("(img) => img.decode().then(() => [img.naturalWidth, img.naturalHeight])", image)
            assert size == [64, 64]
            assert image.get_attribute("title") == "seed 42"
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOTS / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert Image.open(shot).size[0] > 0
        finally:
            browser.close()


def test_several_models_and_sizes(sd_batch4, sd_bf16_wide, sd_fp32):
    """One model at two compiled sizes (fp32 batch 4 and bf16 batch 2) plus a second model; bf16 batched
    images stay within bf16's tolerance of their solo images."""
    from aotdiffusion.serve import create_app

    app = create_app([f"sd={sd_batch4}", f"sd={sd_bf16_wide}", f"one={sd_fp32}"], max_wait_ms=400)
    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=120) as api:
        cards = {card["id"]: card for card in api.get("/v1/models").json()["data"]}
        assert cards["sd"]["sizes"] == ["64x64", "96x64"] and cards["one"]["sizes"] == ["64x64"]
        assert "64x64, 96x64" in error_of(generate(api, model="sd", size="32x32"), 400, "size")
        assert decode(generate(api, model="one", seed=1).json()["data"][0]["b64_json"]).shape == (64, 64, 3)
        bodies = [dict(model="sd", size="96x64", prompt="a red fox", seed=3),
                  dict(model="sd", size="96x64", prompt="a blue car", seed=8)]  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda body: generate(api, **body), bodies))
        wide = app.state.registry.models["sd"].exports["96x64"]
        text = app.state.metrics.render().decode()
        assert metric(text, "aotdiffusion_batches_total", model="sd", size="96x64") == 1, "both in one call"
        for body, response in zip(bodies, together):
            batched = decode(response.json()["data"][0]["b64_json"]) / 255.0
            solo = decode(generate(api, **body).json()["data"][0]["b64_json"]) / 255.0
            assert batched.shape == (64, 96, 3)
            difference = float(np.abs(batched - solo).max())
            assert difference < BF16_ATOL
            if difference > 0:
                assert psnr(batched, solo) > BF16_MIN_PSNR
        assert wide.info.tasks == ("text-to-image",)
        files = {"image": ("i.png", png(Image.new("RGB", (96, 64))), "image/png")}
        response = api.post("/v1/images/edits", data={"prompt": "x", "model": "sd", "size": "96x64"}, files=files)
        assert "VAE encoder" in error_of(response, 400, "image")
    with pytest.raises(ValueError, match="both model 'sd' at 64x64"):
        create_app([f"sd={sd_batch4}", f"sd={sd_fp32}"])


def test_serve_command(sd_fp32):
    """`aotdiffusion serve` in its own process: ready on /health, answers, stops cleanly on Ctrl-C."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "aotdiffusion.cli", "serve", str(sd_fp32), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not become ready"
                time.sleep(0.2)
        name = sd_fp32.name
        assert [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]] == [name]
        response = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=120,
                              json={"prompt": "a cat", "num_inference_steps": 2})  # fmt: skip
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"serving on http://127.0.0.1:{port}/" in out
    assert "Traceback" not in err


def test_concurrent_clients_that_disconnect_mid_request_leave_no_5xx_and_no_held_slots(sd_batch4):
    """Twelve clients at once, eight of them hanging up at staggered moments (queued, or while their batch
    runs): every answer sent is a 200, none a 5xx, and afterwards the queue is empty, no replica is busy,
    no slot is held and a new request is served."""
    from aotdiffusion.serve import create_app

    app = create_app([f"sd={sd_batch4}"], max_wait_ms=100)

    async def client(url: str, i: int):
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"prompt": f"client {i}", "n": 1 + i % 3, "num_inference_steps": 60, "seed": i}
            request = http.post("/v1/images/generations", json=body, timeout=300)
            if i % 3 == 0:  # stays to the end
                return (await request).status_code
            try:
                return (await asyncio.wait_for(request, timeout=0.2 + 0.3 * i)).status_code
            except TimeoutError:
                return "hung up"

    async def everyone(url: str):
        return await asyncio.gather(*(client(url, i) for i in range(12)))

    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=120) as api:
        outcomes = asyncio.run(everyone(url))
        assert set(outcomes) <= {200, "hung up"} and outcomes.count("hung up") >= 4, outcomes
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            health = api.get("/health").json()
            if health["queued_requests"] == 0 and health["busy_replicas"] == 0:
                break
            time.sleep(0.05)
        assert health["queued_requests"] == 0 and health["busy_replicas"] == 0, health
        assert generate(api, n=4, seed=9).status_code == 200  # all four slots free again
        text = api.get("/metrics").text
    server_errors = [line for line in text.splitlines() if line.startswith("aotdiffusion_responses_total") and
                     'status="5' in line]  # fmt: skip
    assert server_errors == [] and metric(text, "aotdiffusion_queue_depth", model="sd", size="64x64") == 0
