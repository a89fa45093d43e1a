"""The ``amortize`` command line (``train``, ``sample``, ``ppc``, ``validate``, ``sbc``, ``bench``): parsing,
printing and exit codes only. :mod:`amortize.rundir` loads and trains runs, :mod:`amortize.export` writes
draws, :mod:`amortize.validate.commands` and :mod:`amortize.validate.draw_checks` compute the checks (and
write their reports and figures); this module prints what they return and the library's log records
(``amortize: warning: ...``). A library error or a missing file ends a command with one line
``amortize: error: ...`` and exit code 2 (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .amortizer import Amortizer
from .config import Config, load_config
from .errors import AmortizeError, ConfigError
from .export import write_draws
from .files import write_json
from .rundir import load_run, new_amortizer, new_run, read_data, record_resume, resumed
from .validate import commands, draw_checks
from .validate.bench import AGAINST
from .validate.metrics import format_table

__all__ = ["main", "build_parser"]

RUN_HELP = "a run folder written by 'amortize train' (checkpoints/<name>/<timestamp>)"


class _StderrHandler(logging.Handler):
    """Log records as ``amortize: warning: ...`` lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"amortize: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars: not with ``--quiet`` and not when ``CI`` is set."""
    return not args.quiet and not os.environ.get("CI")


