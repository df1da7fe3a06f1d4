"""Running an exported GLM graph with onnxruntime.

:class:`OnnxSession` owns the onnxruntime session and the provider policy;
:class:`OnnxRunner` gives it the call signature of :class:`glm_runtime.core.model.GLMModel`
(``runner(input_ids, position_ids, mask, cache=None, start=0, logits_index=None)``), so
:class:`glm_runtime.api.GLM` and :func:`glm_runtime.core.generation.generate` drive it unchanged:
masks, positions, sampling and the KV cache buffers all stay the host code's.

Provider policy. The list comes from the caller, else ``GLM_ONNX_PROVIDERS`` (comma
separated; short names such as ``cuda``, ``migraphx``, ``cann`` are accepted), else CPU.
A CPU fallback is never silent:

* a requested provider this onnxruntime build lacks is an error in strict mode and a
  warning otherwise;
* strict mode sets ``session.disable_cpu_ep_fallback`` whenever the preferred provider
  is not the CPU, so a node the accelerator cannot run is an error at load;
* otherwise, when the preferred provider is not the CPU, one profiled run at load counts
  the nodes that ended up on the CPU and warns with the count;
* the op report (``model.op_report()``) lists the providers the session holds and, from
  a profiled run, how many nodes of each type each provider actually executed.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from glm_runtime.converters.onnx import layout
from glm_runtime.core.errors import BackendError, CheckpointError

log = logging.getLogger("glm_runtime.backends.onnx")
ENV_PROVIDERS = "GLM_ONNX_PROVIDERS"
CPU = "CPUExecutionProvider"
SHORT_NAMES = {
    "cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider", "cann": "CANNExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider",
    "azure": "AzureExecutionProvider",
}


def requested_providers(providers: list[str] | str | None = None) -> list[str]:
    """The provider list in priority order: argument > GLM_ONNX_PROVIDERS > CPU."""
    if providers is None:
        providers = os.environ.get(ENV_PROVIDERS) or [CPU]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    out = [SHORT_NAMES.get(p.strip().lower(), p.strip()) for p in providers]
    if not out:
        raise BackendError("the onnx backend was given an empty execution provider list")
    return out


def resolve_providers(requested: list[str], strict: bool) -> list[str]:
    """Drop providers this build lacks (an error in strict mode), loudly."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    missing = [p for p in requested if p not in have]
    if missing:
        msg = (f"onnxruntime {ort.__version__} has no {', '.join(missing)} (available: {', '.join(have)}); "
               f"install the onnxruntime package built for that provider")
        if strict:
            raise BackendError(f"strict ops: {msg}")
        log.warning("%s; running on the others", msg)
    usable = [p for p in requested if p in have]
    if not usable:
        log.warning("no requested onnxruntime provider is available: running on %s", CPU)
        usable = [CPU]
    return usable


