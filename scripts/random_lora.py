# A random full-size SD 1.5 LoRA (rank 16 on the UNet's and the text encoder's attention projections, the
# common target set), saved as diffusers saves one. Usage: python scripts/random_lora.py MODEL OUT SEED
import sys

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

model, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
pipe = StableDiffusionPipeline.from_pretrained(model)
torch.manual_seed(seed)
pipe.unet.add_adapter(
    LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
)
inject_adapter_in_model(
    LoraConfig(
        r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    ),
    pipe.text_encoder,
)
# gaussian init leaves B = 0: give B values of a trained LoRA's size (a visible but not destructive change)
with torch.no_grad():
    for model_ in (pipe.unet, pipe.text_encoder):
        for name, p in model_.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
StableDiffusionPipeline.save_lora_weights(
    out,
    unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
    text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
)
print("saved", out)
