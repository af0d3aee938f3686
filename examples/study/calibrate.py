"""Experiment ``calibrate`` of the seed-002 study: the SGLD step size of each study model.

For every model of ``configs/study/models`` this trains the model as the study does (SGD and the
online NGD arm, the model's epochs, no measurements), then runs
:func:`lightning_curvature.sampling.calibrate_sgld` at the trained weights on the study's LLC
measurement set (4,096 training samples, minibatch and nβ = n/ln n with n = 55,000 as in
``configs/study/base.yaml``). The recommendation per model is the smaller of the two arms' (a
step size must be stable at every point the study measures). Written to
``<out>/<model>/{calibration.md,calibration_<arm>.png}`` and ``<out>/step_sizes.yaml``;
the study's model files state the values used, and this script reports any disagreement.

    python examples/study/calibrate.py [--models mlp64,lenet5] [--out runs/study/calibration]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from lightning_curvature.callbacks.measurement_set import (
    draw_indices,
    gather_samples,
    training_dataset,
)
from lightning_curvature.cli.base import CurvatureCLI
from lightning_curvature.sampling import calibrate_sgld, default_nbeta

STUDY = Path(__file__).resolve().parents[2] / "configs" / "study"
STEP_SIZES = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4)
ARMS = ("sgd", "online_ngd")


def llc_settings(base: Path = STUDY / "base.yaml") -> dict:
    """The LocalLearningCoefficient init_args of the study's base config."""
    config = yaml.safe_load(base.read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("LocalLearningCoefficient"):
            return dict(cb["init_args"])
    raise ValueError(f"{base}: no LocalLearningCoefficient callback in trainer.callbacks")


def configured_step_size(model: str) -> float:
    """The step size the study uses for ``model`` (model file, else the base config)."""
    config = yaml.safe_load((STUDY / "models" / f"{model}.yaml").read_text()) or {}
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        if cb["class_path"].endswith("LocalLearningCoefficient"):
            return float(cb["init_args"]["step_size"])
    return float(llc_settings()["step_size"])


def train(model: str, arm: str, seed: int) -> CurvatureCLI:
    """Train ``model`` with ``arm`` exactly as the study's run of that seed, without callbacks."""
    args = [
        "--config",
        str(STUDY / "base.yaml"),
        "--config",
        str(STUDY / "models" / f"{model}.yaml"),
        "--config",
        str(STUDY / "arms" / f"{arm}.yaml"),
        "--seed_everything",
        str(seed),
        "--data.seed",
        str(seed),
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
    ]
    cli = CurvatureCLI(args=args, run=False, save_config_callback=None)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def calibrate(model: str, out: Path, seed: int = 0) -> float | None:
    """Calibrate ``model`` at both arms' trained weights; the smaller recommended step size."""
    settings = llc_settings()
    folder = out / model
    folder.mkdir(parents=True, exist_ok=True)
    lines, recommended = [f"# SGLD calibration: {model}", ""], []
    for arm in ARMS:
        start = time.perf_counter()
        cli = train(model, arm, seed)
        dataset = training_dataset(cli.trainer)
        n = len(dataset)
        idx = draw_indices(n, settings["num_samples"], seed=0)
        data = gather_samples(dataset, idx, batch_size=None)
        cal = calibrate_sgld(
            cli.model,
            torch.nn.functional.cross_entropy,
            data,
            step_sizes=STEP_SIZES,
            localizations=(float(settings["localization"]),),
            num_chains=2,
            num_steps=settings["num_burnin"] + settings["num_draws"],
            nbeta=default_nbeta(n),
            n=n,
            batch_size=settings["batch_size"],
            seed=seed,
        )
        cal.figure().savefig(folder / f"calibration_{arm}.png", dpi=90)
        seconds = time.perf_counter() - start
        lines += [
            f"## {arm} (trained {cli.trainer.current_epoch} epochs; {seconds:.0f} s)",
            "",
            cal.table(),
            "",
            f"recommended step size: {cal.recommended_step_size}",
            "",
        ]
        recommended.append(cal.recommended_step_size)
        print(
            f"[calibrate] {model} {arm}: recommended {cal.recommended_step_size} ({seconds:.0f} s)",
            flush=True,
        )
    stable = [r for r in recommended if r is not None]
    chosen = min(stable) if len(stable) == len(recommended) else None
    lines += [
        f"**chosen (smaller of the arms): {chosen}**; configured: {configured_step_size(model)}",
        "",
    ]
    (folder / "calibration.md").write_text("\n".join(lines))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(sorted(p.stem for p in (STUDY / "models").glob("*.yaml")))
    )
    parser.add_argument("--out", type=Path, default=Path("runs/study/calibration"))
    args = parser.parse_args(argv)
    chosen = {m: calibrate(m, args.out) for m in args.models.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_sizes.yaml").write_text(yaml.safe_dump(chosen))
    status = 0
    for model, step in chosen.items():
        used = configured_step_size(model)
        verdict = "ok" if step is not None and used <= step else "MISMATCH"
        status |= verdict != "ok"
        print(f"[calibrate] {model}: recommended {step}, configured {used}: {verdict}")
    return status


if __name__ == "__main__":
    sys.exit(main())
