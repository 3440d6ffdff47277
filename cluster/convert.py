"""Protobuf ↔ engine dataclasses, at the services' edges (errors name the proto field)."""

from __future__ import annotations

from cluster.errors import InvalidRequest
from engine.sampling import SamplingParams
from tandem_proto.tandem.v1 import common_pb2

DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 0.0  # greedy, as tandem.v1.SamplingParams documents

# Finish reasons by the names the engine (`engine.request.FinishReason` values), the router,
# the metrics and the client use.
FINISH_TO_PB: dict[str, common_pb2.FinishReason] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
}
FINISH_FROM_PB: dict[int, str] = {value: name for name, value in FINISH_TO_PB.items()}


def sampling_from_pb(pb: common_pb2.SamplingParams,
                     default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
    """Validated engine sampling params; `InvalidRequest("sampling.<field>", ...)` if invalid."""
    try:
        return SamplingParams(
            max_tokens=pb.max_tokens if pb.HasField("max_tokens") else default_max_tokens,
            temperature=pb.temperature if pb.HasField("temperature") else DEFAULT_TEMPERATURE,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            top_k=pb.top_k if pb.HasField("top_k") else 0,
            seed=pb.seed if pb.HasField("seed") else None,
            stop_token_ids=tuple(pb.stop_token_ids),
            ignore_eos=pb.ignore_eos,
            seed_offset=pb.seed_offset,
        )
    except ValueError as error:
        raise as_invalid(error, prefix="sampling.") from None


def sampling_to_pb(params: SamplingParams, stop: list[str] | None = None,
                   ) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, stop=stop or [], seed_offset=params.seed_offset)
    if params.seed is not None:
        pb.seed = params.seed
    return pb


def as_invalid(error: ValueError, prefix: str = "") -> InvalidRequest:
    """An engine `ValueError("field: message")` as `InvalidRequest` naming the proto field."""
    text = str(error)
    field, sep, message = text.partition(": ")
    if not sep or " " in field:
        return InvalidRequest(prefix.rstrip(".") or "request", text)
    return InvalidRequest(prefix + field, message)
