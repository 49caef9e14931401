"""gpt-oss attention (learned sinks, sliding-window and full layers alternating, q/k/v/o biases) trains like one
process under tensor and context parallelism (fp32, gloo), built the way `loom train` builds it.

Sinks are per head: tensor parallelism shards them with the heads (framework/parallel/tensor.py), Ulysses context
parallelism narrows them to the heads each rank attends over (framework/parallel/context.py). The harness and
tolerances are tests/framework/parallel/test_context_parallel.py's (5 steps; packed documents). The biased,
clamped-SwiGLU experts under expert parallelism are in test_expert_parallel.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from dist_cases_cp import assert_matches

from framework.config.schema import LayersConfig

GPT_OSS_ATTENTION = {
    "attention_sinks": True,
    "bias": True,
    "layers": LayersConfig(pattern=["attention_local", "attention"], local_window=5),
}

STEPS = 5
CASES: dict[str, tuple[int, dict[str, Any]]] = {
    "tp2_sp": (2, {"tp": 2, "sequence_parallel": True}),
    "cp2": (2, {"cp": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sinks_match_one_process(dist_pool, case: str) -> None:
    world, parallel = CASES[case]
    for result in dist_pool(world).run(
        "dist_cases_cp:parity", STEPS, parallel, GPT_OSS_ATTENTION, "documents"
    ):
        print(case, result)
        assert "layers.0.attention.sinks" not in result["noise_grads"]  # the sinks' gradient is compared
        assert_matches(result)
