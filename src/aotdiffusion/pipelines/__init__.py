from .base import AOTPipelineMixin
from .stable_diffusion import AOTStableDiffusionPipeline

__all__ = ["AOTPipelineMixin", "AOTStableDiffusionPipeline"]
