"""Errors that the command line turns into a clear message and exit code 2."""


class CfmaeError(Exception):
    """A problem with the user's input (config, data, paths): exit code 2, no traceback.

    The message names the bad key or file and says what to do.
    """

    exit_code = 2


class ConfigError(CfmaeError):
    """A preset, YAML file or ``--set`` override that does not validate."""


class DataError(CfmaeError):
    """A dataset folder that does not follow the layout of docs/dataset-format.md."""
