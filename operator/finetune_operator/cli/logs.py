"""`ftctl logs`: a worker's log (rank 0 unless --rank), followed with -f until the worker ends.

ftctl logs NAME [-f] [--rank N] [--tail N] [-n NAMESPACE]
"""

from __future__ import annotations

import argparse

from finetune_operator.cli.common import HelpFormatter, add_cluster_options, client_for


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "logs", help="print or follow a worker's log", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("name", help="the job")
    add_cluster_options(p)
    p.add_argument("-f", "--follow", action="store_true", help="stream new lines until the worker ends")
    p.add_argument("--rank", type=int, default=0, help="which worker (node rank)")
    p.add_argument("--tail", type=int, help="only the last N lines (default: all)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for line in client_for(args).logs(args.name, rank=args.rank, follow=args.follow, tail=args.tail):
        print(line, flush=True)
    return 0
