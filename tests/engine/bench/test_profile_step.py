"""`engine.bench.profile_step.kind_of`: every op the CPU engine runs lands in its kind, the C++
kernels' included (they are named `tandem_cpu::...`, not after torch's ops)."""

from __future__ import annotations

import pytest

from engine.bench.profile_step import kind_of


@pytest.mark.parametrize("name,kind", [
    ("mkldnn::_linear_pointwise", "matmuls"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("tandem_cpu::paged_decode", "attention"),
    ("tandem_cpu::prefill_attention", "attention"),
    ("tandem_cpu::paged_prefill_attention", "attention"),
    ("tandem_cpu::rms_norm", "elementwise"),
    ("aten::argmax", "sampling"),
    ("tandem_cpu::argmax", "sampling"),
    ("aten::empty", "other ops"),
])
def test_ops_land_in_their_kind(name: str, kind: str) -> None:
    assert kind_of(name, [[8, 576]], vocab=49_152) == kind


def test_a_matmul_over_the_vocabulary_is_the_lm_head() -> None:
    assert kind_of("mkldnn::_linear_pointwise", [[8, 576], [49_152, 576]], 49_152) == "lm_head"
