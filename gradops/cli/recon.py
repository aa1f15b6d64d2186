"""``gradops recon``: Recon's layer search, the before/after conflict table and the search's
cost against the published pair loop (see docs/recon.md)."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.options import add_config_options
    p = sub.add_parser("recon", help="Recon: search the most conflicting layers, compare "
                       "conflicts before/after branching, time the search")
    cmds = p.add_subparsers(dest="recon_command", required=True)

    s = cmds.add_parser("search", help="train the unbranched model and rank its layers by "
                        "S-conflict score (writes DIR/ranking.json and DIR/scores.png)")
    s.add_argument("--iters", type=int, default=200, help="training iterations (default 200)")
    s.add_argument("--S", type=float, default=-0.02, dest="S",
                   help="severity threshold in (-1, 0] (default -0.02)")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--overwrite", action="store_true", help="replace the files in --out")
    s.add_argument("--config", default=None, metavar="FILE", help="options from a TOML file")
    s.add_argument("--no-progress", action="store_true")
    add_config_options(s, skip=("epochs",))
    s.set_defaults(fn=run_search)

    c = cmds.add_parser("compare", help="distribution of pairwise cosines on the remaining "
                        "shared layers before and after branching (Recon's Table 6)")
    c.add_argument("--ranking", required=True, metavar="RANKING_JSON")
    c.add_argument("--topk", type=int, required=True, metavar="K")
    c.add_argument("--iters", type=int, default=200)
    c.add_argument("--init", default="reinit", choices=("reinit", "copy"))
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
        from ..train.io_errors import describe_os_error
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
    from ..train.options import merge_config
    from ..train.recon import recon_search
    try:
        _check_paths(args)
        cfg, _ = merge_config(args)
        ranking = recon_search(cfg, args.iters, args.S, args.out, overwrite=args.overwrite,
                               progress=not args.no_progress)
    except (ConfigError, OSError) as e:
        return _fail(e)
    top = ", ".join(f"{r['layer']} ({r['score']})" for r in ranking[:5])
    print(f"gradops recon search: {len(ranking)} layers ranked; top: {top} -> {args.out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train import ConfigError
    from ..train.options import merge_config
    from ..train.recon import conflict_table, conflict_table_markdown, read_ranking
    from ..train.checkpoint import atomic_write_text
    from ..train.recon.search import check_empty_dir
    from ..train.rundir import DirLock
    try:
        _check_paths(args)
        cfg, _ = merge_config(args)
        out = Path(args.out)
        check_empty_dir(out, overwrite=args.overwrite)
        ranking = read_ranking(args.ranking, "--ranking")
        with DirLock(out, "--out"):          # one writer of --out until the tables are written
            check_empty_dir(out, overwrite=args.overwrite, probe=False)
            table = conflict_table(cfg, ranking, args.topk, args.iters, init=args.init)
            md = conflict_table_markdown(table)
            atomic_write_text(out / "conflict_table.json", json.dumps(table, indent=1) + "\n")
            atomic_write_text(out / "conflict_table.md", md)
    except (ConfigError, OSError) as e:
        return _fail(e)
    print(md, end="")
    return 0


def run_cost(args: argparse.Namespace) -> int:
    from ..train import ConfigError
    from ..train.models import build_encoder
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
