"""The core's own exception types.

The CLI turns each into one line on stderr and an exit code: ``exit_code`` 2 means
bad usage or bad input, 1 an operational failure.
"""

from __future__ import annotations


class KVCacheError(Exception):
    """Base class of every error kvcache raises on purpose."""

    exit_code = 1


class BadInputError(KVCacheError):
    """The user's input (a file, an argument, a query) cannot be used."""

    exit_code = 2


class ConfigError(BadInputError):
    """The configuration file has an unknown key or a bad value."""


class NotFoundError(BadInputError):
    """A session or snapshot id that the store does not hold."""


class StoreError(KVCacheError):
    """The database cannot be opened, read or written."""


class IntegrityError(StoreError):
    """Stored data failed its integrity check (a snapshot hash, a corrupt file)."""


class ServerError(KVCacheError):
    """The LLM server could not be reached or answered with an error (``status``: the
    HTTP status of its answer, None when it did not answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LockBusyError(KVCacheError):
    """Another process holds the lock this operation needs."""
