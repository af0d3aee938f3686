"""Command-line entry point ``lightning-curvature`` (also ``python -m lightning_curvature``).

Commands
--------
``fit | validate | test | predict --config <yaml>``
    LightningCLI over :class:`~lightning_curvature.models.ImageClassifier` and
    :class:`~lightning_curvature.data.MNISTDataModule`; configs choose dataset x model x
    optimizer x callbacks (``configs/``). ``--print_config`` prints the resolved config; the
    resolved config is saved beside the logs (``<log_dir>/config.yaml``).
``split --config <yaml> --split_epoch N``
    Train with SGD for N epochs (run ``base``), then continue from exactly those weights, loop
    counters, callback states and data order as one run per branch (default ``sgd`` and ``ngd``;
    settings in the config's ``split.branches``), up to ``trainer.max_epochs``. Runs are sibling
    TensorBoard versions ``<save_dir>/<name>/{base,sgd,ngd}``; branch epoch axes continue from N.
``report <logdir>``
    One PNG comparing every run below ``logdir`` (λ̂ ± std, tr H, λ_max, λ_min, validation loss,
    update norm vs epoch) and a markdown table of final values.

How ``split`` branches: the base run ends with ``trainer.save_checkpoint`` after epoch N. Each
branch builds a fresh module from the config with its optimizer overrides and
``restore_optimizer_state=False``, then ``Trainer.fit(ckpt_path=base)``: Lightning restores the
weights, epoch/step counters and callback states (measurement sets, random directions, seeds) but
not the base optimizer's state (SGD momentum is not carried into NGD, nor into the SGD branch, so
the two branches differ only in their optimizer). The data module shuffles by ``(seed, epoch)``,
so both branches see the same batches in the same order as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CurvatureCLI",
    "REPORT_PANELS",
    "load_scalars",
    "main",
    "make_report",
    "run_split",
]

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
_USAGE = """usage: lightning-curvature <command> [options]

commands:
  fit --config CONFIG.yaml          train (LightningCLI; also validate, test, predict)
  split --config CONFIG.yaml --split_epoch N
                                    SGD to epoch N, then SGD and NGD branches from those weights
  report LOGDIR                     PNG + markdown table comparing the runs under LOGDIR

`lightning-curvature <command> --help` shows each command's options.
"""


def _cli_class():
    # Lightning is imported lazily so `report` and `--help` start fast.
    from lightning.pytorch.cli import LightningCLI

    class _CurvatureCLI(LightningCLI):
        """LightningCLI with the project's model/data classes and a ``split`` config section."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--split",
                type=dict | None,
                default=None,
                help="Settings for `lightning-curvature split` (ignored by fit): split_epoch, "
                "base (ImageClassifier overrides for the SGD phase), branches (name -> overrides).",
            )

    return _CurvatureCLI


def CurvatureCLI(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any):  # noqa: N802
    """Build the project's LightningCLI (``ImageClassifier`` x ``MNISTDataModule``)."""
    from lightning_curvature.data import MNISTDataModule
    from lightning_curvature.models import ImageClassifier

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault("seed_everything_default", 0)
    kwargs.setdefault(
        "trainer_defaults",
        {
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "default"},
            }
        },
    )
    cls = _cli_class()
    if args is None:
        return cls(ImageClassifier, MNISTDataModule, run=run, **kwargs)
    # LightningCLI warns when given args while sys.argv has its own: ours were derived from it.
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        return cls(ImageClassifier, MNISTDataModule, args=list(args), run=run, **kwargs)
    finally:
        sys.argv = saved


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------
_DEFAULT_BRANCHES: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd"},
    "ngd": {"optimizer": "ngd"},
}


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping at the top level")
    return data


def _logger_settings(config: dict[str, Any], config_path: str) -> dict[str, Any]:
    """The config's TensorBoardLogger init_args, with ``save_dir`` and ``name`` filled in."""
    logger = (config.get("trainer") or {}).get("logger")
    init = dict(logger.get("init_args") or {}) if isinstance(logger, dict) else {}
    if isinstance(logger, dict) and "TensorBoardLogger" not in str(logger.get("class_path", "")):
        init = {}  # another logger class: only its save_dir/name carry over
    init["save_dir"] = str(init.get("save_dir", "runs"))
    init["name"] = str(init.get("name") or Path(config_path).stem)
    init.pop("version", None)
    return init


