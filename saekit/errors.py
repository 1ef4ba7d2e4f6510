"""The errors a user can cause. The CLI prints any ``UserError`` as one line and exits with status 2
(``--debug`` shows the traceback); every other exception is a bug in saekit and keeps its traceback."""


class UserError(Exception):
    """Bad input: a config value, a missing or damaged file, a run directory that holds another run.
    The message names the file or value and says how to fix it."""

    def __str__(self) -> str:  # KeyError-style subclasses would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
    """A configuration file, override or value that cannot be used as written."""
