"""Random-weight pipelines built from configs, with a real CLIP BPE tokenizer, and no network.

* tiny: the real classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, a diffusers
  scheduler) scaled down, for tests and the demo;
* full size: the published Stable Diffusion 1.5 architecture with random weights, for benchmarks and
  export measurements (speed and memory depend on the architecture, not on the values).

Both are saved as ordinary diffusers folders, so they go through exactly the loading code a hub model
goes through.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

# Prompt-like text the tokenizer's merges are learned from, so common words become single tokens.
_CORPUS = """a photo of an astronaut riding a horse on mars, a painting of a fox in the snow, a cat sitting on a
park bench, high resolution, detailed, 8k, oil painting of a beautiful landscape with mountains and a lake,
sunlight and clouds in the sky, warm colors, a majestic lion jumping from a big stone at night, portrait of a
woman, cinematic lighting, a dog running by the river, fantasy castle, watercolor, photograph, city street"""


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = 0
    chars = {}
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    words = Counter(text.lower().replace(",", " ").split())
    vocab = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in words.items()}
    merges = []
    for _ in range(count):
        pairs: Counter = Counter()
        for symbols, n in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, n in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = n
        vocab = merged
    return merges


def tiny_clip_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    merges = _learn_merges(_CORPUS, 200)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 (Unigram) tokenizer over the corpus' words and letters, built here: no download."""
    from transformers import T5Tokenizer

    words = sorted(set(_CORPUS.replace(",", " ").split()))
    letters = sorted(set("".join(words)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in words] + [(letter, -3.0) for letter in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _tiny_t5_encoder(seed: int, tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_pixart_sigma(seed: int = 0):
    """A PixArtSigmaPipeline producing 256x256 images: a VAE of four levels (scale 8, as PixArt's) so that
    diffusers' resolution binning (the 256px bins, for transformers of sample size 32) runs as on the real model."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 16, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=8, sample_size=256,
    ).eval()  # fmt: skip
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5_encoder(seed, tokenizer),
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def tiny_stable_diffusion_3(seed: int = 0):
    """A StableDiffusion3Pipeline producing 64x64 images: two CLIP encoders with projection (their hidden states
    concatenated are T5's width, as SD3's 768 + 1280 pad to 4096), T5, a 2-layer MMDiT and a 16-channel-style VAE
    with SD3's shift and scale."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()  # fmt: skip
    vae = _tiny_vae(seed, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_tiny_text_encoder(seed, clip, with_projection=True),
        tokenizer=clip,
        text_encoder_2=_tiny_text_encoder(seed + 1, clip, with_projection=True),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_tiny_t5_encoder(seed, t5, d_model=64),
        tokenizer_3=t5,
    )


def _tiny_unet(seed: int, **overrides):
    from diffusers import UNet2DConditionModel

    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**config, **overrides}).eval()


def _tiny_sdxl_unet(seed: int, *, text_embeds_dim: int, time_ids: int, **overrides):
    # SDXL conditions on pooled text embeddings plus `time_ids` micro-conditioning values, each
    # embedded in `addition_time_embed_dim` channels.
    return _tiny_unet(
        seed,
        cross_attention_dim=64 if time_ids == 6 else 32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=text_embeds_dim + 8 * time_ids,
        **overrides,
    )


def _tiny_vae(seed: int, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        **overrides,
    ).eval()


def _tiny_text_encoder(seed: int, tokenizer, *, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _sd_parts(seed: int, unet) -> dict:
    tokenizer = tiny_clip_tokenizer()
    return dict(
        vae=_tiny_vae(seed),
        text_encoder=_tiny_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_stable_diffusion(seed: int = 0):
    """A StableDiffusionPipeline small enough to compile in about a minute, producing 64x64 images."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**_sd_parts(seed, _tiny_unet(seed)))


def tiny_stable_diffusion_inpaint(seed: int = 0):
    """SD inpainting: the UNet takes 9 channels (latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(**_sd_parts(seed, _tiny_unet(seed, in_channels=9)))


def tiny_stable_diffusion_instruct_pix2pix(seed: int = 0):
    """InstructPix2Pix: the UNet takes 8 channels (latents and the input image's latents)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(**_sd_parts(seed, _tiny_unet(seed, in_channels=8)))


def tiny_stable_diffusion_xl_instruct_pix2pix(seed: int = 0):
    """SDXL InstructPix2Pix: SDXL base's parts, the UNet taking 8 channels."""
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    return StableDiffusionXLInstructPix2PixPipeline(
        **_sdxl_parts(seed, _tiny_sdxl_unet(seed, text_embeds_dim=32, time_ids=6, in_channels=8))
    )


def tiny_controlnet(seed: int = 0):
    """A ControlNet for the tiny SD UNet (a model only): its encoder copied from a tiny UNet as diffusers' from_unet
    does, and its zero-initialised convolutions given random weights, so its residuals are not zero."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(_tiny_unet(seed + 5), conditioning_embedding_out_channels=(16, 32))
    return _unzeroed(controlnet, seed + 6)


def tiny_sdxl_controlnet(seed: int = 0):
    """A ControlNet for the tiny SDXL UNet (a model only): it takes SDXL's pooled text embeddings and time ids too."""
    from diffusers import ControlNetModel

    unet = _tiny_sdxl_unet(seed + 5, text_embeds_dim=32, time_ids=6)
    return _unzeroed(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)), seed + 6)


def full_size_controlnet(seed: int = 0):
    """A ControlNet of SD 1.5's architecture (lllyasviel/sd-controlnet-*: 361M parameters) with random weights."""
    from diffusers import ControlNetModel

    return _unzeroed(ControlNetModel.from_unet(full_size_stable_diffusion_15(seed + 5).unet), seed + 6)


def _unzeroed(controlnet, seed: int):
    """A fresh ControlNet's output convolutions start at zero (its residuals too): random weights instead."""
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]  # fmt: skip
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    return controlnet.eval()


class IPAdapterFolder:
    """An IP-Adapter laid out as h94/IP-Adapter lays out its SD 1.5 and SDXL ones: ``models/ip-adapter.safetensors``
    (the ``image_proj.*`` and ``ip_adapter.*`` weights diffusers' loader reads) and the CLIP image encoder in
    ``models/image_encoder``."""

    SUBFOLDER, WEIGHT_NAME = "models", "ip-adapter.safetensors"

    def __init__(self, weights: dict[str, torch.Tensor], image_encoder: torch.nn.Module):
        self.weights, self.image_encoder = weights, image_encoder

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(path) / self.SUBFOLDER
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.weights.items()}, folder / self.WEIGHT_NAME)
        self.image_encoder.save_pretrained(folder / "image_encoder")