def _note(args: argparse.Namespace, text: str) -> None:
    """A progress line on stderr (stdout is kept for results)."""
    if not args.quiet:
        print(text, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    """Train an amortized posterior from a YAML config (or resume a run).

    examples:
      amortize train experiments/gaussian_2level.yaml
      amortize train experiments/gaussian_2level.yaml train.steps=500 network.hidden=32 --root runs
      amortize train --resume checkpoints/gaussian_2level/20250101-120000 train.steps=6000
    """
    overrides = list(args.overrides)
    if args.resume:
        if args.config and "=" not in args.config:
            raise ConfigError("train: give CONFIG.yaml or --resume RUN_DIR, not both (a run keeps its config)")
        overrides = ([args.config] if args.config else []) + overrides
        with resumed(args.resume, overrides) as (cfg, amortizer):
            if amortizer.step >= cfg.train.total_steps:
                print(
                    f"{args.resume}: already at step {amortizer.step} (train.steps={cfg.train.steps},"
                    f" train.refine_steps={cfg.train.refine_steps}); pass train.steps=N or train.refine_steps=N"
                )
                return 0
            if overrides:
                record_resume(Path(args.resume), amortizer.step, overrides)
            return _fit(args, cfg, amortizer, Path(args.resume))
    if not args.config or "=" in args.config:
        raise ConfigError("train: give CONFIG.yaml (or --resume RUN_DIR)")
    cfg = load_config(args.config, overrides)
    amortizer = new_amortizer(cfg)
    with new_run(cfg, args.run_dir, args.root) as run:
        return _fit(args, cfg, amortizer, run)


def _fit(args: argparse.Namespace, cfg: Config, amortizer: Amortizer, run: Path) -> int:
    """Train ``amortizer`` in ``run`` to ``cfg.train``'s end; print where and how it ended."""
    _note(args, f"training {amortizer!r}")
    start, t0 = amortizer.step, time.perf_counter()
    try:
        tb, checkpoint = str(run / "tb"), str(run / "checkpoint.pt")
        history = amortizer.fit(config=cfg.train, log_dir=tb, checkpoint_path=checkpoint, progress=_progress(args))
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


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw from the amortized posterior of a dataset.

    examples:
      amortize sample checkpoints/gaussian_2level/20250101-120000 --data my.csv --out draws.nc
      amortize sample RUN_DIR --data my.csv --levels district,school --response y --covariates obs:x --out draws.csv
      amortize sample RUN_DIR --data my.csv --correct --num-samples 2000 --seed 1 --out draws.nc

    The globals' Pareto k is estimated on --k-sets independent sets of --num-samples / 4 global draws (at
    least 100) each: the pooled k, its range over the sets and the decision are printed and written out.
    """
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in (".nc", ".csv"):
        raise ConfigError(f"--out {out}: the name must end in .nc (ArviZ NetCDF) or .csv")
    cfg, _, amortizer = load_run(args.run_dir, device=args.device)
    data = read_data(cfg, amortizer, args.data, args.levels, args.response, args.covariates, args.nested_ids)
    post = amortizer.posterior(data)
    drawn = draw_checks.draw_sample(post, args.num_samples, args.seed, args.k_sets, args.correct, args.local_sbc)
    diag, draws = drawn.diagnostics, drawn.draws
    what = "draws"
    if drawn.corrected:
        what = f"PSIS-corrected draws (from {draws.num_proposals} proposals, k {draws.pareto_k:.2f})"
    checks = "\n".join(line for line in (draw_checks.k_line(diag), draw_checks.local_line(diag)) if line)
    if out is None:
        frame = post.summary(args.num_samples, args.seed, correct=args.correct)
        print(frame.to_string(float_format=lambda x: f"{x:.3f}"), checks, sep="\n")
        return 0
    _note(args, checks)
    write_draws(post, out, args.num_samples, args.seed, correct=args.correct, record=drawn.record, draws=draws)
    print(f"wrote {args.num_samples} {what} to {out} ({draw_checks.verdict_word(diag)})")
    if draws is not None and not drawn.corrected:
        print(f"the draws are uncorrected: Pareto k {draws.pareto_k:.2f} of the correction's proposals > 0.7")
    return 0


def cmd_ppc(args: argparse.Namespace) -> int:
    """Posterior predictive check of the model on a dataset (test statistics per level).

    examples:
      amortize ppc checkpoints/radon_minnesota/20250101-120000 --data experiments/data/radon_minnesota.csv
      amortize ppc RUN_DIR --data my.csv --num-samples 1000 --json ppc.json

    Statistics per level: mean, sd, min and max of the response and of each level's group means; the
    p-value is P(T(y_rep) > T(y)) + P(T(y_rep) = T(y)) / 2 over the replicated datasets.
    """
    cfg, _, amortizer = load_run(args.run_dir, device=args.device)
    data = read_data(cfg, amortizer, args.data, args.levels, args.response, args.covariates, args.nested_ids)
    ppc = draw_checks.ppc_run(amortizer, data, args.run_dir, args.data, args.num_samples, args.seed, args.json)
    res = ppc.result
    print(f"{args.run_dir}: posterior predictive check on {args.data} ({res.num_samples} replicated datasets)")
    print(format_table(res.rows, draw_checks.PPC_COLUMNS))
    if res.extreme:
        print(f"p-value below 0.05 or above 0.95: {', '.join(res.extreme)}")
    else:
        print("no statistic has a p-value below 0.05 or above 0.95")
    print("wrote " + ", ".join(str(p) for p in ppc.written))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Compare the amortized posterior with NUTS (a dataset, or held-out simulations).

    examples:
      amortize validate checkpoints/gaussian_2level/20250101-120000 --datasets 5 --json val.json
      amortize validate RUN_DIR --data experiments/data/eight_schools.csv validate.nuts.num_chains=4

    The report goes to RUN_DIR/validate-NAME.json and the figures (amortized vs NUTS per site) to
    RUN_DIR/tb under validate/NAME/ (NAME: --name, else the data file's stem, or 'heldout'):
    tensorboard --logdir RUN_DIR
    """
    name = commands.validation_name(args.name, args.data)
    cfg, _, amortizer = load_run(args.run_dir, args.overrides, device=args.device, with_sampler=not args.data)
    data = None
    if args.data:
        data = read_data(cfg, amortizer, args.data, args.levels, args.response, args.covariates, args.nested_ids)
    val = commands.validate_run(
        cfg, amortizer, args.run_dir, name, data, args.data, args.datasets, args.num_samples, args.seed,
        keep=args.figures, k_sets=args.k_sets, progress=_progress(args),
    )  # fmt: skip
    nuts = cfg.validate.nuts
    print(
        f"{args.run_dir}: validation '{name}': amortized ({val.num_samples} draws) vs"
        f" NUTS ({nuts.num_chains}x{nuts.num_samples}) on {val.source}"
    )
    if val.report.rows:
        print(val.report.table(by=args.by))
    print(f"wrote {write_json(Path(args.json) if args.json else val.run_dir / f'validate-{name}.json', val.result)}")
    tags = commands.validation_figures(amortizer, val, args.recovery)
    if tags:
        run = val.run_dir
        print(f"wrote {len(tags)} figures to {run / 'tb'} under validate/{name}/ (tensorboard --logdir {run})")
    return 0


