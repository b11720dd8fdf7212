"""Errors that mean "the user's input is wrong", as opposed to a bug.

Recipes catch `AlignError`, print its one-line message and exit with status 2;
anything else is a bug and keeps its traceback.
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


class StageError(AlignError):
    """A library (transformers, PEFT, TRL, torch) raised while a stage ran.

    One line naming the stage, the step and the cause; the run dir is marked failed with the
    traceback in its manifest. Exit status 1: not necessarily bad input. `--debug` shows the trace.
    """

    exit_code = 1
