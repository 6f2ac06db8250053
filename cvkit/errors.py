"""cvkit's error types, without torch: every layer raises these, and the command turns them into one line.

Each is a ``ValueError`` (bad input, reported with exit code 2) except :class:`UsageError`, which the
command reports like an argparse error. The modules that raised them before (``cvkit.config``,
``cvkit.data.io``, ``cvkit.io``, ``cvkit.cli.base``) export the same classes.
"""


class ConfigError(ValueError):
    """An experiment file or override is wrong; the message names the key and what was expected."""


class DataError(ValueError):
    """A dataset, file or table does not hold what cvkit expected; the message says where and what."""


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint file is missing, cut off, tampered with, or not what was expected.

    A ValueError, so command layers report it as bad input; still a RuntimeError, as before.
    """


class UsageError(Exception):
    """Options that do not fit together; reported like an argparse error (exit 2)."""
