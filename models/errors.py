"""Errors of the model package that a user can act on.

:class:`InputError` is bad input to training or inference (a missing or corrupt model file, an
unreadable good image, too little data): the CLI prints it as one line and exits with code 2.
``scanner.errors.UserError`` derives from it, so one ``except InputError`` catches both.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input: the message names the file or option at fault and says why, in one line."""