def cmd_sbc(args: argparse.Namespace) -> int:
    """Simulation-based calibration of a trained run.

    example:
      amortize sbc checkpoints/gaussian_2level/20250101-120000 --datasets 200

    The ECDF and rank-histogram plots also go to RUN_DIR/tb (tags sbc/ecdf, sbc/hist).
    """
    cfg, _, amortizer = load_run(args.run_dir, args.overrides, device=args.device, with_sampler=True)
    out = commands.sbc_run(cfg, amortizer, args.run_dir, args.datasets, args.num_samples, args.json, _progress(args))
    res = out.result
    print(
        f"{args.run_dir}: SBC on {res.num_datasets} simulated datasets, {res.num_draws} draws each"
        f" (seed {out.seed}); band {1 - res.alpha_per_quantity:.2%} per quantity"
        f" ({'family-wise ' if res.settings['familywise'] else ''}alpha {res.alpha})"
    )
    print(res.table())
    print("passed" if res.passed else "FAILED: " + ", ".join(res.failed()))
    print("wrote " + ", ".join(str(p) for p in out.written))
    if out.tags is not None:
        tb = Path(args.run_dir) / "tb"
        print(f"wrote {', '.join(out.tags)} and {out.p_values} p-values (sbc/<quantity>/p_value) to {tb}")
    return 0 if res.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark trained runs (accuracy against references, speed).

    examples:
      amortize bench checkpoints/radon_minnesota/20250101-120000 checkpoints/gaussian_2level/20250101-120000
      amortize bench RUN_DIR --against nuts --datasets 5 --json bench.json

    Runs of a model with a known reference posterior (radon Minnesota: Inference Gym; eight schools:
    posteriordb) are compared with it on the real data; other runs with NUTS on held-out simulations.
    """
    entries = []
    options = (args.against, args.datasets, args.num_samples, args.k_sets, args.device, _progress(args))
    for run in args.run_dirs:
        entries.append(commands.bench_run(run, *options))
        if not args.json:
            write_json(Path(run) / "bench.json", entries[-1])
    print(format_table(commands.bench_rows(entries), commands.BENCH_COLUMNS))
    if args.json:
        print(f"wrote {write_json(args.json, {'runs': entries})}")
    else:
        print("wrote " + ", ".join(str(Path(r) / "bench.json") for r in args.run_dirs))
    return 0


def _count(text: str, minimum: int = 0) -> int:
    if not text.isdigit() or int(text) < minimum:
        what = "a positive integer" if minimum == 1 else f"a whole number >= {minimum}"
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
    return int(text)


def _positive(text: str) -> int:
    return _count(text, 1)


K_SETS = {"type": _positive, "default": 4, "help": "independent sets of draws for Pareto k and its spread (default 4)"}


def _data_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, metavar="CSV", help="long-format CSV, one row per observation")
    p.add_argument("--levels", help="id columns, outermost first, comma-separated (default: from the config)")
    p.add_argument("--response", help="response column (default: from the config)")
    p.add_argument("--covariates", action="append", metavar="LEVEL:COL[,COL]", help="covariate columns (repeatable)")
    p.add_argument("--nested-ids", action="store_true", help="ids repeat within parents")


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

    def add(name: str, func: Callable[[argparse.Namespace], int], run: bool = True) -> argparse.ArgumentParser:
        """Subcommand ``name``: help, epilog from ``func``'s docstring; with ``run``, RUN_DIR and ``--device``."""
        help, _, epilog = inspect.cleandoc(func.__doc__ or "").partition("\n\n")
        kind = argparse.RawDescriptionHelpFormatter
        p = sub.add_parser(name, help=help, description=help, parents=[common], epilog=epilog, formatter_class=kind)
        p.set_defaults(func=func)
        if run:
            p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_HELP)
            p.add_argument("--device", help="override the config's device")
        return p

    p = add("train", cmd_train, run=False)
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="experiment config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")
    p.add_argument("--root", default=".", help="folder that holds checkpoints/<name>/<timestamp>/ (default: cwd)")
    p.add_argument("--run-dir", help="write the run to this folder instead")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run to train.steps")

    p = add("sample", cmd_sample)
    _data_flags(p, required=True)
    p.add_argument("--num-samples", type=_positive, default=1000, help="draws (default 1000)")
    p.add_argument("--correct", action="store_true", help="PSIS-resampled draws (applied where Pareto k <= 0.7)")
    p.add_argument("--k-sets", **K_SETS)
    p.add_argument("--local-sbc", action="store_true", help="also run the local SBC (reported, not deciding)")
    p.add_argument("--out", help="draws.nc (full ArviZ InferenceData) or draws.csv; default: print a summary")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws and the diagnostics (default 0)")

    p = add("ppc", cmd_ppc)
    _data_flags(p, required=True)
    p.add_argument("--num-samples", type=_positive, default=500, help="replicated datasets (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws (default 0)")
    p.add_argument("--json", help="report (default: RUN_DIR/ppc-<data stem>.json; the PNG beside it)")

    p = add("validate", cmd_validate)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. validate.nuts.num_samples=1000")
    _data_flags(p, required=False)
    p.add_argument("--datasets", type=_positive, help="held-out datasets (default: validate.datasets)")
    p.add_argument("--num-samples", type=_positive, help="amortized draws (default: validate.num_samples)")
    p.add_argument("--seed", type=int, help="seeds held-out datasets, draws and NUTS (default: validate.seed)")
    p.add_argument("--by", choices=("level", "site"), default="level", help="rows of the table")
    p.add_argument("--k-sets", **K_SETS)
    p.add_argument(
        "--name",
        help="names this validation: RUN_DIR/validate-NAME.json, tags validate/NAME/... "
        "(default: the --data file's stem, or 'heldout')",
    )
    p.add_argument("--json", help="JSON report (default: RUN_DIR/validate-NAME.json)")
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

    p = add("sbc", cmd_sbc)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. validate.seed=3")
    p.add_argument("--datasets", type=_positive, default=200, help="simulated datasets ranked (default 200)")
    p.add_argument("--num-samples", type=_positive, default=1000, help="posterior draws per dataset (default 1000)")
    p.add_argument("--json", help="report (default: RUN_DIR/sbc.json; the PNG files beside it)")

    p = add("bench", cmd_bench, run=False)
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
    p.add_argument("--k-sets", **K_SETS)
    p.add_argument("--device", help="override the configs' device")
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
    quiet = logging.DEBUG if args.debug else logging.ERROR  # the commands say these, with what to do next
    levels = {"amortize": min(quiet, logging.WARNING), "amortize.posterior": quiet, "amortize.validate.nuts": quiet}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    handler = _StderrHandler()
    logging.getLogger("amortize").addHandler(handler)
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
        last = traceback.extract_tb(e.__traceback__)[-1:]
        where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
        print(f"amortize: error: {args.command}: SystemExit({e.code}) was raised{where}", file=sys.stderr)
        return 2
    finally:  # leave logging as it was (main may be called from Python, e.g. in tests)
        logging.getLogger("amortize").removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
