"""`python -m finetune_operator`: run the FineTuneJob operator against the current kubeconfig.

python -m finetune_operator                       # all namespaces, with peering
python -m finetune_operator --namespace team-a --namespace team-b --standalone
"""

# ruff: noqa: E402  (the guard below must run before kopf is imported)
from __future__ import annotations

import sys

# kopf imports the kubernetes client whenever it is installed, only to recognise the client's model
# classes, which the operator never hands it: 285 modules and 10 MiB of the operator's memory. The
# operator talks to the API server through adapters/rest.py, so in this process the client stays
# unimported (ftctl, in its own process, still uses it).
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]

import argparse
import copy
import dataclasses
import logging
import random
from collections.abc import Sequence

import kopf

from finetune_operator import handlers
from finetune_operator import settings as settings_module
from finetune_operator.adapters import metrics_server, preflight
from finetune_operator.adapters.kube import JobApi
from finetune_operator.adapters.login import login
from finetune_operator.adapters.rest import Rest
from finetune_operator.controller import Controller
from finetune_operator.metrics import build_metrics


class JobPrefixFormatter(logging.Formatter):
    """Starts a job's lines with `[namespace/name]`. The job loops log through kopf's ObjectLogger, which
    carries the job's reference (and posts warnings as events on it) but leaves the prefix to kopf's own
    log setup, which this process does not use."""

    def format(self, record: logging.LogRecord) -> str:
        ref = getattr(record, "k8s_ref", None)
        if ref:
            record = copy.copy(record)
            where = "/".join(part for part in (ref.get("namespace"), ref.get("name")) if part)
            record.msg = f"[{where}] {record.msg}"
        return super().format(record)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_operator",
        description="Run the FineTuneJob operator. Every setting can also be given as FINETUNE_<GROUP>_<FIELD> "
        "(see finetune_operator/settings.py); flags win over the environment.",
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster account, $KUBECONFIG, ~/.kube/config)"
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch only this namespace (repeat for more; globs like team-* work); default: all namespaces",
    )
    parser.add_argument(
        "--standalone", action="store_true", default=None, help="run without peering (one replica)"
    )
    parser.add_argument("--peering-name", help="KopfPeering/ClusterKopfPeering object the replicas share")
    parser.add_argument("--priority", type=int, help="peering priority of this replica (default: random)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics port (0 disables; default 8080)"
    )
    parser.add_argument("--health-port", type=int, help="liveness /healthz port (0 disables; default 8081)")
    parser.add_argument("--trainer-image", help="trainer image for jobs that name none")
    parser.add_argument(
        "--webhook-port",
        type=int,
        help="serve the validating admission webhook on this port and register it (0 disables; default 0)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> settings_module.Settings:
    base = settings_module.from_env()
    peering = base.peering
    if args.standalone is not None:
        peering = dataclasses.replace(peering, standalone=args.standalone)
    if args.peering_name:
        peering = dataclasses.replace(peering, name=args.peering_name)
    if args.priority is not None:
        peering = dataclasses.replace(peering, priority=args.priority)
    metrics = base.metrics
    if args.metrics_port is not None:
        metrics = dataclasses.replace(metrics, port=args.metrics_port)
    if args.health_port is not None:
        metrics = dataclasses.replace(metrics, health_port=args.health_port)
    trainer = base.trainer
    if args.trainer_image:
        trainer = dataclasses.replace(trainer, image=args.trainer_image)
    webhook = base.webhook
    if args.webhook_port is not None:
        webhook = dataclasses.replace(webhook, port=args.webhook_port)
    namespaces = tuple(args.namespaces) if args.namespaces else base.namespaces
    return dataclasses.replace(
        base, peering=peering, metrics=metrics, trainer=trainer, webhook=webhook, namespaces=namespaces
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JobPrefixFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    settings = build_settings(args)
    metrics = build_metrics(retention_seconds=settings.metrics.finished_retention_seconds)
    try:
        # The writer threads and the two informers' watches each hold a connection.
        rest = Rest(lambda: login(args.kubeconfig), pool_size=settings.timing.api_threads + 4)
    except (kopf.LoginError, OSError) as exc:
        logging.getLogger("finetune_operator").error("cannot log in to the API server: %s", exc)
        return 1
    api = JobApi(rest)
    found = preflight.problems(api.rest, settings)
    for problem in found:
        logging.getLogger("finetune_operator").error("cannot act: %s", problem)
    controller = Controller(settings, api, metrics, preflight_problems=tuple(found))
    registry = kopf.OperatorRegistry()
    handlers.register(registry, controller, settings)
    metrics_server.serve(metrics.registry, settings.metrics.port)
    peering = settings.peering
    # Equal priorities would let two replicas act at once; a random one makes a tie vanishingly rare.
    priority = peering.priority or random.randint(1, 2**31 - 1)
    health = settings.metrics.health_port
    kopf.run(
        registry=registry,
        standalone=peering.standalone,
        # A named peering is mandatory in kopf: without its CRD/object the operator waits rather than
        # risk two replicas acting. Standalone runs have no peering at all.
        peering_name=None if peering.standalone else peering.name,
        priority=priority,
        namespaces=settings.namespaces,
        clusterwide=not settings.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health}/healthz" if health else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
