"""The claim table of the seed-002 study: claim | published | ours (mean ± SE, t, p) | verdict.

Reads the TensorBoard logs the study wrote (``runs/study/<experiment>/...``) with the report
module's loader and tests each published claim:

1. (3.1) NGD ends with a higher λ̂ and tr H than SGD, per model: Welch's t-test of the final
   values, online NGD vs SGD and exact NGD vs SGD.
2. (3.2) Lowering α (at ε 1e-10) or ε (at α 1e-2) raises the online NGD's λ̂: least-squares
   slope of the final λ̂ on log10 α (log10 ε) over all runs; the claim is a negative slope.
3. (3.3) After the split λ̂ rises under NGD, not under SGD or SGD at 4x lr; a higher NGD lr
   raises it more: Welch's t-test of Δλ̂ = λ̂(end) − λ̂(split) between branches.
4. (A.3) λ̂, WBIC and tr H rise while the validation loss rises: per run, the slope per epoch
   of each quantity over the epochs after the validation-loss minimum; one-sample t-test of the
   slopes against 0 across seeds.

A verdict is "holds" when the effect has the published sign at p < 0.05, "opposite" when it has
the other sign at p < 0.05, else "not significant". Points where the LLC reported that w* is not
a local minimum (``llc/not_minimum``) are counted next to each row: λ̂ there is no complexity.

    python examples/study/summary.py runs/study > docs/figures/study_summary.md
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from lightning_curvature.cli.report import find_runs, load_scalars, seed_of

LLC, TRACE, WBIC, NOT_MIN = "llc/lambda_hat", "curvature/trace", "llc/wbic", "llc/not_minimum"
VAL_LOSS, TRAIN_LOSS = "val/loss", "train/loss"
ALPHA = 0.05


@dataclass(frozen=True)
class Test:
    """One claim's statistic: ``effect`` ± ``se`` with ``t`` and two-sided ``p``."""

    effect: float
    se: float
    t: float
    p: float
    n: str  # e.g. "3 vs 3"

    def verdict(self, sign: int) -> str:
        if not math.isfinite(self.p) or self.p >= ALPHA:
            return "not significant"
        return "holds" if np.sign(self.effect) == sign else "opposite"

    def cell(self) -> str:
        return (
            f"{self.effect:+.4g} ± {self.se:.2g} (t = {self.t:.2f}, p = {self.p:.2g}; n {self.n})"
        )


def welch(a, b) -> Test:
    """Welch's unequal-variance t-test of mean(a) − mean(b) (Welch 1947)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]  # a run without that measurement
    if not len(a) or not len(b):
        return Test(math.nan, math.nan, math.nan, math.nan, f"{len(a)} vs {len(b)}")
    diff = a.mean() - b.mean()
    if len(a) < 2 or len(b) < 2:
        return Test(diff, math.nan, math.nan, math.nan, f"{len(a)} vs {len(b)}")
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    res = stats.ttest_ind(a, b, equal_var=False)
    return Test(diff, se, float(res.statistic), float(res.pvalue), f"{len(a)} vs {len(b)}")


def one_sample(values) -> Test:
    """t-test of mean(values) against 0."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return Test(
            float(v.mean()) if len(v) else math.nan, math.nan, math.nan, math.nan, str(len(v))
        )
    res = stats.ttest_1samp(v, 0.0)
    se = v.std(ddof=1) / math.sqrt(len(v))
    return Test(float(v.mean()), se, float(res.statistic), float(res.pvalue), str(len(v)))


