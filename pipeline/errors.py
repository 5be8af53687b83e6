"""User-facing errors: each becomes one line on stderr and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (params, files, folders). No traceback is shown."""


class ConfigError(UserError):
    """params.yaml has an unknown key, a wrong type or an out-of-range value."""


class DataError(UserError):
    """A data folder or prepared array is missing, truncated or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated or was written for another model."""
