"""A real two-node run on one machine: two network namespaces joined by a veth pair (10.77.0.1 and
10.77.0.2, inside the namespaces only), one `torchrun` "node" in each, c10d rendezvous over the veth
link, training a shrunken `tiny` with pp=2 x ep=2 (expert parallelism inside a node, the pipeline
across the nodes, as DeepSeek-V3 places them) against the single-process run.

Needs root and iproute2 (`ip netns`, `ip link ... type veth`); skipped with the reason otherwise.
The namespaces are made and removed by tests/netns_two_hosts.sh.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "netns_two_hosts.sh"
PORT = 29511


def _hosts_or_skip(name: str) -> None:
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("network namespaces need root (run as root to test two torchrun nodes over a veth pair)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (`ip` not found): cannot create network namespaces")
    made = subprocess.run(["bash", str(HELPER), "up", name], capture_output=True, text=True)
    if made.returncode != 0:
        subprocess.run(["bash", str(HELPER), "down", name], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {(made.stderr or made.stdout).strip()}")


def _veth_bytes(name: str) -> int:
    out = subprocess.run(["ip", "-n", f"{name}0", "-s", "-j", "link", "show", f"{name}a"],
                         capture_output=True, text=True, check=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])


def _launch(name: str, node: int, script_args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               GLOO_SOCKET_IFNAME=f"{name}{'ab'[node]}")
    cmd = ["ip", "netns", "exec", f"{name}{node}", sys.executable, "-m", "torch.distributed.run",
           "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=10.77.0.1:{PORT}",
           f"--rdzv-id={name}", f"--rdzv-conf=is_host={int(node == 0)}", f"--local-addr=10.77.0.{node + 1}",
           *script_args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_pipeline_and_experts_across_two_namespaces(tmp_path):
    name = f"mf{os.getpid() % 100000}"
    _hosts_or_skip(name)
    try:
        before = _veth_bytes(name)
        script = [str(ROOT / "tests" / "dist_pipeline_train.py"), "pp=2,ep=2,schedule=dualpipev",
                  "pp=2,ep=2,schedule=1f1b"]
        logs = [tmp_path / f"node{i}.log" for i in range(2)]
        procs = [_launch(name, i, script + ["--tmp", str(tmp_path / f"ckpt{i}")], logs[i]) for i in range(2)]
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=300))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append("timeout")
        outputs = [log.read_text() for log in logs]
        assert codes == [0, 0], f"exit codes {codes}\nnode 0:\n{outputs[0][-4000:]}\nnode 1:\n{outputs[1][-4000:]}"
        assert "PARALLEL OK" in outputs[0], outputs[0][-4000:]
        crossed = _veth_bytes(name) - before
        assert crossed > 100_000, f"only {crossed} bytes crossed the veth link"
    finally:
        subprocess.run(["bash", str(HELPER), "down", name], capture_output=True)
