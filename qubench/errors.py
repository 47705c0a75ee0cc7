"""Errors that carry an actionable message for the user (the CLI prints them without a traceback)."""


class QubenchError(Exception):
    """Base of every error qubench raises on purpose."""


class ConfigError(QubenchError):
    """Bad user input: an unknown plugin name, an unknown or invalid parameter, a missing path."""


class PluginLoadError(QubenchError):
    """A plugin's entry point exists but its module failed to import."""


class DataError(QubenchError):
    """Task data is missing or malformed."""


class CacheError(QubenchError):
    """A cached artifact is damaged (it differs from what its build wrote) and may not be rebuilt."""


class StorageError(QubenchError):
    """A folder qubench must write to is not writable or has too little free space."""
