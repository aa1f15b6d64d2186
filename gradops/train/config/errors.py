"""The trainer's error for bad input: it names the option and, where there are some, the valid
choices (the commands print it on one line and exit with status 2)."""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad input to the trainer. ``option`` is the command-line spelling (``--method``).

    Args:
        option: the option, as spelled on the command line (``--method``).
        message: what is wrong.
        choices: the valid values, appended to the message as ``; valid: ...``, or None.
    """

    def __init__(self, option: str, message: str, choices: Iterable[str] | None = None):
        self.option = option
        self.choices = None if choices is None else list(choices)
        text = f"{option}: {message}"
        if self.choices is not None:
            text += f"; valid: {', '.join(self.choices)}"
        super().__init__(text)