def _max_epochs(config: dict[str, Any], extra_args: Sequence[str]) -> int | None:
    """``trainer.max_epochs`` from the YAML, or from a ``--trainer.max_epochs`` override."""
    value = (config.get("trainer") or {}).get("max_epochs")
    args = list(extra_args)
    for i, arg in enumerate(args):
        if arg.startswith("--trainer.max_epochs="):
            value = arg.split("=", 1)[1]
        elif arg == "--trainer.max_epochs" and i + 1 < len(args):
            value = args[i + 1]
    return None if value is None else int(value)


def _overrides(prefix: str, values: dict[str, Any]) -> list[str]:
    # Strings go verbatim (a JSON-quoted string would not match a Literal); the rest as JSON.
    return [
        f"--{prefix}.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()
    ]


def _check_overrides(where: str, values: Any) -> dict[str, Any]:
    from lightning_curvature.models import ImageClassifier

    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of ImageClassifier arguments, got {values!r}")
    allowed = set(inspect.signature(ImageClassifier.__init__).parameters) - {"self", "model"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown ImageClassifier arguments {unknown}; allowed: {sorted(allowed)}"
        )
    return dict(values)


def run_split(
    config: str,
    split_epoch: int | None = None,
    *,
    branches: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    reuse_base: bool = False,
) -> dict[str, str]:
    """Run a split experiment; return ``{run name: TensorBoard log dir}``.

    Parameters
    ----------
    config : str
        A fit config with an optional ``split:`` section::

            split:
              split_epoch: 10          # or --split_epoch
              base: {lr: 0.05}         # ImageClassifier overrides for the SGD phase (optional)
              branches:                # name -> ImageClassifier overrides (default: sgd, ngd)
                sgd: {optimizer: sgd}
                ngd: {optimizer: ngd, alpha: 0.01, eps: 1.0e-10}

        ``trainer.max_epochs`` is the total: branches run from ``split_epoch`` to it.
    split_epoch : int, optional
        Overrides ``split.split_epoch``.
    branches : sequence of str, optional
        Run only these branches.
    extra_args : sequence of str
        Further LightningCLI overrides (e.g. ``--trainer.max_epochs=20``), applied to all runs.
    reuse_base : bool
        Skip the base run when its checkpoint already exists (to add branches later).
    """
    cfg = _read_yaml(config)
    section = cfg.get("split") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{config}: the split section must be a mapping")
    if split_epoch is None:
        split_epoch = section.get("split_epoch")
    if split_epoch is None or int(split_epoch) < 1:
        raise ValueError(
            "split_epoch must be an integer >= 1 (--split_epoch or split.split_epoch), "
            f"got {split_epoch}"
        )
    split_epoch = int(split_epoch)
    base_overrides = _check_overrides("split.base", section.get("base"))
    if base_overrides.get("optimizer", "sgd") != "sgd":
        raise ValueError("split.base.optimizer must be 'sgd': the base phase trains with SGD")
    base_overrides["optimizer"] = "sgd"
    all_branches = section.get("branches") or _DEFAULT_BRANCHES
    if not isinstance(all_branches, dict) or not all_branches:
        raise ValueError(f"{config}: split.branches must be a non-empty mapping name -> overrides")
    if branches is not None:
        missing = sorted(set(branches) - set(all_branches))
        if missing:
            raise ValueError(
                f"branches {missing} are not in split.branches ({sorted(all_branches)})"
            )
        all_branches = {k: all_branches[k] for k in branches}
    branch_overrides = {
        k: _check_overrides(f"split.branches.{k}", v) for k, v in all_branches.items()
    }
    for name in branch_overrides:
        if name == "base" or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(
                f"branch name {name!r} must be alphanumeric (with _ or -) and not 'base'"
            )

    total = _max_epochs(cfg, extra_args)
    if total is not None and total <= split_epoch:
        raise ValueError(
            f"trainer.max_epochs ({total}) must exceed split_epoch ({split_epoch}): it is the "
            "total number of epochs, branches run from split_epoch to it"
        )
    logger_init = _logger_settings(cfg, config)
    save_dir, name = logger_init["save_dir"], logger_init["name"]

    def logger_arg(version: str) -> str:
        logger = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {**logger_init, "version": version},
        }
        return f"--trainer.logger={json.dumps(logger)}"

    common = ["--config", config, *extra_args]
    runs: dict[str, str] = {}
    base_dir = Path(save_dir) / name / "base"
    ckpt = base_dir / f"split_epoch={split_epoch}.ckpt"
    if not (reuse_base and ckpt.is_file()):
        cli = CurvatureCLI(
            [*common, *_overrides("model", base_overrides), f"--trainer.max_epochs={split_epoch}",
             logger_arg("base")],
            run=False,
        )  # fmt: skip
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if cli.trainer.current_epoch != split_epoch:
            raise RuntimeError(
                f"the base run stopped at epoch {cli.trainer.current_epoch}, not at split_epoch="
                f"{split_epoch} (early stopping or max_steps?); not branching from it"
            )
        cli.trainer.save_checkpoint(str(ckpt))
    runs["base"] = str(base_dir)
    for branch, overrides in branch_overrides.items():
        overrides = {**base_overrides, **overrides, "restore_optimizer_state": False}
        cli = CurvatureCLI(
            [*common, *_overrides("model", overrides), logger_arg(branch)], run=False
        )
        max_epochs = cli.trainer.max_epochs
        if max_epochs is None or max_epochs <= split_epoch:
            raise ValueError(
                f"trainer.max_epochs ({max_epochs}) must exceed split_epoch ({split_epoch}): it is "
                "the total number of epochs, branches run from split_epoch to it"
            )
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt))
        runs[branch] = str(Path(save_dir) / name / branch)
    return runs


