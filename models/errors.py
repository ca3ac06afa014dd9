"""Errors of the model package that a user can act on.

:class:`InputError` is bad input to training or inference (a missing or corrupt model file, an
unreadable good image, too little data): the CLI prints it as one line and exits with code 2.
It lives in the lowest layer (``simulators.errors``) so that ``scanner.errors.UserError``
derives from the same class and one ``except InputError`` catches both.
"""

from __future__ import annotations

from simulators.errors import InputError

__all__ = ["InputError"]
