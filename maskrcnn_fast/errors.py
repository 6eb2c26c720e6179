"""Errors a user can cause (bad paths, bad files, bad options).

The CLI prints these as one line, without a traceback, and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the command's input, explained in one line."""


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss; the message names the iteration and the loss terms."""
