"""Third-party notices that say nothing to an aotdiffusion user, kept off the terminal.

transformers 5 warns, on every import of diffusers' pipelines, that its CLIP and SigLIP image
processors fall back to their PIL versions because torchvision is absent. aotdiffusion never uses
those processors (no safety checker or image encoder is compiled), so the CLI and the bench's
worker processes drop exactly that notice; every other warning still shows.
"""

from __future__ import annotations

import logging

_NOTICES = ("requires torchvision (not installed); falling back to",)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in _NOTICES)


def drop_irrelevant_notices() -> None:
    """Installs the filter on the logger that emits them; call before importing diffusers."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())
