"""``gradops recon``: Recon's layer search, the before/after conflict table and the search's
cost against the published pair loop (see docs/recon.md)."""
from __future__ import annotations

import argparse
import json
import sys

#: Recon's protocol as far as 2 CPU cores afford it (docs/recon.md): the default grid's model
#: (``gradops compare``: the CNN at width 32, 8 epochs), the S of the authors' NYUv2 run,
#: top-2 of the CNN's 7 layers, 3 seeds
DEFAULT_S = -0.02
DEFAULT_TOPK = 2
DEFAULT_SEEDS = "0,1,2"
_ITERS_HELP = ("training iterations (default: the default grid's training, --epochs 8 over "
               "the training split: 312 on digits)")


def _merge(args: argparse.Namespace):
    """The configuration on the default grid's model (``gradops compare``'s budget)."""
    from ..train import BUDGETS
    from ..train.config.cli_options import merge_config
    cfg, _ = merge_config(args, base=dict(BUDGETS["default"]["config"]))
    return cfg


def _iters(args: argparse.Namespace, cfg) -> int:
    from ..train.recon.search import default_iters
    return default_iters(cfg.validate()) if args.iters is None else args.iters


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config.cli_options import add_config_options
    p = sub.add_parser("recon", help="Recon: search the most conflicting layers, compare "
                       "conflicts before/after branching, time the search")
    cmds = p.add_subparsers(dest="recon_command", required=True)

    s = cmds.add_parser("search", help="train the unbranched model and rank its layers by "
                        "S-conflict score (writes DIR/ranking.json and DIR/scores.png)")
    s.add_argument("--iters", type=int, default=None, help=_ITERS_HELP)
    s.add_argument("--S", type=float, default=DEFAULT_S, dest="S",
                   help=f"severity threshold in (-1, 0] (default {DEFAULT_S})")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--overwrite", action="store_true", help="replace the files in --out")
    s.add_argument("--config", default=None, metavar="FILE", help="options from a TOML file")
    s.add_argument("--no-progress", action="store_true")
    add_config_options(s, skip=("epochs",))
    s.set_defaults(fn=run_search)

    c = cmds.add_parser("compare", help="distribution of pairwise cosines on the remaining "
                        "shared layers before and after branching (Recon's Table 6), per seed, "
                        "with the paired change and a verdict on Recon's claim")
    c.add_argument("--ranking", default=None, metavar="RANKING_JSON",
                   help="a ranking of `recon search` used for every seed (default: a search "
                   "on each seed, with --iters and --S)")
    c.add_argument("--topk", type=int, default=DEFAULT_TOPK, metavar="K",
                   help=f"layers to branch (default {DEFAULT_TOPK})")
    c.add_argument("--seeds", default=DEFAULT_SEEDS,
                   help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
    c.add_argument("--iters", type=int, default=None, help=_ITERS_HELP)
    c.add_argument("--S", type=float, default=DEFAULT_S, dest="S",
                   help=f"severity threshold of the per-seed search (default {DEFAULT_S})")
    c.add_argument("--init", default="reinit", choices=("reinit", "copy"))
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--config", default=None, metavar="FILE")
    add_config_options(c, skip=("epochs",))
    c.set_defaults(fn=run_compare)

    b = cmds.add_parser("cost", help="seconds per step of the fused search against the "
                        "published pair loop (one host sync per pair and layer)")
    b.add_argument("--backbone", default="cnn", help="cnn, mlp or a timm model (its layers)")
    b.add_argument("--width", type=int, default=8)
    b.add_argument("--tasks", type=int, default=3, metavar="T")
    b.add_argument("--input", default="1,14,14", help="C,H,W of the input (default 1,14,14)")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--device", default="cpu")
    b.set_defaults(fn=run_cost)


def _fail(e: Exception) -> int:
    if isinstance(e, OSError):
        from ..train.config.io_errors import describe_os_error
        e = describe_os_error(e)
    print(f"gradops recon: error: {e}", file=sys.stderr)
    return 2


def _check_paths(args: argparse.Namespace) -> None:
    from ..train import ConfigError
    for opt in ("out", "config", "ranking"):
        if getattr(args, opt, None) == "":
            raise ConfigError("--" + opt, "empty value (give a path)")


def run_search(args: argparse.Namespace) -> int:
    from ..train import ConfigError
    from ..train.runs.recon_search import recon_search
    try:
        _check_paths(args)
        cfg = _merge(args)
        ranking = recon_search(cfg, _iters(args, cfg), args.S, args.out, overwrite=args.overwrite,
                               progress=not args.no_progress)
    except (ConfigError, OSError) as e:
        return _fail(e)
    top = ", ".join(f"{r['layer']} ({r['score']})" for r in ranking[:5])
    print(f"gradops recon search: {len(ranking)} layers ranked; top: {top} -> {args.out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train import ConfigError
    from ..train.config.atomic import atomic_write_text
    from ..train.config.cli_options import parse_list
    from ..train.recon import read_ranking
    from ..train.recon.search import encoder_layers
    from ..train.runs.recon_search import check_empty_dir
    from ..train.report.recon_seeds import format_console_summary, format_recon_report, recon_seeds
    from ..train.runs.rundir import DirLock
    try:
        _check_paths(args)
        seeds = parse_list(args.seeds, "--seeds", int)
        if not seeds:
            raise ConfigError("--seeds", f"no seed given in {args.seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError("--seeds", f"duplicate seeds in {args.seeds!r}")
        cfg = _merge(args).validate()
        iters = _iters(args, cfg)
        out = Path(args.out)
        check_empty_dir(out, overwrite=args.overwrite)
        # the ranking and K are checked before anything is written
        n_layers = len(read_ranking(args.ranking, "--ranking")) if args.ranking is not None \
            else len(encoder_layers(cfg))
        if not 1 <= args.topk <= n_layers:
            raise ConfigError("--topk", f"must be an integer in [1, {n_layers}] (the ranked "
                              f"layers), got {args.topk}")
        with DirLock(out, "--out"):          # one writer of --out until the report is written
            check_empty_dir(out, overwrite=args.overwrite, probe=False)
            tables = recon_seeds(cfg, seeds, args.topk, iters, args.S, out,
                                 ranking=args.ranking, init=args.init,
                                 progress=not args.no_progress)
            from ..train import BUDGETS
            grid = BUDGETS["default"]["config"]
            same = (cfg.backbone, cfg.width, cfg.data) == ("cnn", grid["width"], "digits")
            header = [f"Model: {cfg.backbone} at width {cfg.width} on {cfg.data} ("
                      + ("the default grid's model of `gradops compare`" if same else
                         f"not the default grid's: cnn at width {grid['width']} on digits")
                      + f"), method {cfg.method}, lr {cfg.lr:g}, "
                      f"batch {cfg.batch_size}; {iters} iterations per model; top-{args.topk} "
                      f"layers branched (init {args.init}); seeds "
                      f"{', '.join(map(str, seeds))}; ranking: "
                      + ("given, " + args.ranking if args.ranking is not None else
                         f"a search on each seed (S = {args.S:g}, {iters} iterations)") + "."]
            md = format_recon_report(tables, header)
            atomic_write_text(out / "report.md", md)
            atomic_write_text(out / "recon_compare.json", json.dumps(
                {"seeds": seeds, "iters": iters, "topk": args.topk, "tables": tables},
                indent=1) + "\n")
    except (ConfigError, OSError) as e:
        return _fail(e)
    print(md, end="")
    print(format_console_summary(tables))
    return 0


def run_cost(args: argparse.Namespace) -> int:
    from ..train import ConfigError
    from ..train.models.encoders import build_encoder
    from ..train.recon import bench_search_cost, layer_names
    try:
        shape = tuple(int(v) for v in args.input.split(","))
        enc, _ = build_encoder(args.backbone, shape, args.width)
    except (ConfigError, ValueError) as e:
        return _fail(e)
    mods = dict(enc.named_modules())
    numels = [sum(p.numel() for p in mods[n].parameters(recurse=False))
              for n in layer_names(enc)]
    r = bench_search_cost(numels, args.tasks, repeats=args.repeats, device=args.device)
    print(json.dumps({"backbone": args.backbone, **r}))
    return 0
