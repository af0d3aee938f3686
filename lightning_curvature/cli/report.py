"""``lightning-curvature report LOGDIR``: one PNG and a markdown table comparing runs.

Every folder below ``LOGDIR`` with TensorBoard event files is a run, labelled by its path
relative to ``LOGDIR``. x-axis: completed training epochs (the TensorBoard step the callbacks and
:class:`~lightning_curvature.models.ImageClassifier` log).

Seeds
-----
A run whose label has a path component ``seed<k>``, ``<arm>_seed<k>`` or ``<arm>-seed<k>`` is
seed ``k`` of the *arm* named by the label without that part: ``sgd/seed1``, ``sgd_seed1`` and
``seed1/sgd`` are all seed 1 of arm ``sgd`` (``split --trainer.logger.init_args.version seed1``
writes ``<name>/seed1/{base,sgd,...}``). Arms with two or more seeds are drawn as the mean ± one
standard error (SE = sample std / sqrt(n)) across seeds at each epoch, and the markdown gets a
table of final values (mean ± SE, n) per arm and Welch's unequal-variance t-test between every
pair of arms (``scipy.stats.ttest_ind(equal_var=False)``; Welch 1947).

Outputs: ``--output`` (PNG, default ``LOGDIR/report.png``) and ``--table`` (markdown, default
``LOGDIR/report.md``; also printed).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CLIError, RunsNotFoundError

__all__ = [
    "NOT_MINIMUM_TAG",
    "REPORT_PANELS",
    "Panel",
    "PanelSeries",
    "find_runs",
    "group_seeds",
    "load_scalars",
    "make_report",
    "report_main",
    "seed_of",
]

Scalars = dict[str, tuple[list[float], list[float]]]

#: 0/1 scalar logged next to ``llc/lambda_hat``: 1 when SGLD found clearly lower loss nearby.
NOT_MINIMUM_TAG = "llc/not_minimum"


@dataclass(frozen=True)
class PanelSeries:
    """One curve of a panel: ``tag`` (or the first present of ``fallbacks``) ± ``err``."""

    tag: str
    err: str | None = None
    fallbacks: tuple[str, ...] = ()
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[PanelSeries, ...]


REPORT_PANELS: tuple[Panel, ...] = (
    Panel("LLC $\\hat\\lambda$ (± std over chains; × = not a minimum)",
          (PanelSeries("llc/lambda_hat", "llc/lambda_hat_std"),)),
    Panel("Hessian trace tr H (± stderr)",
          (PanelSeries("curvature/trace", "curvature/trace_stderr"),)),
    Panel("$\\lambda_{max}$ (solid), $\\lambda_{min}$ (dashed)",
          (PanelSeries("curvature/lambda_max"), PanelSeries("curvature/lambda_min", style="--"))),
    Panel("validation loss", (PanelSeries("val/loss", fallbacks=("val/loss_epoch",)),)),
    Panel("validation accuracy", (PanelSeries("val/acc", fallbacks=("val/acc_epoch",)),)),
    Panel("update norm $\\|\\theta_{t+1}-\\theta_t\\|$ (epoch mean)",
          (PanelSeries("optim/update_norm", fallbacks=("ngd/update_norm",)),)),
)  # fmt: skip

#: (column, tag, uncertainty tag or None, fallback tags)
_TABLE_COLUMNS: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
    ("λ̂", "llc/lambda_hat", "llc/lambda_hat_std", ()),
    ("WBIC", "llc/wbic", None, ()),
    ("tr H", "curvature/trace", "curvature/trace_stderr", ()),
    ("λ_max", "curvature/lambda_max", None, ()),
    ("λ_min", "curvature/lambda_min", None, ()),
    ("train loss", "train/loss", None, ("train/loss_epoch",)),
    ("val loss", "val/loss", None, ("val/loss_epoch",)),
    ("val acc", "val/acc", None, ("val/acc_epoch",)),
    ("update norm", "optim/update_norm", None, ("ngd/update_norm",)),
    ("κ (NGD)", "ngd/kappa", None, ()),
)

_SEED_PART = re.compile(r"(?:(?P<arm>.+?)[_-])?seed(?P<seed>\d+)")


# ------------------------------------------------------------------------------------- runs
def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Folders below ``logdir`` (inclusive) that hold TensorBoard event files, sorted.

    Symbolic links to run folders are followed, so a run can appear in several comparisons.
    """
    runs = set()
    for folder, _, files in os.walk(logdir, followlinks=True):
        if any(f.startswith("events.out.tfevents.") for f in files):
            runs.add(Path(folder))
    return sorted(runs)


