"""Command lines that fail in one line (``error: <what, where, the fix>``); the traceback only with ``--debug``.

Every ``python -m ...`` entry point of the project runs through ``run_cli``. An unknown or mistyped
option exits 2 with one line naming the flag (a ``Literal`` option lists its choices: jsonargparse's
own message for those reads "Cannot take a Union of no types"); what fails later, in the run, is
printed as its message alone and exits 1.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

DEBUG_FLAG = "--debug"
OUR_PACKAGES = ("core", "finetune", "server", "submission", "bench", "scripts", "__main__")  # __main__: the module run
# Raised on purpose with a message meant for the user (bad option, file, data, budget, checkpoint).
EXPECTED = (ValueError, OSError, FloatingPointError)


def error_line(e: BaseException) -> str:
    """``error: <message>``; an exception nobody raised on purpose also says what it is and how to see more."""
    message = str(e).strip() or type(e).__name__
    if isinstance(e, EXPECTED) or type(e).__module__.split(".")[0] in OUR_PACKAGES:
        return f"error: {message}"
    return f"error: {type(e).__name__}: {message} (rerun with {DEBUG_FLAG} for the traceback)"


def run_cli(components: Callable | type | dict[str, Callable], args: list[str] | None = None, then: Callable | None = None, **kwargs: Any) -> Any:
    """jsonargparse's ``auto_cli`` over ``components`` (``--flag`` for every argument), with one-line errors.

    ``then``: called with what was parsed (e.g. a config dataclass), its failures reported the same way.
    ``--debug`` anywhere in ``args`` (default: ``sys.argv``) is taken out and lets exceptions through with
    their traceback.
    """
    from argparse import ArgumentError

    from jsonargparse import auto_cli

    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    kwargs.setdefault("epilog", f"{DEBUG_FLAG}: show the traceback of a failure (otherwise one line: error: ...)")
    kwargs.setdefault("exit_on_error", False)
    try:
        parsed = auto_cli(components, args=argv, as_positional=False, **kwargs)  # a function component also runs here
        return then(parsed) if then is not None else parsed
    except ArgumentError as e:
        if debug:
            raise
        sys.stdout.flush()
        print(parse_error_line(str(e), components, argv), file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        if debug:
            raise
        sys.stdout.flush()
        print(error_line(e), file=sys.stderr)
        raise SystemExit(1) from None


def parse_error_line(message: str, components: Any, argv: list[str]) -> str:
    """One line for a command line jsonargparse refused: the flag, what was given, and for a ``Literal`` its choices."""
    key = re.match(r'Parser key "([^"]+)"', message)
    if key:
        flag = f"--{key.group(1)}"
        choices = literal_choices(components, key.group(1))
        given = [a.partition("=")[2] for a in argv if a.startswith(flag + "=")]
        given += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
        value = repr(given[-1]) if given else "the value in --config"
        if choices:
            return f"error: {flag}: {value} is not one of {', '.join(map(str, choices))}"
        reason = next((line.strip() for line in message.splitlines()[1:] if line.strip()), "")
        return f"error: {flag}: {reason} (see --help)"
    return f"error: {' '.join(message.split())} (see --help)"


def literal_choices(component: Any, key: str) -> tuple | None:
    """The values a ``Literal`` option ``key`` ("speed.micro_batch") takes, walking dataclass fields from ``component``."""
    if isinstance(component, dict):
        head, _, key = key.partition(".")
        component = component.get(head)
    annotation: Any = component
    for part in key.split("."):
        owner = annotation if inspect.isclass(annotation) else None
        try:
            hints = typing.get_type_hints(annotation.__init__ if owner and not dataclasses.is_dataclass(owner) else annotation)
        except Exception:  # noqa: BLE001  an annotation that does not resolve: no choices to name
            return None
        annotation = _without_none(hints.get(part))
        if annotation is None:
            return None
    return _literal_values(annotation) or None


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _literal_values(annotation: Any) -> tuple:
    """Every value of a (nested, optional) ``Literal``; () for anything else."""
    if typing.get_origin(annotation) is Literal:
        return tuple(v for a in typing.get_args(annotation) for v in (_literal_values(a) or (a,)))
    return tuple(v for a in typing.get_args(annotation) if a is not type(None) for v in _literal_values(a))
