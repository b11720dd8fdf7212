"""Errors that mean "the user's input is wrong", as opposed to a bug.

Recipes catch `AlignError`, print its one-line message and exit with status 2. An error a
library raises while a stage runs is one line too (exit status 1; the stage, the step and the
cause; `--debug` shows the trace); anything else is a bug and keeps its traceback.
"""


class AlignError(Exception):
    """Bad input: a config, a data file or a model reference. One line, exit status 2."""

    exit_code = 2


class ConfigError(AlignError):
    """A config key is unknown, mistyped or inconsistent."""


class DataError(AlignError):
    """A dataset is missing, unreadable or lacks required fields."""


class ModelError(AlignError):
    """A model reference cannot be resolved or loaded."""

