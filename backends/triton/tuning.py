"""Launch configurations of the Triton kernels, per platform and GPU architecture.

Why per platform: NVIDIA schedules warps of 32 threads, AMD and Hygon DCU wavefronts of
64, so the same ``num_warps`` means twice the threads on ROCm/DTK; AMD's Triton backend
wants 1-2 software-pipeline stages where NVIDIA's benefits from 3-4 (cp.async / TMA);
gfx906 (Hygon Z100, AMD MI50/60) has no matrix cores, so large dot tiles only spill
registers there; sm_90 and gfx942 have the shared memory for bigger tiles.

Status: these are starting points chosen from those architectural facts and from the
configurations Triton's own tutorials use per vendor; none has been measured on the
hardware by this project (none is available to it). Every entry is compiled ahead of
time for its target by ``python -m glm_runtime.backends.triton.aot`` (shared memory within the
architecture's limit), except Hygon's gfx926/gfx928, which upstream Triton does not know:
those need the Triton build that ships with DTK. ``glmrt doctor --bench`` on a device
prints achieved bandwidth/FLOP rates per op so a user can tune and report; unknown
architectures get the platform's ``default`` entry, never an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RowCfg:
    """Row-wise kernels (norms, activations): warps grow with the row width."""

    block: int = 1024  # elements per program for elementwise/gated kernels
    warps_small: int = 4
    warps_large: int = 8
    large_from: int = 4096

    def warps_for(self, n: int) -> int:
        return self.warps_large if n >= self.large_from else self.warps_small


@dataclass(frozen=True)
class RotaryCfg:
    block_t: int = 16
    num_warps: int = 4


@dataclass(frozen=True)
class MatmulCfg:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class AttnCfg:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Tuning:
    platform: str
    arch: str
    row: RowCfg = field(default_factory=RowCfg)
    rotary: RotaryCfg = field(default_factory=RotaryCfg)
    matmul: MatmulCfg = field(default_factory=MatmulCfg)
    matmul_decode: MatmulCfg = field(default_factory=lambda: MatmulCfg(16, 64, 128, 4, 3))
    attention: AttnCfg = field(default_factory=AttnCfg)


def _t(platform, arch, **kw) -> Tuning:
    return Tuning(platform, arch, **kw)


# NVIDIA: warp 32. sm_80/sm_90 have 164/228 KB shared memory per SM -> deeper pipelines.
CUDA = {
    "default": _t("cuda", "default"),
    "sm_70": _t("cuda", "sm_70", matmul=MatmulCfg(64, 64, 32, 4, 2), attention=AttnCfg(64, 32, 4, 1)),
    "sm_75": _t("cuda", "sm_75", matmul=MatmulCfg(64, 64, 32, 4, 2), attention=AttnCfg(64, 32, 4, 1)),
    "sm_80": _t("cuda", "sm_80", matmul=MatmulCfg(128, 128, 32, 8, 3), attention=AttnCfg(128, 64, 4, 3)),
    "sm_86": _t("cuda", "sm_86", matmul=MatmulCfg(64, 128, 32, 4, 3), attention=AttnCfg(64, 64, 4, 2)),
    "sm_89": _t("cuda", "sm_89", matmul=MatmulCfg(64, 128, 32, 4, 3), attention=AttnCfg(64, 64, 4, 2)),
    "sm_90": _t("cuda", "sm_90", matmul=MatmulCfg(128, 128, 64, 8, 4),
                matmul_decode=MatmulCfg(16, 128, 128, 4, 4), attention=AttnCfg(128, 64, 8, 3)),
}

# AMD: wavefront 64 -> half the warps for the same threads; 1-2 stages on the AMD backend.
_ROW64 = RowCfg(block=1024, warps_small=2, warps_large=4, large_from=4096)
ROCM = {
    "default": _t("rocm", "default", row=_ROW64, matmul=MatmulCfg(64, 64, 32, 4, 2),
                  matmul_decode=MatmulCfg(16, 64, 128, 4, 2), attention=AttnCfg(64, 64, 4, 1)),
    "gfx90a": _t("rocm", "gfx90a", row=_ROW64, matmul=MatmulCfg(128, 128, 32, 8, 2),
                 matmul_decode=MatmulCfg(16, 64, 128, 4, 2), attention=AttnCfg(128, 64, 4, 1)),
    "gfx942": _t("rocm", "gfx942", row=_ROW64, matmul=MatmulCfg(128, 128, 64, 8, 2),
                 matmul_decode=MatmulCfg(16, 128, 128, 4, 2), attention=AttnCfg(128, 64, 4, 2)),
}

# Hygon DCU (DTK): wavefront 64. gfx906 (Z100) lacks matrix cores: small dot tiles, one
# stage; gfx926 (K100) and gfx928 (K100-AI) get the mid-size tiles.
DCU = {
    "default": _t("dcu", "default", row=_ROW64, matmul=MatmulCfg(64, 64, 32, 4, 1),
                  matmul_decode=MatmulCfg(16, 64, 64, 4, 1), attention=AttnCfg(64, 32, 4, 1)),
    "gfx906": _t("dcu", "gfx906", row=_ROW64, rotary=RotaryCfg(8, 2), matmul=MatmulCfg(32, 64, 32, 4, 1),
                 matmul_decode=MatmulCfg(16, 32, 64, 2, 1), attention=AttnCfg(32, 32, 2, 1)),
    "gfx926": _t("dcu", "gfx926", row=_ROW64, matmul=MatmulCfg(64, 64, 32, 4, 1),
                 matmul_decode=MatmulCfg(16, 64, 64, 4, 1), attention=AttnCfg(64, 32, 4, 1)),
    "gfx928": _t("dcu", "gfx928", row=_ROW64, matmul=MatmulCfg(128, 64, 32, 8, 2),
                 matmul_decode=MatmulCfg(16, 64, 128, 4, 2), attention=AttnCfg(64, 64, 4, 1)),
}

TABLES = {"cuda": CUDA, "rocm": ROCM, "dcu": DCU}


def lookup(platform: str, arch: str | None) -> Tuning:
    """The tuning entry for ``arch`` on ``platform`` (its ``default`` when unknown)."""
    table = TABLES[platform]
    base = (arch or "default").split(":")[0]  # gcnArchName carries ":sramecc+:xnack-"
    return table.get(base, table["default"])