class OnnxSession:
    """One onnxruntime session over a checked export directory."""

    def __init__(self, info: layout.ExportInfo, providers: list[str] | str | None = None, strict: bool = False):
        import onnxruntime as ort

        self.info, self.strict = info, strict
        self.requested = requested_providers(providers)
        self.providers = resolve_providers(self.requested, strict)
        self.no_cpu_fallback = strict and self.providers[0] != CPU
        self.session = self._session(ort)
        self.in_session = self.session.get_providers()
        self._placement: Counter | None = None
        if self.providers[0] != CPU and not self.no_cpu_fallback:
            on_cpu = sum(n for (p, _), n in self.placement().items() if p == CPU)
            if on_cpu:
                log.warning("onnx backend: %d graph nodes fell back from %s to %s (strict mode forbids this)",
                            on_cpu, self.providers[0], CPU)

    def _options(self, ort, profile_dir: str | None = None):
        so = ort.SessionOptions()
        so.log_severity_level = 4  # fatal only: errors reach the user as one-line GLMErrors below
        so.intra_op_num_threads = torch.get_num_threads()  # the same CPU threads as the torch backends
        # onnxruntime's threads spin between parallel sections and, for a while, after a run,
        # so that the next decode step finds its worker awake (onnxruntime's default, kept).
        # Measured on a 2-core Intel machine, decode steps' run time against stopping the
        # spinning at the end of each run (``session.force_spinning_stop``), median of 16
        # interleaved rounds: 98M layer-dominated model fp32 / INT8 / INT4 1.02 / 1.09 /
        # 1.07x, GLM-4-vocabulary model 1.00 / 1.10 / 1.20x; never spinning: 0.81x (fp32).
        # The cost is when the host's work between steps is long and multi-threaded: sampling
        # from a flat distribution over GLM-4's 151,552 tokens sorts them all on torch's
        # threads, which the spinning worker slows (whole steps 7 % slower there; over a
        # 16K vocabulary sampling still gains 8 %).
        if self.no_cpu_fallback:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if profile_dir is not None:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(profile_dir, "glm")
        return so

    def _session(self, ort, profile_dir: str | None = None):
        try:
            return ort.InferenceSession(str(self.info.graph), self._options(ort, profile_dir),
                                        providers=self.providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = first.split(" : ")[-1]
            if "fallback to CPU EP has been explicitly disabled" in first:
                raise BackendError(f"strict ops: part of the graph cannot run on {self.providers[0]} and CPU "
                                   f"fallback is disabled (session.disable_cpu_ep_fallback)", self.info.graph) from None
            raise CheckpointError(f"onnxruntime cannot load the graph: {first}", self.info.graph) from None

    def run(self, feeds: dict) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def run_with_binding(self, binding) -> None:
        self.session.run_with_iobinding(binding)

    def placement(self) -> Counter:
        """{(provider, op type): nodes executed} from one profiled run on a short prompt."""
        if self._placement is None:
            import onnxruntime as ort  # heavy: imported where used (a plain glmrt command never loads it)

            c = self.info.config
            ids = torch.full((2, 3), c.pad_token_id or 0, dtype=torch.long)
            pos = torch.zeros((2, 2, 3) if c.rope == "neox_2d" else (2, 3), dtype=torch.long)
            mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
            with tempfile.TemporaryDirectory() as d:
                s = self._session(ort, profile_dir=d)
                s.run(None, layout.feeds(c, ids, pos, mask, layout.empty_past(c, 2)))
                events = json.loads(Path(s.end_profiling()).read_text())
            self._placement = Counter((e["args"]["provider"], e["args"]["op_name"]) for e in events
                                      if e.get("cat") == "Node" and "provider" in e.get("args", {}))
        return self._placement

    def _fallback_policy(self) -> str:
        if self.providers[0] == CPU:
            return "n/a (CPU preferred)"
        return "disabled (strict)" if self.no_cpu_fallback else "allowed"

    def format_report(self) -> str:
        """What runs where: shown by ``GLM.op_report()`` / ``glmrt generate --ops``."""
        import onnxruntime as ort

        i = self.info
        lines = [f"onnxruntime {ort.__version__} session for {i.graph} ({i.precision}, opset {i.opset}, "
                 f"family {i.config.family})",
                 f"  providers requested: {', '.join(self.requested)}",
                 f"  providers in session: {', '.join(self.in_session)}",
                 f"  CPU fallback: {self._fallback_policy()}",
                 "  nodes executed per provider (profiled run):"]
        by_provider: dict[str, Counter] = {}
        for (p, op), n in self.placement().items():
            by_provider.setdefault(p, Counter())[op] += n
        for p, ops in sorted(by_provider.items()):
            detail = ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda x: (-x[1], x[0])))
            lines.append(f"    {p}: {sum(ops.values())} nodes: {detail}")
        return "\n".join(lines)


