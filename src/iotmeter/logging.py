"""Logging set-up: one line per record, UTC timestamps."""

from __future__ import annotations

import logging
import time


def configure_logging(level: str) -> None:
    """Send iotmeter's log records to stderr at the given level (once per process)."""
    logger = logging.getLogger("iotmeter")
    logger.setLevel(level)
    if any(getattr(handler, "_iotmeter", False) for handler in logger.handlers):
        return
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    handler._iotmeter = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
