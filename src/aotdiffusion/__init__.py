"""aotdiffusion: Stable Diffusion pipelines compiled ahead of time with torch.export + AOTInductor."""

from .quiet import drop_irrelevant_notices

drop_irrelevant_notices()  # before diffusers is imported below, which triggers the notices

from .pipelines import *  # noqa: E402, F403  (the public classes; the list lives in pipelines/__init__.py)
from .pipelines import __all__  # noqa: E402, F401
