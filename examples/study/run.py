"""Run the seed-002 study (docs/results.md): all of it, or one experiment, resumably.

    python examples/study/run.py                       # calibrate + all four experiments
    python examples/study/run.py split overfit         # some experiments
    python examples/study/run.py sgd_vs_ngd --models mlp256x256 --jobs 2
    python examples/study/run.py --dry-run             # print the commands only

Runs execute as ``python -m lightning_curvature ...`` subprocesses, ``--jobs`` at a time
(by priority, longest first), each with ``--threads`` torch threads. A finished run leaves
``study_run.json`` (command, wall time) in its folder and is skipped next time, so the study can
be run piecewise; a folder without it (an interrupted run) is moved aside to
``<folder>.incomplete-<k>``, never deleted. Afterwards every experiment gets a ``report``
(figure + table in ``--figures``) and :mod:`summary` writes the claim table
``<figures>/study_summary.md``. ``--override`` arguments are appended to every run (e.g.
``--override=--trainer.max_epochs=2``), for smoke runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plan as study_plan  # noqa: E402
import summary as study_summary  # noqa: E402

MARKER = "study_run.json"


def run_folder(save_dir: Path, run: study_plan.Run) -> Path:
    return save_dir / run.experiment / run.name


def set_aside(folder: Path) -> Path | None:
    """Move an interrupted run's folder to ``<folder>.incomplete-<k>`` (nothing is deleted)."""
    if not folder.exists() and not folder.is_symlink():
        return None
    k = 0
    while (target := folder.with_name(f"{folder.name}.incomplete-{k}")).exists():
        k += 1
    folder.rename(target)
    return target


def _link(save_dir: Path, run: study_plan.Run) -> str:
    folder = run_folder(save_dir, run)
    target = save_dir / run.link_to
    if folder.is_symlink() or folder.exists():
        return "exists"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(os.path.relpath(target, folder.parent), target_is_directory=True)
    return "linked"


def execute(
    run: study_plan.Run, save_dir: Path, threads: int, override: list[str], logs: Path
) -> tuple[str, float]:
    """Run one command unless already done; returns (status, wall seconds)."""
    folder = run_folder(save_dir, run)
    if (folder / MARKER).exists():
        return "done before", 0.0
    moved = set_aside(folder)
    if moved is not None:
        print(f"[study] {run.experiment}/{run.name}: interrupted run moved to {moved}", flush=True)
    argv = [sys.executable, "-m", "lightning_curvature", *run.argv, *override]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    log = logs / f"{run.experiment}__{run.name.replace('/', '__')}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        return f"FAILED (exit {rc}, log {log})", seconds
    record = {"command": shlex.join(argv[1:]), "wall_s": round(seconds, 1), "threads": threads}
    (folder / MARKER).write_text(json.dumps(record, indent=1))
    return "ran", seconds


def _seed(name: str) -> int:
    return study_summary.seed_of(name)[1] or 0


def run_all(
    runs: list[study_plan.Run],
    save_dir: Path,
    jobs: int,
    threads: int,
    override: list[str],
    order: str = "cost",
) -> dict[str, float]:
    """Execute ``runs`` (longest first, then links); wall seconds per experiment (summed)."""
    logs = save_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    real = [r for r in runs if r.link_to is None]
    if order == "seed":  # every arm's seed 0 first: partial results stay comparable
        real.sort(key=lambda r: (r.priority, _seed(r.name), -r.cost))
    else:
        real.sort(key=lambda r: (r.priority, -r.cost))
    spent: dict[str, float] = {}
    failures = []

    def one(run: study_plan.Run) -> None:
        status, seconds = execute(run, save_dir, threads, override, logs)
        spent[run.experiment] = spent.get(run.experiment, 0.0) + seconds
        print(f"[study] {run.experiment}/{run.name}: {status} ({seconds:.0f} s)", flush=True)
        if status.startswith("FAILED"):
            failures.append(f"{run.experiment}/{run.name}: {status}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, real))
    for run in runs:
        if run.link_to is not None:
            print(f"[study] {run.experiment}/{run.name}: {_link(save_dir, run)} -> {run.link_to}")
    if failures:
        raise SystemExit("study runs failed:\n  " + "\n  ".join(failures))
    return spent


def report(save_dir: Path, figures: Path, experiments: list[str], models) -> None:
    """``lightning-curvature report`` per experiment (per model for sgd_vs_ngd)."""
    targets = []
    for exp in experiments:
        if exp == "sgd_vs_ngd":
            targets += [
                (save_dir / exp / m, f"study_{exp}_{m}", f"{exp}: {m}")
                for m in models
                if (save_dir / exp / m).exists()
            ]
        elif (save_dir / exp).exists():
            targets.append((save_dir / exp, f"study_{exp}", exp))
    figures.mkdir(parents=True, exist_ok=True)
    for logdir, stem, title in targets:
        argv = [
            sys.executable,
            "-m",
            "lightning_curvature",
            "report",
            str(logdir),
            "--output",
            str(figures / f"{stem}.png"),
            "--table",
            str(figures / f"{stem}.md"),
            "--title",
            f"study {title} (Fashion-MNIST)",
        ]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "experiments",
        nargs="*",
        default=["calibrate", *study_plan.EXPERIMENTS],
        help=f"calibrate and/or {', '.join(study_plan.EXPERIMENTS)} (default: all)",
    )
    p.add_argument("--models", default=",".join(study_plan.MODELS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: CPU cores // jobs, at least 1)",
    )
    p.add_argument("--save-dir", type=Path, default=Path("runs/study"))
    p.add_argument("--figures", type=Path, default=Path("docs/figures"))
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra argument appended to every run (repeatable)",
    )
    p.add_argument(
        "--order",
        choices=("cost", "seed"),
        default="cost",
        help="cost: longest runs first (shortest wall time); seed: all arms' seed 0 first",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.add_argument("--no-report", action="store_true", help="skip reports and summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in study_plan.MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(study_plan.MODELS)}")
    experiments = [e for e in args.experiments if e != "calibrate"]
    runs = study_plan.plan(experiments, args.save_dir, models)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.dry_run:
        for run in runs:
            what = (
                f"link -> {run.link_to}"
                if run.link_to
                else shlex.join(["python", "-m", "lightning_curvature", *run.argv, *args.override])
            )
            print(f"{run.experiment}/{run.name}: {what}")
        return 0
    start = time.perf_counter()
    if "calibrate" in args.experiments:
        import calibrate

        t = time.perf_counter()
        calibrate.main(["--models", ",".join(models), "--out", str(args.save_dir / "calibration")])
        print(f"[study] calibrate: {time.perf_counter() - t:.0f} s", flush=True)
    spent = run_all(runs, args.save_dir, args.jobs, threads, args.override, args.order)
    if not args.no_report:
        report(args.save_dir, args.figures, experiments, models)
        text = study_summary.summarize(args.save_dir)
        (args.figures / "study_summary.md").write_text(text)
        print(text)
    for exp, seconds in spent.items():
        print(f"[study] {exp}: {seconds:.0f} s of run time (summed over runs)")
    print(f"[study] wall time: {time.perf_counter() - start:.0f} s with {args.jobs} jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
