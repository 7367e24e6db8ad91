from .auto import AOTDiffusionPipeline
from .latent_consistency import AOTLatentConsistencyModelPipeline
from .stable_diffusion import (
    AOTStableDiffusionImg2ImgPipeline,
    AOTStableDiffusionInpaintPipeline,
    AOTStableDiffusionPipeline,
)
from .stable_diffusion_xl import (
    AOTStableDiffusionXLImg2ImgPipeline,
    AOTStableDiffusionXLInpaintPipeline,
    AOTStableDiffusionXLPipeline,
)

__all__ = [
    "AOTDiffusionPipeline",
    "AOTLatentConsistencyModelPipeline",
    "AOTStableDiffusionPipeline",
    "AOTStableDiffusionImg2ImgPipeline",
    "AOTStableDiffusionInpaintPipeline",
    "AOTStableDiffusionXLPipeline",
    "AOTStableDiffusionXLImg2ImgPipeline",
    "AOTStableDiffusionXLInpaintPipeline",
]
