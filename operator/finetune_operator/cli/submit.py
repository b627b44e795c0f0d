"""`ftctl submit`: plan each job here, then create it (or update its spec), like `kubectl apply` with the
planner in front: a job that does not fit never reaches the cluster.

    ftctl submit -f job.yaml [-n NAMESPACE] [--wait]

Exits 1 when a job does not fit (nothing is submitted) or, with --wait, when it fails.
"""

from __future__ import annotations

import argparse
import sys

from finetune_operator.cli.common import HelpFormatter, add_cluster_options, add_filename_option, client_for
from finetune_operator.core.plan import plan
from finetune_operator.manifests import load_jobs

FAILED = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "submit",
        help="plan, then create or update FineTuneJobs",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_filename_option(p)
    add_cluster_options(p)
    p.add_argument("--wait", action="store_true", help="wait until every job succeeded or one failed")
    p.add_argument("--timeout", type=float, default=86400.0, help="seconds --wait waits")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from finetune_operator.client import JobFailed  # the kubernetes client, for cluster commands only

    jobs = load_jobs(args.filename)
    misfits = [(j, plan(j.job.spec)) for j in jobs]
    misfits = [(j, p) for j, p in misfits if not p.fits]
    for loaded, result in misfits:
        print(
            f"ftctl submit: {loaded.where}: {loaded.job.metadata.name} does not fit: {result.message}",
            file=sys.stderr,
        )
    if misfits:
        return FAILED  # all or nothing: a half-submitted file is harder to reason about
    client = client_for(args)
    for loaded in jobs:
        result = client.submit(loaded.job, args.namespace)
        namespace = args.namespace or loaded.job.metadata.namespace or client.namespace
        print(
            f"finetunejob.finetune.dev/{loaded.job.metadata.name} submitted to {namespace}: {result.message}"
        )
    if not args.wait:
        return 0
    try:
        for loaded in jobs:
            status = client.wait(loaded.job.metadata.name, args.namespace, timeout=args.timeout)
            print(f"finetunejob.finetune.dev/{loaded.job.metadata.name} {status.phase}: {status.message}")
    except (JobFailed, TimeoutError) as exc:
        print(f"ftctl submit: {exc}", file=sys.stderr)
        return FAILED
    return 0
