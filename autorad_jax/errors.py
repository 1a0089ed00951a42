"""The library's own errors. Each says what is wrong and what to run; the command line prints it as one line.

Anything that is not an `AutoradError` is unexpected and keeps its traceback.
"""


class AutoradError(Exception):
    """Bad input, a missing or mismatched dataset, checkpoint or export, or a diverged run: a message for the user."""


class ConfigError(AutoradError, ValueError):
    """A config value (or a command-line flag) that the library cannot use; the message names the key."""


# A checkpoint or export whose prompts' fixed token embeddings are not the rows of its own (frozen) text tower's table.
STALE_PROMPT_EMBEDDINGS = (
    "the class prompts' fixed token embeddings (SOS, class words, '.', EOS) are not its text tower's, so its text "
    "features were computed from other vectors than the class names' (a run from a pretrained folder made before "
    "those embeddings were taken from the folder). Train it again.")


class PredictInputError(AutoradError, ValueError):
    """The CT, the nodule or the model given to predict cannot be used; the message says what is wrong."""


# The optional dependency groups of pyproject.toml, by the top-level module a command imports from each; pylidc needs
# pkg_resources, which the demo extra's setuptools pin provides.
EXTRA_OF_MODULE = {"torch": "torch", "apache_beam": "beam", "pylidc": "demo", "pkg_resources": "demo"}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The extra that installs the module `error` could not find, or None when that module belongs to no extra."""
    return EXTRA_OF_MODULE.get((error.name or "").partition(".")[0])
