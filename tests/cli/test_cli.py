"""End-to-end CLI: fit, --print_config, split and report on a tiny synthetic dataset."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from lightning_curvature.cli import CurvatureCLI, load_scalars, main, make_report, run_split

ROOT = Path(__file__).resolve().parents[2]
HAS_NGD = importlib.util.find_spec("lightning_curvature.optim.ngd") is not None


_SUITE_NEEDS = {
    "callbacks": ("HessianTrace", "HessianEigenvalues", "OptimizerMonitor", "CurvatureDashboard"),
    "curvature": ("hutchpp_trace", "extreme_eigenpairs", "spectral_density"),
    "sampling": ("estimate_llc",),
    "landscape": ("loss_surface", "random_directions"),
}


def _importable(layer: str, names=()) -> bool:
    try:
        module = importlib.import_module(f"lightning_curvature.{layer}")
    except ImportError:
        return False
    return all(hasattr(module, n) for n in names)


def _callbacks_ready() -> bool:
    """The callback suite and the engine functions it calls have landed."""
    return all(_importable(layer, names) for layer, names in _SUITE_NEEDS.items())


def test_fit_trains_logs_on_epoch_axis_and_saves_config(make_config, tmp_path):
    config = make_config("fit")
    assert main(["fit", "--config", config]) == 0
    run = tmp_path / "runs" / "fit" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["model"]["class_path"] == "lightning_curvature.models.MLP"
    assert saved["data"]["val_size"] == 60
    scalars = load_scalars(run)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert scalars[tag][0] == [1.0, 2.0], tag  # x = completed epochs
    assert scalars["train/loss"][1][1] < scalars["train/loss"][1][0]


def test_print_config_resolves_model_class_path(make_config, capsys):
    config = make_config("printed", model={"lr": 0.3})
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", config, "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["lr"] == 0.3
    assert printed["model"]["model"]["init_args"]["hidden_sizes"] == [16]
    assert printed["split"] is None


def test_lenet_from_yaml(make_config):
    config = make_config(
        "lenet",
        model={"model": {"class_path": "lightning_curvature.models.LeNet5"}, "lr": 0.05},
        trainer={"max_epochs": 1},
    )
    cli = CurvatureCLI(["--config", config], run=False)
    assert type(cli.model.model).__name__ == "LeNet5"
    assert sum(p.numel() for p in cli.model.parameters()) == 61_706


def _reference_val_losses(make_config, epochs: int) -> list[float]:
    config = make_config("reference", trainer={"max_epochs": epochs})
    main(["fit", "--config", config])
    run = Path(yaml.safe_load(open(config))["trainer"]["logger"]["init_args"]["save_dir"])
    return load_scalars(run / "reference" / "version_0")["val/loss"][1]


def test_split_branches_continue_from_the_same_weights_and_data(make_config, tmp_path):
    branches = {"sgd": {"optimizer": "sgd"}, "sgd_lr2x": {"optimizer": "sgd", "lr": 0.2}}
    if HAS_NGD:
        branches["ngd"] = {"optimizer": "ngd", "lr": 0.05, "alpha": 0.1, "eps": 1e-8}
    config = make_config("split", trainer={"max_epochs": 3}, split={"branches": branches})
    assert main(["split", "--config", config, "--split_epoch", "1"]) == 0
    root = tmp_path / "runs" / "split"
    assert (root / "base" / "split_epoch=1.ckpt").is_file()
    runs = {name: load_scalars(root / name) for name in ["base", *branches]}
    assert runs["base"]["val/loss"][0] == [1.0]
    for name in branches:
        assert runs[name]["val/loss"][0] == [2.0, 3.0], name  # epoch axis continues from 1
        assert (root / name / "config.yaml").is_file()
        assert "hp_metric" not in runs[name]  # the config's logger settings carry over
    # continued SGD equals an uninterrupted SGD run: same weights, same batches in the same order
    reference = _reference_val_losses(make_config, 3)
    assert runs["base"]["val/loss"][1][0] == pytest.approx(reference[0], rel=1e-6)
    assert runs["sgd"]["val/loss"][1] == pytest.approx(reference[1:], rel=1e-6)
    assert runs["sgd_lr2x"]["val/loss"][1][0] != pytest.approx(reference[1], rel=1e-3)
    saved = yaml.safe_load((root / "sgd_lr2x" / "config.yaml").read_text())
    assert saved["model"]["lr"] == 0.2 and saved["model"]["restore_optimizer_state"] is False
    if HAS_NGD:
        assert runs["ngd"]["ngd/kappa"][0] == [2.0, 3.0]
        assert "ngd/kappa" not in runs["sgd"]
    # report over the split: one PNG and one table row per run
    png, markdown = make_report(root)
    assert png.is_file() and png.stat().st_size > 10_000
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert sorted(r.split("|")[1].strip() for r in rows) == sorted(["base", *branches])
    sgd_row = next(r for r in rows if r.startswith("| sgd |"))
    assert sgd_row.split("|")[2].strip() == "3"
    assert f"{runs['sgd']['val/loss'][1][-1]:.4g}" in sgd_row


@pytest.mark.parametrize(
    ("section", "match"),
    [({"split_epoch": 0}, "split_epoch"),
     ({"split_epoch": 2}, "max_epochs"),
     ({"split_epoch": 1, "branches": {"sgd": {"learning_rate": 1}}}, "learning_rate"),
     ({"split_epoch": 1, "base": {"optimizer": "ngd"}}, "base"),
     ({"split_epoch": 1, "branches": {"base": {}}}, "base")],
)  # fmt: skip
def test_split_rejects_bad_settings(make_config, section, match):
    config = make_config("bad", trainer={"max_epochs": 2}, split=section)
    with pytest.raises(ValueError, match=match):
        run_split(config)


def test_report_on_handwritten_event_files(tmp_path):
    logdir = tmp_path / "logs"
    for name, offset in (("a", 0.0), ("b", 1.0)):
        writer = SummaryWriter(str(logdir / name))
        for epoch in range(4):
            writer.add_scalar("llc/lambda_hat", 10 + offset + epoch, epoch)
            writer.add_scalar("llc/lambda_hat_std", 0.5, epoch)
            writer.add_scalar("curvature/trace", 100 * (1 + offset), epoch)
            writer.add_scalar("curvature/trace_stderr", 2.0, epoch)
            writer.add_scalar("curvature/lambda_max", 7.0, epoch)
            writer.add_scalar("curvature/lambda_min", -0.25, epoch)
            writer.add_scalar("val/loss", 1.0 / (epoch + 1), epoch)
        writer.add_scalar("val/loss", 0.125, 2)  # a rewritten step: the last value wins
        writer.close()
    (logdir / "c").symlink_to(logdir / "a", target_is_directory=True)  # linked runs count too
    png, markdown = make_report(logdir, output=tmp_path / "r.png", table=tmp_path / "r.md")
    assert png == tmp_path / "r.png" and png.is_file()
    assert (tmp_path / "r.md").read_text() == markdown
    row_b = next(line for line in markdown.splitlines() if line.startswith("| b |"))
    cells = [c.strip() for c in row_b.split("|")[1:-1]]
    assert cells[:4] == ["b", "3", "14 ± 0.5", "–"]  # run, epoch, λ̂ ± std, no WBIC logged
    assert cells[4] == "200 ± 2" and cells[5] == "7" and cells[6] == "-0.25"
    assert load_scalars(logdir / "a")["val/loss"][1][2] == 0.125
    labels = [line.split("|")[1].strip() for line in markdown.splitlines()[2:]]
    assert labels == ["a", "b", "c"]


def test_report_without_runs_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        make_report(tmp_path)


def test_help_and_unknown_command(capsys):
    assert main([]) == 0
    assert "split" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_curvature", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "report" in result.stdout


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse(path, capsys):
    text = path.read_text()
    if "lightning_curvature.callbacks" in text and not _importable(
        "callbacks", _SUITE_NEEDS["callbacks"]
    ):
        pytest.skip("callbacks not available yet")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(path), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["dataset"] in ("mnist", "fashion_mnist")


@pytest.mark.skipif(not _callbacks_ready(), reason="callbacks / engine not available yet")
def test_fit_with_callbacks_logs_curvature(make_config, tmp_path):
    callbacks = [
        {"class_path": "lightning_curvature.callbacks.HessianTrace",
         "init_args": {"num_samples": 64, "num_matvecs": 6, "measure_on_train_start": True}},
        {"class_path": "lightning_curvature.callbacks.HessianEigenvalues",
         "init_args": {"num_samples": 64, "max_iters": 30}},
        {"class_path": "lightning_curvature.callbacks.OptimizerMonitor"},
    ]  # fmt: skip
    config = make_config("cb", callbacks=callbacks)
    assert main(["fit", "--config", config]) == 0
    scalars = load_scalars(tmp_path / "runs" / "cb" / "version_0")
    assert scalars["curvature/trace"][0] == [0.0, 1.0, 2.0]
    # the eigenvalue callback may skip an epoch it could not resolve; what it logs is on this axis
    assert scalars["curvature/lambda_max"][0] and set(scalars["curvature/lambda_max"][0]) <= {1, 2}
    assert scalars["optim/update_norm"][0] == [1.0, 2.0]
    assert scalars["val/loss"][0] == [1.0, 2.0]  # same axis as the callbacks
    png, _ = make_report(tmp_path / "runs" / "cb")
    assert png.is_file()
