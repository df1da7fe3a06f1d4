"""Two processes: a tensor-parallel block with the backend's kernels and collectives."""
from __future__ import annotations

import pytest

from glm_runtime.conformance import dist_check


@pytest.mark.slow
def test_two_process_tensor_parallel_block(glm_target, request):
    c = request.config
    ok, detail = dist_check.run(c.getoption("--glm-backend"), c.getoption("--glm-backend-object"),
                                c.getoption("--glm-host"), c.getoption("--glm-dtypes"))
    assert ok, detail
