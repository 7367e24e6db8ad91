"""Scale-out on a real local Ray cluster (2 CPUs): Ray Serve with two model replicas, Ray Data offline generation."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import cli
from PIL import Image
from serving import decode

# Images Ray Serve made, by (prompt, seed): Ray Data's must be the same (both run 1-CPU replicas).
SERVED: dict[tuple[str, int], str] = {}
STEPS = 3


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    yield context
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_two_replicas(ray_cluster, sd_batch4):
    from openai import OpenAI
    from ray import serve

    from aotdiffusion.serve import ray_serve

    port = free_port()
    ray_serve.run([f"sd={sd_batch4}"], port=port, replicas=2, num_cpus=1, max_wait_ms=200, api_key="k")
    try:
        status = serve.status().applications["aotdiffusion"].deployments
        assert status["sd-64x64"].replica_states == {"RUNNING": 2}
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
        prompts = [("a red fox", 5), ("a green car", 9), ("a blue bird", 13), ("a boat", 2), ("a tree", 40)]

        def one(prompt_seed):
            prompt, seed = prompt_seed
            return client.images.generate(model="sd", prompt=prompt, n=2, size="64x64",
                                          extra_body={"seed": seed, "num_inference_steps": STEPS})  # fmt: skip

        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(one, prompts))
        for (prompt, seed), result in zip(prompts, results):
            assert [image.model_extra["seed"] for image in result.data] == [seed, seed + 1]
            SERVED[prompt, seed] = result.data[0].b64_json
        # Batched with others or alone, an image is the same.
        alone = client.images.generate(model="sd", prompt="a green car", size="64x64",
                                       extra_body={"seed": 9, "num_inference_steps": STEPS})  # fmt: skip
        assert np.array_equal(decode(alone.data[0].b64_json), decode(SERVED["a green car", 9]))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k"}) as api:
            bad = api.post("/v1/images/generations", json={"prompt": "x", "size": "128x128"})
            assert bad.status_code == 400 and "64x64" in bad.json()["error"]["message"]
            assert api.get("/health").json()["status"] == "ok"
            metrics = api.get("/metrics").text
        assert 'aotdiffusion_images_served_total{model="sd"} 11.0' in metrics
    finally:
        serve.shutdown()


def test_ray_data_offline_generation(ray_cluster, sd_batch4, tmp_path):
    """`generate --prompts FILE --ray` joins the cluster and runs 2 actors; the images match Ray Serve's."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "seed": s} for p, s in SERVED] + [{"prompt": "a quiet lake"}]
    prompts.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "images"
    result = cli("generate", str(sd_batch4), "--prompts", str(prompts), "--ray", "--replicas", "2",
                 "--ray-address", ray_cluster.address_info["address"], "--steps", str(STEPS), "--seed", "100",
                 "--output", str(out))  # fmt: skip
    assert "6 image(s)" in result.stdout
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [(row["prompt"], row.get("seed", 105)) for row in rows]
    for record in records:
        image = np.asarray(Image.open(record["path"]))
        assert image.shape == (64, 64, 3)
        if (record["prompt"], record["seed"]) in SERVED:
            assert np.array_equal(image, decode(SERVED[record["prompt"], record["seed"]]))
    assert len(SERVED) == 5, "runs after test_ray_serve_two_replicas, whose images it compares with"