def slope(x, y) -> Test:
    """Least-squares slope of y on x with its standard error and p (scipy.stats.linregress)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0:
        return Test(math.nan, math.nan, math.nan, math.nan, str(len(x)))
    res = stats.linregress(x, y)
    t = res.slope / res.stderr if res.stderr > 0 else math.inf
    return Test(float(res.slope), float(res.stderr), float(t), float(res.pvalue), str(len(x)))


# ---------------------------------------------------------------------------------- reading
def load_experiment(folder: Path) -> dict[str, dict]:
    """Run label (path below ``folder``) -> scalars."""
    out = {}
    for run in find_runs(folder):
        label = run.relative_to(folder).as_posix()
        if ".incomplete-" not in label:
            out[label] = load_scalars(run)
    return out


def last(scalars: dict, tag: str) -> float:
    series = scalars.get(tag)
    return series[1][-1] if series and series[1] else math.nan


def value_at(scalars: dict, tag: str, step: float) -> float:
    series = scalars.get(tag)
    if not series:
        return math.nan
    by = dict(zip(*series, strict=True))
    return by.get(step, math.nan)


def arms_of(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """Arm -> the runs of its seeds (labels ``<arm>_seed<k>``)."""
    arms: dict[str, list[dict]] = {}
    for label, scalars in sorted(runs.items()):
        arm, _ = seed_of(label)
        arms.setdefault(arm, []).append(scalars)
    return arms


def flagged(runs: list[dict]) -> int:
    """Runs whose last LLC measurement says w* is not a local minimum."""
    return sum(1 for r in runs if last(r, NOT_MIN) >= 0.5)


# ---------------------------------------------------------------------------------- claims
def claim1(save_dir: Path) -> list[str]:
    rows = []
    folder = save_dir / "sgd_vs_ngd"
    if not folder.exists():
        return rows
    for model_dir in sorted(
        p for p in folder.iterdir() if p.is_dir() and ".incomplete-" not in p.name
    ):
        arms = arms_of(load_experiment(model_dir))
        if "sgd" not in arms:
            continue
        damping = save_dir / "damping"
        if model_dir.name == "mlp256x256" and damping.exists():
            # the damping sweep's alpha 4 (Kaldi's default) runs: same model, data and epochs
            kaldi = arms_of(load_experiment(damping)).get("alpha4_eps1e-10")
            if kaldi:
                arms["online_ngd_alpha4"] = kaldi
        for ngd in ("online_ngd", "online_ngd_alpha4", "ngd", "ngd_paper"):
            if ngd not in arms:
                continue
            for tag, what in ((LLC, "λ̂"), (TRACE, "tr H")):
                test = welch([last(r, tag) for r in arms[ngd]], [last(r, tag) for r in arms["sgd"]])
                if not math.isfinite(test.effect):
                    continue  # not measured in these runs
                losses = (
                    np.mean([last(r, TRAIN_LOSS) for r in arms[ngd]]),
                    np.mean([last(r, TRAIN_LOSS) for r in arms["sgd"]]),
                )
                note = (
                    f"train loss {losses[0]:.3f} vs {losses[1]:.3f}; not-minimum flags "
                    f"{flagged(arms[ngd])}/{len(arms[ngd])} vs "
                    f"{flagged(arms['sgd'])}/{len(arms['sgd'])}"
                )
                rows.append(
                    f"| 1 | {model_dir.name}: {what}({ngd}) − {what}(sgd) > 0 | higher "
                    f"| {test.cell()} | {test.verdict(+1)} | {note} |"
                )
    return rows


def _damping_points(runs: dict[str, dict], fixed: str, value: str, varied: str):
    xs, ys, flags = [], [], 0
    for label, scalars in runs.items():
        arm, _ = seed_of(label)  # alpha<a>_eps<e>
        a, e = arm.removeprefix("alpha").split("_eps")
        params = {"alpha": a, "eps": e}
        if params[fixed] != value:
            continue
        xs.append(math.log10(float(params[varied])))
        ys.append(last(scalars, LLC))
        flags += last(scalars, NOT_MIN) >= 0.5
    return xs, ys, flags


def claim2(save_dir: Path) -> list[str]:
    folder = save_dir / "damping"
    if not folder.exists():
        return []
    runs = load_experiment(folder)
    rows = []
    for varied, fixed, value in (("alpha", "eps", "1e-10"), ("eps", "alpha", "1e-2")):
        xs, ys, flags = _damping_points(runs, fixed, value, varied)
        test = slope(xs, ys)
        rows.append(
            f"| 2 | d λ̂ / d log10 {varied} < 0 (at {fixed} {value}) | negative "
            f"| {test.cell()} | {test.verdict(-1)} | not-minimum flags {flags}/{len(xs)} |"
        )
    return rows


def split_deltas(save_dir: Path) -> dict[str, list[float]]:
    """Branch -> Δλ̂ per seed (λ̂ at the branch's end − the base's λ̂ at the split)."""
    deltas: dict[str, list[float]] = {}
    folder = save_dir / "split"
    if not folder.exists():
        return deltas
    for seed_dir in sorted(
        p for p in folder.iterdir() if p.is_dir() and ".incomplete-" not in p.name
    ):
        runs = load_experiment(seed_dir)
        if "base" not in runs:
            continue
        at_split = last(runs["base"], LLC)
        for branch, scalars in runs.items():
            if branch != "base":
                deltas.setdefault(branch, []).append(last(scalars, LLC) - at_split)
    return deltas


def claim3(save_dir: Path) -> list[str]:
    d = split_deltas(save_dir)
    rows = []
    pairs = [
        ("online_ngd", "sgd"),
        ("online_ngd", "sgd_lr4x"),
        ("online_ngd_lr10x", "online_ngd"),
        ("ngd", "sgd"),
    ]
    for a, b in pairs:
        if a in d and b in d:
            test = welch(d[a], d[b])
            rows.append(
                f"| 3 | Δλ̂({a}) − Δλ̂({b}) > 0 after the split | higher | {test.cell()} "
                f"| {test.verdict(+1)} | Δλ̂ {a} {np.mean(d[a]):+.4g}, {b} {np.mean(d[b]):+.4g} |"
            )
    if "sgd" in d:
        test = one_sample(d["sgd"])
        rows.append(
            f"| 3 | Δλ̂(sgd) ≈ 0 (SGD steady) | steady | {test.cell()} "
            f"| {'not rejected' if test.verdict(+1) == 'not significant' else 'rejected'} | |"
        )
    return rows


def overfit_slopes(scalars: dict, tag: str) -> tuple[float, int] | None:
    """Slope per epoch of ``tag`` after the validation-loss minimum, and the points used."""
    if VAL_LOSS not in scalars or tag not in scalars:
        return None
    steps, losses = scalars[VAL_LOSS]
    start = steps[int(np.argmin(losses))]
    x, y = scalars[tag]
    pts = [(s, v) for s, v in zip(x, y, strict=True) if s >= start]
    if len(pts) < 3:
        return None
    xs, ys = zip(*pts, strict=True)
    return float(stats.linregress(xs, ys).slope), len(pts)


def claim4(save_dir: Path) -> list[str]:
    folder = save_dir / "overfit"
    if not folder.exists():
        return []
    rows = []
    for arm, runs in sorted(arms_of(load_experiment(folder)).items()):
        rises = [last(r, VAL_LOSS) - min(r[VAL_LOSS][1]) for r in runs if VAL_LOSS in r]
        for tag, what in ((LLC, "λ̂"), (WBIC, "WBIC"), (TRACE, "tr H")):
            fits = [s for s in (overfit_slopes(r, tag) for r in runs) if s is not None]
            if not fits:
                rows.append(
                    f"| 4 | {arm}: {what} rises while val loss rises | rises | no "
                    "over-fitting phase with ≥ 3 measurements | – | "
                    f"val loss rise {np.mean(rises):.3f} |"
                )
                continue
            test = one_sample([f[0] for f in fits])
            rows.append(
                f"| 4 | {arm}: d {what} / d epoch > 0 after the val-loss minimum | rises "
                f"| {test.cell()} | {test.verdict(+1)} | val loss rise {np.mean(rises):.3f}, "
                f"{np.mean([f[1] for f in fits]):.0f} points per run |"
            )
    return rows


def summarize(save_dir: str | Path) -> str:
    save_dir = Path(save_dir)
    header = [
        "| # | claim (ours tests) | published | ours: effect ± SE (t, p; n) | verdict | notes |",
        "|---|---|---|---|---|---|",
    ]
    rows = claim1(save_dir) + claim2(save_dir) + claim3(save_dir) + claim4(save_dir)
    intro = [
        "# Seed-002 study: the published claims against our runs",
        "",
        f"Verdict: the published sign at p < {ALPHA} (holds), the other sign at p < {ALPHA} "
        "(opposite), else not significant. Generated by examples/study/summary.py.",
        "",
    ]
    return "\n".join([*intro, *header, *rows, ""])


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "runs/study"))
