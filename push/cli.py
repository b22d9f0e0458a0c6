"""The pbx-push command (the push wake-up service; built in its own issue)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("pbx-push: the push service is not built yet", file=sys.stderr)
    return 1
