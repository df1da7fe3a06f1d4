"""Every op of the backend against the reference, over the case grid and the dtypes."""
from __future__ import annotations

import pytest
import torch

from glm_runtime.conformance.cases import CASES, check
from glm_runtime.conformance.target import KIT_DTYPES


@pytest.mark.parametrize("dtype", KIT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op(glm_target, glm_strict, case, dtype):
    if dtype not in glm_target.dtypes:
        pytest.skip(f"{dtype} not checked for this backend")
    k = glm_target.kernels.get(case.op)
    if k is None:
        if glm_strict:
            pytest.fail(f"backend {glm_target.backend.name!r} has no {case.op} kernel (strict)")
        pytest.skip(f"no {case.op} kernel: the op table uses the reference (and says so)")
    if not k.supports(dtype):
        if glm_strict:
            pytest.fail(f"{case.op} kernel does not support {dtype} (strict)")
        pytest.skip(f"{case.op} kernel does not declare {dtype}")
    r = check(k.fn, case, dtype, glm_target.device)
    assert r.ok, f"{glm_target.label}: {case.id} [{dtype}]: {r.detail}"


def test_declares_identity(glm_target):
    """The facts the core asks for are stated, not left to guesses from the name."""
    b = glm_target.backend
    assert b.name and b.device_type and b.dist_backend
    assert isinstance(b.forward_env_prefixes, tuple)
    assert b.visible_devices_env is None or isinstance(b.visible_devices_env, str)
    for op, k in glm_target.kernels.items():
        assert k.dtypes and all(isinstance(d, torch.dtype) for d in k.dtypes), op
