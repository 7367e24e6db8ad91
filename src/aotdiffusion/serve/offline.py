"""Offline batch generation: a file of prompts through an actor pool of compiled pipelines on Ray Data, or
through one pipeline in this process (``generate --prompts`` without ``--ray``).

Each actor holds one export (a :class:`~.runner.Runner`); Ray Data hands it ``batch_size`` prompts at
a time, which it runs as one pipeline call (the last one padded), writes the PNGs itself and returns
one record per image. The driver writes the records as JSONL: prompt, negative prompt, seed, path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .batcher import CallKey, Item, pack
from .runner import TEXT_TO_IMAGE, ExportInfo

RECORDS_FILE = "images.jsonl"


def read_prompts(path: str | Path, *, seed: int, negative_prompt: str | None = None) -> list[dict[str, Any]]:
    """Prompts from a text file (one per line) or JSONL (``prompt``, optional ``negative_prompt``, ``seed``).

    A line without its own seed gets ``seed + its line index``, so a rerun reproduces every image.
    """
    path = Path(path)
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f'{path}:{number} is not JSON ({error}); each line is {{"prompt": ...}}.') from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{number} has no "prompt" string: {line[:80]!r}.')
        else:
            row = {"prompt": line}
        rows.append(
            {
                "index": len(rows),
                "prompt": row["prompt"],
                "negative_prompt": row.get("negative_prompt", negative_prompt) or "",
                "seed": int(row.get("seed", seed + len(rows))),
            }
        )
    if not rows:
        raise ValueError(f"{path} holds no prompts.")
    return rows


class GenerateImages:
    """Ray Data actor: one export, one pipeline call per batch of prompts, PNGs written from here."""

    def __init__(self, folder: str, output: str, steps: int | None, guidance_scale: float | None,
                 trust_remote_code: bool = False):  # fmt: skip
        from .runner import Runner

        self.runner = Runner(folder, trust_remote_code=trust_remote_code)
        info = self.runner.info
        guidance = info.default_guidance_scale if guidance_scale is None else guidance_scale
        self.key = CallKey(TEXT_TO_IMAGE, steps or info.default_steps, guidance, None)
        self.output = Path(output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        info, k = self.runner.info, self.runner.info.images_per_prompt
        uses_negative = info.guidance_batch and self.key.guidance_scale > 1
        items = [
            Item(str(prompt), str(negative) if uses_negative else None, tuple(int(seed) + j for j in range(k)), k)
            for prompt, negative, seed in zip(batch["prompt"], batch["negative_prompt"], batch["seed"])
        ]
        images = self.runner(pack(self.key, items, info.batch_size))
        records: dict[str, list] = {name: [] for name in ("index", "prompt", "negative_prompt", "seed", "path")}
        for row, item in enumerate(items):
            for j, seed in enumerate(item.seeds):
                path = self.output / f"{int(batch['index'][row]):06d}-{j}-seed{seed}.png"
                path.write_bytes(images[row * k + j])
                records["index"].append(int(batch["index"][row]))
                records["prompt"].append(item.prompt)
                records["negative_prompt"].append(item.negative_prompt or "")
                records["seed"].append(seed)
                records["path"].append(str(path))
        return records


def generate(
    folder: str | Path,
    prompts: str | Path,
    output: str | Path,
    *,
    replicas: int = 1,
    num_cpus: float = 1,
    num_gpus: float = 0,
    seed: int = 0,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Generates an image per prompt (``images_per_prompt`` each) on the running Ray cluster; returns the JSONL."""
    import ray

    info, rows, output = _prepare(folder, prompts, output, seed, negative_prompt, guidance_scale)
    dataset = ray.data.from_items(rows).map_batches(
        GenerateImages,
        fn_constructor_kwargs={
            "folder": str(Path(folder).resolve()),
            "output": str(output.resolve()),
            "steps": steps,
            "guidance_scale": guidance_scale,
            "trust_remote_code": trust_remote_code,
        },  # fmt: skip
        batch_size=info.batch_size,
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    return _write_records(dataset.take_all(), output)


def generate_here(
    folder: str | Path,
    prompts: str | Path,
    output: str | Path,
    *,
    seed: int = 0,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    trust_remote_code: bool = False,
    loras: list | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """:func:`generate` without Ray: the same calls, files and records, one compiled batch after another in this
    process. ``loras`` (``(source, scale)`` pairs) are applied to the compiled weights first; ``progress(done,
    total)`` is told after each call."""
    info, rows, output = _prepare(folder, prompts, output, seed, negative_prompt, guidance_scale)
    actor = GenerateImages(str(folder), str(output), steps, guidance_scale, trust_remote_code)
    if loras:
        from ..export.lora import load_loras

        load_loras(actor.runner.pipelines[TEXT_TO_IMAGE], loras)
    records = []
    for start in range(0, len(rows), info.batch_size):
        chunk = rows[start : start + info.batch_size]
        columns = actor({name: np.array([row[name] for row in chunk]) for name in chunk[0]})
        records.extend(dict(zip(columns, values)) for values in zip(*columns.values()))
        if progress is not None:
            progress(start + len(chunk), len(rows))
    return _write_records(records, output)


def _prepare(folder, prompts, output, seed, negative_prompt, guidance_scale) -> tuple[ExportInfo, list, Path]:
    """What both ways check before anything runs: the export does text-to-image at that guidance; the prompts."""
    info = ExportInfo.read(folder)
    if TEXT_TO_IMAGE not in info.tasks:
        raise ValueError(f"{folder} does not do text-to-image (it serves {', '.join(info.tasks)}).")
    problem = info.guidance_problem(info.default_guidance_scale if guidance_scale is None else guidance_scale)
    if problem is not None:
        raise ValueError(problem)
    rows = read_prompts(prompts, seed=seed, negative_prompt=negative_prompt)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    return info, rows, output


def _write_records(records: list[dict[str, Any]], output: Path) -> Path:
    path = output / RECORDS_FILE
    with path.open("w", encoding="utf-8") as file:
        for record in sorted(records, key=lambda r: (r["index"], r["path"])):
            fields = ("prompt", "negative_prompt", "seed", "path")
            file.write(json.dumps({name: _plain(record[name]) for name in fields}) + "\n")
    return path


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
