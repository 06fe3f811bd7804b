"""Errors the user can fix, logging, and how a command reports them: one `error:` line, no traceback."""

from __future__ import annotations

import logging
import sys


class PipelineError(Exception):
    """A problem the user can fix (bad input file, bad parameter). Printed without a traceback."""


def get_logger(name: str) -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    return logging.getLogger(name)


def run_main(main, argv=None) -> None:
    """Run a stage's main(); a PipelineError prints as one clear line and exits 1, no traceback."""
    try:
        main(argv)
    except PipelineError as exc:
        print_error(f"error: {exc}")
        raise SystemExit(1) from None


def print_error(message: str) -> None:
    """One line on stderr whatever it holds: a lone surrogate (a file name or argument that was not UTF-8) or a
    character the terminal's encoding lacks is written as a backslash escape, never a UnicodeEncodeError."""
    stream = sys.stderr
    encoding = getattr(stream, "encoding", None) or "utf-8"
    safe = message.encode(encoding, errors="backslashreplace").decode(encoding, errors="replace")
    try:
        stream.write(safe + "\n")
        stream.flush()
    except UnicodeError:  # a stream that still refuses it: plain ASCII
        stream.write(message.encode("ascii", errors="backslashreplace").decode("ascii") + "\n")
        stream.flush()
