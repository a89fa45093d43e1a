"""The ``amortize`` command line: ``train``, ``sample``, ``ppc``, ``validate``, ``sbc``, ``bench``.

Library code never prints; this package formats all output. Errors of the library (and missing
files) end the command with one line ``amortize: error: ...`` and exit code 2; ``--debug`` adds
the traceback.

Example:
    $ amortize train experiments/gaussian_2level.yaml train.steps=500
    $ amortize sample checkpoints/gaussian_2level/20250101-120000 --data my.csv --correct --out draws.nc
    $ amortize ppc checkpoints/gaussian_2level/20250101-120000 --data my.csv
    $ amortize validate checkpoints/gaussian_2level/20250101-120000 --datasets 5
    $ amortize bench checkpoints/radon_minnesota/20250101-120000 checkpoints/eight_schools/20250101-130000

``validate`` and ``sbc`` add figures to the run's TensorBoard folder (``RUN_DIR/tb``): amortized vs
NUTS marginals per site (``validate/<name>/...``, one name per validation) and the SBC ECDF and rank
plots (``sbc/ecdf``, ``sbc/hist``).

The package: this module parses, dispatches and holds ``train`` and ``sample``; :mod:`.common` what
the commands share (``load_run``); :mod:`.draws` ``sample`` and ``ppc``; :mod:`.checks` ``validate``,
``sbc`` and ``bench``, which call
:mod:`amortize.validate` and format what it returns.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..amortizer import Amortizer
from ..config import Config, config_dir, config_source, load_config, save_config
from ..errors import AmortizeError, ConfigError
from ..experiment import build_sampler
from ..modelspec import resolve_model
from ..rundir import (
    locked,
    make_dirs,
    present,
    record_resume,
    recorded_overrides,
    refuse_changes,
    remove_half_made,
)
from ..validate.bench import AGAINST
from .checks import cmd_bench, cmd_sbc, cmd_validate
from .common import _count, _data_flags, _device, _note, _positive, _progress, load_run
from .draws import cmd_ppc, cmd_sample

__all__ = ["main", "build_parser", "load_run"]

log = logging.getLogger(__name__)
EXAMPLES = {
    "train": """examples:
  amortize train experiments/gaussian_2level.yaml
  amortize train experiments/gaussian_2level.yaml train.steps=500 network.hidden=32 --root runs
  amortize train --resume checkpoints/gaussian_2level/20250101-120000 train.steps=6000""",
    "sample": """examples:
  amortize sample checkpoints/gaussian_2level/20250101-120000 --data my.csv --out draws.nc
  amortize sample RUN_DIR --data my.csv --levels district,school --response y --covariates obs:x --out draws.csv
  amortize sample RUN_DIR --data my.csv --correct --num-samples 2000 --seed 1 --out draws.nc

Pareto k is estimated on --k-sets independent sets of --num-samples draws: the pooled k, its range
over the sets and the decision (ok, or why not) are printed and written into the output.""",
    "ppc": """examples:
  amortize ppc checkpoints/radon_minnesota/20250101-120000 --data experiments/data/radon_minnesota.csv
  amortize ppc RUN_DIR --data my.csv --num-samples 1000 --json ppc.json

Statistics per level: mean, sd, min and max of the response and of each level's group means; the
p-value is P(T(y_rep) > T(y)) + P(T(y_rep) = T(y)) / 2 over the replicated datasets.""",
    "validate": """examples:
  amortize validate checkpoints/gaussian_2level/20250101-120000 --datasets 5 --json val.json
  amortize validate RUN_DIR --data experiments/data/eight_schools.csv validate.nuts.num_chains=4

