"""Protobuf ↔ engine conversions: the sampling defaults the proto documents, the finish map."""

from __future__ import annotations

import pytest

from cluster.convert import FINISH_FROM_PB, FINISH_TO_PB, sampling_from_pb, sampling_to_pb
from cluster.errors import InvalidRequest
from engine.request import FinishReason
from engine.sampling import SamplingParams
from tandem_proto.tandem.v1 import common_pb2


def test_unset_sampling_fields_take_the_documented_defaults() -> None:
    """Greedy by default, as tandem.v1.SamplingParams says (the OpenAI front applies 1.0)."""
    params = sampling_from_pb(common_pb2.SamplingParams(), default_max_tokens=9)
    assert params == SamplingParams(max_tokens=9, temperature=0.0, top_p=1.0, top_k=0)
    assert params.greedy
    field = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name["temperature"]
    assert field.has_presence  # unset is distinguishable from 0


def test_sampling_round_trips_and_names_bad_fields() -> None:
    params = SamplingParams(max_tokens=5, temperature=0.5, top_p=0.75, top_k=40, seed=3,
                            stop_token_ids=(2,), ignore_eos=True)
    assert sampling_from_pb(sampling_to_pb(params)) == params
    with pytest.raises(InvalidRequest) as caught:
        sampling_from_pb(common_pb2.SamplingParams(top_p=1.5))
    assert caught.value.field == "sampling.top_p"


def test_every_engine_finish_reason_has_a_wire_value() -> None:
    for reason in FinishReason:
        assert FINISH_FROM_PB[FINISH_TO_PB[reason.value]] == reason.value
