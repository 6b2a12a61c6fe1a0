"""Command lines that fail in one line (``error: <what, where, the fix>``); the traceback only with ``--debug``.

Every ``python -m ...`` entry point of the project runs through ``run_cli``. jsonargparse still
refuses unknown or mistyped options itself (usage and exit code 2); what fails later, in the run,
is printed as its message alone and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

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
    from jsonargparse import auto_cli

    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    kwargs.setdefault("epilog", f"{DEBUG_FLAG}: show the traceback of a failure (otherwise one line: error: ...)")
    try:
        parsed = auto_cli(components, args=argv, as_positional=False, **kwargs)
        return then(parsed) if then is not None else parsed
    except Exception as e:
        if debug:
            raise
        sys.stdout.flush()
        print(error_line(e), file=sys.stderr)
        raise SystemExit(1) from None
