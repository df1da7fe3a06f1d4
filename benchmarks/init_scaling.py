"""Start-up time of a job against its world size, and a model of it at 1K / 4K / 10K ranks.

Three measurements (all on one host; rerun with ``python benchmarks/init_scaling.py``):

1. ``full``: N real ranks under ``mpiexec``, each importing torch before the clock starts,
   then timed phase by phase with the bootstrap of :mod:`glm_runtime.parallel.bootstrap` (MPI discovery
   with the shared-memory split, rank 0's libuv TCPStore on port 0 broadcast over MPI,
   arrival barrier, gloo process group up to its first barrier, TP x DP x PP subgroups from
   a DeviceMesh). Same N, same phases with torchrun-style ``env://`` rendezvous (a port
   chosen by the launcher in advance, ``init_process_group(init_method="env://")``).
2. ``store``: the rendezvous protocol alone at larger N: one libuv TCPStore server and N
   client connections spread over a few processes, each "rank" connecting, checking in
   with one ``add`` and waiting for the last arrival's key (our O(N) arrival barrier).
3. ``mesh``: the all-to-all address exchange a full-mesh process group (gloo) does through
   the store (each rank sets its key and reads every other rank's): O(N^2) requests.

Results go to ``docs/scaling.json`` and ``docs/scaling.png``; docs/scaling.md explains them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PHASES = ("discover", "store", "arrival", "process_group", "subgroups")

# torch's store client and server look up the host name of every connection's address
# (for log messages) with getnameinfo. Where reverse DNS is slow or lossy, as on the host
# these figures come from, one lookup in a few dozen stalls for the resolver's 5 s
# timeout. Preloading this shim makes those lookups numeric: it stands for a cluster
# whose reverse DNS answers at once (nscd, or /etc/hosts entries for every node).
NUMERIC_NAMEINFO_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
typedef int (*gni_t)(const struct sockaddr *, socklen_t, char *, socklen_t, char *, socklen_t, int);
int getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen,
                char *serv, socklen_t servlen, int flags) {
    static gni_t real;
    if (!real) real = (gni_t)dlsym(RTLD_NEXT, "getnameinfo");
    flags &= ~NI_NAMEREQD;
    return real(sa, salen, host, hostlen, serv, servlen, flags | NI_NUMERICHOST | NI_NUMERICSERV);
}
"""


