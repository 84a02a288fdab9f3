"""Argument types and an argument parser whose errors are one line.

Every value the command line takes is checked here, so a bad one ends in
``sfrtr <command>: error: <what was wrong>; <what to do>`` and exit status 2,
never in a traceback from deep inside a run.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` that reports a bad command line in one line
    (argparse's default prints the whole usage first) and points at ``--help``."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message (see 'prog --help')`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their paragraphs; every option with a default says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and action.option_strings and action.nargs != 0
                and default is not None and default is not False
                and default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """A whole number above zero (``--customers``, ``--processes``...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A whole number, zero or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def seconds(text: str) -> float:
    """A finite, positive number of seconds (``nan`` and ``inf`` are refused: a demo of
    ``nan`` seconds runs nothing and one of ``inf`` never reports)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds above 0")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port: use 1-65535 (0: any free port)")
    return value


def endpoint(text: str) -> str:
    """``HOST:PORT`` (an etcd member); ``[v6]:PORT`` for IPv6."""
    host, sep, number = text.rpartition(":")
    if not sep or not host or not number.isdigit() or not 0 < int(number) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:2379)")
    return text


def namespace(text: str) -> str:
    """An etcd key prefix: not empty, not ending with ``/`` (the store adds it)."""
    if not text or text.endswith("/"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a namespace: give a non-empty prefix without a trailing '/' "
            "(e.g. prod/sfrtr)")
    return text


def customer(text: str) -> str:
    """A customer name: not empty, no surrounding blanks."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the customer name is empty")
    if text != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has leading or trailing blanks")
    return text


def fmt_seconds(value: float) -> str:
    """``0.4 s``, ``2 s``, ``1.5 s``: as many decimals as the value needs, at most two."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{text} s"


def fail(prog: str, message: str) -> int:
    """Print ``prog: error: message`` on stderr; the exit status of a bad input (2)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
