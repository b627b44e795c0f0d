"""`ftctl render`: the objects the operator would create for a FineTuneJob, like `helm template`.

    ftctl render -f FILE|DIR|- [-n NAMESPACE] [--attempt N] [-o yaml|json]

The same pipeline the controller runs (parse → plan → gang → scheduling plug-in → objects), with the
operator's settings from the environment (`FINETUNE_TRAINER_IMAGE`, …), so what it prints is what the
operator creates: the ConfigMap, the headless Service, the PodGroup of a coscheduled job
(`FINETUNE_SCHEDULING_GANG_SCHEDULING=coscheduling` renders every job so) and one worker pod per node.
The owner reference carries the job's `metadata.uid` when the file has one (the API server assigns it).
Several jobs render into one List. Exits 1 with the reason when a job cannot run (the webhook's answer),
2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from finetune_operator.cli.common import HelpFormatter, add_filename_option, add_output_option
from finetune_operator.core.desire import SpecProblem, desire
from finetune_operator.core.gang import JobRef
from finetune_operator.core.render import to_yaml
from finetune_operator.manifests import load_jobs
from finetune_operator.scheduling import refiner_for
from finetune_operator.settings import from_env

#: Exit status when the job cannot run (the reason is printed), as `ftctl plan` does for a misfit.
CANNOT_RUN = 1
#: Stands in for the UID the API server gives a job that was never created.
UNCREATED_UID = "00000000-0000-0000-0000-000000000000"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "render",
        help="print the ConfigMap, Service and pods the operator would create for a FineTuneJob",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_filename_option(p)
    p.add_argument(
        "-n", "--namespace", help="namespace (default: the job's metadata.namespace, else default)"
    )
    p.add_argument("--attempt", type=int, default=0, help="the gang's attempt, i.e. restarts so far")
    add_output_option(p, ("yaml", "json"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    objects: list[dict[str, Any]] = []
    settings = from_env()
    options, scheduling = settings.render_options(), settings.scheduling_options()
    for loaded in load_jobs(args.filename):
        job, meta = loaded.job, loaded.job.metadata
        ref = JobRef(
            name=meta.name,
            namespace=args.namespace or meta.namespace or "default",
            uid=meta.uid or UNCREATED_UID,
            generation=meta.generation or 1,
        )
        desired = desire(job, ref, options, args.attempt, refiner_for(job, scheduling))
        if isinstance(desired, SpecProblem):
            print(f"ftctl render: {loaded.where}: {desired.reason}: {desired.message}", file=sys.stderr)
            return CANNOT_RUN
        objects += [desired.configmap, desired.service, *desired.companions, *desired.pods]
    if args.output == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        sys.stdout.write(to_yaml(objects))
    return 0
