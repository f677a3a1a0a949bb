"""Errors in what a user gave (a file, a folder, a config key): reported in one line, without a
traceback, by the command-line tools; tracebacks are for bugs."""

__all__ = ["UserInputError"]


class UserInputError(ValueError):
    """Something the user passed is missing or wrong; the message names it and says what to do."""
