"""``aotdiffusion bench-serve``: a load test of the HTTP server, dynamic batching against one request per call.

Both servers are the same ``aotdiffusion serve`` over the same exports, started in their own
processes; the baseline runs with ``--no-batching`` (each request alone in a padded pipeline call),
so the one difference measured is the packing. The traffic is planned from a seed: ``clients``
concurrent clients send ``requests`` requests mixing ``n`` = 1..batch, every served size, a few
seeds, and a few bad requests (which must get a 400). Afterwards every image is compared with the
image the same (prompt, size, seed) gives in a request of its own: 0 lost, 0 mixed up, 0 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PROMPTS = ("a photo of an astronaut riding a horse on mars", "a watercolor of a lighthouse at dusk")
SEED_BASES = (0, 100, 200, 300, 400)
# Bad requests and the status each must get.
BAD_REQUESTS = (
    ({"prompt": "x", "size": "13x13"}, 400),
    ({"prompt": "x", "n": 0}, 400),
    ({"prompt": "x", "num_inference_steps": -1}, 400),
    ({"prompt": "x", "guidance_scale": "high"}, 400),
    ({"prompt": "x", "steps": 4}, 400),
    ({"prompt": "x", "model": "no-such-model"}, 404),
)


@dataclass
class LoadConfig:
    exports: list[str]
    clients: int = 16
    requests: int = 200
    steps: int = 4
    bad_fraction: float = 0.05
    max_wait_ms: float = 100.0
    max_n: int | None = None  # images per request drawn from 1..max_n (default: the compiled batch)
    seed: int = 0
    output_dir: str = "bench-serve-results"


@dataclass
class Outcome:
    request: dict[str, Any]
    expected: int
    status: int = 0
    seconds: float = 0.0
    images: list[str] = field(default_factory=list)  # b64 PNGs
    seeds: list[int] = field(default_factory=list)
    error: str = ""


def plan(config: LoadConfig, sizes: list[str], batch: int) -> list[tuple[dict[str, Any], int]]:
    rng = random.Random(config.seed)
    requests = []
    for _ in range(config.requests):
        if rng.random() < config.bad_fraction:
            requests.append(rng.choice(BAD_REQUESTS))
            continue
        n = rng.randint(1, config.max_n or batch)
        body = {"model": "bench", "prompt": rng.choice(PROMPTS), "size": rng.choice(sizes), "n": n,
                "seed": rng.choice(SEED_BASES), "num_inference_steps": config.steps}  # fmt: skip
        requests.append((body, 200))
    return requests


async def drive(
    url: str, requests: list[tuple[dict, int]], clients: int, timeout: float = 600
) -> tuple[list[Outcome], float]:
    """Sends every request with ``clients`` at a time; returns the outcomes and the wall time."""
    outcomes = [Outcome(body, expected) for body, expected in requests]
    queue: asyncio.Queue[Outcome] = asyncio.Queue()
    for outcome in outcomes:
        queue.put_nowait(outcome)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            outcome = queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await http.post("/v1/images/generations", json=outcome.request)
                outcome.status = response.status_code
                if response.status_code == 200:
                    data = response.json()["data"]
                    outcome.images = [image["b64_json"] for image in data]
                    outcome.seeds = [image["seed"] for image in data]
                else:
                    outcome.error = response.json().get("error", {}).get("message", "")[:200]
            except httpx.HTTPError as error:
                outcome.error = f"{type(error).__name__}: {error}"
            outcome.seconds = time.perf_counter() - start

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return outcomes, time.perf_counter() - start


def _pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def verify(url: str, outcomes: list[Outcome], steps: int) -> dict[str, int]:
    """Each image against its solo image (a request of its own, n=1, for that prompt, size and seed)."""
    solo: dict[tuple[str, str, int], np.ndarray] = {}
    lost = mixed = 0
    with httpx.Client(base_url=url, timeout=600) as http:
        for outcome in outcomes:
            body = outcome.request
            if outcome.expected != 200:
                continue
            if outcome.status != 200 or len(outcome.images) != body["n"]:
                lost += 1
                continue
            if outcome.seeds != [body["seed"] + i for i in range(body["n"])]:
                mixed += 1
                continue
            for image, seed in zip(outcome.images, outcome.seeds):
                key = (body["prompt"], body["size"], seed)
                if key not in solo:
                    alone = {**body, "n": 1, "seed": seed}
                    response = http.post("/v1/images/generations", json=alone)
                    response.raise_for_status()
                    solo[key] = _pixels(response.json()["data"][0]["b64_json"])
                if not np.array_equal(_pixels(image), solo[key]):
                    mixed += 1
    return {"lost": lost, "mixed_up": mixed, "solo_references": len(solo)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    exports: list[str], *, batching: bool = True, max_wait_ms: float = 100.0, max_queue: int = 64, replicas: int = 1
) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "aotdiffusion.cli", "serve", *[f"bench={e}" for e in exports], "--port", str(port),
               "--max-wait-ms", str(max_wait_ms), "--max-queue", str(max_queue),
               "--replicas", str(replicas)]  # fmt: skip
    if not batching:
        command.append("--no-batching")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not answer /health within 600 s")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # as Ctrl-C: the server closes its replicas
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def _peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + "{"))


def measure(config: LoadConfig, *, batching: bool, sizes: list[str], batch: int) -> dict[str, Any]:
    requests = plan(config, sizes, batch)
    process, url = start_server(config.exports, batching=batching, max_wait_ms=config.max_wait_ms,
                                max_queue=config.requests)  # fmt: skip
    try:
        # Warm-up: one request per size, so first-call costs are not in the timing.
        with httpx.Client(base_url=url, timeout=600) as http:
            for size in sizes:
                warm = {"model": "bench", "prompt": "warm", "size": size, "num_inference_steps": config.steps}
                http.post("/v1/images/generations", json=warm).raise_for_status()
            before = http.get("/metrics").text
        outcomes, wall = asyncio.run(drive(url, requests, config.clients))
        after = httpx.get(f"{url}/metrics").text
        checks = verify(url, outcomes, config.steps)
        peak = _peak_rss_gib(process.pid)
    finally:
        _stop(process)
    good = [o for o in outcomes if o.expected == 200 and o.status == 200]
    latencies = sorted(o.seconds for o in good)
    images = sum(len(o.images) for o in good)
    batches = _metric_sum(after, "aotdiffusion_batches_total") - _metric_sum(before, "aotdiffusion_batches_total")
    padded = _metric_sum(after, "aotdiffusion_padded_slots_total") - _metric_sum(
        before, "aotdiffusion_padded_slots_total"
    )
    return {
        "server": "batching" if batching else "one request per call",
        "requests": len(outcomes),
        "bad_requests": sum(o.expected != 200 for o in outcomes),
        "bad_answered_right": sum(o.expected != 200 and o.status == o.expected for o in outcomes),
        "server_errors": sum(o.status >= 500 or o.status == 0 for o in outcomes),
        **checks,
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "pipeline_calls": int(batches),
        "padded_slots": int(padded),
        "peak_rss_gib": peak,
    }


def run(config: LoadConfig) -> dict[str, Any]:
    from ..serve.runner import ExportInfo
    from .run import hardware, versions

    infos = [ExportInfo.read(folder) for folder in config.exports]
    batch = min(info.slots for info in infos)
    sizes = [info.size for info in infos]
    rows = [measure(config, batching=batching, sizes=sizes, batch=batch) for batching in (False, True)]
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    report = {"config": asdict(config), "batch": batch, "sizes": sizes, "hardware": hardware(),
              "versions": versions(), "results": rows, "speedup": speedup}  # fmt: skip
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve-load.json").write_text(json.dumps(report, indent=2))
    text = render(report)
    (out / "serve-load.md").write_text(text)
    print(text)
    return report


def render(report: dict[str, Any]) -> str:
    config, hw = report["config"], report["hardware"]
    lines = [
        f"Load test: {config['requests']} requests from {config['clients']} concurrent clients, "
        f"n = 1..{config['max_n'] or report['batch']} (compiled batch {report['batch']}), "
        f"sizes {', '.join(report['sizes'])}, {config['steps']} steps, "
        f"max wait {config['max_wait_ms']:.0f} ms; {hw['cpu']}, {hw['cores']} cores; "
        f"torch {report['versions']['torch']}.",
        "",
        "| server | images/s | p50 s | p95 s | images | pipeline calls | padded slots | lost | mixed up | 5xx | "
        "bad requests answered right | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['server']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['images']} | "
            f"{r['pipeline_calls']} | {r['padded_slots']} | {r['lost']} | {r['mixed_up']} | {r['server_errors']} | "
            f"{r['bad_answered_right']}/{r['bad_requests']} | {r['peak_rss_gib']:.2f} |"
        )
    naive = report["results"][0]
    # One request per call computes every slot of each call; batching at best only the requested images.
    bound = (naive["pipeline_calls"] * report["batch"]) / max(naive["images"], 1)
    lines += [
        "",
        f"Batching: **{report['speedup']:.2f}x** the images/s of one request per call (target >= 2.5x); for this "
        f"traffic the bound is {bound:.2f}x (slots the baseline computes / images asked for).",
    ]
    return "\n".join(lines) + "\n"


def deployment(export: str, *, replicas: list[int], steps: int, output_dir: str) -> dict[str, Any]:
    """Full-size figures: start to /health, start to the first image, then images/min with each replica count."""
    from .run import hardware, versions

    rows = []
    body = {"model": "bench", "prompt": PROMPTS[0], "num_inference_steps": steps, "seed": 0}
    for count in replicas:
        start = time.perf_counter()
        process, url = start_server([export], replicas=count)
        ready = time.perf_counter() - start
        try:
            with httpx.Client(base_url=url, timeout=3600) as http:
                http.post("/v1/images/generations", json=body).raise_for_status()
                first = time.perf_counter() - start
            requests = [({**body, "seed": i}, 200) for i in range(2 * count)]  # two rounds over the replicas
            # Full-size images on a CPU take minutes each, and the second round waits for the first.
            outcomes, wall = asyncio.run(drive(url, requests, len(requests), timeout=4 * 3600))
            if any(o.status != 200 for o in outcomes):
                raise RuntimeError(f"a request failed: {[o.error for o in outcomes if o.status != 200]}")
            peak = _peak_rss_gib(process.pid)
        finally:
            _stop(process)
        rows.append({"replicas": count, "ready_s": ready, "first_image_s": first, "images": len(outcomes),
                     "wall_s": wall, "images_per_min": 60 * len(outcomes) / wall,
                     "server_peak_rss_gib": peak})  # fmt: skip
        print(rows[-1], flush=True)
    report = {"export": export, "steps": steps, "hardware": hardware(), "versions": versions(), "results": rows}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve-deployment.json").write_text(json.dumps(report, indent=2))
    hw = report["hardware"]
    lines = [f"`aotdiffusion serve {export}`, {steps} steps; {hw['cpu']}, {hw['cores']} cores.", "",
             "| replicas | start -> /health s | start -> first image s | images/min | server peak RSS GiB |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['replicas']} | {r['ready_s']:.1f} | {r['first_image_s']:.1f} | {r['images_per_min']:.2f} | "
                     f"{r['server_peak_rss_gib']:.2f} |")  # fmt: skip
    (out / "serve-deployment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
