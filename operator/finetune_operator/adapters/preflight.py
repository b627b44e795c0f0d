"""What the operator checks as it starts: the things whose absence makes it do nothing without a word.

kopf waits forever for a missing peering object, and a missing CRD or permission fails every reconcile
with a stack of API errors; a newcomer's operator then looks idle. Each problem found is one line that
says what to do, logged at ERROR and reported by the health endpoint (the `preflight` probe).
"""

from __future__ import annotations

from collections.abc import Iterator

from kubernetes import client
from kubernetes.client.exceptions import ApiException

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
)


def problems(api_client: client.ApiClient, settings: Settings) -> list[str]:
    """One line per thing that keeps the operator from acting, with what to do; empty when ready."""
    return list(_crd(api_client)) + list(_peering(api_client, settings)) + list(_access(api_client, settings))


def _crd(api_client: client.ApiClient) -> Iterator[str]:
    try:
        client.ApiextensionsV1Api(api_client).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    except ApiException as exc:
        if exc.status == 404:
            yield (
                f"the FineTuneJob CRD ({PLURAL}.{GROUP}) is not installed: kubectl apply --server-side -f "
                "crds/ (or install the Helm chart, which brings it)"
            )


def _peering(api_client: client.ApiClient, settings: Settings) -> Iterator[str]:
    peering = settings.peering
    if peering.standalone:
        return
    objects = client.CustomObjectsApi(api_client)
    exact = [ns for ns in settings.namespaces if not any(c in ns for c in "*?[")]
    scopes: list[str | None] = list(exact) if settings.namespaces else [None]
    for namespace in scopes:
        try:
            if namespace is None:
                objects.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering.name)
            else:
                objects.get_namespaced_custom_object(
                    "kopf.dev", "v1", namespace, "kopfpeerings", peering.name
                )
        except ApiException as exc:
            if exc.status == 404:
                kind = "ClusterKopfPeering" if namespace is None else f"KopfPeering in namespace {namespace}"
                yield (
                    f"no {kind} named {peering.name!r}: kopf waits for it and does nothing. Install the Helm "
                    "chart (it creates one), apply one, or run a single replica with --standalone"
                )


def _access(api_client: client.ApiClient, settings: Settings) -> Iterator[str]:
    authorization = client.AuthorizationV1Api(api_client)
    namespace = next((ns for ns in settings.namespaces if not any(c in ns for c in "*?[")), None)
    for verb, group, resource in NEEDED:
        plural, _, subresource = resource.partition("/")
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb=verb,
                    group=group,
                    resource=plural,
                    subresource=subresource or None,
                    namespace=namespace,
                )
            )
        )
        try:
            answer = authorization.create_self_subject_access_review(review).status
        except ApiException:
            return  # cannot ask: the reconciles will say what is refused
        if answer is not None and not answer.allowed:
            where = f" in namespace {namespace}" if namespace else " cluster-wide"
            yield (
                f"this account may not {verb} {resource}{where}: grant it (the chart's ClusterRole has every "
                "rule the operator needs)"
            )
