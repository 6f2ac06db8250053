"""The ``cvkit`` command: one subcommand per registered function.

A subcommand is a function ``run(args) -> exit code`` registered with its options::

    def _my_args(parser): parser.add_argument("--steps", type=int, default=100, help="...")

    @register_command("lr-find", "Find a learning rate range.", _my_args)
    def _lr_find(args): ...

Exit codes: 0 success, 1 the command ran and found problems (``check``), 2 bad usage or bad
data, reported as one line on stderr. :mod:`cvkit.cli.base` holds the registry and the parser,
:mod:`cvkit.cli.data` the data commands, :mod:`cvkit.cli.experiment` the experiment commands;
neither imports the other.
"""
from cvkit.cli.base import COMMANDS, Command, UsageError, build_parser, list_commands, main, register_command

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "list_commands", "main", "register_command",
           "add_dataset_arguments", "dataset_from_args"]


def __getattr__(name: str):
    """``add_dataset_arguments`` / ``dataset_from_args`` live in :mod:`cvkit.cli.data` (imported on use)."""
    if name in ("add_dataset_arguments", "dataset_from_args"):
        from cvkit.cli import data

        return getattr(data, name)
    raise AttributeError(f"module 'cvkit.cli' has no attribute {name!r}")
