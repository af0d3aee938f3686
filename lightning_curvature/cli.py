"""Command-line entry point ``lightning-curvature`` (commands arrive with the CLI issue)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Print the help; the ``fit``/``split``/``report`` commands are added by the CLI issue."""
    print("usage: lightning-curvature {fit,split,report} ...  (commands not yet available)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