def load_scalars(run_dir: str | os.PathLike[str]) -> Scalars:
    """All scalar series of one run: ``{tag: (steps, values)}``, one value per step (the last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 1, "histograms": 1, "tensors": 1}  # 0: keep all scalars
    acc = EventAccumulator(str(run_dir), size_guidance=guidance)
    acc.Reload()
    out: Scalars = {}
    for tag in acc.Tags().get("scalars", []):
        by_step: dict[int, float] = {}
        for event in acc.Scalars(tag):
            by_step[int(event.step)] = float(event.value)
        steps = sorted(by_step)
        out[tag] = ([float(s) for s in steps], [by_step[s] for s in steps])
    return out


def seed_of(label: str) -> tuple[str, int | None]:
    """``(arm, seed)`` of a run label by the seed convention of this module (else seed None)."""
    parts = label.replace(os.sep, "/").split("/")
    for i, part in enumerate(parts):
        match = _SEED_PART.fullmatch(part)
        if match:
            rest = [*parts[:i], *([match["arm"]] if match["arm"] else []), *parts[i + 1 :]]
            return "/".join(rest) or "run", int(match["seed"])
    return label, None


def group_seeds(labels: Sequence[str]) -> dict[str, list[int]]:
    """Arm -> indices into ``labels`` of its runs (one index for runs without a seed)."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        arm, seed = seed_of(label)
        groups.setdefault(arm if seed is not None else label, []).append(i)
    return groups


# ------------------------------------------------------------------------------ aggregation
def _series(scalars: Scalars, tag: str, fallbacks: Sequence[str] = ()):
    for t in (tag, *fallbacks):
        if t in scalars and scalars[t][0]:
            return scalars[t]
    return None


def _aggregate(runs: Sequence[Scalars], tag: str, fallbacks: Sequence[str], err_tag: str | None):
    """``(x, mean, err, n)`` across runs; err is the SE over seeds (n>1) or the logged error."""
    per_run = [s for s in (_series(r, tag, fallbacks) for r in runs) if s is not None]
    if not per_run:
        return None
    if len(runs) == 1:
        x, y = per_run[0]
        err = None
        if err_tag and err_tag in runs[0]:
            by = dict(zip(*runs[0][err_tag], strict=True))
            err = np.array([by.get(s, np.nan) for s in x])
        return np.array(x), np.array(y), err, np.ones(len(x), dtype=int)
    steps = sorted(set().union(*(set(x) for x, _ in per_run)))
    table = [dict(zip(x, y, strict=True)) for x, y in per_run]
    xs, means, ses, ns = [], [], [], []
    for s in steps:
        values = np.array([t[s] for t in table if s in t])
        xs.append(s)
        means.append(values.mean())
        ses.append(values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.nan)
        ns.append(len(values))
    return np.array(xs), np.array(means), np.array(ses), np.array(ns)


def _flagged_steps(runs: Sequence[Scalars]) -> set[float]:
    steps: set[float] = set()
    for r in runs:
        if NOT_MINIMUM_TAG in r:
            steps |= {s for s, v in zip(*r[NOT_MINIMUM_TAG], strict=True) if v >= 0.5}
    return steps


# ---------------------------------------------------------------------------------- drawing
def _draw(ax, x, y, err, color: str, style: str, label: str | None, thin: bool) -> None:
    kwargs = dict(color=color, ls=style, lw=1.0 if thin else 1.6, alpha=0.7 if thin else 1.0)
    has_err = err is not None and np.isfinite(err).any()
    if len(x) == 1 and has_err:  # a band of one point is invisible: draw its error bar
        ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=3, label=label, **kwargs)
        ax.set_xlim(min(ax.get_xlim()[0], x[0] - 1), max(ax.get_xlim()[1], x[0] + 1))
        return
    ax.plot(x, y, marker="o", ms=3, label=label, **kwargs)
    if has_err:
        ok = np.isfinite(err)
        ax.fill_between(x[ok], (y - err)[ok], (y + err)[ok], color=color, alpha=0.2, lw=0)


