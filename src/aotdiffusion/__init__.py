"""aotdiffusion: Stable Diffusion pipelines compiled ahead of time with torch.export + AOTInductor."""

from .pipelines import AOTStableDiffusionPipeline

__all__ = ["AOTStableDiffusionPipeline"]
