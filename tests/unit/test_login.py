"""Where the operator's credentials come from, read without the kubernetes client: kubeconfigs merged as
kubectl merges them (file references relative to their file), the pod's service account in the cluster,
and a plain refusal for a user only an exec plugin can log in."""

from __future__ import annotations

from pathlib import Path

import kopf
import pytest
import yaml

from finetune_operator.adapters.login import from_kubeconfig, in_cluster


def write(path: Path, config: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def kubeconfig(context: str, cluster: dict[str, object], user: dict[str, object]) -> dict[str, object]:
    return {
        "current-context": context,
        "contexts": [{"name": context, "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
    }


def test_the_current_context_with_its_files_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    path = write(
        tmp_path / "kube" / "config",
        kubeconfig(
            "local",
            {"server": "https://127.0.0.1:6443", "certificate-authority": "pki/ca.crt"},
            {"client-certificate": "pki/admin.crt", "client-key": "/abs/admin.key"},
        ),
    )
    info = from_kubeconfig([path])
    assert info.server == "https://127.0.0.1:6443"
    assert info.ca_path == str(tmp_path / "kube" / "pki" / "ca.crt")
    assert info.certificate_path == str(tmp_path / "kube" / "pki" / "admin.crt")
    assert info.private_key_path == "/abs/admin.key"
    assert info.default_namespace == "team-a"


def test_kubeconfigs_merge_first_wins_and_a_missing_one_is_skipped(tmp_path: Path) -> None:
    first = write(tmp_path / "a", kubeconfig("one", {"server": "https://one"}, {"token": "t1"}))
    second = kubeconfig("two", {"server": "https://two"}, {"token": "t2"})
    second["contexts"] = [{"name": "one", "context": {"cluster": "c", "user": "u"}}]  # already named
    token = tmp_path / "token"
    token.write_text("from-file\n")
    third = write(tmp_path / "c", kubeconfig("three", {"server": "https://three"}, {"tokenFile": "token"}))

    assert from_kubeconfig([tmp_path / "absent", first, write(tmp_path / "b", second)]).token == "t1"
    info = from_kubeconfig([third, first])
    assert (info.server, info.token) == ("https://three", "from-file")


def test_a_user_that_needs_an_exec_plugin_is_refused_by_name(tmp_path: Path) -> None:
    path = write(
        tmp_path / "config",
        kubeconfig(
            "eks", {"server": "https://eks"}, {"exec": {"command": "aws", "args": ["eks", "get-token"]}}
        ),
    )
    with pytest.raises(kopf.LoginError, match="user 'u' authenticates through exec"):
        from_kubeconfig([path])


def test_no_kubeconfig_or_no_current_context_says_so(tmp_path: Path) -> None:
    with pytest.raises(kopf.LoginError, match="no kubeconfig at"):
        from_kubeconfig([tmp_path / "absent"])
    config = kubeconfig("x", {"server": "https://x"}, {})
    del config["current-context"]
    with pytest.raises(kopf.LoginError, match="has no current context"):
        from_kubeconfig([write(tmp_path / "config", config)])


def test_a_malformed_kubeconfig_is_a_login_error_not_a_traceback(tmp_path: Path) -> None:
    no_server = write(tmp_path / "no-server", kubeconfig("x", {"certificate-authority": "ca.crt"}, {}))
    with pytest.raises(kopf.LoginError, match="names no cluster with a server"):
        from_kubeconfig([no_server])
    nameless = kubeconfig("x", {"server": "https://x"}, {})
    nameless["users"] = [{"user": {"token": "t"}}]
    with pytest.raises(kopf.LoginError, match="an entry in users without a name"):
        from_kubeconfig([write(tmp_path / "nameless", nameless)])
    broken = tmp_path / "broken"
    broken.write_text("clusters: [unclosed\n")
    with pytest.raises(kopf.LoginError, match="is not YAML"):
        from_kubeconfig([broken])


def test_in_the_cluster_the_service_account_and_the_address_the_kubelet_gave(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "namespace").write_text("finetune-system")
    (tmp_path / "ca.crt").write_text("")
    info = in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert (info.server, info.token, info.default_namespace) == (
        "https://10.96.0.1:443",
        "sa-token",
        "finetune-system",
    )
    assert info.ca_path == str(tmp_path / "ca.crt")
    assert in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "fd00::1"}).server == "https://[fd00::1]:443"
