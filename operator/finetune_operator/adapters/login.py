"""Where the operator's credentials come from: the pod's service account in the cluster, a kubeconfig
outside it. One `kopf.ConnectionInfo` serves kopf's watches and the operator's own requests (rest.py).

Read here rather than by the kubernetes client, which the operator does not load (see rest.py). A
kubeconfig user may authenticate with a token (or a token file), a client certificate or a password:
what works without running anything. A user that needs an exec plugin or an auth provider (a cloud's
`get-token`) is refused with a message that says so, rather than left to fail every request with 401.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import kopf
import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: kubeconfig fields that name a file, relative to the kubeconfig that holds them.
FILE_FIELDS = ("certificate-authority", "client-certificate", "client-key", "tokenFile")


def login(kubeconfig: str | None = None) -> kopf.ConnectionInfo:
    """An explicit kubeconfig; else the pod's service account; else $KUBECONFIG or ~/.kube/config: the
    order the kubernetes client follows. Called again on a 401, so a rotated token is read anew."""
    if kubeconfig:
        return from_kubeconfig([Path(kubeconfig)])
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT / "token").exists():
        return in_cluster(SERVICE_ACCOUNT, os.environ)
    listed = [Path(p).expanduser() for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return from_kubeconfig(listed or [Path("~/.kube/config").expanduser()])


def in_cluster(account: Path, environ: Mapping[str, str]) -> kopf.ConnectionInfo:
    """The API server the kubelet told the pod of (by address: cluster DNS may not be up yet), and the
    service account's token and CA."""
    host, port = environ["KUBERNETES_SERVICE_HOST"], environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    namespace = account / "namespace"
    return kopf.ConnectionInfo(
        server=f"https://{host}:{port}",
        ca_path=str(account / "ca.crt"),
        token=(account / "token").read_text().strip(),
        default_namespace=namespace.read_text().strip() if namespace.exists() else None,
    )


def from_kubeconfig(paths: Sequence[Path]) -> kopf.ConnectionInfo:
    """The current context's cluster and user from these kubeconfigs, merged as kubectl merges them: the
    first file to set a name or the current context wins; a listed file that does not exist is skipped."""
    current: str | None = None
    entries: dict[str, dict[str, dict[str, Any]]] = {"contexts": {}, "clusters": {}, "users": {}}
    found = [path for path in paths if path.exists()]
    if not found:
        raise kopf.LoginError(f"no kubeconfig at {', '.join(map(str, paths))}, and not in a cluster")
    for path in found:
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise kopf.LoginError(f"the kubeconfig {path} is not YAML: {error}") from error
        current = current or config.get("current-context")
        for section, key in (("contexts", "context"), ("clusters", "cluster"), ("users", "user")):
            for item in config.get(section) or []:
                if "name" not in item:
                    raise kopf.LoginError(f"the kubeconfig {path} has an entry in {section} without a name")
                entries[section].setdefault(item["name"], resolved(item.get(key) or {}, path.parent))
    if not current or current not in entries["contexts"]:
        raise kopf.LoginError(f"the kubeconfig ({', '.join(map(str, found))}) has no current context")
    context = entries["contexts"][current]
    cluster = entries["clusters"].get(context.get("cluster", ""))
    if not cluster or not cluster.get("server"):
        raise kopf.LoginError(
            f"context {current!r} names no cluster with a server that the kubeconfig defines"
        )
    user_name = context.get("user", "")
    user = entries["users"].get(user_name, {})
    plugin = next((key for key in ("exec", "auth-provider") if key in user), None)
    if plugin is not None:
        raise kopf.LoginError(
            f"kubeconfig user {user_name!r} authenticates through {plugin}, which the operator does not run: "
            "give it a kubeconfig with a token or a client certificate, or run it in the cluster"
        )
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = Path(user["tokenFile"]).read_text().strip()
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=cluster.get("certificate-authority"),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=cluster.get("insecure-skip-tls-verify"),
        proxy_url=cluster.get("proxy-url"),
        token=token,
        certificate_path=user.get("client-certificate"),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=user.get("client-key"),
        private_key_data=user.get("client-key-data"),
        username=user.get("username"),
        password=user.get("password"),
        default_namespace=context.get("namespace"),
    )


def resolved(entry: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """A kubeconfig entry with its file references made absolute against its file's folder."""
    return {
        key: str(base / Path(value).expanduser()) if key in FILE_FIELDS and value else value
        for key, value in entry.items()
    }
