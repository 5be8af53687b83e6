"""User-facing errors: each becomes one line on stderr and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (params, files, folders). No traceback is shown."""


class ConfigError(UserError):
    """params.yaml has an unknown key, a wrong type or an out-of-range value."""


class DataError(UserError):
    """A data folder or prepared array is missing, truncated or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated or was written for another model."""


_CAUSES = ("Connection refused", "Connection reset", "Connection aborted", "Read timed out", "timed out",
           "Name or service not known", "No route to host", "database is locked")


def first_line(err: BaseException) -> str:
    """What went wrong in a few words, without credentials: the network's cause when a client wrapped one
    (MLflow's and SQLAlchemy's messages run to several hundred characters), else the message's first line."""
    from pipeline.redact import redact

    text = str(err).strip()
    for cause in _CAUSES:
        if cause.lower() in text.lower():
            return cause.lower()
    return redact(text.splitlines()[0][:300]) if text else type(err).__name__