def numeric_nameinfo_env(tmp: Path) -> dict:
    """Environment that preloads the numeric getnameinfo shim (empty when no C compiler)."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return {}
    src, lib = tmp / "numeric_nameinfo.c", tmp / "numeric_nameinfo.so"
    src.write_text(NUMERIC_NAMEINFO_C)
    if subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"]).returncode:
        return {}
    return {"LD_PRELOAD": str(lib)}


# ------------------------------------------------------------------ rank side (full)


def _rank_main(mode: str, repeats: int) -> None:
    """One rank of a ``full`` measurement (run under mpiexec)."""
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    import torch  # noqa: F401 - imported before the clock starts, like any job would
    import torch.distributed as dist
    from mpi4py import MPI

    from glm_runtime.parallel import bootstrap
    from glm_runtime.parallel.topology import Topology

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    tp = 2 if world >= 2 else 1
    pp = 2 if world >= 4 else 1
    runs = []
    for rep in range(repeats):
        comm.Barrier()
        marks = {}
        t0 = time.perf_counter()
        if mode == "mpi":
            info = bootstrap.discover()
            marks["discover"] = time.perf_counter()
            timeout = bootstrap.timeout_for(info.world_size)
            store = bootstrap.open_store(info, timeout)
            marks["store"] = time.perf_counter()
            bootstrap.wait_for_all(store, info, timeout, key=f"glm/arrived/{rep}")
            marks["arrival"] = time.perf_counter()
            dist.init_process_group("gloo", store=dist.PrefixStore(f"pg{rep}", store), rank=rank,
                                    world_size=world, timeout=timeout)
        else:  # env:// as torchrun sets it up; rank 0 serves the store inside init_process_group
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
            os.environ["MASTER_PORT"] = os.environ[f"GLM_BENCH_PORT_{rep}"]
            marks["discover"] = marks["store"] = marks["arrival"] = time.perf_counter()
            dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=600))
        dist.barrier()
        marks["process_group"] = time.perf_counter()
        topo = Topology(tp=tp, pp=pp, device_type="cpu")
        dist.barrier()
        marks["subgroups"] = time.perf_counter()
        ends = {k: v - t0 for k, v in marks.items()}
        runs.append({"ends": ends, "groups": topo.groups_created})
        dist.destroy_process_group()
        if mode == "mpi":
            del store
    everything = comm.gather(runs, root=0)
    if rank == 0:
        out = []
        for rep in range(repeats):
            ends = {k: max(r[rep]["ends"][k] for r in everything) for k in PHASES}
            out.append({"ends": ends, "groups": everything[0][rep]["groups"]})
        print("BENCH " + json.dumps({"mode": mode, "world": world, "tp": tp, "pp": pp, "runs": out}), flush=True)


def _connections_main() -> None:
    """One rank of the connection count: bootstrap, a (2, 2, N/4) topology, then count
    the TCP sockets this process opened for the store and its peers."""
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    import torch.distributed as dist
    from mpi4py import MPI  # noqa: F401 - MPI's own sockets open here, before the count starts

    from glm_runtime.parallel import bootstrap
    from glm_runtime.parallel.topology import Topology

    def sockets() -> set[str]:
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:"):
                found.add(link)
        return found

    mpi_own = sockets()  # init finalizes MPI once every rank arrived; these are not counted
    ctx = bootstrap.init("cpu")
    after_store_pg = len(sockets() - mpi_own)
    world = ctx.world_size
    topo = Topology(tp=2 if world >= 2 else 1, pp=2 if world >= 4 else 1, device_type="cpu")
    dist.barrier()
    after_groups = len(sockets() - mpi_own)
    counts = [None] * world
    dist.all_gather_object(counts, (after_store_pg, after_groups, topo.groups_created))
    if ctx.rank == 0:
        print("CONN " + json.dumps({"world": world, "rank0": counts[0], "others_max": max(counts[1:] or [counts[0]]),
                                    "others_min": min(counts[1:] or [counts[0]])}), flush=True)
    bootstrap.shutdown()


def measure_connections(worlds) -> list[dict]:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    rows = []
    for n in worlds:
        env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        p = subprocess.run([str(mpiexec), "-n", str(n), sys.executable, __file__, "_connections"],
                           capture_output=True, text=True, env=env, timeout=600)
        line = [x for x in p.stdout.splitlines() if x.startswith("CONN ")]
        if p.returncode or not line:
            raise SystemExit(f"connection count failed at N={n}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        rows.append(json.loads(line[0][5:]))
        print("connections " + json.dumps(rows[-1]), flush=True)
    return rows


def _free_port(start: int) -> int:
    """How env:// launchers get a port: a free one chosen in advance, closed again, for rank 0
    to bind later. Below the kernel's ephemeral range (like torchrun's 29500): a port taken
    from that range (bind to port 0, then close) was, in this benchmark, grabbed by a gloo
    listener of the previous repetition before rank 0 bound it, and the job hung with its
    ranks connected to the wrong server (docs/scaling.md)."""
    for port in range(start, 32768):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit("no free port below 32768")


def measure_full(worlds, repeats: int, extra_env: dict | None = None, label: str = "default") -> list[dict]:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    rows = []
    for mode in ("mpi", "env"):
        for n in worlds:
            env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                       MASTER_ADDR="127.0.0.1", **(extra_env or {}))
            port = 29500
            for rep in range(repeats):
                port = _free_port(port + 1)
                env[f"GLM_BENCH_PORT_{rep}"] = str(port)
            cmd = [str(mpiexec), "-n", str(n), sys.executable, __file__, "_rank", mode, "--repeats", str(repeats)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
            line = [x for x in p.stdout.splitlines() if x.startswith("BENCH ")]
            if p.returncode or not line:
                raise SystemExit(f"full benchmark failed at N={n} ({mode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
            r = json.loads(line[0][6:])
            r["median"] = {k: statistics.median(run["ends"][k] for run in r["runs"]) for k in PHASES}
            r["names"] = label
            rows.append(r)
            print(f"full  {mode:3s} {label:7s} N={n:4d}  " + "  ".join(f"{k}={r['median'][k] * 1e3:8.1f}ms" for k in PHASES)
                  + f"  groups={r['runs'][0]['groups']}", flush=True)
    return rows


# ------------------------------------------------------------ store-only (many ranks)


def _clients_main(host: str, port: int, world: int, first: int, count: int, pattern: str, out: str) -> None:
    """``count`` simulated ranks in one process, each with its own store connection.

    Phases: connect every client (each connect timed), then wait until the driver says
    every process is connected (a file appears), then the request pattern. Separating the
    two keeps connect-time effects (see docs/scaling.md: reverse DNS) out of the
    server-throughput figure.
    """
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    from torch.distributed import TCPStore

    timeout = datetime.timedelta(seconds=900)
    per_conn, stores = [], []
    Path(out + ".ready").write_text("1")
    go_connect = Path(out).with_name("go-connect")
    while not go_connect.exists():
        time.sleep(0.001)
    t_connect = time.time()
    for _ in range(count):
        t = time.perf_counter()
        stores.append(TCPStore(host, port, world, False, timeout=timeout, wait_for_workers=False, use_libuv=True))
        per_conn.append(time.perf_counter() - t)
    t_connected = time.time()
    Path(out + ".connected").write_text("1")
    go = Path(out).with_name("go")
    while not go.exists():
        time.sleep(0.001)
    t_go = time.time()
    if pattern == "arrival":
        for s in stores:
            if s.add("arrived", 1) == world:
                s.set("all", b"1")
        for s in stores:
            s.wait(["all"], timeout)
    else:  # full-mesh address exchange: set own key, then read every other rank's
        for i, s in enumerate(stores):
            s.set(f"addr/{first + i}", b"10.0.0.1:12345")
        for i, s in enumerate(stores):
            s.wait([f"addr/{world - 1}"], timeout)
            for j in range(world):
                if j != first + i:
                    s.get(f"addr/{j}")
    t_end = time.time()
    Path(out).write_text(json.dumps({"connect_go": t_connect, "connected": t_connected, "go": t_go, "end": t_end,
                                     "connect_s": per_conn}))


def _server_main(world: int) -> None:
    """The store's host: prints its port, serves until its stdin closes (like a launcher agent)."""
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, world, True, timeout=datetime.timedelta(seconds=900),
                      wait_for_workers=False, use_libuv=True)
    print(server.port, flush=True)
    sys.stdin.read()


