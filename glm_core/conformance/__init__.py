"""The conformance kit: what any backend must pass, runnable without special hardware.

It checks a backend against the op contract and the reference backend at three levels:

1. every op it implements, over a grid of shapes (odd sizes, GQA ratios, the three rotary
   layouts, masks with padding and prefix, decode steps) and dtypes, with the contract's
   tolerance table (:mod:`glm_core.conformance.cases`);
2. a tiny model of each GLM family: logits and greedy tokens against the cpu backend
   (:mod:`glm_core.conformance.model_check`);
3. a two-process distributed run over the backend's collectives
   (:mod:`glm_core.conformance.dist_worker`).

It ships as a pytest plugin (entry point ``pytest11``)::

    pytest --glm-backend NAME                # every check, on the backend's device
    pytest --glm-backend NAME --glm-host     # the backend's kernels on host (CPU) tensors
    pytest --glm-backend-object pkg.mod:MyBackend   # a backend class not yet packaged

``--glm-host`` is for kernels that can execute on the host: Triton kernels under
``TRITON_INTERPRET=1``, or a backend whose vendor module is replaced by a fake.
The functions are importable too, for tests that drive the kit directly.
"""
from .cases import CASES, CheckResult, Case, check, run_grid

__all__ = ["CASES", "Case", "CheckResult", "check", "run_grid"]
