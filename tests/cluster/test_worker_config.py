"""cluster.worker_config: the worker's flags and variables, its tunables reaching the parts that
use them, and the transfer secret (required off loopback)."""

from __future__ import annotations

import argparse
import logging

import pytest

from cluster.roles import Role
from cluster.worker_config import LOCAL_DEV_TOKEN, WorkerConfig, is_loopback, worker_flags
from engine.block_hash import DEFAULT_HASH_SEED
from engine.config import EngineConfig
from kv_transfer.base import TransferConfig

FLAGS = worker_flags()


def build(argv: list[str], environ: dict[str, str] | None = None,
          role: Role = Role.PREFILL) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    FLAGS.add_to(parser)
    return FLAGS.build(parser.parse_args(argv), environ=environ or {}, role=role)


def test_flags_in_use_keep_working() -> None:
    """The flags LocalCluster, `tandem up` and the e2e tests pass."""
    config = build(["--model", "/m", "--redis-url", "redis://127.0.0.1:7000/0",
                    "--listen", "127.0.0.1:5000", "--metrics-listen", "", "--worker-id", "p-1",
                    "--num-threads", "1", "--num-blocks", "192", "--step-delay-ms", "150",
                    "--kv-layer-group", "2", "--shutdown-grace-s", "1", "--block-size", "32",
                    "--transfer-backend", "ucxx", "--max-num-batched-tokens", "64",
                    "--lease-ms", "500", "--transfer-token", "s3cret"], role=Role.DECODE)
    assert config.role is Role.DECODE
    assert (config.model, config.redis_url, config.listen, config.metrics_listen,
            config.worker_id, config.id) == (
        "/m", "redis://127.0.0.1:7000/0", "127.0.0.1:5000", "", "p-1", "p-1")
    assert config.engine == EngineConfig(num_threads=1, num_blocks=192, kv_layer_group=2,
                                         block_size=32, max_num_batched_tokens=64)
    assert (config.step_delay_s, config.shutdown_grace_s, config.transfer_backend,
            config.lease_ms, config.transfer_token) == (0.15, 1.0, "ucxx", 500, "s3cret")


def test_defaults_are_the_dataclasses() -> None:
    config = build(["--model", "/m"])
    assert config == WorkerConfig(role=Role.PREFILL, model="/m")
    assert config.engine == EngineConfig()
    assert config.engine.num_blocks is None and config.engine.num_threads is None
    assert config.engine.hash_seed == DEFAULT_HASH_SEED
    assert config.redis_url is None and config.transfer_token is None


def test_variables_configure_a_worker() -> None:
    config = build([], {"TANDEM_MODEL": "/m", "TANDEM_NUM_BLOCKS": "64",
                        "TANDEM_TRANSFER_TOKEN": "t", "TANDEM_QUARANTINE_S": "0",
                        "TANDEM_HEARTBEAT_TTL_S": "9", "TANDEM_ENABLE_PREFIX_CACHING": "false",
                        "TANDEM_TRANSFER_PEER_TIMEOUT_S": "2.5"})
    assert (config.model, config.engine.num_blocks, config.transfer_token, config.quarantine_s,
            config.heartbeat_ttl_s, config.engine.enable_prefix_caching,
            config.transfer_peer_timeout_s) == ("/m", 64, "t", 0.0, 9.0, False, 2.5)
    with pytest.raises(ValueError, match="TANDEM_NUM_BLOCKS"):
        build(["--model", "/m"], {"TANDEM_NUM_BLOCKS": "lots"})


def test_the_model_is_required() -> None:
    with pytest.raises(ValueError, match=r"model: --model \(or TANDEM_MODEL\) is required"):
        build([])


def test_transfer_and_redis_tunables_reach_their_configs() -> None:
    config = build(["--model", "/m", "--redis-url", "redis://h:1/0", "--namespace", "ns",
                    "--redis-op-timeout-s", "0.75", "--transfer-token", "t",
                    "--transfer-connect-timeout-s", "1", "--transfer-write-timeout-s", "2",
                    "--transfer-request-timeout-s", "3", "--transfer-heartbeat-interval-s", "4",
                    "--transfer-peer-timeout-s", "5", "--advertise-host", "127.0.0.2"])
    assert config.transfer_config() == TransferConfig(
        token="t", backend="nixl", host="127.0.0.2", connect_timeout_s=1.0, write_timeout_s=2.0,
        request_timeout_s=3.0, heartbeat_interval_s=4.0, peer_timeout_s=5.0)
    redis = config.redis_config()
    assert (redis.url, redis.namespace, redis.op_timeout_s) == ("redis://h:1/0", "ns", 0.75)


