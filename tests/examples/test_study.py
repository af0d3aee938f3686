"""The seed-002 study's machinery: its planned runs parse, resume is safe, the claim statistics
are right (against formulas written out here, not scipy's)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "study"))

import plan  # noqa: E402
import run as runner  # noqa: E402
import summary  # noqa: E402


# ------------------------------------------------------------------------------------ plan
def test_plan_covers_the_issue_design():
    runs = plan.plan()
    names = {(r.experiment, r.name) for r in runs}
    assert len(names) == len(runs), "a run is planned twice"
    by_exp = {e: [r for r in runs if r.experiment == e] for e in plan.EXPERIMENTS}
    # >= 3 seeds per arm on the 2x256 MLP and LeNet-5; every model has SGD, online and exact NGD
    for model in plan.MODELS:
        for arm in plan.ARMS:
            seeds = [r for r in by_exp["sgd_vs_ngd"] if r.name.startswith(f"{model}/{arm}_seed")]
            assert len(seeds) >= (3 if model in ("mlp256x256", "lenet5") else 2), (model, arm)
    # the full alpha grid at eps 1e-10 and the eps grid at alpha 1e-2, 3 seeds each
    arms = {summary.seed_of(r.name)[0] for r in by_exp["damping"]}
    assert arms == {f"alpha{a}_eps1e-10" for a in plan.ALPHAS} | {
        f"alpha1e-2_eps{e}" for e in plan.EPSILONS
    }
    links = [r for r in by_exp["damping"] if r.link_to]
    assert {r.link_to for r in links} == {
        f"sgd_vs_ngd/mlp256x256/online_ngd_seed{k}" for k in range(3)
    }
    assert len(by_exp["split"]) == 3 and len(by_exp["overfit"]) == 6


def test_plan_rejects_unknown_experiment():
    with pytest.raises(ValueError, match="unknown experiment"):
        plan.plan(["sgd_vs_ngd", "nope"])


def _parse(argv, monkeypatch):
    from lightning_curvature.cli.base import CurvatureCLI
    from lightning_curvature.cli.split import SplitCLI

    monkeypatch.chdir(ROOT)
    command, rest = argv[0], list(argv[1:])
    if command == "split":
        return SplitCLI(rest).root_config
    cli = CurvatureCLI(args=rest, run=False, save_config_callback=None)
    return cli.model, cli.datamodule, cli.trainer


def test_every_arm_model_split_and_overfit_config_parses(monkeypatch, tmp_path):
    runs = plan.plan(save_dir=tmp_path)
    picked, seen = [], set()
    for r in runs:  # one run per distinct config combination
        key = tuple(a for a in r.argv if a.endswith(".yaml")) + tuple(
            a for a in r.argv if a.startswith("1e") or a == "4"
        )
        if r.link_to is None and key not in seen:
            seen.add(key)
            picked.append(r)
    assert len(picked) >= 15 + 5 + 1 + 2
    for r in picked:
        parsed = _parse(r.argv, monkeypatch)
        if r.experiment == "split":
            assert parsed.split.split_epoch == 10 and parsed.trainer.max_epochs == 20
            assert set(parsed.split.branches) == {
                "sgd", "sgd_lr4x", "online_ngd", "online_ngd_lr10x", "ngd"
            }  # fmt: skip
            continue
        model, data, trainer = parsed
        assert data.batch_size == 128 and data.val_size == 5000
        assert trainer.logger.log_dir == str(tmp_path / r.experiment / r.name)
        if r.experiment == "overfit":
            assert data.train_subset == 1000 and trainer.max_epochs == 200
        else:
            assert data.train_subset is None  # the full 55,000 training images
        arm = r.tags.get("arm")
        if arm == "online_ngd" and r.experiment == "sgd_vs_ngd":
            h = model.hparams
            assert (h.optimizer, h.lr, h.alpha, h.eps) == ("online_ngd", 0.01, 0.01, 1e-10)
        if r.experiment == "damping":
            assert model.hparams.alpha == float(r.tags["alpha"])
            assert model.hparams.eps == float(r.tags["eps"])


# ---------------------------------------------------------------------------------- runner
def test_interrupted_run_is_moved_aside_never_deleted(tmp_path):
    folder = tmp_path / "exp" / "a_seed0"
    folder.mkdir(parents=True)
    (folder / "events.out.tfevents.1").write_text("partial")
    first = runner.set_aside(folder)
    folder.mkdir()
    second = runner.set_aside(folder)
    assert first.name == "a_seed0.incomplete-0" and second.name == "a_seed0.incomplete-1"
    assert (first / "events.out.tfevents.1").read_text() == "partial"
    assert runner.set_aside(folder) is None  # nothing there any more


def test_finished_run_is_skipped(tmp_path):
    run = plan.Run("exp", "a_seed0", ("fit", "--this-would-fail"))
    folder = runner.run_folder(tmp_path, run)
    folder.mkdir(parents=True)
    (folder / runner.MARKER).write_text("{}")
    assert runner.execute(run, tmp_path, 1, [], tmp_path) == ("done before", 0.0)


def test_failed_run_reports_its_log_and_writes_no_marker(tmp_path):
    run = plan.Run("exp", "bad_seed0", ("fit", "--no-such-option"))
    status, _ = runner.execute(run, tmp_path, 1, [], tmp_path)
    assert status.startswith("FAILED") and "exp__bad_seed0.log" in status
    assert not (runner.run_folder(tmp_path, run) / runner.MARKER).exists()


def test_link_run_points_at_the_shared_run(tmp_path):
    target = tmp_path / "sgd_vs_ngd" / "m" / "online_ngd_seed0"
    target.mkdir(parents=True)
    run = plan.Run(
        "damping", "alpha1e-2_eps1e-10_seed0", (), link_to="sgd_vs_ngd/m/online_ngd_seed0"
    )
    assert runner._link(tmp_path, run) == "linked"
    assert (tmp_path / "damping" / run.name).resolve() == target.resolve()
    assert runner._link(tmp_path, run) == "exists"


# ------------------------------------------------------------------------------- statistics
def _welch_by_hand(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, dof


def test_welch_matches_the_formula():
    a, b = [3.1, 2.7, 3.9, 3.3], [2.0, 2.4, 1.1]
    test = summary.welch(a, b)
    t, dof = _welch_by_hand(a, b)
    assert test.t == pytest.approx(t, rel=1e-12)
    assert test.effect == pytest.approx(np.mean(a) - np.mean(b))
    # p from the t distribution with Welch-Satterthwaite dof, by numerical integration
    from scipy.integrate import quad

    def density(x):
        return (1 + x * x / dof) ** (-(dof + 1) / 2)

    tail = quad(density, abs(t), np.inf)[0] / quad(density, -np.inf, np.inf)[0]
    assert test.p == pytest.approx(2 * tail, rel=1e-6)
    assert test.verdict(+1) == ("holds" if test.p < 0.05 else "not significant")


def test_slope_of_exact_line_and_verdicts():
    x = np.log10([4, 1e-1, 1e-2, 1e-3])
    rng = np.random.default_rng(0)
    y = 100 - 30 * x + rng.normal(0, 1, 4)
    test = summary.slope(x, y)
    xm, ym = x.mean(), y.mean()
    b = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    assert test.effect == pytest.approx(b)
    assert test.verdict(-1) == "holds" and test.verdict(+1) == "opposite"
    assert summary.slope([1, 1, 1], [1, 2, 3]).verdict(-1) == "not significant"


def _write_run(folder: Path, series: dict[str, list[tuple[int, float]]]):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_claims_from_logged_runs(tmp_path):
    save = tmp_path / "study"
    # claim 1: online NGD's λ̂ clearly above SGD's on one model
    for k, (s, n) in enumerate([(100, 200), (110, 205), (95, 198)]):
        _write_run(save / "sgd_vs_ngd" / "m" / f"sgd_seed{k}", {summary.LLC: [(10, s)]})
        _write_run(save / "sgd_vs_ngd" / "m" / f"online_ngd_seed{k}", {summary.LLC: [(10, n)]})
    rows = summary.claim1(save)
    assert len(rows) == 1 and "| holds |" in rows[0] and "n 3 vs 3" in rows[0]
    # claim 4: λ̂ rises only after the validation minimum at epoch 20
    for k in range(3):
        val = [(e, 1.0 - 0.01 * e if e <= 20 else 0.8 + 0.01 * (e - 20)) for e in range(0, 61, 10)]
        llc = [(e, 50.0 if e <= 20 else 50.0 + (2 + k) * (e - 20)) for e in range(0, 61, 10)]
        _write_run(save / "overfit" / f"sgd_seed{k}", {summary.VAL_LOSS: val, summary.LLC: llc})
    slope_, points = summary.overfit_slopes(
        summary.load_scalars(save / "overfit" / "sgd_seed0"), summary.LLC
    )
    assert points == 5  # epochs 20..60
    xs, ys = np.array([20, 30, 40, 50, 60.0]), np.array([50, 70, 90, 110, 130.0])
    assert slope_ == pytest.approx(
        ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
    )
    rows4 = summary.claim4(save)
    assert any("sgd: d λ̂ / d epoch" in r and "| holds |" in r for r in rows4)
    text = summary.summarize(save)
    assert text.count("\n| 1 |") == 1 and "| 4 |" in text