class OrtCache:
    """A generation's KV cache as onnxruntime holds it, so it never crosses into numpy or
    torch between steps: each layer's present keys and values (``OrtValue``s the session
    allocated) bound as the next step's past, or, for a graph that writes its cache in
    place (layout ``kv_cache: in_place``), one buffer per layer of ``max_len`` positions
    allocated at the first step and bound as both past and present (plus the positions of
    slack a graph with a stacked decode branch writes past the sequence's end, metadata
    ``kv_slack``: :mod:`glm_runtime.converters.onnx.stacked_decode`).

    In place, the binding itself is kept: the buffers are bound once, and so are a step's
    inputs and logits, into arrays a step of the same shapes copies into; only what changes
    shape is bound again (the mask, one position wider each decode step: for an unpadded
    step, a view of one array of ones). A step of the 98M INT4 benchmark model is ~3 ms:
    rebinding 48 buffers and fetching 49 outputs took a few tenths, and binding four inputs
    and the logits afresh another ~0.1 ms. Between two steps every host call counts: the
    step's weights have just flushed the caches, so each numpy or torch call costs 5-30 us
    there (against ~1 us in a loop), and a step's host work was ~40 of them."""

    def __init__(self, rows: int, max_len: int, slack: int = 0):
        self.rows, self.max_len, self.slack = rows, max_len, slack
        self.values: list | None = None  # past_key.0, past_value.0, past_key.1, ...
        self.length = 0
        self._binding = None
        self._arrays: list[np.ndarray] = []  # what the in-place buffers' OrtValues point into
        self._bound: dict[str, tuple] = {}  # input or output name -> (array, the OrtValue over it)
        self._ones: np.ndarray | None = None  # an unpadded decode step's mask: views of this
        self._ones_value = None  # the OrtValue over the view bound now

    def in_place_binding(self, session, config, rows: int):
        """The IOBinding with each layer's buffer (zeros, made at the first step) bound as
        both its past and its present."""
        import onnxruntime as ort  # heavy: imported where used (a plain glmrt command never loads it)

        if self._binding is None:
            shape = (rows, config.num_kv_heads, self.max_len + self.slack, config.head_dim)
            self._arrays = [np.zeros(shape, np.float32) for _ in range(2 * config.num_layers)]
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays]
            self._binding = session.io_binding()
            for past, present, value in zip(layout.past_names(config), layout.present_names(config), self.values):
                self._binding.bind_ortvalue_input(past, value)
                self._binding.bind_ortvalue_output(present, value)
        return self._binding

    def bind(self, name: str, value: np.ndarray | None = None, shape: tuple | None = None,
             dtype=np.float32, output: bool = False) -> np.ndarray:
        """The array bound as ``name``: the one bound before when its shape is the same (an
        input's ``value`` copied into it, as ``dtype``), else a new one bound in its place."""
        shape = value.shape if shape is None else shape
        kept = self._bound.get(name)
        if kept is None or kept[0].shape != shape:
            import onnxruntime as ort

            array = np.empty(shape, dtype)
            kept = self._bound[name] = (array, ort.OrtValue.ortvalue_from_numpy(array))
            (self._binding.bind_ortvalue_output if output else self._binding.bind_ortvalue_input)(name, kept[1])
        if value is not None:
            np.copyto(kept[0], value)
        return kept[0]

    def bind_all_ones(self, name: str, rows: int, width: int) -> None:
        """Bind a [rows, 1, 1, width] mask of ones (one decode step, no padding) as a view
        of one array made once: no array to fill or copy each step."""
        import onnxruntime as ort

        if self._ones is None or self._ones.size < rows * width:
            self._ones = np.ones(self.rows * self.max_len, np.bool_)
        self._bound.pop(name, None)  # not an array :meth:`bind` may copy a later mask into
        self._ones_value = ort.OrtValue.ortvalue_from_numpy(self._ones[:rows * width].reshape(rows, 1, 1, width))
        self._binding.bind_ortvalue_input(name, self._ones_value)


