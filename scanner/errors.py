"""Errors a user can act on.

Anything raised as :class:`UserError` is printed by the CLI as one line on stderr and exits
with code 2 (bad input); everything else is a bug or a hardware fault and exits with 1.
"""

from __future__ import annotations

# the very class that devices and simulators raise (defined in the lowest layer)
from devices.errors import UserError as UserError


class RecipeError(UserError):
    """A recipe that cannot be read or does not validate.

    ``kinds`` holds the pydantic error types of the validation's problems (empty when the
    recipe could not be read at all), so that callers need not match the message's text.
    """

    def __init__(self, message: str, kinds: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.kinds = kinds


class PlanError(UserError):
    """A plan that the hardware cannot execute safely (e.g. outside the travel range)."""
