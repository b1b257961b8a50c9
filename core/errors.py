"""User-input errors and how the entry points report them, Lightning-free (importable from every package).

A :class:`UserInputError` is a problem with something the user chose: a file or folder, an option's value, a
combination of settings. Its message names the option or the file and says what to do, so the command line prints
it as ``error: <message>`` and exits with status 2, without a traceback (as jsonargparse and argparse do for a
malformed command line); any other exception is a bug and keeps its traceback. ``--debug`` on the command line, or
``DREAMBOOTH_DEBUG=1`` in the environment, prints the traceback of user-input errors too.

Each subclass also derives from the builtin type such code raised before (``ValueError``, ``FileNotFoundError``,
...), so ``except ValueError`` and ``pytest.raises(FileNotFoundError)`` keep working. The policy for files in the
photo folder is in docs/bad_inputs.md.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from core.console import set_up_console

DEBUG_FLAG = "--debug"
DEBUG_ENV = "DREAMBOOTH_DEBUG"
EXIT_USER_ERROR = 2  # the status argparse / jsonargparse exit with on a bad command line
HINT = f"(run with {DEBUG_FLAG} for the traceback)"
_PREFIX = "error: "


class UserInputError(Exception):
    """A problem with something the user chose; the message names it and says what to do."""


class ConfigError(UserInputError, ValueError):
    """An option's value, or a combination of options, that cannot work."""


class InputFileError(UserInputError, ValueError):
    """A file or folder the user gave that cannot be used: unreadable, empty, the wrong format or the wrong content."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist (or is a broken link)."""


class CheckpointMismatchError(UserInputError, RuntimeError):
    """A checkpoint that does not fit the model the options describe."""


class MissingPackageError(UserInputError, ImportError):
    """An option needs a package that is not installed."""


def debug_from_env() -> bool:
    """``DREAMBOOTH_DEBUG`` set to anything but an empty string, ``0``, ``false`` or ``no``."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def format_user_error(error: BaseException, hint: bool = True) -> str:
    """``error: <message>``, continuation lines indented under the message, then the one-line summary of the chained
    cause (``raise ... from e``) when the message does not already quote it, and the ``--debug`` hint."""
    message = str(error).strip() or type(error).__name__
    lines = message.splitlines()
    cause = error.__cause__
    if cause is not None:
        summary = (str(cause).strip().splitlines() or [""])[0]
        if not summary or summary not in message:
            lines.append(f"caused by {type(cause).__name__}" + (f": {summary}" if summary else ""))
    text = _PREFIX + ("\n" + " " * len(_PREFIX)).join(lines)
    return text + ("\n" + HINT if hint else "")


def report_user_errors(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run an entry point's ``main(argv)``; on a :class:`UserInputError`, print it (see :func:`format_user_error`) and
    return 2. Returns 0 when ``main`` returns; other exceptions propagate with their traceback.

    ``--debug`` is taken out of the arguments before ``main`` sees them. With ``argv=None`` (the command line) it is
    taken out of ``sys.argv`` itself, which LightningCLI reads, and sets ``DREAMBOOTH_DEBUG=1``, which the processes
    that DDP launches (the same command line, again) inherit; the command line also shows this project's INFO
    messages and not the warnings that do not apply (:func:`core.console.set_up_console`).
    """
    from_command_line = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or debug_from_env()
    args = [a for a in args if a != DEBUG_FLAG]
    if from_command_line:
        set_up_console()
        sys.argv[1:] = args
        if debug:
            os.environ[DEBUG_ENV] = "1"
    try:
        main(None if from_command_line else args)
    except UserInputError as error:
        if debug:
            traceback.print_exc()
        else:
            print(format_user_error(error), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0
