"""Entry point of the onnx backend (group ``glm_runtime.backends``).

Unlike the torch backends it has no op kernels: it runs a whole exported graph
(``glmrt export-onnx MODEL OUT``). It says so with ``runs_own_graph`` and implements the
optional hook ``load_runtime(path, ...)``, which :func:`glm_runtime.load_model` calls, so
``load_model(EXPORTED_DIR, backend="onnx")`` and ``glmrt generate EXPORTED_DIR --backend
onnx`` work like any other backend.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import numpy as np
import torch

from glm_runtime.converters.onnx.layout import is_onnx_export, read_export
from glm_runtime.core.ops.table import strict_from_env
from glm_runtime.core.registry import Backend, Capabilities, Check, Probe, hookimpl

from . import cache as export_cache
from .runtime import OnnxRunner, OnnxSession


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class OnnxBackend(Backend):
    name = "onnx"
    aliases = ("onnxruntime", "ort")
    device_type = "cpu"  # host tensors in and out; the providers own their device memory
    dist_backend = "gloo"
    runs_own_graph = True
    description = ("onnxruntime running graphs exported with 'glmrt export-onnx' (fp32, INT8, INT4), or any "
                   "checkpoint through an export cached on first use")

    def probe(self) -> Probe:
        # find_spec and package metadata only: importing onnxruntime may load provider
        # libraries, which a probe must not do.
        missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            return Probe(False, f"{' and '.join(missing)} not installed (a dependency of glm-runtime: pip install onnx onnxruntime onnxscript)")
        ver = _version("onnxruntime") or _version("onnxruntime-gpu") or "?"
        # Score 20: above the cpu backend (10), below any accelerator (100). On the host it
        # is the fastest single-process path at every bit width (fused attention and norms,
        # MatMulNBits low-bit linears; benchmarks/decode.py); a checkpoint is exported once
        # into the cache. Uses that need the GLM graph itself (parallel ranks, training,
        # batched serving) pass over it (get_backend's needs_graph).
        return Probe(True, f"onnxruntime {ver}: fused graph, fastest on the host for one process; "
                           "checkpoints are exported once into the cache", score=20)

    def capabilities(self) -> Capabilities:
        import onnxruntime as ort  # heavy: imported where used (a plain glmrt command never loads it)

        return Capabilities(arch="onnxruntime " + ", ".join(ort.get_available_providers()),
                            compute_dtypes=(torch.float32,),
                            extra={"runtime": "exported ONNX graph", "providers_env": "GLM_ONNX_PROVIDERS"})

    def load_runtime(self, path: str | os.PathLike, *, strict_ops: bool | None = None, progress: bool = False,
                     providers: list[str] | str | None = None, cache: bool | None = None,
                     sat_args: str | None = None):
        """An :class:`OnnxRunner` for an export directory (checked before onnxruntime sees
        it), or for any checkpoint directory through its cached export (:mod:`.cache`;
        ``cache=False`` bypasses the cache). ``providers``: execution providers in order of
        preference (default ``GLM_ONNX_PROVIDERS`` or the CPU). ``sat_args``: a GLM-130B SAT
        checkpoint's model arguments (it carries no config of its own)."""
        if not is_onnx_export(path):
            path = export_cache.exported(path, progress=progress, cache=cache, sat_args=sat_args)
        strict = strict_from_env() if strict_ops is None else strict_ops
        return OnnxRunner(OnnxSession(read_export(path), providers, strict))

    def doctor(self) -> list[Check]:
        import onnx  # heavy: imported where used (a plain glmrt command never loads them)
        import onnxruntime as ort
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "smoke",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 8
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        ok = bool((s.run(None, {"x": np.ones(2, np.float32)})[0] == 2).all())
        return [Check("onnxruntime", True, ort.__version__), Check("onnx", True, onnx.__version__),
                Check("providers", True, ", ".join(ort.get_available_providers())),
                Check("cpu session", ok, "Add graph runs")]


@hookimpl
def glm_backends():
    return [OnnxBackend()]
