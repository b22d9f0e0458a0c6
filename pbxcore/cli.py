"""What both commands (pbx-relay, pbx-push) share: the one error handler, exit codes, and output helpers.

Exit codes, documented in the README and in each command's ``--help``:

- 0: done;
- 1: the command failed (a service did not answer, a refused request, a port in use, ...);
- 2: the configuration (file, variable or flag) is wrong, or the command line is
  (argparse's usage errors).

A failure is one line on stderr, ``<prog>: <message>``, never a traceback: the
message is a :class:`~pbxcore.errors.PbxError`'s (also when it comes wrapped in the
exception groups of a trio task tree). An :class:`OSError` nobody turned into one
(a file the command could not write, say) is printed as one line too, exit 1.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from pbxcore.errors import EXIT_FAILURE, PbxError
from pbxcore.http import one_line

EXIT_CODES_HELP = "exit codes: 0 done, 1 failed, 2 configuration or usage error"


def run_command(prog: str, body: Callable[[], int]) -> int:
    """``body()``'s exit code; a failure becomes one line on stderr and its exit code."""
    try:
        return body()
    except BaseException as e:  # noqa: B036 - re-raised unless it is one we explain
        leaf = find_leaf(e, PbxError) or find_leaf(e, OSError)
        if leaf is None:
            raise
        print(f"{prog}: {describe(leaf)}", file=sys.stderr)
        return leaf.exit_code if isinstance(leaf, PbxError) else EXIT_FAILURE


def package_version() -> str:
    """The installed version of pbx-relay (both commands ship in it)."""
    try:
        return metadata.version("pbx-relay")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


Subcommands = argparse._SubParsersAction  # the type argparse gives add_subparsers() no public name


def command_parser(
    prog: str, description: str, add_common: Callable[[argparse.ArgumentParser], None],
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, Subcommands[argparse.ArgumentParser]]:
    """A command's parser with --version and the exit codes in its help, the options
    ``add_common`` adds taken before *and* after the verb: (parser, the parent every verb
    gets, the verbs). The parent's options default to SUPPRESS, so a verb given no
    option keeps what was given before it."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_CODES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    add_common(p)
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    add_common(common)
    return p, common, p.add_subparsers(dest="command", required=True, metavar="COMMAND")


def describe(exc: BaseException) -> str:
    """One line for an error we explain (see the module docstring)."""
    if isinstance(exc, OSError) and not isinstance(exc, PbxError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return one_line(f"{exc.strerror}{where}")
    return one_line(exc) or type(exc).__name__


def find_leaf(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...],
              ) -> BaseException | None:
    """``exc`` itself or the first ``kind`` inside its exception groups (trio's nurseries
    wrap what a task raised)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = find_leaf(sub, kind)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------ output


def iso_time(t: float | None) -> str:
    """Unix seconds as ``2024-05-01T12:00:00Z``; ``-`` for None."""
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(obj: Any) -> None:
    """``obj`` as indented JSON on stdout."""
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def address(transport: str, ip: str, port: int) -> str:
    """``tcp:192.0.2.1:5060``, IPv6 in brackets."""
    return f"{transport}:[{ip}]:{port}" if ":" in ip else f"{transport}:{ip}:{port}"
