"""Silence what third-party libraries print that is not the user's business; imported first by ``dynnet``.

Only messages named here are dropped, by a filter on the logger that emits them; nothing else changes.
"""

from __future__ import annotations

import logging

__all__ = ["install"]

# (logger, start of the message). torch.utils.cpp_extension warns at import on every machine without CUDA, and
# dynnet imports it (torch.utils.benchmark, the compiled kernels) in every command.
_DROPPED = (("torch.utils.cpp_extension", "No CUDA runtime is found"),)


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Add the filters (once per logger and message)."""
    for name, prefix in _DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))


install()
