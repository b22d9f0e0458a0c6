"""The README's install blocks as printed, made into scripts that stop at the first failing line.

A block is the fenced code block right after a ``<!-- install-test: KIND -->`` line in
README.md. ``step`` blocks are pasted in README order; other kinds (``renewal-hook``)
are files the checks use. A pasted block runs line by line as a root shell would run
it, except that a line that fails stops the block and says which README line it was:
``a && b`` whose ``a`` fails does not stop ``set -e``, so each line's status is checked
after it. Here-documents and continued lines are kept whole.

    python3 readme_blocks.py README.md list            # kind, first line, per block
    python3 readme_blocks.py README.md script N OUT    # step N (1-based) as a script
    python3 readme_blocks.py README.md raw KIND OUT    # the first KIND block, verbatim
    python3 readme_blocks.py README.md pasted KIND OUT # the first KIND block as a script
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^<!--\s*install-test:\s*([\w-]+)\s*-->\s*$")
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")


class BlockError(Exception):
    """The README's markers do not lead to a fenced block."""


@dataclass(frozen=True)
class Block:
    """One fenced block: its kind, the README line of its first line, its lines."""

    kind: str
    line: int
    lines: list[str]


def blocks(readme: str) -> list[Block]:
    found: list[Block] = []
    lines = readme.splitlines()
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        i += 1
        if not m:
            continue
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i >= len(lines) or not lines[i].startswith("```"):
            raise BlockError(f"README.md:{i}: install-test marker {m.group(1)!r} not followed by a ``` block")
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end >= len(lines):
            raise BlockError(f"README.md:{start}: unterminated ``` block")
        found.append(Block(m.group(1), start + 1, lines[start:end]))
        i = end + 1
    return found


def commands(block: Block) -> list[tuple[int, str]]:
    """(README line, text) of each command: a line, with its continuations and here-document."""
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(block.lines):
        first = i
        text = [block.lines[i]]
        while text[-1].endswith("\\") and i + 1 < len(block.lines):
            i += 1
            text.append(block.lines[i])
        here = HEREDOC.search(" ".join(text)) if "<<" in " ".join(text) else None
        if here:
            while i + 1 < len(block.lines):
                i += 1
                text.append(block.lines[i])
                if block.lines[i].strip() == here.group(1):
                    break
        i += 1
        joined = "\n".join(text)
        if joined.strip() and not joined.lstrip().startswith("#"):
            out.append((block.line + first, joined))
    return out


def script(block: Block, number: int, name: str = "") -> str:
    """The block as a bash script: echo each command with its README line, run it, stop
    with the line and the status at the first one that fails. ``name``: how the block is
    called in those lines (default: install block ``number``)."""
    parts = ["set -o pipefail"]
    for line, text in commands(block):
        shown = text.splitlines()[0] + (" ..." if "\n" in text else "")
        where = f"README.md:{line} ({name or f'install block {number}'})"
        parts.append(f"echo {shlex.quote(f'{where}# {shown}')}")
        parts.append(text)
        parts.append(f"rc=$?; if [ $rc -ne 0 ]; then echo {shlex.quote(f'STOPPED at {where}: {shown}')}"
                     ' "(exit $rc)" >&2; exit $rc; fi')
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    readme, verb, *rest = argv
    found = blocks(Path(readme).read_text())
    steps = [b for b in found if b.kind == "step"]
    if not steps:
        raise BlockError("no install-test: step blocks in README.md")
    if verb == "list":
        for b in found:
            print(b.kind, b.line)
        return 0
    if verb == "script":
        n, out = int(rest[0]), rest[1]
        Path(out).write_text(script(steps[n - 1], n))
        return 0
    if verb in ("raw", "pasted"):
        kind, out = rest
        block = next((b for b in found if b.kind == kind), None)
        if block is None:
            raise BlockError(f"no install-test: {kind} block in README.md")
        text = script(block, 0, kind) if verb == "pasted" else "\n".join(block.lines) + "\n"
        Path(out).write_text(text)
        return 0
    raise SystemExit(f"unknown verb {verb}")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BlockError as e:
        print(f"readme_blocks: {e}", file=sys.stderr)
        sys.exit(1)