The report goes to RUN_DIR/validate-NAME.json and the figures (amortized vs NUTS per site) to
RUN_DIR/tb under validate/NAME/ (NAME: --name, else the data file's stem, or 'heldout'):
tensorboard --logdir RUN_DIR""",
    "sbc": """example:
  amortize sbc checkpoints/gaussian_2level/20250101-120000 --datasets 200

The ECDF and rank-histogram plots also go to RUN_DIR/tb (tags sbc/ecdf, sbc/hist).""",
    "bench": """examples:
  amortize bench checkpoints/radon_minnesota/20250101-120000 checkpoints/gaussian_2level/20250101-120000
  amortize bench RUN_DIR --against nuts --datasets 5 --json bench.json

Runs of a model with a known reference posterior (radon Minnesota: Inference Gym; eight schools:
posteriordb) are compared with it on the real data; other runs with NUTS on held-out simulations.""",
}


RUN_HELP = "a run folder written by 'amortize train' (checkpoints/<name>/<timestamp>)"


class _StderrHandler(logging.Handler):
    """Log records as ``amortize: warning: ...`` lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"amortize: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


_HANDLER = _StderrHandler()


# ---------------------------------------------------------------------------------------------- commands
def _new_run_dir(args: argparse.Namespace, cfg: Config) -> tuple[Path, list[Path]]:
    """The new run's folder, and the folders made for it (removed again if no checkpoint comes of it)."""
    if args.run_dir:
        run = Path(args.run_dir)
        if (run / "checkpoint.pt").exists():
            raise ConfigError(f"--run-dir {run}: already holds a run; continue it with --resume {run}")
        return run, make_dirs(run, exist_ok=True)
    root = Path(args.root) / "checkpoints" / cfg.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        run = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            return run, make_dirs(run, exist_ok=False)
        except FileExistsError:
            continue
    raise ConfigError(f"{root}: cannot make a new run directory for {stamp}")


def cmd_train(args: argparse.Namespace) -> int:
    """``amortize train``: new run, or ``--resume`` an existing one.

    The run folder is locked while training (a second ``train`` on it exits 2 naming the holder's
    pid); a new run that ends before its first checkpoint leaves nothing behind; a resume never
    rewrites ``config.yaml``: its overrides go to ``history.yaml``, and those that would change what
    the checkpoint was trained with (network, seed, model, structures, ...) are refused by name.
    """
    overrides = list(args.overrides)
    if args.resume:
        if args.config and "=" not in args.config:
            raise ConfigError("train: give CONFIG.yaml or --resume RUN_DIR, not both (a run keeps its config)")
        overrides = ([args.config] if args.config else []) + overrides
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"{run}: not a run directory (no config.yaml; runs are made by 'amortize train')")
        with locked(run):
            recorded = recorded_overrides(run)
            refuse_changes(
                run, load_config(run / "config.yaml", recorded), load_config(run / "config.yaml", recorded + overrides)
            )
            cfg, _, amortizer = load_run(run, overrides, with_sampler=True)
            if amortizer.step >= cfg.train.total_steps:
                print(
                    f"{run}: already at step {amortizer.step} (train.steps={cfg.train.steps},"
                    f" train.refine_steps={cfg.train.refine_steps}); pass train.steps=N or train.refine_steps=N"
                )
                return 0
            if overrides:
                record_resume(run, amortizer.step, overrides)
            return _fit(args, cfg, amortizer, run)
    if not args.config or "=" in args.config:
        raise ConfigError("train: give CONFIG.yaml (or --resume RUN_DIR)")
    cfg = load_config(args.config, overrides)
    model = resolve_model(cfg.model, config_dir(cfg), config_source(cfg))
    amortizer = Amortizer(
        model,
        build_sampler(cfg),
        hidden=cfg.network.hidden,
        seed=cfg.seed,
        device=_device(cfg.device),
        global_coupling=cfg.network.global_coupling,
    )
    run, made = _new_run_dir(args, cfg)
    before = present(run)  # a folder the user gave may hold files of theirs by these names: kept
    try:
        with locked(run):
            try:
                if (run / "checkpoint.pt").exists():  # another run finished here since the check above
                    raise ConfigError(f"--run-dir {run}: already holds a run; continue it with --resume {run}")
                save_config(cfg, run / "config.yaml")
                return _fit(args, cfg, amortizer, run)
            except BaseException:
                remove_half_made(run, made, keep=before)  # under the lock: nobody else's files
                raise
    except ConfigError:
        remove_half_made(run, made, files=False)  # the lock was another's: only our folders, if left empty
        raise


