from .auto import AOTDiffusionPipeline
from .latent_consistency import AOTLatentConsistencyModelPipeline
from .pixart import AOTPixArtSigmaPipeline
from .stable_diffusion import (
    AOTStableDiffusionControlNetImg2ImgPipeline,
    AOTStableDiffusionControlNetInpaintPipeline,
    AOTStableDiffusionControlNetPipeline,
    AOTStableDiffusionImg2ImgPipeline,
    AOTStableDiffusionInpaintPipeline,
    AOTStableDiffusionInstructPix2PixPipeline,
    AOTStableDiffusionPipeline,
)
from .stable_diffusion_3 import AOTStableDiffusion3Pipeline
from .stable_diffusion_xl import (
    AOTStableDiffusionXLControlNetImg2ImgPipeline,
    AOTStableDiffusionXLControlNetInpaintPipeline,
    AOTStableDiffusionXLControlNetPipeline,
    AOTStableDiffusionXLImg2ImgPipeline,
    AOTStableDiffusionXLInpaintPipeline,
    AOTStableDiffusionXLInstructPix2PixPipeline,
    AOTStableDiffusionXLPipeline,
)

__all__ = [
    "AOTDiffusionPipeline",
    "AOTLatentConsistencyModelPipeline",
    "AOTPixArtSigmaPipeline",
    "AOTStableDiffusion3Pipeline",
    "AOTStableDiffusionPipeline",
    "AOTStableDiffusionControlNetPipeline",
    "AOTStableDiffusionControlNetImg2ImgPipeline",
    "AOTStableDiffusionControlNetInpaintPipeline",
    "AOTStableDiffusionImg2ImgPipeline",
    "AOTStableDiffusionInpaintPipeline",
    "AOTStableDiffusionInstructPix2PixPipeline",
    "AOTStableDiffusionXLPipeline",
    "AOTStableDiffusionXLImg2ImgPipeline",
    "AOTStableDiffusionXLInpaintPipeline",
    "AOTStableDiffusionXLInstructPix2PixPipeline",
    "AOTStableDiffusionXLControlNetPipeline",
    "AOTStableDiffusionXLControlNetImg2ImgPipeline",
    "AOTStableDiffusionXLControlNetInpaintPipeline",
]