class OnnxRunner:
    """An export behind GLMModel's forward signature (see the module docstring).

    ``dtype`` and ``device`` are the graph's: fp32 activations in host memory. ``ops`` is
    the :class:`OnnxSession`, whose ``format_report`` is the op report. Inputs and outputs
    are bound (onnxruntime's IOBinding): the KV cache stays in onnxruntime's memory
    (:class:`OrtCache`) and the inputs are read where they lie.
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, session: OnnxSession):
        self.ops = session
        self.config = session.info.config
        tok = session.info.tokenizer
        self.tokenizer_path = None if tok is None else str(tok)
        self._outputs = layout.output_names(self.config)
        self.in_place = session.info.meta.get(layout.KV_CACHE) == layout.KV_IN_PLACE
        self.slack = int(session.info.meta.get(layout.KV_SLACK, 0))

    def new_cache(self, rows: int, max_len: int) -> OrtCache:
        return OrtCache(rows, max_len, self.slack)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                 cache: OrtCache | None = None, start: int | torch.Tensor = 0,
                 logits_index: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        B, T = input_ids.shape
        if not isinstance(start, int):
            raise BackendError("the onnx backend decodes the rows of a batch in step (its graph appends to one "
                               "shared past length); per-row positions need a backend that runs the GLM graph")
        if cache is None and start:
            raise BackendError("the onnx runner needs a cache to continue at a position > 0")
        if cache is not None and start != cache.length:
            raise BackendError(f"the onnx runner's cache holds {cache.length} positions, not {start}")
        if cache is not None and self.in_place:
            return self._step_in_place(input_ids, position_ids, mask, cache, start, logits_index)
        mask = _attend_all(B, T, start + T) if mask is None else mask
        feeds = layout.feeds(c, input_ids, position_ids, mask, (), logits_index)
        import onnxruntime as ort  # heavy: imported where used (a plain glmrt command never loads it)

        binding = self.ops.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        past = cache.values if cache is not None and cache.values is not None else [
            ort.OrtValue.ortvalue_from_numpy(t.numpy()) for kv in layout.empty_past(c, B) for t in kv]
        for name, value in zip(layout.past_names(c), past):
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.ops.run_with_binding(binding)
        out = binding.get_outputs()
        if cache is not None:
            cache.values, cache.length = out[1:], start + T
        return torch.from_numpy(out[0].numpy())

    def _step_in_place(self, input_ids, position_ids, mask, cache: OrtCache, start: int, logits_index):
        """One call on the cache's kept binding (:class:`OrtCache`): the inputs are copied
        into the bound arrays straight from the callers' tensors, no feed dict between."""
        B, T = input_ids.shape
        if start + T > cache.max_len:
            raise BackendError(f"the KV cache of {cache.max_len} positions is full (need {start + T})")
        binding = cache.in_place_binding(self.ops.session, self.config, B)
        dtypes = layout.INPUT_DTYPES
        cache.bind("input_ids", _array(input_ids), dtype=dtypes["input_ids"])
        cache.bind("position_ids", _array(position_ids), dtype=dtypes["position_ids"])
        if mask is None and T == 1:
            cache.bind_all_ones("attention_mask", B, start + T)
        else:
            mask = _attend_all(B, T, start + T) if mask is None else _array(mask)
            cache.bind("attention_mask", mask, dtype=dtypes["attention_mask"])
        index = np.arange(T) if logits_index is None else _array(logits_index)
        cache.bind("logits_index", index, dtype=dtypes["logits_index"])
        logits = cache.bind("logits", shape=(B, len(index), self.config.vocab_size), output=True)
        self.ops.run_with_binding(binding)
        cache.length = start + T
        return torch.from_numpy(logits.copy())  # the buffer is the next step's


def _array(t) -> np.ndarray:
    """A torch tensor's host array (shared memory), or the array given."""
    return t.numpy() if isinstance(t, torch.Tensor) else t


def _attend_all(rows: int, T: int, width: int) -> np.ndarray:
    """The mask a ``None`` mask stands for (GLMModel's "attend to everything")."""
    return np.ones((rows, 1, T, width), np.bool_)