def _split_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-curvature split",
        description="Train with SGD to --split_epoch, then branch (SGD, NGD, ...) from the same "
        "weights and data order. Unrecognized options are LightningCLI overrides for every run "
        "(e.g. --trainer.max_epochs=20 --data.train_subset=5000).",
    )
    parser.add_argument(
        "--config", required=True, help="fit config with an optional split: section"
    )
    parser.add_argument(
        "--split_epoch", type=int, default=None, help="epochs of SGD before branching"
    )
    parser.add_argument("--branches", default=None, help="comma-separated subset of split.branches")
    parser.add_argument(
        "--reuse_base", action="store_true", help="reuse an existing base checkpoint for this split"
    )
    args, extra = parser.parse_known_args(argv)
    runs = run_split(
        args.config,
        args.split_epoch,
        branches=args.branches.split(",") if args.branches else None,
        extra_args=extra,
        reuse_base=args.reuse_base,
    )
    for run, path in runs.items():
        print(f"{run}: {path}")
    return 0


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
#: (title, tag, uncertainty tag or None, fallback tags)
REPORT_PANELS: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
    ("LLC $\\hat\\lambda$ (± std over chains)", "llc/lambda_hat", "llc/lambda_hat_std", ()),
    ("Hessian trace tr H (± stderr)", "curvature/trace", "curvature/trace_stderr", ()),
    ("$\\lambda_{max}$", "curvature/lambda_max", None, ()),
    ("$\\lambda_{min}$", "curvature/lambda_min", None, ()),
    ("validation loss", "val/loss", None, ("val/loss_epoch",)),
    ("update norm $\\|\\theta_{t+1}-\\theta_t\\|$ (epoch mean)", "optim/update_norm", None,
     ("ngd/update_norm",)),
)  # fmt: skip

