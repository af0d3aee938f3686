"""``report``: per-run table with measurement epochs, seed aggregation, Welch's t, flags."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from torch.utils.tensorboard import SummaryWriter

from lightning_curvature.cli import RunsNotFoundError, load_scalars, main, make_report
from lightning_curvature.cli.report import REPORT_PANELS, _draw, group_seeds, seed_of


def _write_run(path, series: dict[str, dict[int, float]]) -> None:
    writer = SummaryWriter(str(path))
    for tag, values in series.items():
        for step, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def test_report_on_handwritten_event_files(tmp_path):
    logdir = tmp_path / "logs"
    for name, offset in (("a", 0.0), ("b", 1.0)):
        writer = SummaryWriter(str(logdir / name))
        for epoch in range(4):
            writer.add_scalar("llc/lambda_hat", 10 + offset + epoch, epoch)
            writer.add_scalar("llc/lambda_hat_std", 0.5, epoch)
            writer.add_scalar("curvature/trace", 100 * (1 + offset), epoch)
            writer.add_scalar("curvature/trace_stderr", 2.0, epoch)
            writer.add_scalar("val/loss", 1.0 / (epoch + 1), epoch + 1)
        writer.add_scalar("curvature/lambda_max", 7.0, 2)  # measured less often
        writer.add_scalar("curvature/lambda_min", -0.25, 2)
        writer.add_scalar("val/loss", 0.125, 2)  # a rewritten step: the last value wins
        writer.close()
    (logdir / "c").symlink_to(logdir / "a", target_is_directory=True)  # linked runs count too
    png, markdown = make_report(logdir, output=tmp_path / "r.png", table=tmp_path / "r.md")
    assert png == tmp_path / "r.png" and png.is_file()
    assert (tmp_path / "r.md").read_text() == markdown
    row_b = next(line for line in markdown.splitlines() if line.startswith("| b |"))
    cells = [c.strip() for c in row_b.split("|")[1:-1]]
    # each cell says the epoch of its own last measurement
    assert cells[:3] == ["b", "14 ± 0.5 (e3)", "–"]  # run, λ̂ ± std, no WBIC logged
    assert cells[3] == "200 ± 2 (e3)" and cells[4] == "7 (e2)" and cells[5] == "-0.25 (e2)"
    assert cells[7] == "0.25 (e4)"
    assert load_scalars(logdir / "a")["val/loss"][1][1] == 0.125
    labels = [line.split("|")[1].strip() for line in markdown.splitlines()[2:] if line]
    assert labels == ["a", "b", "c"]
    assert "Welch" not in markdown  # no seeds, no test


def test_lambda_max_and_min_share_one_panel():
    tags = [{s.tag for s in panel.series} for panel in REPORT_PANELS]
    assert {"curvature/lambda_max", "curvature/lambda_min"} in tags


def test_single_measurement_is_drawn_with_its_error_bar():
    from matplotlib.container import ErrorbarContainer
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    _draw(ax, np.array([3.0]), np.array([5.0]), np.array([0.5]), "C0", "-", "one", thin=False)
    (container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = container.lines[2][0].get_segments()
    np.testing.assert_allclose(segments[0], [[3.0, 4.5], [3.0, 5.5]])


@pytest.mark.parametrize(
    ("label", "expected"),
    [("sgd/seed1", ("sgd", 1)), ("sgd_seed12", ("sgd", 12)), ("seed3/ngd", ("ngd", 3)),
     ("split/seed2/base", ("split/base", 2)), ("ngd-seed0", ("ngd", 0)),
     ("plain", ("plain", None)), ("seeds/x", ("seeds/x", None))],
)  # fmt: skip
def test_seed_naming_convention(label, expected):
    assert seed_of(label) == expected


def test_report_aggregates_seeds_with_standard_errors_and_welch_t(tmp_path, capsys):
    logdir = tmp_path / "study"
    finals = {"sgd": [1.0, 1.5, 1.1], "ngd": [2.0, 2.6, 2.9, 2.2]}
    for arm, values in finals.items():
        for k, final in enumerate(values):
            name = f"{arm}/seed{k}" if arm == "sgd" else f"{arm}_seed{k}"
            flag = {0: 0.0, 1: 1.0 if (arm, k) == ("ngd", 1) else 0.0}
            _write_run(logdir / name, {"llc/lambda_hat": {0: 0.5, 1: final},
                                       "llc/not_minimum": flag,
                                       "val/loss": {1: 0.1 * final, 2: 0.05 * final}})
    assert group_seeds(["sgd/seed0", "sgd/seed1", "ngd_seed0", "base"]) == {
        "sgd": [0, 1], "ngd": [2], "base": [3]}  # fmt: skip
    assert main(["report", str(logdir), "--output", str(tmp_path / "o.png")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "o.png").is_file() and (logdir / "report.md").read_text() in out
    lines = out.splitlines()

    def mean_se(v):
        v = np.asarray(v)
        return v.mean(), math.sqrt(((v - v.mean()) ** 2).sum() / (len(v) - 1) / len(v))

    for arm, values in finals.items():
        row = next(r for r in lines if r.startswith(f"| {arm} |"))
        m, se = mean_se(values)
        assert row.split("|")[2].strip() == f"{m:.4g} ± {se:.2g} (n={len(values)}, e1)"
    # Welch's t from its formula (Welch 1947), p from the t distribution with Welch-Satterthwaite df
    a, b = np.array(finals["ngd"]), np.array(finals["sgd"])  # arms in label order
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p = 2 * stats.t.sf(abs(t), df)
    welch = next(r for r in lines if r.startswith("| λ̂ | ngd | sgd |"))
    cells = [c.strip() for c in welch.split("|")[1:-1]]
    assert cells[3:] == [f"{a.mean() - b.mean():.4g}", f"{t:.4g}", f"{p:.4g}"]
    # the flagged measurement is marked in its run's row and explained
    flagged = next(r for r in lines if r.startswith("| ngd_seed1 |"))
    assert "2.6 * (e1)" in flagged and "llc/not_minimum = 1" in out
    assert "*" not in next(r for r in lines if r.startswith("| ngd_seed0 |")).split("|")[2]


def test_report_user_errors(tmp_path, capsys):
    with pytest.raises(RunsNotFoundError, match="no TensorBoard event files"):
        make_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"lightning-curvature report: error: {tmp_path / 'missing'}: no such " \
        "directory"
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path), "--title", "T", "--print_config"])
    assert info.value.code in (0, None)
    assert "title: T" in capsys.readouterr().out
