from .auto import PIPELINES, AOTDiffusionPipeline
from .base import AOTPipelineMixin
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
    "PIPELINES",
    "AOTDiffusionPipeline",
    "AOTPipelineMixin",
    "AOTLatentConsistencyModelPipeline",
    "AOTStableDiffusionPipeline",
    "AOTStableDiffusionImg2ImgPipeline",
    "AOTStableDiffusionInpaintPipeline",
    "AOTStableDiffusionXLPipeline",
    "AOTStableDiffusionXLImg2ImgPipeline",
    "AOTStableDiffusionXLInpaintPipeline",
]
