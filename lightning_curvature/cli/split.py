"""``lightning-curvature split``: SGD to ``split_epoch``, then branches from those weights.

The command line and config files are parsed **once** by LightningCLI's parser
(:class:`SplitCLI`: every ``fit`` option plus the typed ``split:`` section and the run options
``--split_epoch``, ``--branches``, ``--reuse_base``, ``--overwrite``). The base run's and each
branch's config are derived from that namespace with ``parser.parse_object`` (so a branch's
overrides are validated like ``model:`` itself), and each run is instantiated through
LightningCLI's own ``instantiate_classes``: every override (``--trainer.logger.init_args.*``,
``--trainer.callbacks``, ``--data.*``, ``--trainer.*``) applies to every run.

Layout (``V`` is the logger's ``version`` when given, e.g. ``seed1``; else nothing)::

    <save_dir>/<name>/[V/]split.yaml                     manifest: split epoch, checkpoint, runs
    <save_dir>/<name>/[V/]base/split_epoch=<N>.ckpt      the weights every branch starts from
    <save_dir>/<name>/[V/]{base,<branch>...}/config.yaml  each run's resolved config

An existing run folder is never written into: the split is refused (one line, exit 2) unless
``--overwrite`` (which deletes those run folders first) or ``--reuse_base`` (keeps a base whose
saved config equals the one this command would run). Branches: each builds a fresh module with
its overrides and ``restore_optimizer_state=False``, then ``Trainer.fit(ckpt_path=<base ckpt>)``:
Lightning restores weights, epoch/step counters and callback states but not the optimizer state,
and the data module shuffles by ``(seed, epoch)``, so a branch sees the batches an uninterrupted
run would.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch import seed_everything
from lightning.pytorch.cli import LightningArgumentParser
from torch import nn

from .base import CurvatureCLI
from .errors import CLIError

__all__ = ["RunPlan", "SplitCLI", "compare_branch_networks", "run_split", "split_main"]

#: Keys of the root namespace that describe this invocation, not a run (left out of comparisons).
_RUN_OPTIONS = ("split_epoch", "branches", "reuse_base", "overwrite")
MANIFEST = "split.yaml"


#: Training samples (the first ones, a fixed set) on which the branch comparison evaluates the
#: linear-path losses.
COMPARISON_SAMPLES = 2048


def compare_branch_networks(
    networks: Mapping[str, nn.Module],
    split_dir: Path,
    *,
    loss_fn: Any = None,
    data: tuple[Any, Any] | None = None,
    step: int = 0,
) -> dict[str, float]:
    """Compare every pair of split networks up to permutation of hidden units (seed 003).

    For each pair ``a < b`` (in the order given: the base first, then the branches) it computes
    Φ naive, Φ after weight matching of ``b``'s units to ``a``'s, and the loss barrier along the
    linear path after alignment (:func:`lightning_curvature.permutation.compare_networks`), and
    writes them as ``split/phi/<a>_<b>``, ``split/phi_naive/<a>_<b>``, ``split/barrier/<a>_<b>``
    to ``<split_dir>/comparison`` (TensorBoard, x = ``step``) and ``<split_dir>/comparison.yaml``.

    A model the permutation package cannot describe (no MLP/LeNet5/plain chain) or fewer than two
    networks: a warning, nothing written; the finished runs are never put at risk.

    Parameters
    ----------
    networks : mapping
        Run name -> trained ``torch.nn.Module`` (``ImageClassifier.model``). Not modified.
    split_dir : Path
        The split's folder (holds ``split.yaml`` and the run folders).
    loss_fn, data :
        Loss ``loss_fn(outputs, targets)`` and ``(inputs, targets)`` for the path losses; without
        either, nothing is compared (the barrier needs a loss on data).
    step : int
        x-axis value of the logged scalars (the branches' final epoch).

    Returns
    -------
    dict
        The logged scalars (empty when the comparison was skipped).
    """
    from lightning_curvature.permutation import compare_networks, comparison_scalars

    if len(networks) < 2 or loss_fn is None or data is None:
        return {}
    try:
        result = compare_networks(dict(networks), loss_fn, data)
    except (ValueError, TypeError) as err:
        warnings.warn(f"split: branch networks not compared ({err})", stacklevel=2)
        return {}
    scalars = comparison_scalars(result, prefix="split")
    from torch.utils.tensorboard import SummaryWriter

    out = Path(split_dir) / "comparison"
    with SummaryWriter(str(out)) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    per_layer = {
        f"{p.a}_{p.b}": {
            "phi_naive": float(p.phi_naive.overall),
            "phi_aligned": float(p.phi_aligned.overall),
            "barrier_aligned": float(p.path_aligned.barrier),
            "barrier_naive": None if p.path_naive is None else float(p.path_naive.barrier),
        }
        for p in result.pairs
    }
    (Path(split_dir) / "comparison.yaml").write_text(
        yaml.safe_dump({"step": step, "pairs": per_layer}, sort_keys=False)
    )
    return scalars


@dataclass
class RunPlan:
    """One run of a split: its resolved config, TensorBoard folder and whether to skip it."""

    name: str
    config: Namespace
    log_dir: Path
    reuse: bool = False


def _strip_run_options(dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dump.items() if k not in (*_RUN_OPTIONS, "split")}


class SplitCLI(CurvatureCLI):
    """LightningCLI that parses a split once and runs base + branches from derived configs.

    ``SplitCLI(args)`` parses (``--print_config`` prints the resolved config and exits);
    :meth:`run` executes and returns ``{run name: log dir}``.
    """

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        self._deferred = True  # classes are instantiated per run, not for the root config
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        super().__init__(args, run=False, **kwargs)
        self.root_config: Namespace = self.config
        self._deferred = False

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--split_epoch", type=int | None, default=None,
                            help="Epochs of SGD before branching (overrides split.split_epoch).")
        parser.add_argument("--branches", type=str | None, default=None,
                            help="Comma-separated subset of split.branches to run.")
        parser.add_argument("--reuse_base", action=ActionYesNo, default=False,
                            help="Keep an existing base run whose saved config matches.")
        parser.add_argument("--overwrite", action=ActionYesNo, default=False,
                            help="Delete existing run folders of this split before running.")
        # fmt: skip

    def instantiate_classes(self) -> None:
        if not self._deferred:
            super().instantiate_classes()

    # ---------------------------------------------------------------------------- planning
    @property
    def split_epoch(self) -> int:
        cfg = self.root_config
        value = cfg.split_epoch if cfg.split_epoch is not None else cfg.split.split_epoch
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CLIError(
                f"split_epoch must be an integer >= 1 (--split_epoch or split.split_epoch), "
                f"got {value}"
            )
        total = cfg.trainer.max_epochs
        if total is None or total <= value:
            raise CLIError(
                f"trainer.max_epochs ({total}) must exceed split_epoch ({value}): it is the total "
                "number of epochs, branches run from split_epoch to it"
            )
        return value

    def _branch_overrides(self) -> dict[str, dict[str, Any]]:
        branches = dict(self.root_config.split.branches or {})
        if not branches:
            raise CLIError("split.branches must name at least one branch")
        for name in branches:
            if name == "base" or not name.replace("_", "").replace("-", "").isalnum():
                raise CLIError(
                    f"branch name {name!r} must be alphanumeric (with _ or -) and not 'base'"
                )
        selected = self.root_config.branches
        if selected:
            wanted = [b.strip() for b in selected.split(",") if b.strip()]
            unknown = [b for b in wanted if b not in branches]
            if unknown:
                raise CLIError(
                    f"unknown branch {', '.join(unknown)} (--branches); split.branches has "
                    f"{', '.join(branches)}"
                )
            branches = {b: branches[b] for b in wanted}
        return {name: dict(values or {}) for name, values in branches.items()}

    def _logger_args(self) -> Namespace:
        logger = self.root_config.trainer.logger
        init = getattr(logger, "init_args", None) if isinstance(logger, Namespace) else None
        if init is None or not {"save_dir", "name", "version"} <= set(vars(init)):
            raise CLIError(
                "split needs one logger with save_dir, name and version (a TensorBoardLogger or "
                f"CSVLogger) in trainer.logger, got {logger!r}"
            )
        return init

    @property
    def split_dir(self) -> Path:
        """``<save_dir>/<name>[/<version>]``: the folder of this split's runs."""
        init = self._logger_args()
        root = Path(init.save_dir) / str(init.name or "")
        return root / str(init.version) if init.version not in (None, "") else root

    def _derive(self, run: str, overrides: dict[str, Any], where: str) -> RunPlan:
        """The root namespace with ``overrides`` merged (validated) and this run's version."""
        self.parser.exit_on_error = False
        try:
            cfg = self.parser.parse_object(overrides, self.root_config.clone())
        except Exception as err:  # jsonargparse raises ArgumentError with the offending key
            raise CLIError(f"{where}: {err}") from err
        finally:
            self.parser.exit_on_error = True
        init = cfg.trainer.logger.init_args
        version = self._logger_args().version
        init.version = f"{version}/{run}" if version not in (None, "") else run
        cfg.split.split_epoch = cfg.split_epoch = self.split_epoch
        sub_dir = getattr(init, "sub_dir", None)
        log_dir = self.split_dir / run / (sub_dir or "")
        return RunPlan(run, cfg, log_dir)

    def plan(self) -> list[RunPlan]:
        """Every run of the split (base first), checked against what exists on disk."""
        split_epoch = self.split_epoch
        base_overrides = dict(self.root_config.split.base or {})
        if base_overrides.get("optimizer", "sgd") != "sgd":
            raise CLIError("split.base.optimizer must be 'sgd': the base phase trains with SGD")
        base_overrides["optimizer"] = "sgd"
        runs = [self._derive("base", {"model": base_overrides,
                                      "trainer": {"max_epochs": split_epoch}}, "split.base")]
        for name, overrides in self._branch_overrides().items():
            model = {**base_overrides, **overrides, "restore_optimizer_state": False}
            runs.append(self._derive(name, {"model": model}, f"split.branches.{name}"))
        for run in runs:
            self._check_target(run)
        return runs  # fmt: skip

    @property
    def base_checkpoint(self) -> Path:
        return self.split_dir / "base" / f"split_epoch={self.split_epoch}.ckpt"

    def _check_target(self, run: RunPlan) -> None:
        exists = run.log_dir.exists() and any(run.log_dir.iterdir())
        if run.name == "base" and self.root_config.reuse_base:
            self._check_reusable(run)
            run.reuse = True
            return
        if exists and not self.root_config.overwrite:
            raise CLIError(
                f"{run.log_dir} already exists (an earlier run); pass --overwrite to replace it, "
                "or write elsewhere (--trainer.logger.init_args.version/name/save_dir)"
            )

    def _check_reusable(self, run: RunPlan) -> None:
        saved = run.log_dir / "config.yaml"
        if not (self.base_checkpoint.is_file() and saved.is_file()):
            raise CLIError(
                f"--reuse_base: no base run with {self.base_checkpoint.name} and config.yaml in "
                f"{run.log_dir}"
            )
        want = _strip_run_options(yaml.safe_load(self.parser.dump(run.config, skip_none=False)))
        have = _strip_run_options(yaml.safe_load(saved.read_text()) or {})
        if want != have:
            differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise CLIError(
                f"--reuse_base: {saved} differs from this split's base config in "
                f"{', '.join(differ)}; not reusing it (drop --reuse_base, or --overwrite)"
            )

    # ----------------------------------------------------------------------------- running
    def _instantiate(self, run: RunPlan) -> None:
        seed = self.root_config.seed_everything
        if seed is not False:
            seed_everything(seed, workers=True)
        self.config = run.config
        # LightningCLI caches the config dump its module instantiator hands to
        # save_hyperparameters (load_from_checkpoint support); drop it, or every run would store
        # the first run's hyper-parameters and train with them.
        self.__dict__.pop("config_dump", None)
        self.instantiate_classes()
        if Path(self.trainer.log_dir) != run.log_dir:
            raise CLIError(f"run {run.name}: logger writes to {self.trainer.log_dir}, expected "
                           f"{run.log_dir}")  # fmt: skip

    def _fit_base(self, run: RunPlan) -> None:
        self._instantiate(run)
        self.trainer.fit(self.model, datamodule=self.datamodule)
        if self.trainer.current_epoch != self.split_epoch:
            raise CLIError(
                f"the base run stopped at epoch {self.trainer.current_epoch}, not at split_epoch="
                f"{self.split_epoch} (early stopping or max_steps?); not branching from it"
            )
        self.trainer.save_checkpoint(str(self.base_checkpoint))

    def _write_manifest(self, runs: Sequence[RunPlan], done: Mapping[str, Any]) -> None:
        path = self.split_dir / MANIFEST
        manifest = yaml.safe_load(path.read_text()) if path.is_file() else {}
        manifest = manifest if isinstance(manifest, dict) else {}
        manifest["split_epoch"] = self.split_epoch
        manifest["base_checkpoint"] = str(self.base_checkpoint)
        entries = manifest.setdefault("runs", {})
        for run in runs:
            if run.name in done:
                entries[run.name] = {"log_dir": str(run.log_dir),
                                     "config": str(run.log_dir / "config.yaml"), **done[run.name]}
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))  # fmt: skip

    def _compare(self, networks: dict[str, nn.Module]) -> None:
        """The base network (from its checkpoint) and every branch, compared up to permutation."""
        if not networks:
            return
        first = next(iter(networks.values()))
        base = copy.deepcopy(first)
        state = torch.load(str(self.base_checkpoint), map_location="cpu", weights_only=False)
        prefix = "model."
        base.load_state_dict(
            {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
        )
        train = getattr(self.datamodule, "train_tensors", None)
        data = None if train is None else tuple(t[:COMPARISON_SAMPLES] for t in train)
        compare_branch_networks(
            {"base": base, **networks},
            self.split_dir,
            loss_fn=getattr(self.model, "loss_fn", None),
            data=data,
            step=int(self.trainer.current_epoch),
        )

    def run(self) -> dict[str, str]:
        """Run base (unless reused) and every branch; return ``{run name: log dir}``."""
        runs = self.plan()
        if self.root_config.overwrite:
            for run in runs:
                if not run.reuse and run.log_dir.exists():
                    shutil.rmtree(run.log_dir)
        done: dict[str, Any] = {}
        networks: dict[str, nn.Module] = {}
        for run in runs:
            if run.name == "base":
                if not run.reuse:
                    self._fit_base(run)
                done["base"] = {"reused": run.reuse}
            else:
                self._instantiate(run)
                self.trainer.fit(self.model, datamodule=self.datamodule,
                                 ckpt_path=str(self.base_checkpoint))  # fmt: skip
                final = run.log_dir / f"final_epoch={self.trainer.current_epoch}.ckpt"
                self.trainer.save_checkpoint(str(final))
                done[run.name] = {"final_checkpoint": str(final)}
                networks[run.name] = self.model.model
            self.split_dir.mkdir(parents=True, exist_ok=True)
            self._write_manifest(runs, done)
        self._compare(networks)
        return {run.name: str(run.log_dir) for run in runs}


def _make_cli(args: Sequence[str]) -> SplitCLI:
    with warnings.catch_warnings():
        # Our args come from sys.argv minus the command name, which LightningCLI warns about.
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")
        return SplitCLI(list(args))


def run_split(
    config: str,
    split_epoch: int | None = None,
    *,
    branches: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    reuse_base: bool = False,
    overwrite: bool = False,
) -> dict[str, str]:
    """Python form of ``lightning-curvature split``; returns ``{run name: log dir}``.

    ``extra_args`` are further command-line options (``--trainer.max_epochs=20``, ...).
    Raises :class:`~lightning_curvature.cli.CLIError` for a bad split.
    """
    args = ["--config", str(config), *extra_args]
    if split_epoch is not None:
        args.append(f"--split_epoch={split_epoch}")
    if branches:
        args.append(f"--branches={','.join(branches)}")
    if reuse_base:
        args.append("--reuse_base")
    if overwrite:
        args.append("--overwrite")
    return _make_cli(args).run()


def split_main(argv: Sequence[str]) -> int:
    """``lightning-curvature split ARGS``: run and print ``run: log dir`` lines."""
    for run, path in _make_cli(argv).run().items():
        print(f"{run}: {path}")
    return 0
