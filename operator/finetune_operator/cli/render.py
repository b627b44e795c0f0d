"""`ftctl render`: the objects the operator would create for a FineTuneJob, like `helm template`.

    ftctl render -f job.yaml [-n NAMESPACE] [--attempt N] [-o yaml|json]

The same pipeline the controller runs (parse → plan → gang → scheduling plug-in → objects), with the
operator's settings from the environment (`FINETUNE_TRAINER_IMAGE`, …), so what it prints is what the
operator creates: the ConfigMap, the headless Service and one worker pod per node. The owner reference
carries the job's `metadata.uid` when the file has one (the API server assigns it). Exits 1 with the
reason when the job cannot run (the webhook's answer), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune_operator.cli.common import load_job
from finetune_operator.core.desire import SpecProblem, desire
from finetune_operator.core.gang import JobRef
from finetune_operator.core.render import to_yaml
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-f", "--filename", type=Path, required=True, help="FineTuneJob YAML")
    p.add_argument(
        "-n", "--namespace", help="namespace (default: the job's metadata.namespace, else default)"
    )
    p.add_argument(
        "--attempt", type=int, default=0, help="the gang's attempt, i.e. restarts so far (default: 0)"
    )
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="default: yaml")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    job = load_job(args.filename)
    meta = job.metadata
    ref = JobRef(
        name=meta.name,
        namespace=args.namespace or meta.namespace or "default",
        uid=meta.uid or UNCREATED_UID,
        generation=meta.generation or 1,
    )
    desired = desire(job, ref, from_env().render_options(), args.attempt, refiner_for(job))
    if isinstance(desired, SpecProblem):
        print(f"ftctl render: {desired.reason}: {desired.message}", file=sys.stderr)
        return CANNOT_RUN
    objects = [desired.configmap, desired.service, *desired.pods]
    if args.output == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        sys.stdout.write(to_yaml(objects))
    return 0
