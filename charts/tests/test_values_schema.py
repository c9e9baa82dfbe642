"""values.schema.json rejects bad values: `helm template` must fail with a schema error."""

from __future__ import annotations

import json

import pytest

from conftest import CHART, helm_template

BAD_VALUES = {
    "unknown top-level key": ["--set", "replicaCount=3"],
    "unknown nested key": ["--set", "worker.replicaCount=3"],
    "queue type not quorum/classic": ["--set", "queue.type=stream"],
    "queue name with a space": ["--set-string", "queue.name=my tasks"],
    "log format": ["--set", "log.format=xml"],
    "negative worker replicas": ["--set", "worker.replicas=-1"],
    "replicas as a string": ["--set-string", "sender.replicas=three"],
    "zero sender replicas": ["--set", "sender.replicas=0"],
    "service port out of range": ["--set", "sender.service.port=70000"],
    "prefetch zero": ["--set", "worker.prefetch=0"],
    "concurrency zero": ["--set", "worker.concurrency=0"],
    "concurrency as text": ["--set-string", "worker.concurrency=many"],
    "negative seconds per dot": ["--set", "worker.secondsPerDot=-1"],
    "grace period zero": ["--set", "worker.terminationGracePeriodSeconds=0"],
    "bad cpu quantity": ["--set", "worker.resources.limits.cpu=lots"],
    "memory request missing": ["--set", "controller.resources.requests.memory=null"],
    "rbac scope": ["--set", "controller.rbac.scope=everything"],
    "two controllers without leader election": ["--set", "controller.replicas=2",
                                                "--set", "controller.leaderElection=false"],
    "maxReplicas zero": ["--set", "queueScaler.maxReplicas=0"],
    "polling interval zero": ["--set", "queueScaler.pollingIntervalSeconds=0"],
    "messagesPerReplica zero": ["--set", "queueScaler.messagesPerReplica=0"],
    "targetDrainSeconds as text": ["--set-string", "queueScaler.targetDrainSeconds=soon"],
    "rabbitmq tag empty": ["--set-string", "rabbitmq.image.tag="],
    "rabbitmq replicas zero": ["--set", "rabbitmq.replicas=0"],
    "password not URL-safe": ["--set-string", "rabbitmq.auth.password=p@ss/word:123456"],
    "password too short": ["--set-string", "rabbitmq.auth.password=short"],
    "username with a colon": ["--set-string", "rabbitmq.auth.username=ad:min"],
    "erlang cookie with symbols": ["--set-string", "rabbitmq.auth.erlangCookie=not-a-valid-cookie-value!!"],
    "persistence size not a quantity": ["--set-string", "rabbitmq.persistence.size=big"],
    "pull policy": ["--set", "image.pullPolicy=Sometimes"],
    "image tag with a slash": ["--set-string", "image.tag=a/b"],
    "uppercase fullnameOverride": ["--set", "fullnameOverride=Warren"],
    "networkPolicy enabled as text": ["--set-string", "networkPolicy.enabled=yes"],
    "seconds per dot as words": ["--set-string", "worker.secondsPerDot=slow"],
    "unknown behavior key": ["--set", "queueScaler.behavior.scaleUpp.stabilizationWindowSeconds=0"],
    "behavior policy type": ["--set-json", 'queueScaler.behavior={"scaleUp":{"policies":'
                                           '[{"type":"Replicas","value":1,"periodSeconds":15}]}}'],
    "behavior policy without value": ["--set-json", 'queueScaler.behavior={"scaleDown":{"policies":'
                                                    '[{"type":"Pods","periodSeconds":15}]}}'],
    "select policy": ["--set", "queueScaler.behavior.scaleDown.selectPolicy=Sometimes"],
    "fallback threshold zero": ["--set", "queueScaler.fallback.failureThreshold=0"],
    "unknown fallback key": ["--set", "queueScaler.fallback.replica=2"],
    "scaler enabled as text": ["--set-string", "queueScaler.enabled=true"],
    "events max age without unit": ["--set-string", "events.maxAge=7"],
    "events max age lowercase day": ["--set-string", "events.maxAge=7d"],
    "events max bytes tiny": ["--set", "events.maxBytes=1000"],
    "events max bytes as text": ["--set-string", "events.maxBytes=lots"],
    "sender maxInFlight zero": ["--set", "sender.maxInFlight=0"],
    "sender maxConnections negative": ["--set", "sender.maxConnections=-1"],
    "sender header timeout as text": ["--set-string", "sender.headerReadTimeoutMs=10s"],
    "sender idle timeout fractional": ["--set", "sender.idleTimeoutMs=1.5"],
    "sender unknown limit": ["--set", "sender.maxRequests=10"],
    "port zero": ["--set", "sender.ports.http=0"],
    "port above 65535": ["--set", "worker.ports.http=70000"],
    "port as text": ["--set-string", "controller.ports.http=http"],
    "unknown port name": ["--set", "admin.ports.metrics=9100"],
    "a pool's own port": ["--set-json", 'worker.pools=[{"name":"worker","ports":{"http":9091}}]'],
    "env without a name": ["--set-json", 'sender.extraEnv=[{"value":"x"}]'],
    "env value and valueFrom": ["--set-json", 'sender.extraEnv=[{"name":"A","value":"x",'
                                              '"valueFrom":{"fieldRef":{"fieldPath":"metadata.name"}}}]'],
    "env value as a number": ["--set-json", 'worker.extraEnv=[{"name":"A","value":1}]'],
    "env unknown key": ["--set-json", 'controller.extraEnv=[{"name":"A","val":"x"}]'],
    "env name with a space": ["--set-json", 'admin.extraEnv=[{"name":"A B","value":"x"}]'],
    "extraEnv as a map": ["--set-json", 'sender.extraEnv={"A":"x"}'],
    "audit batch zero": ["--set", "sender.audit.batch=0"],
    "audit batch above u16": ["--set", "sender.audit.batch=70000"],
    "audit linger negative": ["--set", "sender.audit.lingerMs=-1"],
    "audit linger as text": ["--set-string", "sender.audit.lingerMs=1s"],
    "rabbitmq port zero": ["--set", "rabbitmq.ports.amqp=0"],
    "rabbitmq unknown port": ["--set", "rabbitmq.ports.stream=5552"],
    "postgres port as text": ["--set-string", "postgres.ports.postgres=pg"],
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_rejected_by_the_schema(case, helm):
    proc = helm_template(helm, BAD_VALUES[case], include_crds=False)
    assert proc.returncode != 0, f"{case}: accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


# Refused by the templates (relations JSON Schema cannot express).
BAD_COMBINATIONS = {
    "minReplicas above maxReplicas": (["--set", "queueScaler.enabled=true", "--set", "queueScaler.minReplicas=5",
                                       "--set", "queueScaler.maxReplicas=2"],
                                      "must not exceed queueScaler.maxReplicas"),
    "grace period below the longest job": (["--set", "worker.terminationGracePeriodSeconds=30"],
                                           "must be above the longest job"),
    "fallback above maxReplicas": (["--set", "queueScaler.enabled=true", "--set", "queueScaler.maxReplicas=2",
                                    "--set", "queueScaler.fallback.replicas=3"],
                                   "must not exceed queueScaler.maxReplicas"),
    "scaler on an unmanaged worker": (["--set", "queueScaler.enabled=true",
                                       "--set", "worker.managedByQueueScaler=false"],
                                      "needs worker.managedByQueueScaler=true"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMBINATIONS))
def test_bad_combinations_are_refused(case, helm):
    args, message = BAD_COMBINATIONS[case]
    proc = helm_template(helm, args, include_crds=False)
    assert proc.returncode != 0, f"{case}: accepted"
    assert message in proc.stderr, proc.stderr


GOOD_VALUES = {
    "classic queue": ["--set", "queue.type=classic"],
    "generated password kept empty": ["--set-string", "rabbitmq.auth.password="],
    "fractional seconds per dot": ["--set-json", "worker.secondsPerDot=0.01"],
    "fractional seconds per dot via --set": ["--set", "worker.secondsPerDot=0.5"],
    "scaler with fallback": ["--set", "queueScaler.enabled=true", "--set", "queueScaler.fallback.replicas=1",
                             "--set", "queueScaler.fallback.failureThreshold=2"],
    "numeric cpu": ["--set", "sender.resources.limits.cpu=2"],
    "storage class": ["--set", "rabbitmq.persistence.storageClassName=standard"],
    "target drain seconds": ["--set", "queueScaler.targetDrainSeconds=60"],
    "behavior passthrough": ["--set-json", 'queueScaler.behavior={"cooldownSeconds":30}'],
}


@pytest.mark.parametrize("case", sorted(GOOD_VALUES))
def test_good_values_are_accepted(case, helm):
    proc = helm_template(helm, GOOD_VALUES[case], include_crds=False)
    assert proc.returncode == 0, proc.stderr


def test_schema_covers_every_default_value():
    """Each key of values.yaml is described by the schema (additionalProperties false)."""
    import yaml

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value, node, path):
        if node.get("type") == "object" and isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, path
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} not in the schema"
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "values")
