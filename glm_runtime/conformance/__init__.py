"""The conformance kit: what any backend must pass, runnable without special hardware.

It checks a backend against the op contract and the reference backend at three levels:

1. every op it implements, over a grid of shapes (odd sizes, GQA ratios, the three rotary
   layouts, masks with padding and prefix, decode steps) and dtypes, with the contract's
   tolerance table (:mod:`glm_runtime.conformance.cases`);
2. a tiny model of each GLM family: logits and greedy tokens against the cpu backend
   (:mod:`glm_runtime.conformance.model_check`);
3. a two-process distributed run over the backend's collectives
   (:mod:`glm_runtime.conformance.dist_worker`).

It ships as a pytest plugin (entry point ``pytest11``)::

    pytest --glm-backend NAME                # every check, on the backend's device
    pytest --glm-backend NAME --glm-host     # the backend's kernels on host (CPU) tensors
    pytest --glm-backend-object pkg.mod:MyBackend   # a backend class not yet packaged

``--glm-host`` is for kernels that can execute on the host: Triton kernels under
``TRITON_INTERPRET=1``, or a backend whose vendor module is replaced by a fake.
The modules are importable too, for tests that drive the kit directly
(:func:`glm_runtime.conformance.cases.run_grid`, :func:`glm_runtime.conformance.model_check.compare`).
This package imports nothing itself: pytest loads its plugin module in every session.
"""
