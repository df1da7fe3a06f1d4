"""Single-process checks of the parallel core: discovery order, timeouts, stage partition,
TP sharding layouts (against the unsharded model's own head/row semantics), launcher lines."""
from __future__ import annotations

import pytest
import torch

from glm_runtime.core import sharding
from glm_runtime.core.build import random_state
from glm_runtime.core.errors import GLMError
from glm_runtime.core.presets import preset
from glm_runtime.parallel import bootstrap
from glm_runtime.parallel.pipeline import bubble_theory
from glm_runtime.parallel.stages import partition_layers

# ------------------------------------------------------------------ discovery


@pytest.mark.parametrize("env, want", [
    ({}, (0, 1, 0, "single")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8"},
     (3, 8, 1, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"}, (5, 8, 1, "openmpi")),
    ({"PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"},
     (6, 8, 2, "pmi")),
    ({"PMI_RANK": "6", "PMI_SIZE": "8", "PALS_LOCAL_RANKID": "3"}, (6, 8, 3, "pmi")),
    ({"SLURM_PROCID": "7", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "2(x4)"},
     (7, 8, 3, "slurm")),
    # a batch script in an allocation of 8 tasks is not a launched rank
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "42"}, (0, 1, 0, "single")),
])
def test_discovery_order(env, want):
    info = bootstrap.discover(env=env, use_mpi=False)
    assert (info.rank, info.world_size, info.local_rank, info.source) == want


def test_explicit_arguments_win_and_must_come_in_pairs():
    info = bootstrap.discover(rank=1, world_size=2, env={"RANK": "0", "WORLD_SIZE": "4"})
    assert (info.rank, info.world_size, info.source) == (1, 2, "explicit")
    with pytest.raises(GLMError, match="both rank and world_size"):
        bootstrap.discover(rank=1, env={})
    with pytest.raises(GLMError, match="not an integer"):
        bootstrap.discover(env={"RANK": "x", "WORLD_SIZE": "2"}, use_mpi=False)


def test_timeout_grows_with_world_size():
    small, big = bootstrap.timeout_for(8, 60), bootstrap.timeout_for(10_000, 60)
    assert small.total_seconds() == pytest.approx(60.16)
    assert big.total_seconds() == pytest.approx(260.0)


def test_interface_address_and_store_address(monkeypatch):
    assert bootstrap.interface_address("lo") == "127.0.0.1"
    with pytest.raises(GLMError, match="not found"):
        bootstrap.interface_address("no-such-if0")
    info = bootstrap.LaunchInfo(0, 4, 0, 2, "pmi")
    monkeypatch.setenv("GLM_BOOTSTRAP_IFACE", "lo")
    assert bootstrap.store_address(info) == "127.0.0.1"
    monkeypatch.delenv("GLM_BOOTSTRAP_IFACE")
    monkeypatch.setenv("GLM_BOOTSTRAP_ADDR", "10.1.2.3")
    assert bootstrap.store_address(info) == "10.1.2.3"


def test_without_mpi_a_multi_rank_job_needs_master_addr():
    info = bootstrap.LaunchInfo(1, 4, 1, 4, "slurm")
    with pytest.raises(GLMError, match="MASTER_ADDR"):
        bootstrap.open_store(info, bootstrap.timeout_for(4, 5), env={})


# ------------------------------------------------------------------ partition


def test_partition_balanced_and_lighter_ends():
    assert partition_layers(3, 2) == [(0, 2), (2, 3)]
    assert partition_layers(7, 3) == [(0, 3), (3, 5), (5, 7)]
    glm130b = partition_layers(70, 8, ends_lighter=True)  # as GLM-130B: 8, 9 x 6, 8
    assert [b - a for a, b in glm130b] == [8, 9, 9, 9, 9, 9, 9, 8]
    assert glm130b[-1][1] == 70
    with pytest.raises(GLMError, match="cannot split"):
        partition_layers(2, 4)
    assert bubble_theory(4, 8) == pytest.approx(3 / 11)


# ------------------------------------------------------------------- sharding


@pytest.mark.parametrize("name, tp", [("tiny-chatglm2", 2), ("tiny-chatglm2", 4), ("tiny-glm-130b", 4),
                                      ("tiny-chatglm-6b", 2)])
def test_shard_unshard_round_trip(name, tp):
    cfg = preset(name, vocab_size=1003 if tp == 2 else 1002, eos_token_ids=[2], pad_token_id=0)
    state = random_state(cfg, seed=0)
    for key, full in state.items():
        pieces = [sharding.shard(key, full, cfg, tp, r) for r in range(tp)]
        assert torch.equal(sharding.unshard(key, pieces, cfg, tp), full), key


