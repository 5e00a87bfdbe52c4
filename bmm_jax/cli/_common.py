"""Shared pieces of the entry points: an argument parser whose errors are one line, and the
``main`` wrapper turning library errors into a one-line message and a non-zero exit status."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

# Errors a user can cause with bad arguments or files: reported in one line, exit status 1.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError, OSError)


class UsageError(Exception):
    """A bad command line (exit status 2)."""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` after an option's help unless the help already says its default,
    and hides ``None`` defaults (an option left out: the help says what happens then)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default:" in h or action.default is None or action.default is argparse.SUPPRESS:
            return h
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` raising :class:`UsageError` instead of printing the usage."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(message)


def one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(msg.split())
    return msg or type(e).__name__


def run_main(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run ``body()``; print ``<prog>: error: <one line>`` on stderr for usage (status 2) and user
    errors (status 1). ``debug`` (env ``BMM_DEBUG=1``) re-raises with the traceback."""
    try:
        return int(body() or 0)
    except UsageError as e:
        print(f"{prog}: error: {one_line(e)} (see {prog} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