def _draw_panels(fig, panels, arms: dict[str, list[Scalars]]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(2, 3).ravel()
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    for ax, panel in zip(axes, panels, strict=True):
        plotted = False
        for arm, runs in arms.items():
            thin = arm.split("/")[-1] == "base"
            label = arm if len(runs) == 1 else f"{arm} (mean ± SE, n={len(runs)})"
            for k, spec in enumerate(panel.series):
                agg = _aggregate(runs, spec.tag, spec.fallbacks, spec.err)
                if agg is None:
                    continue
                x, y, err, _ = agg
                _draw(ax, x, y, err, colors[arm], spec.style, label if k == 0 else None, thin)
                plotted = True
                if spec.tag == "llc/lambda_hat":
                    flagged = _flagged_steps(runs)
                    mask = np.isin(x, sorted(flagged))
                    if mask.any():
                        ax.scatter(x[mask], y[mask], marker="x", s=60, color="black", zorder=5,
                                   label="not a minimum (llc/not_minimum)")  # fmt: skip
        if len(panel.series) > 1 and plotted:
            proxies = [Line2D([], [], color="gray", ls=s.style) for s in panel.series]
            ax.legend(proxies, [s.tag.split("/")[-1] for s in panel.series], fontsize=8)
        ax.set_title(panel.title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not plotted:
            tags = ", ".join(s.tag for s in panel.series)
            ax.text(0.5, 0.5, f"no '{tags}' logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")  # fmt: skip
    handles: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=min(len(handles), 5))  # fmt: skip


# ----------------------------------------------------------------------------------- tables
def _fmt(value: float | None, err: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = f"{value:.4g}"
    if err is not None and math.isfinite(err):
        text += f" ± {err:.2g}"
    return text


def _last(scalars: Scalars, tag: str, err_tag: str | None, fallbacks: Sequence[str]):
    """``(value, err, epoch)`` of the last measurement of ``tag`` in one run, or None."""
    series = _series(scalars, tag, fallbacks)
    if series is None:
        return None
    x, y = series
    err = None
    if err_tag and err_tag in scalars:
        err = dict(zip(*scalars[err_tag], strict=True)).get(x[-1])
    return y[-1], err, x[-1]


def _not_minimum_at(scalars: Scalars, epoch: float) -> bool:
    if NOT_MINIMUM_TAG not in scalars:
        return False
    return dict(zip(*scalars[NOT_MINIMUM_TAG], strict=True)).get(epoch, 0.0) >= 0.5


def _run_table(labels: Sequence[str], data: Sequence[Scalars]) -> tuple[list[str], bool]:
    header = "| run | " + " | ".join(c[0] for c in _TABLE_COLUMNS) + " |"
    rows = [header, "|" + "---|" * (len(_TABLE_COLUMNS) + 1)]
    any_flag = False
    for label, scalars in zip(labels, data, strict=True):
        cells = []
        for _, tag, err_tag, fallbacks in _TABLE_COLUMNS:
            last = _last(scalars, tag, err_tag, fallbacks)
            if last is None:
                cells.append("–")
                continue
            value, err, epoch = last
            flag = tag == "llc/lambda_hat" and _not_minimum_at(scalars, epoch)
            any_flag |= flag
            cells.append(f"{_fmt(value, err)}{' *' if flag else ''} (e{epoch:g})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows, any_flag


def _final_values(runs: Sequence[Scalars], tag: str, fallbacks: Sequence[str]):
    lasts = [_last(r, tag, None, fallbacks) for r in runs]
    return [v for v in lasts if v is not None]


def _seed_tables(arms: dict[str, list[Scalars]]) -> list[str]:
    from scipy import stats

    multi = {a: r for a, r in arms.items() if len(r) > 1}
    if not multi:
        return []
    lines = ["", "Final values over seeds: mean ± SE (n seeds; e = epoch of the last measurement)",
             "", "| arm | " + " | ".join(c[0] for c in _TABLE_COLUMNS) + " |",
             "|" + "---|" * (len(_TABLE_COLUMNS) + 1)]  # fmt: skip
    for arm, runs in multi.items():
        cells = []
        for _, tag, _, fallbacks in _TABLE_COLUMNS:
            finals = _final_values(runs, tag, fallbacks)
            if not finals:
                cells.append("–")
                continue
            values = np.array([v for v, _, _ in finals])
            epochs = sorted({e for _, _, e in finals})
            se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else None
            when = f"e{epochs[0]:g}" if len(epochs) == 1 else f"e{epochs[0]:g}-{epochs[-1]:g}"
            cells.append(f"{_fmt(float(values.mean()), se)} (n={len(values)}, {when})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    pairs = list(itertools.combinations(multi, 2))
    if pairs:
        lines += ["", "Welch's t-test between arms on the final values "
                  "(scipy.stats.ttest_ind, equal_var=False)", "",
                  "| quantity | arm A | arm B | mean A − mean B | t | p |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for (column, tag, _, fallbacks), (a, b) in itertools.product(_TABLE_COLUMNS, pairs):
            va = [v for v, _, _ in _final_values(multi[a], tag, fallbacks)]
            vb = [v for v, _, _ in _final_values(multi[b], tag, fallbacks)]
            if len(va) < 2 or len(vb) < 2:
                continue
            with warnings.catch_warnings():  # identical seeds: t is undefined, shown as "–"
                warnings.simplefilter("ignore", RuntimeWarning)
                result = stats.ttest_ind(va, vb, equal_var=False)
            diff = float(np.mean(va) - np.mean(vb))
            lines.append(f"| {column} | {a} | {b} | {_fmt(diff)} | {_fmt(float(result.statistic))}"
                         f" | {_fmt(float(result.pvalue))} |")  # fmt: skip
    return lines


# ----------------------------------------------------------------------------------- report
def make_report(
    logdir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    table: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> tuple[Path, str]:
    """Write the comparison PNG and markdown table for every run under ``logdir``.

    Parameters
    ----------
    logdir : path
        Folder searched (recursively, links followed) for TensorBoard runs.
    output : path, optional
        PNG to write (default ``<logdir>/report.png``).
    table : path, optional
        Markdown to write (default ``<logdir>/report.md``).
    title : str, optional
        Figure title.

    Returns
    -------
    (Path, str)
        The PNG path and the markdown (per-run table, each cell ``value ± err (e<epoch of that
        measurement>)``; with seeds also the per-arm and Welch tables).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logdir = Path(logdir)
    if not logdir.is_dir():
        raise RunsNotFoundError(f"{logdir}: no such directory")
    runs = find_runs(logdir)
    if not runs:
        raise RunsNotFoundError(
            f"{logdir}: no TensorBoard event files (events.out.tfevents.*) below it"
        )
    output = Path(output) if output is not None else logdir / "report.png"
    table = Path(table) if table is not None else logdir / "report.md"
    labels = [r.relative_to(logdir).as_posix() if r != logdir else r.name for r in runs]
    data = [load_scalars(r) for r in runs]
    # A split's branch comparison (``split/*`` tags only) is not a training run.
    keep = [i for i, d in enumerate(data) if not d or not all(t.startswith("split/") for t in d)]
    labels, data = [labels[i] for i in keep], [data[i] for i in keep]
    arms = {arm: [data[i] for i in idx] for arm, idx in group_seeds(labels).items()}

    fig = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    _draw_panels(fig, REPORT_PANELS, arms)
    fig.suptitle(title or f"lightning-curvature report: {logdir}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)

    rows, flagged = _run_table(labels, data)
    if flagged:
        rows += ["", f"\\* {NOT_MINIMUM_TAG} = 1 at that measurement: SGLD found clearly lower "
                 "loss nearby, so the weights are not a local minimum and λ̂ is not an LLC."]
    rows += _seed_tables(arms)  # fmt: skip
    markdown = "\n".join(rows) + "\n"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown)
    return output, markdown


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="lightning-curvature report",
        description="Compare the TensorBoard runs under LOGDIR: one PNG (λ̂ ± std, tr H, "
        "λ_max and λ_min, val loss, val acc, update norm vs epoch) and a markdown table of the "
        "last measurement of each quantity (with its epoch); runs named <arm>/seed<k> or "
        "<arm>_seed<k> are aggregated into mean ± SE with Welch's t-test between arms.",
        exit_on_error=True,
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML with these options")
    parser.add_argument("logdir", type=str, help="folder searched for TensorBoard runs")
    parser.add_argument("--output", type=str | None, default=None,
                        help="PNG path (default LOGDIR/report.png)")
    parser.add_argument("--table", type=str | None, default=None,
                        help="markdown path (default LOGDIR/report.md)")
    parser.add_argument("--title", type=str | None, default=None, help="figure title")
    return parser  # fmt: skip


def report_main(argv: Sequence[str]) -> int:
    """``lightning-curvature report ARGS``: write the report, print the table and PNG path."""
    args = _parser().parse_args(list(argv))
    try:
        png, markdown = make_report(args.logdir, args.output, args.table, args.title)
    except OSError as err:
        if isinstance(err, CLIError):
            raise
        raise CLIError(f"cannot write the report: {err}") from err
    sys.stdout.write(markdown)
    print(f"figure: {png}")
    return 0
