"""The Kubernetes manifests in deploy/kubernetes, checked offline (never applied to a cluster here).

The core kinds against Kubernetes' own schemas (kubernetes-validate, strict: a field Kubernetes does not know
fails), KEDA's kinds against the CRDs kept in deploy/kubernetes/crds, and what no schema knows: that the
ScaledObjects target the worker Deployments and count every list of their kind's queue, that the thresholds
follow from the settings, and that the settings, Secrets, commands and images named are real.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from producer.cli import main as inferq_cli
from producer.contract import queue_keys, queue_name
from producer.settings import KINDS, Settings
from tests.conftest import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"
CRDS = MANIFESTS / "crds"
# The Kubernetes versions KEDA v2.20 (the CRDs' release) is tested on: https://keda.sh/docs/2.22/operate/cluster/
KUBERNETES_VERSIONS = ("1.33", "1.34", "1.35")
# The trigger metadata KEDA's redis scaler reads (pkg/scalers/redis_scaler.go at v2.20.2, the `keda:"name=..."`
# tags; not their <name>FromEnv forms, which these manifests do not use). KEDA ignores any other key unless
# KEDA_CHECK_UNEXPECTED_SCALERS_PARAMS=enabled, so a misspelt one silently leaves its setting at the default.
REDIS_SCALER_KEYS = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                     "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl"}
# Kubernetes replaces $(NAME) in env values, command and args with an env var defined before it; an unknown
# name is left as it is, silently.
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@functools.cache
def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"no manifests in {MANIFESTS}"
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents() if doc["kind"] == kind]


def name(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def workers() -> dict[str, dict[str, Any]]:
    """The worker Deployments by the kind they serve (their `--kinds`)."""
    found = {}
    for deployment in of_kind("Deployment"):
        command = containers(deployment)[0]["command"]
        if command[:2] == ["inferq", "worker"]:
            found[command[command.index("--kinds") + 1]] = deployment
    return found


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def all_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in containers(doc):
                yield f"{name(doc)} {container['name']}", container


# --- the schemas ---------------------------------------------------------------------------------------------

def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others.

    A CRD's structural schema lets the API server prune unknown fields rather than refuse them, but kubectl asks
    for strict field validation by default (`--validate=strict`), and then an unknown field is an error."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator of that CRD's stored version's openAPIV3Schema."""
    found: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            schema = closed(version["schema"]["openAPIV3Schema"])
            # OpenAPI v3.0's schema object is JSON Schema draft 4's keywords (boolean exclusiveMinimum, ...);
            # its `format: int32` and the x-kubernetes-* extensions are unknown to jsonschema and ignored.
            found[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = \
                jsonschema.Draft4Validator(schema)
    return found


def problems(doc: dict[str, Any], version: str = KUBERNETES_VERSIONS[-1]) -> list[str]:
    """What the API server's schemas would refuse in this object (empty: nothing)."""
    validator = crd_validators().get((doc["apiVersion"], doc["kind"]))
    if validator is None:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
        return []
    found = [f"{'.'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(doc)]
    # A CRD leaves metadata to the API server, which checks it as any object's ObjectMeta: as a ConfigMap's.
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        found.append(f"{'.'.join(map(str, exc.path))}: {exc.message}")
    spec = doc.get("spec", {})
    # the ScaledObject CRD's x-kubernetes-validations rule (CEL, which jsonschema does not run)
    if doc["kind"] == "ScaledObject" and spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        found.append("spec: minReplicaCount must be less than or equal to maxReplicaCount")
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_core_object_passes_kubernetes_schemas(version: str) -> None:
    for doc in documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        # raises SchemaNotFoundError for a kind or apiVersion this Kubernetes does not have
        assert problems(doc, version) == [], name(doc)


def test_every_keda_object_passes_its_crd() -> None:
    validators = crd_validators()
    keda = [doc for doc in documents() if doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        assert (doc["apiVersion"], doc["kind"]) in validators, f"no CRD kept for {doc['apiVersion']} {doc['kind']}"
        assert problems(doc) == [], name(doc)


def mutated(kind: str, path: str, value: Any) -> dict[str, Any]:
    """The first object of `kind`, with the dotted `path` (list indexes as numbers) set to `value`."""
    doc = copy.deepcopy(of_kind(kind)[0])
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    target = doc
    for part in parents:
        target = target[part]
    target[last] = value
    return doc


@pytest.mark.parametrize(("kind", "path", "value", "named"), [
    # a misspelt field, deep in a pod template
    ("Deployment", "spec.template.spec.terminationGracePeriodSecond", 130, "terminationGracePeriodSecond"),
    ("Deployment", "spec.template.spec.containers.0.resources.limits", "nvidia.com/gpu: 1", "limits"),
    ("StatefulSet", "spec.replicas", "one", "replicas"),
    ("ScaledObject", "spec.pollingInteval", 30, "pollingInteval"),  # only the closed schema refuses it
    ("ScaledObject", "spec.advanced.scalingModifiers.metricType", "Utilization", "metricType"),  # not in its enum
    ("ScaledObject", "spec.triggers.0.metadata.databaseIndex", 0, "databaseIndex"),  # metadata values are strings
    ("ScaledObject", "spec.minReplicaCount", 5, "minReplicaCount"),  # over maxReplicaCount (the CRD's CEL rule)
    ("ScaledObject", "metadata.namespce", "inferq", "namespce"),  # ObjectMeta, which the CRD leaves to the server
    ("TriggerAuthentication", "spec.secretTargetRef.0", {"name": "inferq-redis", "key": "password"}, "parameter"),
])
def test_the_schema_checks_can_fail(kind: str, path: str, value: Any, named: str) -> None:
    found = problems(mutated(kind, path, value))
    assert any(named in problem for problem in found), found


# --- what no schema knows --------------------------------------------------------------------------------------

def test_each_kind_has_a_worker_deployment_with_one_gpu_a_pod() -> None:
    found = workers()
    assert set(found) == set(KINDS)
    for kind, deployment in found.items():
        (container,) = containers(deployment)
        assert container["command"] == ["inferq", "worker", "--kinds", kind, "--name", "inferq@%h"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "replicas" not in deployment["spec"], "KEDA's HPA owns the replica count"


def test_the_worker_deployments_differ_only_in_their_kind() -> None:
    # three copies of one Deployment (plain YAML has no templates): a change to one must reach all three
    shapes = {json.dumps(deployment, sort_keys=True).replace(kind, "KIND") for kind, deployment in workers().items()}
    assert len(shapes) == 1


def test_each_worker_deployment_is_scaled_on_every_list_of_its_queue() -> None:
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in of_kind("ScaledObject")}
    deployments = {doc["metadata"]["name"] for doc in of_kind("Deployment")}
    assert set(scaled) <= deployments, "a ScaledObject names a Deployment these manifests do not have"
    authentications = {doc["metadata"]["name"] for doc in of_kind("TriggerAuthentication")}
    for kind, deployment in workers().items():
        scaled_object = scaled.pop(deployment["metadata"]["name"])
        assert scaled_object["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        triggers = scaled_object["spec"]["triggers"]
        assert all(trigger["type"] == "redis" for trigger in triggers)
        # the Redis keys Kombu keeps the queue's priority steps in: exactly these, each read once
        lists = sorted(trigger["metadata"].get("listName", "") for trigger in triggers)
        assert lists == sorted(queue_keys(queue_name(kind)))
        for trigger in triggers:
            assert set(trigger["metadata"]) <= REDIS_SCALER_KEYS, trigger["metadata"]
            assert trigger["authenticationRef"]["name"] in authentications
        # the HPA sees the formula's result: it must add up every trigger, once
        formula = scaled_object["spec"]["advanced"]["scalingModifiers"]["formula"]
        assert sorted(term.strip() for term in formula.split("+")) == sorted(trigger["name"] for trigger in triggers)
    assert not scaled, f"ScaledObjects for Deployments that are not workers: {sorted(scaled)}"


def resolved_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's plain env values, $(NAME) references replaced by stand-ins of the Secrets' values."""
    stand_ins = {"REDIS_ADDRESS": "redis.inferq.svc:6379", "REDIS_PASSWORD": "0123abcd"}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = REFERENCE.sub(lambda match: stand_ins[match.group(1)], var["value"])
    return env


def worker_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a worker pod reads: the ConfigMap and its own env."""
    (config_map,) = of_kind("ConfigMap")
    container = containers(workers()["embed"])[0]
    for key in [key for key in os.environ if key.startswith("INFERQ_")]:
        monkeypatch.delenv(key)
    for key, value in {**config_map["data"], **resolved_env(container)}.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_the_thresholds_follow_from_the_workers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = worker_settings(monkeypatch)
    intake = settings.worker_concurrency * settings.worker_prefetch_multiplier  # what one worker takes and holds
    for deployment in workers().values():
        # the warm shutdown's wait for what the worker holds is bounded by the longest time limit
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace == settings.time_limits.longest + 10
    for scaled_object in of_kind("ScaledObject"):
        spec = scaled_object["spec"]
        assert float(spec["advanced"]["scalingModifiers"]["target"]) == intake
        assert spec["minReplicaCount"] >= 1, "the gateway refuses a kind no worker serves: zero never wakes"
        # KEDA reads the database the workers use
        database = settings.broker.rsplit("/", 1)[1]
        assert {trigger["metadata"]["databaseIndex"] for trigger in spec["triggers"]} == {database}


def setting_names() -> set[str]:
    """Every variable inferq's settings read: INFERQ_<FIELD>, and INFERQ_<FIELD>__<SUB> for nested models."""
    prefix = Settings.model_config["env_prefix"]
    delimiter = Settings.model_config["env_nested_delimiter"]
    assert prefix and delimiter
    names = set()
    for field, info in Settings.model_fields.items():
        names.add(f"{prefix}{field}".upper())
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names |= {f"{prefix}{field}{delimiter}{sub}".upper() for sub in info.annotation.model_fields}
    return names


def test_every_inferq_variable_is_a_real_setting() -> None:
    real = setting_names()
    (config_map,) = of_kind("ConfigMap")
    named = {key for key in config_map["data"] if key.startswith("INFERQ_")}
    for _, container in all_containers():
        named |= {var["name"] for var in container.get("env", []) if var["name"].startswith("INFERQ_")}
    assert named - real == set()
    assert "INFERQ_REDIS_URL" in named


def test_references_name_variables_defined_before_them() -> None:
    config_maps = {doc["metadata"]["name"] for doc in of_kind("ConfigMap")}
    for where, container in all_containers():
        defined: set[str] = set()
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps, where
        for var in container.get("env", []):
            assert set(REFERENCE.findall(var.get("value", ""))) <= defined, f"{where}: {var['name']}"
            defined.add(var["name"])
        for word in [*container.get("command", []), *container.get("args", [])]:
            assert set(REFERENCE.findall(word)) <= defined, f"{where}: {word}"


def documented_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the README's `kubectl create secret generic` commands."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    found: dict[str, set[str]] = {}
    for line in readme.splitlines():
        command = re.search(r"create secret generic (\S+)(.*)", line)
        if command:
            found[command.group(1)] = set(re.findall(r"--from-literal=([\w.-]+)=", command.group(2)))
    return found


def test_every_secret_key_used_is_one_the_readme_creates() -> None:
    documented = documented_secrets()
    used: dict[str, set[str]] = {}
    for _, container in all_containers():
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                used.setdefault(ref["name"], set()).add(ref["key"])
    for authentication in of_kind("TriggerAuthentication"):
        for ref in authentication["spec"]["secretTargetRef"]:
            used.setdefault(ref["name"], set()).add(ref["key"])
    assert used == documented


def inferq_commands() -> Iterator[tuple[str, list[str]]]:
    """Every `inferq ...` command line a container or probe runs, as argv."""
    for where, container in all_containers():
        lines = [container.get("command", [])]
        lines += [container[probe]["exec"]["command"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")
                  if "exec" in container.get(probe, {})]
        for line in lines:
            if line[:2] == ["sh", "-c"]:
                line = shlex.split(line[2])
            if line[:1] == ["exec"]:
                line = line[1:]
            if line[:1] == ["inferq"]:
                yield where, line


def test_every_inferq_command_parses() -> None:
    ran = set()
    for where, argv in inferq_commands():
        command = inferq_cli.commands.get(argv[1])
        assert isinstance(command, click.Command), f"{where}: no command inferq {argv[1]}"
        try:
            command.make_context(argv[1], argv[2:])
        except click.UsageError as exc:
            pytest.fail(f"{where}: {shlex.join(argv)}: {exc}")
        ran.add(argv[1])
    assert ran == {"worker", "check", "flower"}


def test_the_worker_probes_ask_for_the_pods_own_worker() -> None:
    for kind, deployment in workers().items():
        (container,) = containers(deployment)
        node = container["command"][container["command"].index("--name") + 1]
        for probe in ("startupProbe", "readinessProbe"):
            argv = shlex.split(container[probe]["exec"]["command"][2])
            # $(hostname) in the probe's shell is the host name Celery puts for %h
            assert argv[argv.index("--name") + 1].replace("$(hostname)", "%h") == node, f"{kind} {probe}"


def test_images_are_the_projects_dockerfiles_or_composes() -> None:
    compose_images = {service["image"] for service in yaml.safe_load((ROOT / "docker-compose.yml").read_text())
                      ["services"].values() if "image" in service}
    for where, container in all_containers():
        image = container["image"]
        if image.startswith("inferq-"):
            dockerfile = ROOT / "docker" / f"{image.split(':')[0].removeprefix('inferq-')}.Dockerfile"
            assert dockerfile.is_file(), f"{where}: no {dockerfile.relative_to(ROOT)} builds {image}"
            assert image in compose_images, f"{where}: compose names its build of that Dockerfile otherwise"
        else:
            assert image in compose_images, f"{where}: {image} is not an image docker-compose.yml runs"


def test_everything_lives_in_the_namespace_the_manifests_make() -> None:
    (namespace,) = of_kind("Namespace")
    for doc in documents():
        if doc is not namespace:
            assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], name(doc)
    assert sorted(MANIFESTS.glob("*.yaml"))[0].name.startswith("00-namespace"), "kubectl applies files in name order"


@pytest.mark.parametrize("path", sorted(CRDS.glob("*.yaml")), ids=lambda path: path.name)
def test_the_kept_crds_are_keda_s_files_unchanged(path: Path) -> None:
    text = path.read_bytes()
    header = re.match(rb"(?:#[^\n]*\n)+", text)
    assert header is not None, "the header naming the source is missing"
    blob = re.search(rb"git blob ([0-9a-f]{40})", header.group(0))
    assert blob is not None
    body = text[header.end():]
    # git's object id of the file as KEDA's repository holds it
    assert hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest() == blob.group(1).decode()


CHECKS_THAT_MUST_FAIL = [
    # (check, kind of the first object changed, path, value)
    (test_each_kind_has_a_worker_deployment_with_one_gpu_a_pod, "Deployment",
     "spec.template.spec.containers.0.resources.limits", {"nvidia.com/gpu": 2}),
    (test_the_worker_deployments_differ_only_in_their_kind, "Deployment",
     "spec.template.spec.terminationGracePeriodSeconds", 131),  # changed in one copy only
    (test_each_worker_deployment_is_scaled_on_every_list_of_its_queue, "ScaledObject",
     "spec.triggers.3.metadata.listName", "embed\x06\x168"),  # no such priority step
    (test_each_worker_deployment_is_scaled_on_every_list_of_its_queue, "ScaledObject",
     "spec.advanced.scalingModifiers.formula", "interactive + bulk"),  # two lists read, not counted
    (test_each_worker_deployment_is_scaled_on_every_list_of_its_queue, "ScaledObject",
     "spec.scaleTargetRef.name", "worker-embedding"),
    (test_each_worker_deployment_is_scaled_on_every_list_of_its_queue, "ScaledObject",
     "spec.triggers.0.metadata", {"listname": "embed", "databaseIndex": "0"}),  # KEDA would read list "" then
    (test_the_thresholds_follow_from_the_workers_settings, "ScaledObject",
     "spec.advanced.scalingModifiers.target", "128"),
    (test_the_thresholds_follow_from_the_workers_settings, "Deployment",
     "spec.template.spec.terminationGracePeriodSeconds", 60),
    (test_the_thresholds_follow_from_the_workers_settings, "ScaledObject",
     "spec.triggers.0.metadata.databaseIndex", "1"),
    (test_every_inferq_variable_is_a_real_setting, "ConfigMap", "data.INFERQ_VISIBILITY_TIMEOUTS", "150"),
    (test_references_name_variables_defined_before_them, "Deployment",
     "spec.template.spec.containers.0.env.2.value", "redis://:$(REDIS_PASWORD)@$(REDIS_ADDRESS)/0"),
    (test_every_inferq_command_parses, "Deployment",
     "spec.template.spec.containers.0.command", ["inferq", "worker", "--kind", "embed"]),
    (test_the_worker_probes_ask_for_the_pods_own_worker, "Deployment",
     "spec.template.spec.containers.0.startupProbe.exec.command", ["sh", "-c", "exec inferq check --name inferq@x"]),
    (test_images_are_the_projects_dockerfiles_or_composes, "Deployment",
     "spec.template.spec.containers.0.image", "inferq-workers:latest"),
    (test_every_secret_key_used_is_one_the_readme_creates, "TriggerAuthentication", "spec.secretTargetRef.1.key",
     "pass"),
    (test_everything_lives_in_the_namespace_the_manifests_make, "Service", "metadata.namespace", "default"),
]


@pytest.mark.parametrize(("check", "kind", "path", "value"), CHECKS_THAT_MUST_FAIL,
                         ids=[f"{check.__name__.removeprefix('test_')}-{path}"
                              for check, _, path, _ in CHECKS_THAT_MUST_FAIL])
def test_the_cross_checks_can_fail(check: Any, kind: str, path: str, value: Any,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    docs = documents()
    index = docs.index(of_kind(kind)[0])
    changed = [*docs[:index], mutated(kind, path, value), *docs[index + 1:]]
    monkeypatch.setattr(sys.modules[__name__], "documents", lambda: changed)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check(monkeypatch) if "monkeypatch" in inspect.signature(check).parameters else check()