def measure_store(worlds, pattern: str, procs: int, tmp: Path, extra_env: dict | None = None,
                  label: str = "default") -> list[dict]:
    rows = []
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", **(extra_env or {}))
    for n in worlds:
        work = tmp / f"{pattern}-{label}-{n}"
        work.mkdir()
        server = subprocess.Popen([sys.executable, __file__, "_server", str(n)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        port = int(server.stdout.readline())
        k = min(procs, n)
        sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
        ps, first = [], 0
        for i, m in enumerate(sizes):
            out = work / f"client-{i}.json"
            ps.append((subprocess.Popen([sys.executable, __file__, "_clients", "127.0.0.1", str(port), str(n),
                                         str(first), str(m), pattern, str(out)], env=env), out))
            first += m
        for phase, flag in ((".ready", "go-connect"), (".connected", "go")):
            while not all(Path(str(out) + phase).exists() for _, out in ps):
                if any(p.poll() for p, _ in ps):
                    raise SystemExit(f"store benchmark client failed at N={n}")
                time.sleep(0.01)
            (work / flag).write_text("1")
        for p, _ in ps:
            if p.wait(timeout=1800):
                raise SystemExit(f"store benchmark client failed at N={n}")
        server.stdin.close()
        server.wait()
        rec = [json.loads(out.read_text()) for _, out in ps]
        conns = sorted(c for r in rec for c in r["connect_s"])
        row = {"pattern": pattern, "names": label, "world": n, "client_procs": k,
               "connect_s": max(r["connected"] for r in rec) - min(r["connect_go"] for r in rec),
               "requests_s": max(r["end"] for r in rec) - min(r["go"] for r in rec),
               "connect_median_s": conns[len(conns) // 2], "connect_p99_s": conns[int(0.99 * (len(conns) - 1))],
               "connect_max_s": conns[-1], "connect_stalls_over_1s": sum(c > 1.0 for c in conns),
               "connect_sum_without_stalls_s": sum(c for c in conns if c <= 1.0)}
        rows.append(row)
        print(f"store {pattern:7s} {label:7s} N={n:6d}  connect={row['connect_s'] * 1e3:9.1f}ms  "
              f"requests={row['requests_s'] * 1e3:9.1f}ms  connect median="
              f"{row['connect_median_s'] * 1e3:.2f}ms p99={row['connect_p99_s'] * 1e3:.1f}ms "
              f"stalls>1s={row['connect_stalls_over_1s']}", flush=True)
    return rows


# ------------------------------------------------------------------------ model


def fit_line(xs, ys):
    """Least-squares a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    return my - b * mx, b


HOP_S = 20e-6  # assumed MPI point-to-point latency between nodes (TCP; ~2-5 us on InfiniBand)
DNS_TIMEOUT_S = 5.0  # glibc resolver default


def model(arrival, mesh, dns, full_rows) -> dict:
    """Start-up time at 1K/4K/10K ranks from the measured per-rank costs (docs/scaling.md
    lists the assumptions). ``arrival``/``mesh``: numeric-name store runs; ``dns``: the
    same arrival runs with the host's resolver, for the stall rate."""
    a_c, b_c = fit_line([r["world"] for r in arrival], [r["connect_s"] for r in arrival])
    a_r, b_r = fit_line([r["world"] for r in arrival], [r["requests_s"] for r in arrival])
    _, per_req = fit_line([r["world"] * (r["world"] + 1) for r in mesh], [r["requests_s"] for r in mesh])
    conns = sum(r["world"] for r in dns)
    stall_rate = sum(r["connect_stalls_over_1s"] for r in dns) / max(1, conns)
    mpi_full = [r for r in full_rows if r["mode"] == "mpi" and r["names"] == "numeric"] or \
        [r for r in full_rows if r["mode"] == "mpi"]
    big = max(mpi_full, key=lambda r: r["world"])
    groups = max(1, big["runs"][0]["groups"])
    per_group = (big["median"]["subgroups"] - big["median"]["process_group"]) / groups
    out = {"store_connect_s_per_rank": b_c, "store_requests_s_per_rank": b_r, "mesh_s_per_request": per_req,
           "reverse_dns_stall_rate": stall_rate, "subgroup_s_per_new_group_call": per_group,
           "assumptions": {"mpi_hop_s": HOP_S, "dns_timeout_s": DNS_TIMEOUT_S, "tp": 8, "pp": 8}, "at": {}}
    for n in (1024, 4096, 10240):
        tp, pp = 8, 8
        dp = n // (tp * pp)
        calls = n // tp + n // dp + n // pp  # new_group calls per rank for the three mesh dimensions
        out["at"][str(n)] = {
            "bcast_s": 2 * HOP_S * (n - 1).bit_length(),
            "store_connect_s": a_c + b_c * n,
            "arrival_s": a_r + b_r * n,
            "full_mesh_exchange_s": per_req * n * (n + 1),
            "subgroups_s": per_group * calls,
            "new_group_calls_per_rank": calls,
            "dns_stalls_expected": stall_rate * n,
            "dns_stall_s_if_serialised": stall_rate * n * DNS_TIMEOUT_S,
            "timeout_s": 120 + 0.02 * n,
        }
    return out


def plot(full_rows, store_rows, mdl, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for names, mode, style in (("numeric", "mpi", "-o"), ("numeric", "env", "-s"), ("default", "mpi", ":o"),
                               ("default", "env", ":s")):
        rows = sorted((r for r in full_rows if r["mode"] == mode and r["names"] == names), key=lambda r: r["world"])
        if not rows:
            continue
        xs = [r["world"] for r in rows]
        label = ("MPI bootstrap" if mode == "mpi" else "env://") + (", host DNS" if names == "default" else "")
        if mode == "mpi" and names == "numeric":
            a1.plot(xs, [r["median"]["arrival"] * 1e3 for r in rows], style, label=f"{label}: store + arrival")
        if names == "numeric":
            a1.plot(xs, [r["median"]["process_group"] * 1e3 for r in rows], style, label=f"{label}: + gloo group")
        a1.plot(xs, [r["median"]["subgroups"] * 1e3 for r in rows], style, label=f"{label}: + TP/DP/PP groups")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("ranks (torch processes on this 2-core host)")
    a1.set_ylabel("ms since start (median of runs, slowest rank)")
    a1.set_title("full start-up")
    a1.legend(fontsize=7)
    series = (("arrival", "numeric", "connect_s", "-o", "connect (names numeric)"),
              ("arrival", "numeric", "requests_s", "-s", "check-in + wait, O(N) (ours)"),
              ("mesh", "numeric", "requests_s", "-^", "full-mesh address exchange, O(N²)"),
              ("arrival", "default", "connect_s", ":x", "connect (host's reverse DNS)"))
    for pattern, names, key, style, label in series:
        rows = sorted((r for r in store_rows if r["pattern"] == pattern and r["names"] == names),
                      key=lambda r: r["world"])
        if rows:
            a2.plot([r["world"] for r in rows], [r[key] for r in rows], style, label=f"measured: {label}")
    ns = sorted(mdl["at"], key=int)
    a2.plot([int(n) for n in ns], [mdl["at"][n]["store_connect_s"] + mdl["at"][n]["arrival_s"] for n in ns],
            "k:", label="model: store connect + arrival")
    a2.plot([int(n) for n in ns], [mdl["at"][n]["full_mesh_exchange_s"] for n in ns], "r:",
            label="model: full-mesh exchange")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("ranks (store clients)")
    a2.set_ylabel("seconds")
    a2.set_title("rendezvous through one libuv TCPStore")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run every measurement and write docs/scaling.{json,png}")
    r.add_argument("--full", default="1,2,4,8,16,32", help="world sizes of real ranks")
    r.add_argument("--store", default="64,256,1024,4096,10240", help="world sizes of the store-only run")
    r.add_argument("--dns", default="64,128", help="world sizes of the run with the host's resolver")
    r.add_argument("--mesh", default="16,32,64,128,256,512", help="world sizes of the full-mesh exchange")
    r.add_argument("--connections", default="2,4,8,16", help="world sizes of the socket count")
    r.add_argument("--client-procs", type=int, default=8)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--out", default=str(DOCS / "scaling.json"))
    k = sub.add_parser("_rank")
    k.add_argument("mode", choices=("mpi", "env"))
    k.add_argument("--repeats", type=int, default=3)
    cn = sub.add_parser("connections", help="count each rank's sockets after start-up; merge into --out")
    cn.add_argument("--worlds", default="2,4,8,16")
    cn.add_argument("--out", default=str(DOCS / "scaling.json"))
    sub.add_parser("_connections")
    sv = sub.add_parser("_server")
    sv.add_argument("world", type=int)
    c = sub.add_parser("_clients")
    for name in ("host", "port", "world", "first", "count", "pattern", "out"):
        c.add_argument(name)
    args = ap.parse_args()
    if args.cmd == "_rank":
        return _rank_main(args.mode, args.repeats)
    if args.cmd == "_connections":
        return _connections_main()
    if args.cmd == "connections":
        rows = measure_connections([int(x) for x in args.worlds.split(",")])
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.exists() else {}
        data["connections"] = rows
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_text(json.dumps(data, indent=1) + "\n")
        tmp_out.rename(out)
        return
    if args.cmd == "_server":
        return _server_main(args.world)
    if args.cmd == "_clients":
        return _clients_main(args.host, int(args.port), int(args.world), int(args.first), int(args.count),
                             args.pattern, args.out)
    if args.cmd != "run":
        ap.print_help()
        return
    import tempfile

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        numeric = numeric_nameinfo_env(Path(tmp))
        label = "numeric" if numeric else "default"
        full = measure_full(ints(args.full), args.repeats)
        if numeric:
            full += measure_full(ints(args.full), args.repeats, numeric, label)
        arrival = measure_store(ints(args.store), "arrival", args.client_procs, Path(tmp), numeric, label)
        mesh = measure_store(ints(args.mesh), "mesh", args.client_procs, Path(tmp), numeric, label)
        dns = measure_store(ints(args.dns), "arrival", args.client_procs, Path(tmp), {}, "default")
    mdl = model(arrival, mesh, dns, full)
    connections = measure_connections(ints(args.connections))
    import torch

    result = {"host": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                       "loadavg_before": load0, "loadavg_after": os.getloadavg()},
              "full": full, "store": arrival + mesh + dns, "model": mdl, "connections": connections}
    out = Path(args.out)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    tmp_out.rename(out)
    plot(full, arrival + mesh + dns, mdl, out.with_suffix(".png"))
    print(json.dumps(mdl, indent=1))


if __name__ == "__main__":
    main()
