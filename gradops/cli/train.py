"""``gradops train``: one multi-task training run into a run directory (see docs/trainer.md)."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config.cli_options import add_config_options
    p = sub.add_parser("train", help="train one multi-task model (a gradient method, optionally "
                       "with sparse training) and write its run directory")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="options from a TOML file (command-line options win)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", default=None, metavar="RUN_DIR", help="the run directory")
    where.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a paper's protocol: nyuv2-mtan, cityscapes-mtan, celeba-famo, "
                        "multi-fashion-recon (data set, model, budget; options given win)")
    p.add_argument("--budget", default="full", metavar="BUDGET",
                   help="with --preset: full (the paper's) or quick (the same code path on a "
                        "few batches)")
    add_config_options(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..train import ConfigError, run_training
    from ..train.engine.distributed import exit_process, launched_by_torchrun
    from ..train.engine.divergence import EXIT_DIVERGED
    from ..train.config.io_errors import describe_os_error
    from ..train.config.cli_options import given_options, merge_config
    from ..train.runs.run import load_run_config
    try:
        for opt in ("out", "resume", "config", "preset"):
            if getattr(args, opt) == "":
                raise ConfigError("--" + opt, "empty value (give a path or name)")
        if args.resume is not None:
            if args.overwrite:
                raise ConfigError("--overwrite", "cannot be combined with --resume")
            saved = load_run_config(args.resume)
            for k, v in given_options(args).items():
                if getattr(saved, k) != v and k not in ("device", "threads"):
                    raise ConfigError("--" + k.replace("_", "-"), f"{v!r} differs from the "
                                      f"resumed run's {getattr(saved, k)!r} (a resumed run keeps "
                                      "its configuration)")
            over = {k: v for k, v in given_options(args).items() if k in ("device", "threads")}
            result = run_training(saved.replace(**over), args.resume, resume=True,
                                  progress=not args.no_progress)
        else:
            from ..train.config.presets import preset_config
            cfg, _ = merge_config(args, base=preset_config(args.preset, args.budget))
            result = run_training(cfg, args.out, overwrite=args.overwrite,
                                  progress=not args.no_progress)
        # a diverged run (non-finite loss or chance-level validation metrics) has said so on
        # stderr and in result.json; its exit status is EXIT_DIVERGED (3), not 0
        rc = EXIT_DIVERGED if result.get("status") == "diverged" else 0
    except ConfigError as e:
        print(f"gradops train: error: {e}", file=sys.stderr)
        rc = 2
    except OSError as e:           # a full disk, a read-only directory, ...: one line, exit 2
        print(f"gradops train: error: {describe_os_error(e)}", file=sys.stderr)
        rc = 2
    if launched_by_torchrun():
        exit_process(rc)
    return rc
