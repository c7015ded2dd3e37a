"""``qtulu study STUDY.yaml [--out DIR] [--plan]``: run (or resume) a study; print its table."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="the paper's experiment: one adapter per recipe on one base, every row evaluated, the table",
        description="Train one adapter per recipe of STUDY.yaml on one base, evaluate the base and every adapter "
                    "(and an optional merge chosen by the suite) on its tasks with the adapters swapped on one "
                    "loaded base, and write DIR/results.{json,md} and DIR/heatmap.png. Every cell is cached by "
                    "the hash of what produced it: the same command resumes an interrupted study, runs only the "
                    "cells a new recipe or task adds, and on a finished study runs nothing.",
    )
    p.add_argument("study", help="study file (YAML), or a name in recipes/studies/ (e.g. demo)")
    p.add_argument("--out", default=None, help="output directory (default: studies/NAME)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that is not a qtulu study")
    p.add_argument("--plan", action="store_true", help="list the cells, complete or to run, and stop (loads no model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from qtulu.study.runner import run_study

    run_study(args.study, args.out, progress=not args.no_progress, plan_only=args.plan, overwrite=args.overwrite)
    return 0