def test_the_transfer_port_reaches_the_agent_and_is_checked() -> None:
    config = build(["--model", "/m", "--transfer-token", "t", "--transfer-port", "23456"])
    assert config.transfer_config().port == 23456
    assert build(["--model", "/m", "--transfer-token", "t"]).transfer_config().port == 0
    with pytest.raises(ValueError, match="transfer_port: must be in"):
        build(["--model", "/m", "--transfer-port", "70000"])


def test_unset_transfer_timeouts_are_the_transfer_package_defaults() -> None:
    config = build(["--model", "/m", "--transfer-token", "t"]).transfer_config()
    assert config == TransferConfig(token="t", host="127.0.0.1")


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.3.2.1:5000", "localhost:0", "[::1]:0"])
def test_a_loopback_worker_without_a_token_uses_the_dev_secret_and_says_so(
        listen: str, caplog: pytest.LogCaptureFixture) -> None:
    config = WorkerConfig(role=Role.PREFILL, model="/m", listen=listen)
    with caplog.at_level(logging.WARNING, logger="cluster.worker_config"):
        transfer = config.transfer_config()
    assert transfer.token == LOCAL_DEV_TOKEN
    (record,) = [r for r in caplog.records if "transfer_token" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "development secret" in record.getMessage()


@pytest.mark.parametrize(("listen", "advertise"), [
    ("0.0.0.0:50051", None), ("10.1.2.3:0", None), ("127.0.0.1:0", "10.1.2.3"),
    ("127.0.0.1:0", "worker-0.tandem.svc"), ("[::]:0", None),
])
def test_a_worker_reachable_from_elsewhere_needs_a_token(listen: str,
                                                         advertise: str | None) -> None:
    with pytest.raises(ValueError, match=r"transfer_token: .*TANDEM_TRANSFER_TOKEN"):
        WorkerConfig(role=Role.DECODE, model="/m", listen=listen, advertise_host=advertise)
    config = WorkerConfig(role=Role.DECODE, model="/m", listen=listen, advertise_host=advertise,
                          transfer_token="s3cret")
    assert config.transfer_config().token == "s3cret"


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="transfer_token: must not be empty"):
        WorkerConfig(role=Role.DECODE, model="/m", transfer_token="")


def test_a_worker_program_without_a_token_off_loopback_refuses_to_start(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from prefill_worker.__main__ import main

    monkeypatch.delenv("TANDEM_TRANSFER_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exc:  # before any model is loaded
        main(["--model", "/nonexistent", "--listen", "0.0.0.0:0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "tandem prefill: error: transfer_token:" in err and "TANDEM_TRANSFER_TOKEN" in err


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.255.0.9", "::1", "[::1]", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com", ""]))


def test_other_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="listen: expected host:port"):
        WorkerConfig(role=Role.DECODE, model="/m", listen="nowhere")
    with pytest.raises(ValueError, match="lease_check_interval_s: must be > 0"):
        WorkerConfig(role=Role.DECODE, model="/m", lease_check_interval_s=0)
    with pytest.raises(ValueError, match="quarantine_s: must be >= 0"):
        WorkerConfig(role=Role.DECODE, model="/m", quarantine_s=-1)
    with pytest.raises(ValueError, match="transfer_poll_interval_s: must be > 0"):
        WorkerConfig(role=Role.PREFILL, model="/m", transfer_poll_interval_s=0)
    with pytest.raises(ValueError, match="idle_wait_s: must be > 0"):
        WorkerConfig(role=Role.PREFILL, model="/m", idle_wait_s=0)


def test_transfer_host_is_where_the_transfer_binds() -> None:
    config = build(["--model", "/m", "--listen", "127.0.0.1:0", "--transfer-host", "127.0.0.2"])
    assert config.transfer_config().host == "127.0.0.2"
    assert build(["--model", "/m"]).transfer_config().host == "127.0.0.1"  # the listen host
    with pytest.raises(ValueError, match="transfer_host: must be one address peers can dial"):
        WorkerConfig(role=Role.DECODE, model="/m", transfer_host="0.0.0.0")
    with pytest.raises(ValueError, match="transfer_token: required .*10.1.2.3"):
        WorkerConfig(role=Role.DECODE, model="/m", transfer_host="10.1.2.3")