def _tiny_image_encoder(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, layer_norm_eps=1e-5,
    )  # fmt: skip
    return CLIPVisionModelWithProjection(config).eval()


def _ip_adapter_weights(unet, encoder, seed: int, *, full: bool = False) -> dict[str, torch.Tensor]:
    """An IP-Adapter's weights for ``unet`` in the original file's names: the image projection, then a key and a
    value projection per cross-attention, numbered 1, 3, 5... in diffusers' processor order.

    The plain adapter projects the encoder's image embedding to 4 tokens; ``full`` (IP-Adapter Full Face) maps
    each token of its penultimate hidden state through a small MLP, the path the plus adapters take too.
    """
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    if full:
        hidden = encoder.config.hidden_size
        weights = {
            "image_proj.proj.0.weight": rand(hidden, hidden), "image_proj.proj.0.bias": rand(hidden),
            "image_proj.proj.2.weight": rand(cross, hidden), "image_proj.proj.2.bias": rand(cross),
            "image_proj.proj.3.weight": 1 + rand(cross), "image_proj.proj.3.bias": rand(cross),
        }  # fmt: skip
    else:
        tokens, embed_dim = 4, encoder.config.projection_dim
        weights = {
            "image_proj.proj.weight": rand(cross * tokens, embed_dim),
            "image_proj.proj.bias": rand(cross * tokens),
            "image_proj.norm.weight": 1 + rand(cross),
            "image_proj.norm.bias": rand(cross),
        }
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
        weights[f"ip_adapter.{key}.to_k_ip.weight"] = rand(hidden, cross)
        weights[f"ip_adapter.{key}.to_v_ip.weight"] = rand(hidden, cross) * 4  # a visible effect on tiny images
        key += 2
    return weights


def tiny_ip_adapter(seed: int = 0) -> IPAdapterFolder:
    """An IP-Adapter for the tiny SD UNet, with a tiny CLIP image encoder (32x32 images)."""
    encoder = _tiny_image_encoder(seed + 7)
    return IPAdapterFolder(_ip_adapter_weights(_tiny_unet(seed), encoder, seed + 8), encoder)


def tiny_sdxl_ip_adapter(seed: int = 0, *, full: bool = False) -> IPAdapterFolder:
    """An IP-Adapter for the tiny SDXL UNet (cross-attention 64 wide); ``full``: a Full Face one."""
    encoder = _tiny_image_encoder(seed + 7)
    unet = _tiny_sdxl_unet(seed, text_embeds_dim=32, time_ids=6)
    return IPAdapterFolder(_ip_adapter_weights(unet, encoder, seed + 8, full=full), encoder)


def tiny_latent_consistency(seed: int = 0):
    """LCM distilled from SD: the UNet embeds the guidance scale (`time_cond_proj_dim`), LCMScheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    parts = _sd_parts(seed, _tiny_unet(seed, time_cond_proj_dim=32))
    parts["scheduler"] = LCMScheduler.from_config(parts["scheduler"].config)
    parts.pop("requires_safety_checker")
    return LatentConsistencyModelPipeline(**parts, requires_safety_checker=False)


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # stable-diffusion-xl-base-1.0's scheduler settings.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def tiny_stable_diffusion_xl(seed: int = 0):
    """SDXL base: two text encoders (the second with projection), micro-conditioning time ids."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**_sdxl_parts(seed, _tiny_sdxl_unet(seed, text_embeds_dim=32, time_ids=6)))


