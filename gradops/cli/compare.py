"""``gradops compare``: train a grid of (method, sparse setting, seed) runs plus the STL baseline,
then write the report (summary.csv, report.md, plots). With no options: the default grid."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config.cli_options import add_config_options
    p = sub.add_parser("compare", help="train every method with and without sparse training "
                       "over several seeds and write the comparison report")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="options from a TOML file: training options and methods / sparse / "
                        "seeds / budget (command-line options win)")
    p.add_argument("--out", default="gradops-compare", metavar="DIR",
                   help="output directory (runs/, summary.csv, report.md, plots; default "
                        "gradops-compare)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: ew, pcgrad, cagrad, graddrop, mgda, "
                        "imtlg, nashmtl, famo; stl always runs as the baseline)")
    p.add_argument("--sparse", default=None,
                   help="comma-separated sparse settings: off, a trainable fraction (0.6 or "
                        "fraction=0.6), k=INT, or RULE:FRACTION with RULE psn, random, global "
                        "or reverse (default off,0.6: the ST paper's random-init setting; 0.3 "
                        "is its pretrained one)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--budget", default=None, choices=("default", "quick"),
                   help="default: the full grid (about 12 min on 2 idle CPU cores); quick: "
                        "a seconds-long smoke grid")
    p.add_argument("--resume", action="store_true",
                   help="continue the comparison in --out (finished runs are kept)")
    p.add_argument("--overwrite", action="store_true", help="start every run in --out again")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at the same time, one process each (default: the "
                        "budget's; each run uses --threads CPU threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a paper's protocol for every run (see gradops train --preset); with "
                        "--budget quick its quick form")
    p.add_argument("--baseline", default="stl", choices=("stl", "published"),
                   help="Δm%% against the stl runs of the grid (default) or the published "
                        "single-task values shipped with gradops (nyuv2, cityscapes)")
    p.add_argument("--lr", dest="lrs", default=None, metavar="LR[,LR...]",
                   help="comma-separated learning rates: every run is trained at each, and the "
                        "report picks per (method, sparse) the rate with the best validation "
                        "Δm%% (default: the budget's or preset's single rate)")
    add_config_options(p, skip=("method", "sparse", "seed", "lr"))
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from ..train import BUDGETS, ConfigError, run_grid
    from ..train.config.io_errors import describe_os_error
    from ..train.config.cli_options import merge_config, parse_list
    try:
        if args.resume and args.overwrite:
            raise ConfigError("--overwrite", "cannot be combined with --resume")
        for opt in ("out", "config", "preset"):
            if getattr(args, opt) == "":
                raise ConfigError("--" + opt, "empty value (give a path or name)")
        extra_keys = ("methods", "sparse", "seeds", "budget", "jobs", "lr")
        _, extra = merge_config(argparse.Namespace(config=args.config), extra_keys=extra_keys)
        budget = args.budget or extra.get("budget", "default")
        if budget not in BUDGETS:
            raise ConfigError("--budget", f"unknown budget {budget!r}", BUDGETS)
        preset = BUDGETS[budget]
        from ..train.config.presets import preset_config
        base = dict(preset["config"])
        if args.preset:
            base.update(preset_config(args.preset, "quick" if budget == "quick" else "full"))
        cfg, _ = merge_config(args, base=base, extra_keys=extra_keys)
        methods = parse_list(_given(args.methods, extra, "methods", preset), "--methods")
        sparses = parse_list(_given(args.sparse, extra, "sparse", preset), "--sparse")
        seeds = parse_list(_given(args.seeds, extra, "seeds", preset), "--seeds", int)
        lr_given = args.lrs if args.lrs is not None else extra.get("lr")
        lrs = None if lr_given is None else parse_list(lr_given, "--lr", float)
        if lrs is not None and not lrs:
            raise ConfigError("--lr", "no rate given")
        jobs = args.jobs or extra.get("jobs") or preset["jobs"]
        if not isinstance(jobs, int) or isinstance(jobs, bool):
            raise ConfigError("--jobs", f"expected an integer, got {jobs!r}")
        run_grid(cfg, methods, sparses, seeds, args.out, resume=args.resume,
                 overwrite=args.overwrite, progress=not args.no_progress, jobs=jobs,
                 baseline=args.baseline, lrs=lrs)
    except ConfigError as e:
        print(f"gradops compare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:           # a full disk, a read-only directory, ...: one line, exit 2
        print(f"gradops compare: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    return 0


def _given(value, extra: dict, key: str, preset: dict):
    """The command line's value, else the config file's, else the budget's; a value given
    empty stays empty (and is refused), it never means the default."""
    if value is not None:
        return value
    return extra[key] if key in extra else preset[key]