_TABLE_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("λ̂", "llc/lambda_hat", "llc/lambda_hat_std"),
    ("WBIC", "llc/wbic", None),
    ("tr H", "curvature/trace", "curvature/trace_stderr"),
    ("λ_max", "curvature/lambda_max", None),
    ("λ_min", "curvature/lambda_min", None),
    ("train loss", "train/loss", None),
    ("val loss", "val/loss", None),
    ("val acc", "val/acc", None),
    ("update norm", "optim/update_norm", None),
    ("κ (NGD)", "ngd/kappa", None),
)


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Folders below ``logdir`` (inclusive) that hold TensorBoard event files, sorted.

    Symbolic links to run folders are followed, so a run can appear in several comparisons.
    """
    runs = set()
    for folder, _, files in os.walk(logdir, followlinks=True):
        if any(f.startswith("events.out.tfevents.") for f in files):
            runs.add(Path(folder))
    return sorted(runs)


def load_scalars(run_dir: str | os.PathLike[str]) -> dict[str, tuple[list[float], list[float]]]:
    """All scalar series of one run: ``{tag: (steps, values)}``, one value per step (the last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 1, "histograms": 1, "tensors": 1}  # 0: keep all scalars
    acc = EventAccumulator(str(run_dir), size_guidance=guidance)
    acc.Reload()
    out: dict[str, tuple[list[float], list[float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        by_step: dict[int, float] = {}
        for event in acc.Scalars(tag):
            by_step[int(event.step)] = float(event.value)
        steps = sorted(by_step)
        out[tag] = ([float(s) for s in steps], [by_step[s] for s in steps])
    return out


def _series(scalars: dict, tag: str, fallbacks: Sequence[str] = ()):
    for t in (tag, *fallbacks):
        if t in scalars and scalars[t][0]:
            return scalars[t]
    return None


def _fmt(value: float | None, err: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = f"{value:.4g}"
    if err is not None and math.isfinite(err):
        text += f" ± {err:.2g}"
    return text


def make_report(
    logdir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    table: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> tuple[Path, str]:
    """Write the comparison PNG and markdown table for every run under ``logdir``.

    Returns ``(png_path, markdown)``; the markdown is also written to ``table`` (default
    ``<logdir>/report.md``). x-axis: completed training epochs (the value the callbacks and
    :class:`~lightning_curvature.models.ImageClassifier` log as the TensorBoard step).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    logdir = Path(logdir)
    runs = find_runs(logdir)
    if not runs:
        raise FileNotFoundError(
            f"{logdir}: no TensorBoard event files (events.out.tfevents.*) below it"
        )
    output = Path(output) if output is not None else logdir / "report.png"
    table = Path(table) if table is not None else logdir / "report.md"
    labels = [str(r.relative_to(logdir)) if r != logdir else r.name for r in runs]
    data = [load_scalars(r) for r in runs]

    fig = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (panel_title, tag, err_tag, fallbacks) in zip(axes, REPORT_PANELS, strict=True):
        plotted = False
        for label, scalars, color in zip(labels, data, colors, strict=True):
            series = _series(scalars, tag, fallbacks)
            if series is None:
                continue
            x, y = series
            linestyle = "--" if label.split(os.sep)[-1] == "base" else "-"
            ax.plot(x, y, marker="o", ms=3, color=color, ls=linestyle, label=label)
            if err_tag and err_tag in scalars:
                err = dict(zip(*scalars[err_tag], strict=True))
                xs = [s for s in x if s in err]
                lo = [v - err[s] for s, v in zip(x, y, strict=True) if s in err]
                hi = [v + err[s] for s, v in zip(x, y, strict=True) if s in err]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            plotted = True
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not plotted:
            ax.text(0.5, 0.5, f"no '{tag}' logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")  # fmt: skip
    handles, legend_labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in legend_labels:
                handles.append(h)
                legend_labels.append(lab)
    if handles:
        fig.legend(handles, legend_labels, loc="outside lower center", ncol=min(len(handles), 6))
    fig.suptitle(title or f"lightning-curvature report: {logdir}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)

    header = "| run | epoch | " + " | ".join(c[0] for c in _TABLE_COLUMNS) + " |"
    rows = [header, "|" + "---|" * (len(_TABLE_COLUMNS) + 2)]
    for label, scalars in zip(labels, data, strict=True):
        cells = []
        last_epoch = None
        for _, tag, err_tag in _TABLE_COLUMNS:
            series = _series(scalars, tag, ("val/loss_epoch",) if tag == "val/loss" else ())
            if series is None:
                cells.append("–")
                continue
            x, y = series
            last_epoch = x[-1] if last_epoch is None else max(last_epoch, x[-1])
            err = None
            if err_tag and err_tag in scalars and scalars[err_tag][0]:
                err_by_step = dict(zip(*scalars[err_tag], strict=True))
                err = err_by_step.get(x[-1])
            cells.append(_fmt(y[-1], err))
        epoch = "–" if last_epoch is None else f"{last_epoch:g}"
        rows.append(f"| {label} | {epoch} | " + " | ".join(cells) + " |")
    markdown = "\n".join(rows) + "\n"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown)
    return output, markdown


def _report_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-curvature report",
        description="Compare the TensorBoard runs under LOGDIR: one PNG (λ̂ ± std, tr H, "
        "λ_max, λ_min, val loss, update norm vs epoch) and a markdown table of final values.",
    )
    parser.add_argument("logdir")
    parser.add_argument("--output", default=None, help="PNG path (default LOGDIR/report.png)")
    parser.add_argument("--table", default=None, help="markdown path (default LOGDIR/report.md)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    png, markdown = make_report(args.logdir, args.output, args.table, args.title)
    print(markdown)
    print(f"figure: {png}")
    return 0


# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``fit|validate|test|predict`` (LightningCLI), ``split`` and ``report``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "split":
        return _split_main(rest)
    if command == "report":
        return _report_main(rest)
    if command in _LIGHTNING_COMMANDS:
        CurvatureCLI([command, *rest])
        return 0
    print(f"lightning-curvature: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
