"""What the operator checks as it starts: the things whose absence makes it do nothing without a word.

kopf waits forever for a missing peering object, and a missing CRD or permission fails every reconcile
with a stack of API errors; a newcomer's operator then looks idle. Each problem found is one line that
says what to do, logged at ERROR and reported by the health endpoint (the `preflight` probe).
"""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.adapters.rest import ApiError, Rest, collection
from finetune_operator.api.models import GROUP, PLURAL
from finetune_operator.settings import Settings

#: What the operator must be allowed to do, as (verb, group, resource).
NEEDED = (
    ("list", GROUP, PLURAL),
    ("watch", GROUP, PLURAL),
    ("patch", GROUP, f"{PLURAL}/status"),
    ("create", "", "pods"),
    ("delete", "", "pods"),
    ("create", "", "events"),
    # The replica acts while kopf runs its one daemon, on the FineTuneJob CRD (handlers.py).
    ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
)
#: Of those, the resources that live outside namespaces.
CLUSTER_SCOPED = frozenset({"customresourcedefinitions"})


def problems(rest: Rest, settings: Settings) -> list[str]:
    """One line per thing that keeps the operator from acting, with what to do; empty when ready."""
    return list(_crd(rest)) + list(_peering(rest, settings)) + list(_access(rest, settings))


def _crd(rest: Rest) -> Iterator[str]:
    crds = collection("apiextensions.k8s.io", "v1", "customresourcedefinitions")
    try:
        rest.get(f"{crds}/{PLURAL}.{GROUP}")
    except ApiError as exc:
        if exc.status == 404:
            yield (
                f"the FineTuneJob CRD ({PLURAL}.{GROUP}) is not installed: kubectl apply --server-side -f "
                "crds/ (or install the Helm chart, which brings it)"
            )


def _peering(rest: Rest, settings: Settings) -> Iterator[str]:
    peering = settings.peering
    if peering.standalone:
        return
    exact = [ns for ns in settings.namespaces if not any(c in ns for c in "*?[")]
    scopes: list[str | None] = list(exact) if settings.namespaces else [None]
    for namespace in scopes:
        plural = "clusterkopfpeerings" if namespace is None else "kopfpeerings"
        try:
            rest.get(f"{collection('kopf.dev', 'v1', plural, namespace)}/{peering.name}")
        except ApiError as exc:
            if exc.status == 404:
                kind = "ClusterKopfPeering" if namespace is None else f"KopfPeering in namespace {namespace}"
                yield (
                    f"no {kind} named {peering.name!r}: kopf waits for it and does nothing. Install the Helm "
                    "chart (it creates one), apply one, or run a single replica with --standalone"
                )


def _access(rest: Rest, settings: Settings) -> Iterator[str]:
    reviews = collection("authorization.k8s.io", "v1", "selfsubjectaccessreviews")
    watched = next((ns for ns in settings.namespaces if not any(c in ns for c in "*?[")), None)
    for verb, group, resource in NEEDED:
        plural, _, subresource = resource.partition("/")
        namespace = None if plural in CLUSTER_SCOPED else watched
        attributes = {"verb": verb, "group": group, "resource": plural}
        attributes.update({"subresource": subresource} if subresource else {})
        attributes.update({"namespace": namespace} if namespace else {})
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        try:
            answer = rest.create(reviews, review).get("status")
        except ApiError:
            return  # cannot ask: the reconciles will say what is refused
        if answer is not None and not answer.get("allowed"):
            where = f" in namespace {namespace}" if namespace else " cluster-wide"
            yield (
                f"this account may not {verb} {resource}{where}: grant it (the chart's ClusterRole has every "
                "rule the operator needs)"
            )
