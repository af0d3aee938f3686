"""End-to-end CLI: fit, --print_config, split (overrides, no clobbering) on tiny synthetic data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_curvature.cli import (
    CLIError,
    CurvatureCLI,
    load_scalars,
    main,
    make_report,
    run_split,
)

ROOT = Path(__file__).resolve().parents[2]


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("lightning-curvature")]


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
    assert printed["split"]["split_epoch"] is None  # the typed section, defaults filled in


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
    branches = {
        "sgd": {"optimizer": "sgd"},
        "sgd_lr2x": {"optimizer": "sgd", "lr": 0.2},
        "ngd": {"optimizer": "ngd", "lr": 0.05, "alpha": 0.1, "eps": 1e-8},
        "online_ngd": {"optimizer": "online_ngd", "lr": 0.05, "alpha": 0.01},
    }
    monitor = [{"class_path": "lightning_curvature.callbacks.OptimizerMonitor"}]
    config = make_config(
        "split", callbacks=monitor, trainer={"max_epochs": 3}, split={"branches": branches}
    )
    assert main(["split", "--config", config, "--split_epoch", "1"]) == 0
    root = tmp_path / "runs" / "split"
    ckpt = root / "base" / "split_epoch=1.ckpt"
    assert ckpt.is_file()
    runs = {name: load_scalars(root / name) for name in ["base", *branches]}
    assert runs["base"]["val/loss"][0] == [1.0]
    for name in branches:
        assert runs[name]["val/loss"][0] == [2.0, 3.0], name  # epoch axis continues from 1
        assert "hp_metric" not in runs[name]  # the config's logger settings carry over
    # continued SGD equals an uninterrupted SGD run: same weights, same batches in the same order
    reference = _reference_val_losses(make_config, 3)
    assert runs["base"]["val/loss"][1][0] == pytest.approx(reference[0], rel=1e-6)
    assert runs["sgd"]["val/loss"][1] == pytest.approx(reference[1:], rel=1e-6)
    assert runs["sgd_lr2x"]["val/loss"][1][0] != pytest.approx(reference[1], rel=1e-3)
    # stored with the runs: each resolved config, the split epoch, the base checkpoint
    saved = yaml.safe_load((root / "sgd_lr2x" / "config.yaml").read_text())
    assert saved["model"]["lr"] == 0.2 and saved["model"]["restore_optimizer_state"] is False
    hparams = yaml.safe_load((root / "sgd_lr2x" / "hparams.yaml").read_text())
    assert hparams["lr"] == 0.2 and hparams["restore_optimizer_state"] is False
    assert saved["split"]["split_epoch"] == 1 and saved["trainer"]["max_epochs"] == 3
    base_saved = yaml.safe_load((root / "base" / "config.yaml").read_text())
    assert base_saved["trainer"]["max_epochs"] == 1 and base_saved["model"]["optimizer"] == "sgd"
    manifest = yaml.safe_load((root / "split.yaml").read_text())
    assert manifest["split_epoch"] == 1 and manifest["base_checkpoint"] == str(ckpt)
    assert set(manifest["runs"]) == {"base", *branches}
    assert Path(manifest["runs"]["sgd"]["final_checkpoint"]).is_file()
    for name in ("ngd", "online_ngd"):
        assert runs[name]["ngd/kappa"][0] == [2.0, 3.0], name
    assert "ngd/kappa" not in runs["sgd"]
    # every pair of networks compared up to permutation (seed 003), logged at the final epoch
    comparison = load_scalars(root / "comparison")
    pairs = yaml.safe_load((root / "comparison.yaml").read_text())["pairs"]
    names = ["base", *branches]
    assert len(pairs) == len(names) * (len(names) - 1) // 2
    assert {frozenset(k.split("_", 1)) for k in pairs if k.startswith("base_")} == {
        frozenset(("base", b)) for b in branches
    }
    for key, values in pairs.items():
        assert comparison[f"split/phi/{key}"] == ([3.0], [pytest.approx(values["phi_aligned"])])
        assert 0.0 <= values["phi_aligned"] <= values["phi_naive"] + 1e-9, key
        assert values["barrier_aligned"] >= 0.0
    # report over the split: one PNG and one table row per run; cells carry their epoch
    png, markdown = make_report(root)
    assert png.is_file() and png.stat().st_size > 10_000
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert sorted(r.split("|")[1].strip() for r in rows) == sorted(["base", *branches])
    sgd_row = next(r for r in rows if r.startswith("| sgd |"))
    assert f"{runs['sgd']['val/loss'][1][-1]:.4g} (e3)" in sgd_row


def test_split_honours_overrides_of_save_dir_name_data_and_callbacks(make_config, tmp_path):
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"filename": "yaml-{epoch}", "save_top_k": -1}}]  # fmt: skip
    config = make_config(
        "ovr",
        callbacks=callbacks,
        trainer={"max_epochs": 2},
        split={"split_epoch": 1, "branches": {"sgd": {}, "fast": {"lr": 0.3}}},
    )
    elsewhere = tmp_path / "elsewhere"
    args = ["split", "--config", config,
            f"--trainer.logger.init_args.save_dir={elsewhere}",
            "--trainer.logger.init_args.name=renamed",
            "--trainer.logger.init_args.version=seed3",
            "--trainer.callbacks.init_args.filename=cli-{epoch}",
            "--data.train_subset=64", "--data.batch_size=16"]  # fmt: skip
    assert main(args) == 0
    root = elsewhere / "renamed" / "seed3"
    assert not (tmp_path / "runs").exists()  # nothing where the YAML pointed
    for run, epochs in (("base", [1]), ("sgd", [2]), ("fast", [2])):
        saved = yaml.safe_load((root / run / "config.yaml").read_text())
        assert saved["data"]["train_subset"] == 64 and saved["data"]["batch_size"] == 16, run
        logger = saved["trainer"]["logger"]["init_args"]
        assert logger["save_dir"] == str(elsewhere) and logger["version"] == f"seed3/{run}"
        ckpts = sorted(p.name for p in (root / run / "checkpoints").iterdir())
        assert ckpts == [f"cli-epoch={e - 1}.ckpt" for e in epochs], run  # callback override
        # 64 images in batches of 16: 4 optimizer steps per epoch
        assert load_scalars(root / run)["val/loss"][0] == [float(e) for e in epochs]
    state = __import__("torch").load(root / "sgd" / "checkpoints" / "cli-epoch=1.ckpt",
                                     weights_only=False)  # fmt: skip
    assert state["global_step"] == 8
    assert yaml.safe_load((root / "fast" / "config.yaml").read_text())["model"]["lr"] == 0.3


def test_split_refuses_to_overwrite_and_reuses_only_a_matching_base(make_config, tmp_path,
                                                                    capsys):  # fmt: skip
    config = make_config("again", trainer={"max_epochs": 2},
                         split={"split_epoch": 1, "branches": {"sgd": {}}})  # fmt: skip
    assert main(["split", "--config", config]) == 0
    root = tmp_path / "runs" / "again"
    ckpt = root / "base" / "split_epoch=1.ckpt"
    before = ckpt.read_bytes()
    events = sorted(p.name for p in (root / "sgd").glob("events.*"))
    capsys.readouterr()
    assert main(["split", "--config", config, "--seed_everything=5"]) == 2
    (line,) = _error_lines(capsys)
    assert "already exists" in line and "--overwrite" in line
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in (root / "sgd").glob("events.*")) == events
    # reuse: a base with another config is refused; the matching one is kept, a branch added
    assert main(["split", "--config", config, "--reuse_base", "--model.lr=0.5",
                 "--branches=sgd"]) == 2  # fmt: skip
    assert "differs" in _error_lines(capsys)[0]
    with pytest.raises(CLIError, match="already exists"):
        run_split(config, reuse_base=True)  # the sgd branch is there already
    config2 = make_config(
        "again",
        trainer={"max_epochs": 2},
        split={"split_epoch": 1, "branches": {"sgd": {}, "hot": {"lr": 1.0}}},
    )
    runs = run_split(config2, reuse_base=True, branches=["hot"])
    assert set(runs) == {"base", "hot"} and ckpt.read_bytes() == before
    assert load_scalars(root / "hot")["val/loss"][0] == [2.0]
    manifest = yaml.safe_load((root / "split.yaml").read_text())
    assert manifest["runs"]["base"]["reused"] is True and {"sgd", "hot"} <= set(manifest["runs"])
    # --overwrite replaces the runs (fresh event files, no appended second run)
    assert main(["split", "--config", config, "--overwrite"]) == 0
    assert len(list((root / "sgd").glob("events.*"))) == 1
    assert load_scalars(root / "sgd")["val/loss"][0] == [2.0]


def test_split_print_config_prints_the_resolved_split(make_config, tmp_path, capsys):
    config = make_config(
        "printed_split",
        trainer={"max_epochs": 4},
        split={"split_epoch": 2, "branches": {"ngd": {"optimizer": "ngd"}}},
    )
    with pytest.raises(SystemExit) as info:
        main(
            [
                "split",
                "--config",
                config,
                "--split_epoch=3",
                "--model.lr=0.02",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'x'}",
                "--print_config",
            ]
        )
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["split_epoch"] == 3 and printed["split"]["branches"] == {
        "ngd": {"optimizer": "ngd"}}  # fmt: skip
    assert printed["model"]["lr"] == 0.02
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "section", "match"),
    [([], {"split_epoch": 0}, "split_epoch must be an integer >= 1"),
     ([], {"split_epoch": 2}, r"max_epochs \(2\) must exceed split_epoch \(2\)"),
     (["--split_epoch=5"], {}, "must exceed split_epoch"),
     ([], {"split_epoch": 1, "branches": {"sgd": {"learning_rate": 1}}}, "learning_rate"),
     ([], {"split_epoch": 1, "base": {"optimizer": "ngd"}}, "base"),
     ([], {"split_epoch": 1, "branches": {"base": {}}}, "base"),
     (["--branches=sgd,nope"], {"split_epoch": 1, "branches": {"sgd": {}}}, "unknown branch nope")],
)  # fmt: skip
def test_split_user_errors_are_one_line(make_config, tmp_path, capsys, args, section, match):
    config = make_config("bad", trainer={"max_epochs": 2}, split=section)
    capsys.readouterr()
    assert main(["split", "--config", config, *args]) == 2
    (line,) = _error_lines(capsys)
    assert re.search(match, line), line
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_no_arguments_help_and_unknown_command(capsys):
    assert main([]) == 2
    assert "usage: lightning-curvature" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "split" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_console_entry_point_without_arguments_exits_nonzero():
    result = subprocess.run([sys.executable, "-m", "lightning_curvature"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "usage" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "lightning_curvature", "report", str(ROOT / "no-such-dir")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"lightning-curvature report: error: {ROOT / 'no-such-dir'}: no such directory"
    ]


def test_a_value_refused_by_a_class_is_one_line_exit_2(tmp_path):
    # The parser accepts the integer; the data module refuses it when LightningCLI builds it.
    result = subprocess.run(
        [sys.executable, "-m", "lightning_curvature", "fit", "--config",
         str(ROOT / "configs" / "quickstart.yaml"), "--data.val_size", "100000",
         f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "lightning-curvature fit: error: `val_size` must be an integer in [0, 3999], got 100000"
    )


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in CONFIGS])
def test_shipped_configs_parse(path, capsys):
    command = "split" if "split" in yaml.safe_load(path.read_text()) else "fit"
    with pytest.raises(SystemExit) as info:
        main([command, "--config", str(path), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["dataset"] in ("mnist", "fashion_mnist", "fashion_mnist_sample")
