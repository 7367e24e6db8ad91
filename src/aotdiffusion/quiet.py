"""Third-party notices that say nothing to an aotdiffusion user, kept off the terminal.

* transformers 5 warns, on every import of diffusers' pipelines, that its CLIP and SigLIP image
  processors fall back to their PIL versions because torchvision is absent. aotdiffusion never uses
  those processors (no safety checker or image encoder is compiled).
* torchao (the optional int8 extra), which diffusers imports whenever it is installed, reports on
  import that its CUDA-only extensions do not load on a CPU wheel of torch, torch warns about an
  Enum torchao registers with pytree, and diffusers that torchao's tensor subclasses did not import
  (they only matter for loading torchao-serialized checkpoints, which aotdiffusion does not do).

Each filter sits on the one logger that emits the notice and drops only that text; every other
warning still shows.
"""

from __future__ import annotations

import logging

_NOTICES = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "torchao": ("Could not load this library",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}
# A notice dropped only when it holds none of these words.
_UNLESS = {"transformers.integrations.peft": ("LOAD REPORT", ("UNEXPECTED", "MISMATCH", "CONVERSION"))}


class _DropNotices(logging.Filter):
    def __init__(self, notices: tuple[str, ...]):
        super().__init__()
        self.notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name in _UNLESS:
            notice, unless = _UNLESS[record.name]
            return not (notice in message and not any(word in message for word in unless))
        return not any(notice in message for notice in self.notices)


def drop_irrelevant_notices() -> None:
    """Installs the filters on the loggers that emit them; call before importing diffusers."""
    for name, notices in {**_NOTICES, **{name: () for name in _UNLESS}}.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(notices))
