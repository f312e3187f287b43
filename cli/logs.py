"""How talkative a command is: ``-v`` for this run, and loggers a command holds back."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

#: ``-v`` count of the running command (set by :func:`cli.main.console`); 0 = quiet libraries.
VERBOSE = 0


@contextlib.contextmanager
def quieter(*names: str, verbose: int = 0) -> Iterator[None]:
    """Hold the loggers ``names`` at WARNING for the block, unless ``verbose`` (``-v``).

    E.g. ``landmarks clean-tune`` runs the cleaning algorithm once per parameter combination;
    its per-run INFO lines would bury the progress counter and the table.
    """
    loggers = [] if verbose else [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
