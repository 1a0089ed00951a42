"""The library's own errors. Each says what is wrong and what to run; the command line prints it as one line.

Anything that is not an `AutoradError` is unexpected and keeps its traceback.
"""


class AutoradError(Exception):
    """Bad input, a missing or mismatched dataset, checkpoint or export, or a diverged run: a message for the user."""


class ConfigError(AutoradError, ValueError):
    """A config value (or a command-line flag) that the library cannot use; the message names the key."""
