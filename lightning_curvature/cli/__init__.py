"""Command-line entry point ``lightning-curvature`` (also ``python -m lightning_curvature``).

Commands
--------
``fit | validate | test | predict --config <yaml>``
    LightningCLI over :class:`~lightning_curvature.models.ImageClassifier` and
    :class:`~lightning_curvature.data.MNISTDataModule` (:class:`CurvatureCLI`); configs choose
    dataset x model x optimizer x callbacks (``configs/``).
``split --config <yaml> [--split_epoch N] [--branches a,b] [--reuse_base] [--overwrite]``
    SGD to epoch N (run ``base``), then one run per branch from exactly those weights, loop
    counters, callback states and data order (:mod:`lightning_curvature.cli.split`).
``report LOGDIR [--output PNG] [--table MD]``
    One PNG and a markdown table comparing the runs under LOGDIR; seeds aggregated
    (:mod:`lightning_curvature.cli.report`).

Every command parses with jsonargparse (LightningCLI's parser), so each accepts ``--config``,
dotted overrides and ``--print_config`` (prints the resolved config and exits). User errors are
one line on stderr with exit status 2, no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_curvature._lazy import lazy_exports

from .errors import CLIError, RunsNotFoundError

__all__ = [
    "CLIError",
    "CurvatureCLI",
    "REPORT_PANELS",
    "RunsNotFoundError",
    "SplitCLI",
    "SplitSettings",
    "compare_branch_networks",
    "find_runs",
    "group_seeds",
    "load_scalars",
    "main",
    "make_report",
    "run_split",
]

# Lightning and matplotlib are imported on first use, so `report` and `--help` start fast.
_LAZY = {
    "CurvatureCLI": ".base",
    "SplitSettings": ".base",
    "SplitCLI": ".split",
    "compare_branch_networks": ".split",
    "run_split": ".split",
    "REPORT_PANELS": ".report",
    "find_runs": ".report",
    "group_seeds": ".report",
    "load_scalars": ".report",
    "make_report": ".report",
}

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: lightning-curvature <command> [options]

commands:
  fit --config CONFIG.yaml          train (LightningCLI; also validate, test, predict)
  split --config CONFIG.yaml [--split_epoch N] [--branches a,b] [--reuse_base] [--overwrite]
                                    SGD to epoch N, then the config's branches from those weights
  report LOGDIR [--output PNG] [--table MD]
                                    PNG + markdown table comparing the runs under LOGDIR

`lightning-curvature <command> --help` shows each command's options; every command accepts
--config FILE, dotted overrides (--trainer.max_epochs 3) and --print_config.
"""


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


def _user_errors() -> tuple[type[BaseException], ...]:
    from lightning_curvature.checks import ArgumentError
    from lightning_curvature.data.idx import IDXFormatError
    from lightning_curvature.data.sources import DatasetNotFoundError

    # ArgumentError: a value from the config or command line that a class refused when
    # LightningCLI instantiated it (e.g. ``--data.val_size`` larger than the training set).
    return (CLIError, ArgumentError, DatasetNotFoundError, IDXFormatError)


def _dispatch(command: str, rest: list[str], from_sys_argv: bool) -> int:
    if command == "split":
        from .split import split_main

        return split_main(rest)
    if command == "report":
        from .report import report_main

        return report_main(rest)
    from .base import CurvatureCLI

    # From the console LightningCLI reads sys.argv itself (no args= / sys.argv conflict).
    CurvatureCLI(None if from_sys_argv else [command, *rest])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``fit|validate|test|predict`` (LightningCLI), ``split`` and ``report``.

    Returns the exit status: 0 on success, 2 for a usage or user error (printed as one line).
    """
    from_sys_argv = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in (*LIGHTNING_COMMANDS, "split", "report"):
        print(f"lightning-curvature: error: unknown command {command!r}\n\n{USAGE}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        return _dispatch(command, rest, from_sys_argv)
    except _user_errors() as err:
        message = " ".join(str(err).split()) if isinstance(err, CLIError) else str(err)
        print(f"lightning-curvature {command}: error: {message}", file=sys.stderr)
        return 2
