"""``glmrt backends``: every discovered backend, available or why not, and its ops."""
from __future__ import annotations

from glm_runtime.core.ops import OPS
from glm_runtime.core.registry import discover, kernels_for

NAME = "backends"
HELP = "list installed backends: availability and reason, device, dtypes, distributed backend, ops"
EXAMPLE = "glmrt backends --ops"


def add_arguments(p):
    p.add_argument("--ops", action="store_true", help="show, per backend, which ops it provides and which "
                   "fall back to the reference")


def _dt(d) -> str:
    return str(d).replace("torch.", "")


def run(args) -> int:
    for name, d in sorted(discover().items()):
        state = "available" if d.available else "unavailable"
        print(f"{name}: {state} - {d.probe.reason}")
        print(f"    from {d.source}")
        b = d.backend
        if b is None:
            continue
        if b.description:
            print(f"    {b.description}")
        caps = b.capabilities() if d.available else None
        aliases = f" (aliases: {', '.join(b.aliases)})" if b.aliases else ""
        print(f"    device {b.device_type}{aliases}, distributed backend {b.dist_backend}")
        if b.visible_devices_env or b.forward_env_prefixes:
            fwd = ", ".join(p + "*" for p in b.forward_env_prefixes) or "-"
            print(f"    visible-devices variable {b.visible_devices_env or '-'}; launcher forwards {fwd}")
        if caps is not None:
            extra = (f", warp {caps.warp_size}" if caps.warp_size else "") + (
                f", tuning {caps.extra['tuning']}" if "tuning" in caps.extra else "")
            print(f"    arch {caps.arch or '-'}, compute dtypes {', '.join(_dt(x) for x in caps.compute_dtypes)}{extra}")
        if args.ops and b.runs_own_graph:
            print("      runs exported graphs of its own: a loaded model's op report lists what ran where")
        elif args.ops:
            kernels = kernels_for(b)
            for op in OPS:
                k = kernels.get(op)
                if k is None:
                    print(f"      {op:<17} reference fallback (no kernel)")
                else:
                    dts = ", ".join(sorted(_dt(x) for x in k.dtypes))
                    print(f"      {op:<17} {b.name} [{dts}] {k.note}")
    return 0