@pytest.mark.parametrize("name, tp, scheme", [("tiny-chatglm2", 4, None), ("tiny-glm-4", 2, "int4"),
                                              ("tiny-glm-130b", 2, "int8"), ("tiny-chatglm-6b", 4, None)])
def test_parts_read_from_a_native_file_are_the_shards(tmp_path, name, tp, scheme):
    """A rank loading a native checkpoint reads each tensor's part straight from the file
    (contiguous slices, padding added): the same tensors as cutting the whole tensor, and
    no more bytes than the parts (replicated norms and biases aside)."""
    from glm_runtime.converters import native
    from glm_runtime.converters.detect import open_parts
    from glm_runtime.converters.quantize import quantize_scheme

    cfg = preset(name, vocab_size=1003, eos_token_ids=[2], pad_token_id=0)
    state = random_state(cfg, seed=1)
    if scheme:
        cfg, state = quantize_scheme(cfg, state, int(scheme[3:]), "fast")
    native.save(tmp_path / "ckpt", cfg, state)
    ck = open_parts(tmp_path / "ckpt")
    read_bytes = []

    def read(key, *where):
        t = ck.read(key, *where)
        read_bytes.append(t.numel() * t.element_size())
        return t
    for r in range(tp):
        read_bytes.clear()
        for key, full in state.items():
            part = sharding.local_part(key, tuple(ck.tensors[key].shape), cfg, tp, r, lambda *w, k=key: read(k, *w))
            want = sharding.shard(key, full, cfg, tp, r)
            assert part.dtype == want.dtype and torch.equal(part, want), key
        total = sum(t.numel() * t.element_size() for t in state.values())
        assert sum(read_bytes) < total / tp * 1.15, (sum(read_bytes), total)


def test_blocked_qkv_split_gives_each_rank_its_heads_and_their_kv_group():
    """With 4 query heads, 2 KV groups and tp=4, rank r holds head r and group r // 2."""
    cfg = preset("tiny-chatglm2")
    d = cfg.head_dim
    rows = torch.arange(cfg.q_size + 2 * cfg.kv_size)
    for r in range(4):
        got = sharding.shard("layers.0.attn.qkv.weight", rows[:, None].float(), cfg, 4, r)[:, 0].long()
        g = r // 2
        want = torch.cat((rows[r * d:(r + 1) * d], rows[cfg.q_size + g * d:cfg.q_size + (g + 1) * d],
                          rows[cfg.q_size + cfg.kv_size + g * d:cfg.q_size + cfg.kv_size + (g + 1) * d]))
        assert torch.equal(got, want)
    local = sharding.local_config(cfg, 4)
    assert (local.num_heads, local.num_kv_heads) == (1, 1)


def test_gated_fc1_split_keeps_value_and_gate_halves_together():
    cfg = preset("tiny-glm-130b")
    f = cfg.ffn_hidden_size
    rows = torch.arange(2 * f)[:, None].float()
    got = sharding.shard("layers.1.mlp.fc1.weight", rows, cfg, 2, 1)[:, 0].long()
    assert torch.equal(got, torch.cat((torch.arange(f // 2, f), torch.arange(f + f // 2, 2 * f))))


def test_vocab_padding_and_indivisible_configs():
    cfg = preset("tiny-chatglm2", vocab_size=1003)
    w = torch.randn(1003, 4)
    pieces = [sharding.shard("embed.weight", w, cfg, 4, r) for r in range(4)]
    assert [p.shape[0] for p in pieces] == [251] * 4 and bool((pieces[-1][-1] == 0).all())
    with pytest.raises(GLMError, match="num_heads=4 is not a multiple of tp=3"):
        sharding.check_divisible(cfg, 3)


# ------------------------------------------------------------------- launcher


def test_launcher_command_lines():
    from glm_runtime.cli.launch import build_command

    cmd = ["glmrt", "generate", "ckpt", "--tp", "2"]
    assert build_command("mpirun", 4, cmd, ["GLM_BACKEND"], [], "mpiexec", "openmpi") == \
        ["mpiexec", "-n", "4", "-x", "GLM_BACKEND", *cmd]
    assert build_command("mpirun", 4, cmd, ["GLM_A", "GLM_B"], [], "mpiexec", "hydra") == \
        ["mpiexec", "-n", "4", "-genvlist", "GLM_A,GLM_B", *cmd]
    assert build_command("srun", 4, cmd, [], ["-N", "2"]) == ["srun", "-n", "4", "--export=ALL", "-N", "2", *cmd]
    tr = build_command("torchrun", 2, cmd, [], [])
    assert tr[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert tr[5:] == ["--no-python", *cmd]
