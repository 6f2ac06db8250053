"""The ``cvkit`` command's core: the command registry, the parser and the one-line error handling.

A subcommand is a function ``run(args) -> exit code`` registered with its options::

    def _my_args(parser): parser.add_argument("--steps", type=int, default=100, help="...")

    @register_command("lr-find", "Find a learning rate range.", _my_args)
    def _lr_find(args): ...

Exit codes: 0 success, 1 the command ran and found problems (``check``), 2 bad usage or bad
data, reported as one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Union

from cvkit.errors import UsageError
from cvkit.registry import Registry
from cvkit.status import say

PathLike = Union[str, os.PathLike]
Run = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: AddArguments
    run: Run


COMMANDS: Registry[Command] = Registry("command")
COMMAND_MODULES = ("cvkit.cli.data", "cvkit.cli.experiment", "cvkit.cli.kfold", "cvkit.cli.deploy",
                   "cvkit.cli.weights", "cvkit.cli.tune")


def refuse_overwriting_inputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike], instead: str) -> None:
    """No command writes over its own input: a :class:`UsageError` naming the file and what to do ``instead``."""
    sources = [Path(p).resolve() for p in inputs]
    for output in outputs:
        if Path(output).resolve() in sources:
            raise UsageError(f"{output} is an input of this command; refusing to write over it ({instead})")


def register_command(name: str, help: str, add_arguments: AddArguments, override: bool = False) -> Callable[[Run], Run]:
    """Register ``run(args) -> int`` as ``cvkit <name>``; ``add_arguments(parser)`` declares its options."""

    def decorator(run: Run) -> Run:
        COMMANDS.register(Command(name, help, add_arguments, run), name=name, override=override)
        return run

    return decorator


def loading(libraries: str) -> None:
    """Before a command's first heavy import: say that it loads ``libraries`` (seconds), unless torch is loaded."""
    if "torch" not in sys.modules:
        say(f"loading {libraries}...")


def list_commands() -> List[str]:
    """Registered command names (the built-in ones are registered on first use)."""
    _register_builtin()
    return COMMANDS.list()


def _register_builtin() -> None:
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` when there is a default worth showing and the help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = _Parser(prog="cvkit", description="cvkit: datasets, checks and training for image competitions.",
                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in list_commands():
        command = COMMANDS.get(name)
        p = sub.add_parser(name, help=command.help, description=command.help,
                           formatter_class=_HelpFormatter)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cvkit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"cvkit {args.command}"
    try:
        return int(args._run(args))
    except UsageError as exc:
        print(f"{prog}: error: {exc} (see {prog} --help)", file=sys.stderr)
    except (ValueError, KeyError, OSError) as exc:  # DataError, ConfigError, CheckpointError are ValueErrors
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


