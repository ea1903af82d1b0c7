"""python -m lam.compare RUN_DIR... [--png compare.png] [--metric val/loss]

Compares training runs from their folders alone (no wandb needed): each run's .hydra/ config, csv/metrics.csv
and, once it finished, metrics.json. Runs that share every config value but the seed form a group; the table
has one row per group, with mean ± std over its seeds, and the PNG plots every run's metric against steps and
against wall time. A folder that is not a run is searched for runs below it, so a Hydra multirun folder
(outputs/multirun/<date>_<time>) gives all its jobs. Lower is better: best = the lowest value logged.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement

from lam.config import report_user_errors
from lam.errors import UserError
from lam.training.runs import csv_columns, expand, find_runs, load_run, plot, table


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lam.compare", description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="+", help="run folders, folders holding runs (a multirun), or globs")
    parser.add_argument("--png", type=Path, default=Path("compare.png"),
                        help="plot file (default: compare.png)")
    parser.add_argument("--metric", default="val/loss",
                        help="a column of csv/metrics.csv, lower is better (default: val/loss)")
    args = parser.parse_args(argv)

    if missing := [r for r in args.runs if not expand(r)]:
        raise UserError(f"{missing[0]} {'matches nothing' if glob.has_magic(missing[0]) else 'does not exist'}")
    paths = find_runs(args.runs)
    if not paths:
        raise UserError(f"no runs (folders with .hydra/config.yaml) in {' '.join(args.runs)}")
    runs = [load_run(path, args.metric) for path in paths]
    if not any(run.values for run in runs):
        logged = sorted({key for path in paths for key in csv_columns(path)} - {"step", "epoch"})
        raise UserError(f"no run has logged {args.metric!r} in its csv/metrics.csv; logged: {', '.join(logged)}")
    console, out = Console(), table(runs, args.metric)
    width = Measurement.get(console, console.options.update_width(1000), out).maximum
    console.width = max(console.width, width)  # wider than the terminal rather than cut off
    console.print(out)
    plot(runs, args.metric, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
