"""aotdiffusion: Stable Diffusion pipelines compiled ahead of time with torch.export + AOTInductor."""

from .pipelines import *  # noqa: F403  (the public classes; the list lives in pipelines/__init__.py)
from .pipelines import __all__  # noqa: F401
