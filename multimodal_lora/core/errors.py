"""User-facing errors.

Anything raised as a :class:`UserError` is the user's to fix (a recipe key, a
file, a path); the command-line entry points print its message without a
traceback and exit with status 2. Everything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """An error in what the user gave us; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A recipe or command-line override is invalid."""


class DataError(UserError):
    """A data set, a file in it, or a row of it cannot be used."""


class AdapterError(UserError):
    """An adapter directory is missing, incomplete, or belongs to another base."""


class ImageError(DataError):
    """An image file cannot be read as an image."""
