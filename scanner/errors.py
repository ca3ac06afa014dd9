"""Errors a user can act on.

Anything raised as :class:`UserError` is printed by the CLI as one line on stderr and exits
with code 2 (bad input); everything else is a bug or a hardware fault and exits with 1.
"""

from __future__ import annotations

from models.errors import InputError


class UserError(InputError):
    """Bad input: a malformed recipe, a missing file, a plan outside the stage travel.

    The message must name the field or file at fault and say why, in one line.
    """


class RecipeError(UserError):
    """A recipe that cannot be read or does not validate."""


class PlanError(UserError):
    """A plan that the hardware cannot execute safely (e.g. outside the travel range)."""
