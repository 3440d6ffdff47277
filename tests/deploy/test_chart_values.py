"""Bad values are refused before anything is rendered, each with a message that names the value:
by values.schema.json (helm validates the values against it) or, for rules that compare values
with each other, by the chart's own checks (`tandem.validate` in templates/_helpers.tpl)."""

from __future__ import annotations

import pytest

from tests.deploy.chart import refused

SCHEMA = "values don't meet the specifications of the schema"

# (--set, what helm must say)
SCHEMA_REFUSALS = [
    ("discovery=etcd", "at '/discovery': value must be one of 'redis', 'kubernetes'"),
    ("prefill.gpus=-1", "at '/prefill/gpus': minimum: got -1, want 0"),
    ("model.source=s3", "at '/model/source': value must be one of"),
    ("model.source=pvc", "at '/model/pvc/claimName': minLength: got 0, want 1"),
    ("model.source=hostPath,model.hostPath.path=models",
     "at '/model/hostPath/path': 'models' does not match pattern"),
    ("redis.mode=external", "at '/redis/external/url': minLength: got 0, want 1"),
    ("redis.mode=external,redis.external.url=redis://user:pw@redis:6379/0",
     "at '/redis/external/url': 'redis://user:pw@redis:6379/0' does not match pattern"),
    ("redis.mode=external,redis.external.url=http://redis:6379",
     "at '/redis/external/url': 'http://redis:6379' does not match pattern"),
    ("router.settings.listen=0.0.0.0:1", "invalid propertyName 'listen'"),
    ("decode.settings.transfer_token=hunter2", "invalid propertyName 'transfer_token'"),
    ("settings.Block-Size=16", "invalid propertyName 'Block-Size'"),
    ("prefill.resources.limits.memory=lots",
     "at '/prefill/resources/limits/memory': 'lots' does not match pattern"),
    ("ports.workerGrpc=70000", "at '/ports/workerGrpc': maximum: got 70,000, want 65,535"),
    ("transfer.backend=tcp", "at '/transfer/backend': value must be one of 'nixl', 'ucxx'"),
    ("decode.autoscaling.targetCPUUtilizationPercentage=150",
     "at '/decode/autoscaling/targetCPUUtilizationPercentage': maximum: got 150, want 100"),
    ("monitoring.serviceMonitor.interval=often",
     "at '/monitoring/serviceMonitor/interval': 'often' does not match pattern"),
    ("tls.workerServerName=Tandem_Worker",
     "at '/tls/workerServerName': 'Tandem_Worker' does not match pattern"),
    ("tls.existingSecret=My_Certs", "at '/tls/existingSecret': 'My_Certs' does not match pattern"),
    ("replicas=3", "at '': additional properties 'replicas' not allowed"),
    ("decode.replica=3", "at '/decode': additional properties 'replica' not allowed"),
]

# (--set, what the chart's own check says)
TEMPLATE_REFUSALS = [
    ("ports.workerGrpc=40000", "ports.workerGrpc: 40000 lies inside transfer.portRange "
                               "(32768-60999), which the workers open to each other"),
    ("transfer.portRange.start=50000,transfer.portRange.end=40000",
     "transfer.portRange: start (50000) must not exceed end (40000)"),
    ("planner.enabled=true,decode.autoscaling.enabled=true",
     "planner.enabled: the planner sets the prefill and decode replica counts; turn off "
     "prefill.autoscaling and decode.autoscaling"),
    ("decode.autoscaling.enabled=true,decode.resources.requests=null",
     "decode.autoscaling.targetCPUUtilizationPercentage: needs decode.resources.requests.cpu"),
    ("prefill.autoscaling.enabled=true,prefill.autoscaling.targetCPUUtilizationPercentage=null",
     "prefill.autoscaling: give targetCPUUtilizationPercentage or customMetrics"),
    ("prefill.enabled=false", "prefill.enabled, decode.enabled: a prefill worker needs a decode "
                              "worker and the other way round"),
    ("prefill.enabled=false,decode.enabled=false",
     "prefill, decode, aggregated: enable a prefill and a decode worker, or an aggregated one"),
    ("discovery=kubernetes,rbac.create=false,serviceAccount.create=false",
     "rbac.create: kubernetes discovery and the planner need their Roles"),
]


@pytest.mark.parametrize(("setting", "message"), SCHEMA_REFUSALS,
                         ids=[s for s, _ in SCHEMA_REFUSALS])
def test_schema_refuses(setting: str, message: str) -> None:
    error = refused(sets=[setting])
    assert SCHEMA in error and message in error, error


@pytest.mark.parametrize(("setting", "message"), TEMPLATE_REFUSALS,
                         ids=[s for s, _ in TEMPLATE_REFUSALS])
def test_chart_refuses(setting: str, message: str) -> None:
    error = refused(sets=[setting])
    assert message in error, error
