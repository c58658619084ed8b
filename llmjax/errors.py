"""Errors a user can cause, and how every command reports them: one line, exit code 2.

Every module raises a subclass of `UserError` for input a user can fix (config keys, paths, file
contents, command-line arguments), with a message that names the key, path or value. Every CLI
runs through `run`, so a bad flag and a `UserError` both end as one line `llmjax: ...` on stderr
with exit code 2, before anything on disk has changed; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags, logging


class UserError(ValueError):
    """Input a user can fix; the message names what and where, in one line."""


def one_line(e: BaseException, *, named: bool = False, limit: int = 0) -> str:
    """The first non-empty line of an error's message, or its type's name; `named`: after its
    type's name ("OSError: ..."), for errors from other libraries; `limit` > 0: cut to that many
    characters and "..."."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = lines[0] if not limit or len(lines[0]) <= limit else lines[0][:limit] + "..."
    return f"{type(e).__name__}: {line}" if named else line


def fail(e: BaseException | str, code: int = 2) -> NoReturn:
    print(f"llmjax: {e if isinstance(e, str) else one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    # absl reports a bad flag with a usage dump and exit code 1; users get one line and exit 2.
    # A bad --config file or override surfaces as KeyError, TypeError, AttributeError or OSError.
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, TypeError, ValueError, AttributeError, OSError) as e:
        fail(e)


def run(main: Callable[[list[str]], None]) -> None:
    """absl's app.run for every llmjax command: flags parsed as above, `UserError` reported."""

    def guarded(argv: list[str]) -> None:
        # Orbax narrates every save and restore, and `datasets` its imports, at INFO: a user's
        # terminal gets warnings and the commands' own output only.
        logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except UserError as e:
            fail(e)

    app.run(guarded, flags_parser=_parse_flags)
