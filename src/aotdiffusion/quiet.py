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
    "transformers.integrations.peft": ("LOAD REPORT",),
}
# Words that keep a logger's notice on the terminal: what a real problem would say.
_KEPT_IF = {"transformers.integrations.peft": ("UNEXPECTED", "MISMATCH", "CONVERSION")}


class _DropNotices(logging.Filter):
    def __init__(self, notices: tuple[str, ...], kept_if: tuple[str, ...] = ()):
        super().__init__()
        self.notices = notices
        self.kept_if = kept_if

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        dropped = any(notice in message for notice in self.notices)
        return not dropped or any(word in message for word in self.kept_if)


def drop_irrelevant_notices() -> None:
    """Installs the filters on the loggers that emit them; call before importing diffusers."""
    for name, notices in _NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(notices, _KEPT_IF.get(name, ())))