def _sdxl_parts(seed: int, unet) -> dict:
    tokenizer = tiny_clip_tokenizer()
    return dict(
        vae=_tiny_vae(seed, force_upcast=True, scaling_factor=0.13025),
        text_encoder=_tiny_text_encoder(seed, tokenizer),
        text_encoder_2=_tiny_text_encoder(seed + 1, tokenizer, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_sdxl_scheduler(),
        add_watermarker=False,
    )


def tiny_stable_diffusion_xl_refiner(seed: int = 0):
    """SDXL refiner: only `text_encoder_2`, aesthetic-score conditioning (5 time ids)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    tokenizer = tiny_clip_tokenizer()
    return StableDiffusionXLImg2ImgPipeline(
        vae=_tiny_vae(seed, force_upcast=True, scaling_factor=0.13025),
        text_encoder=None,
        text_encoder_2=_tiny_text_encoder(seed + 2, tokenizer, with_projection=True),
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=_tiny_sdxl_unet(seed + 3, text_embeds_dim=32, time_ids=5),
        scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


def tiny_lcm_sdxl_unet(seed: int = 0):
    """An LCM-distilled UNet for the tiny SDXL (what latent-consistency/lcm-sdxl is for SDXL): a UNet only."""
    return _tiny_sdxl_unet(seed + 4, text_embeds_dim=32, time_ids=6, time_cond_proj_dim=32)


def _sd_scheduler():
    from diffusers import PNDMScheduler

    # Stable Diffusion 1.5's own scheduler settings.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def _full_size_vae(**overrides):
    """The SD/SDXL autoencoder (same architecture, 8x downsampling)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        **{"latent_channels": 4, **overrides},
    )


def full_size_stable_diffusion_15(seed: int = 0):
    """Stable Diffusion 1.5's architecture (860M-parameter UNet, 512x512) with random weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = _full_size_vae(sample_size=512)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _full_size_clip_pair(tokenizer, *, first_projected: bool):
    """CLIP ViT-L and OpenCLIP ViT-bigG text encoders (SDXL's and SD3's), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, vocab_size=49408, max_position_embeddings=77)  # fmt: skip
    large = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           hidden_act="quick_gelu", projection_dim=768, **special)  # fmt: skip
    big = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                         hidden_act="gelu", projection_dim=1280, **special)  # fmt: skip
    first = (CLIPTextModelWithProjection if first_projected else CLIPTextModel)(large)
    return first.eval(), CLIPTextModelWithProjection(big).eval()


def full_size_stable_diffusion_xl(seed: int = 0):
    """SDXL base 1.0's architecture (2.6B-parameter UNet, CLIP-L + OpenCLIP-G, 1024x1024) with random weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _full_size_clip_pair(tokenizer, first_projected=False)
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = _full_size_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet.eval(),
        scheduler=_sdxl_scheduler(),
        add_watermarker=False,
    )


def full_size_stable_diffusion_3(seed: int = 0):
    """SD3-medium's architecture (2B-parameter MMDiT, CLIP-L + OpenCLIP-G, 16-channel VAE, 1024x1024) with random
    weights, without its T5-XXL encoder (4.8B parameters: 19 GB in fp32, more than this 24 GiB machine can export
    beside the rest). diffusers runs SD3 without T5 (zero embeddings in its place), as its docs describe."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _full_size_clip_pair(tokenizer, first_projected=True)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192,
    ).eval()  # fmt: skip
    vae = _full_size_vae(sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                         use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


TINY_MODELS = {
    "sd": tiny_stable_diffusion,
    "sd-inpaint": tiny_stable_diffusion_inpaint,
    "sd-instruct-pix2pix": tiny_stable_diffusion_instruct_pix2pix,
    "sdxl-instruct-pix2pix": tiny_stable_diffusion_xl_instruct_pix2pix,
    "lcm": tiny_latent_consistency,
    "sdxl": tiny_stable_diffusion_xl,
    "sdxl-refiner": tiny_stable_diffusion_xl_refiner,
    "lcm-sdxl": tiny_lcm_sdxl_unet,
    "controlnet": tiny_controlnet,
    "controlnet-2": lambda: tiny_controlnet(seed=10),  # a second, different one (multi-ControlNet)
    "controlnet-sdxl": tiny_sdxl_controlnet,
    "ip-adapter": tiny_ip_adapter,
    "ip-adapter-sdxl": tiny_sdxl_ip_adapter,
    "ip-adapter-full-sdxl": lambda: tiny_sdxl_ip_adapter(seed=1, full=True),
    "pixart-sigma": tiny_pixart_sigma,
    "sd3": tiny_stable_diffusion_3,
}
FULL_SIZE_MODELS = {
    "sd": full_size_stable_diffusion_15,
    "sdxl": full_size_stable_diffusion_xl,
    "controlnet": full_size_controlnet,
    "sd3": full_size_stable_diffusion_3,
}


def save_tiny(kind: str, path: str | Path, *, full_size: bool = False) -> Path:
    models = FULL_SIZE_MODELS if full_size else TINY_MODELS
    if kind not in models:
        raise ValueError(f"Unknown model kind {kind!r}; choose one of {sorted(models)}.")
    path = Path(path)
    models[kind]().save_pretrained(path)
    return path
