"""aotdiffusion: Stable Diffusion pipelines compiled ahead of time with torch.export + AOTInductor."""

from .pipelines import (
    AOTDiffusionPipeline,
    AOTLatentConsistencyModelPipeline,
    AOTStableDiffusionImg2ImgPipeline,
    AOTStableDiffusionInpaintPipeline,
    AOTStableDiffusionPipeline,
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
