"""Protobuf views of a worker shared by both roles: its status and its transfer endpoint."""

from __future__ import annotations

import time
from collections.abc import Mapping

from cluster.roles import Role
from cluster.worker_runtime import WorkerRuntime
from kv_transfer.handshake import PROTOCOL_VERSION
from kv_transfer.spec import LOCAL_FIELDS
from tandem_proto.tandem.v1 import common_pb2

ROLE_PB = {Role.PREFILL: common_pb2.WORKER_ROLE_PREFILL, Role.DECODE: common_pb2.WORKER_ROLE_DECODE,
           Role.AGGREGATED: common_pb2.WORKER_ROLE_AGGREGATED}


def transfer_endpoint(runtime: WorkerRuntime) -> common_pb2.TransferEndpoint:
    return common_pb2.TransferEndpoint(
        worker_id=runtime.worker_id, metadata=runtime.agent.metadata().encode(),
        compat_hash=runtime.agent.spec.compat_hash, handshake_version=PROTOCOL_VERSION)


def worker_status(runtime: WorkerRuntime, role: Role, counters: Mapping[str, float],
                  gauges: Mapping[str, float]) -> common_pb2.WorkerStatus:
    """The worker's status: the engine's counters and gauges, then the role's."""
    load = runtime.load()
    engine = runtime.engine
    engine_counters = {
        "prefill_tokens_computed": engine.stats.prefill_tokens_computed,
        "decode_tokens_computed": engine.stats.decode_tokens_computed,
        "prefix_hit_tokens": engine.block_manager.stats.prefix_hit_tokens,
        "preemptions": engine.stats.preemptions,
    }
    engine_gauges = {
        "requests": engine.num_requests(),
        "running": load.running,
        "waiting": load.waiting,
        "kv_blocks_free": engine.block_manager.num_free_blocks,
        "kv_blocks_total": engine.num_blocks,
    }
    return common_pb2.WorkerStatus(
        worker_id=runtime.worker_id, role=ROLE_PB[role],
        address=runtime.address,
        load=common_pb2.WorkerLoad(running=load.running, waiting=load.waiting,
                                   kv_blocks_used=load.kv_blocks_used,
                                   kv_blocks_total=load.kv_blocks_total,
                                   max_running=load.max_running,
                                   queued_prompt_blocks=load.queued_prompt_blocks),
        load_unix_ms=int(time.time() * 1000),
        publishes_prefix_events=runtime.writer is not None,
        counters={**engine_counters, **counters},
        gauges={**engine_gauges, **gauges},
        compat_hash=runtime.agent.spec.compat_hash,
        block_size=engine.config.block_size,
        hash_seed=engine.config.hash_seed,
        kv_layout={name: str(value) for name, value in runtime.agent.spec.to_dict().items()
                   if name not in LOCAL_FIELDS})
