# In-place LoRA on the loaded full-size SD 1.5 export: time of each diffusers LoRA call, UNet call time with and
# without the LoRA (same process, same inputs, alternating is impossible: one UNet), and the UNet's output with the
# LoRA against eager diffusers' UNet with the same LoRA fused. Usage: measure_lora.py EXPORT MODEL LORA_A LORA_B
import json
import resource
import statistics
import sys
import time

import torch
from diffusers import StableDiffusionPipeline

from aotdiffusion import AOTStableDiffusionPipeline

export, model, lora_a, lora_b = sys.argv[1:5]
result = {
    "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
    "torch": torch.__version__,
}
t = time.perf_counter()
pipe = AOTStableDiffusionPipeline.from_pretrained(export)
result["from_pretrained_s"] = time.perf_counter() - t
unet = pipe.unet.compiled
torch.manual_seed(0)
ins = {
    s["name"]: torch.randn(s["shape"]) if s["dtype"] == "float32" else torch.full(s["shape"], 500, dtype=torch.int64)
    for s in unet.inputs
}
ins["timestep"] = torch.full(unet.input_shape("timestep"), 500.0)


def step_times(n=3):
    unet(**dict(ins))  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = unet(**dict(ins))["sample"]
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}, out


result["unet_step_base"], base_out = step_times()


def timed(label, method, *args, **kwargs):
    t = time.perf_counter()
    getattr(pipe, method)(*args, **kwargs)
    result[label] = round(time.perf_counter() - t, 3)


timed("load_lora_weights_a_first_s", "load_lora_weights", lora_a, adapter_name="a")
timed("load_lora_weights_b_s", "load_lora_weights", lora_b, adapter_name="b")
timed("set_adapters_switch_to_a_s", "set_adapters", "a")
timed("set_adapters_switch_to_b_s", "set_adapters", "b")
timed("set_adapters_both_s", "set_adapters", ["a", "b"], adapter_weights=[0.7, 0.5])
timed("set_adapters_a_s", "set_adapters", "a")
timed("fuse_lora_s", "fuse_lora", lora_scale=0.8)
result["unet_step_lora"], lora_out = step_times()
result["lora_changed_output_max_abs"] = float((lora_out - base_out).abs().max())
timed("unfuse_lora_s", "unfuse_lora")
timed("unload_lora_weights_s", "unload_lora_weights")
back = unet(**dict(ins))["sample"]
result["after_unload_vs_base_max_abs"] = float((back - base_out).abs().max())
result["peak_rss_gib_before_eager"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
# eager diffusers with the same LoRA fused the same way
eager = StableDiffusionPipeline.from_pretrained(model)
eager.load_lora_weights(lora_a, adapter_name="a")
eager.set_adapters("a")
eager.fuse_lora(lora_scale=0.8)
pipe.load_lora_weights(lora_a, adapter_name="a")
pipe.set_adapters("a")
pipe.fuse_lora(lora_scale=0.8)
ours = unet(**dict(ins))["sample"]
with torch.no_grad():
    ref = eager.unet(ins["sample"], ins["timestep"], encoder_hidden_states=ins["encoder_hidden_states"]).sample
result["unet_vs_eager_lora_max_abs"] = float((ours - ref).abs().max())
result["unet_vs_eager_lora_max_rel"] = float((ours - ref).abs().max() / ref.abs().max())
result["eager_lora_vs_base_max_abs"] = float((ref - base_out).abs().max())
result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(result, indent=1))