def _fit(args: argparse.Namespace, cfg: Config, amortizer: Amortizer, run: Path) -> int:
    """Train ``amortizer`` in ``run`` to ``cfg.train``'s end; print where and how it ended."""
    _note(args, f"training {amortizer!r}")
    start, t0 = amortizer.step, time.perf_counter()
    try:
        history = amortizer.fit(
            config=cfg.train,
            log_dir=str(run / "tb"),
            checkpoint_path=str(run / "checkpoint.pt"),
            progress=_progress(args),
        )
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the step was finished and saved
        print(f"interrupted at step {amortizer.step}; continue with: amortize train --resume {run}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))  # 128 + the signal: 130 SIGINT, 143 SIGTERM, 129 SIGHUP
    loss = amortizer.history[-1]["loss"] if amortizer.history else float("nan")
    print(f"run: {run}")
    drops = amortizer.drops
    dropped = f"; {drops.total} of {drops.requested} simulations dropped" if drops.total else ""
    print(
        f"steps {start}->{amortizer.step} in {time.perf_counter() - t0:.1f} s; final loss {loss:.4f}"
        f"{'' if history else ' (no new log entry)'}{dropped}"
    )
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _k_sets_flag(p: argparse.ArgumentParser) -> None:
    """``--k-sets``: Pareto k from this many independent sets of draws (pooled), with its spread."""
    p.add_argument(
        "--k-sets", type=_positive, default=4, help="independent sets of draws for Pareto k and its spread (default 4)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``amortize`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks on errors")
    parser = argparse.ArgumentParser(prog="amortize", description="Neural amortized inference for Pyro models.")
    parser.add_argument("--version", action="version", version=f"amortize {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress output (also when CI is set)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            parents=[common],
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("train", "Train an amortized posterior from a YAML config (or resume a run).")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="experiment config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")
    p.add_argument("--root", default=".", help="folder that holds checkpoints/<name>/<timestamp>/ (default: cwd)")
    p.add_argument("--run-dir", help="write the run to this folder instead")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run to train.steps")
    p.set_defaults(func=cmd_train)

    p = add("sample", "Draw from the amortized posterior of a dataset.")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_HELP)
    _data_flags(p, required=True)
    p.add_argument("--num-samples", type=_positive, default=1000, help="draws (default 1000)")
    p.add_argument("--correct", action="store_true", help="PSIS-resampled draws (applied where Pareto k <= 0.7)")
    _k_sets_flag(p)
    p.add_argument("--out", help="draws.nc (full ArviZ InferenceData) or draws.csv; default: print a summary")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws and the diagnostics (default 0)")
    p.add_argument("--device", help="override the config's device")
    p.set_defaults(func=cmd_sample)

    p = add("ppc", "Posterior predictive check of the model on a dataset (test statistics per level).")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_HELP)
    _data_flags(p, required=True)
    p.add_argument("--num-samples", type=_positive, default=500, help="replicated datasets (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws (default 0)")
    p.add_argument("--json", help="report (default: RUN_DIR/ppc-<data stem>.json; the PNG beside it)")
    p.add_argument("--device", help="override the config's device")
    p.set_defaults(func=cmd_ppc)

    p = add("validate", "Compare the amortized posterior with NUTS (a dataset, or held-out simulations).")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. validate.nuts.num_samples=1000")
    _data_flags(p, required=False)
    p.add_argument("--datasets", type=_positive, help="held-out datasets (default: validate.datasets)")
    p.add_argument("--num-samples", type=_positive, help="amortized draws (default: validate.num_samples)")
    p.add_argument("--seed", type=int, help="seeds held-out datasets, draws and NUTS (default: validate.seed)")
    p.add_argument("--by", choices=("level", "site"), default="level", help="rows of the table")
    _k_sets_flag(p)
    p.add_argument(
        "--name",
        help="names this validation: RUN_DIR/validate-NAME.json, tags validate/NAME/... "
        "(default: the --data file's stem, or 'heldout')",
    )
    p.add_argument("--json", help="JSON report (default: RUN_DIR/validate-NAME.json)")
    p.add_argument("--device", help="override the config's device")
    p.add_argument(
        "--figures", type=_count, default=3, metavar="N", help="datasets drawn as figures in RUN_DIR/tb (default 3)"
    )
    p.add_argument(
        "--recovery",
        type=_count,
        default=20,
        metavar="N",
        help="held-out simulations (amortized only) in the recovery and z-vs-contraction figures (default 20; 0: none)",
    )
    p.set_defaults(func=cmd_validate)

    p = add("sbc", "Simulation-based calibration of a trained run.")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. validate.seed=3")
    p.add_argument("--datasets", type=_positive, default=200, help="simulated datasets ranked (default 200)")
    p.add_argument("--num-samples", type=_positive, default=1000, help="posterior draws per dataset (default 1000)")
    p.add_argument("--json", help="report (default: RUN_DIR/sbc.json; the PNG files beside it)")
    p.add_argument("--device", help="override the config's device")
    p.set_defaults(func=cmd_sbc)

    p = add("bench", "Benchmark trained runs (accuracy against references, speed).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by 'amortize train'")
    p.add_argument(
        "--against",
        choices=AGAINST,
        default="auto",
        help="auto: the model's reference posterior when there is one, else NUTS on held-out simulations",
    )
    p.add_argument("--datasets", type=_positive, help="held-out datasets for NUTS (default: validate.datasets)")
    p.add_argument("--num-samples", type=_positive, help="amortized draws (default: validate.num_samples)")
    p.add_argument("--json", help="one JSON report for all runs (default: RUN_DIR/bench.json per run)")
    _k_sets_flag(p)
    p.add_argument("--device", help="override the configs' device")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``amortize`` command; returns the exit code (0 ok, 2 usage or input error)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value overrides after an option land here
            if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = list(args.overrides) + extra
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    quiet = {"amortize.posterior": logging.ERROR, "amortize.validate.nuts": logging.ERROR}  # the CLI prints these
    levels = {"amortize": logging.DEBUG if args.debug else logging.WARNING}
    levels.update({name: logging.DEBUG for name in quiet} if args.debug else quiet)
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("amortize").addHandler(_HANDLER)
    try:
        return args.func(args)
    except (AmortizeError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"amortize: error: {'; '.join(s.strip() for s in text.splitlines() if s.strip())}", file=sys.stderr)
        return 2
    except SystemExit as e:  # sys.exit() inside the user's model (its import is caught in modelspec.resolve_model)
        if args.debug:
            traceback.print_exc()
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        print(f"amortize: error: {args.command}: SystemExit({e.code}) was raised{where}", file=sys.stderr)
        return 2
    finally:  # leave logging as it was (main may be called from Python, e.g. in tests)
        logging.getLogger("amortize").removeHandler(_HANDLER)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
