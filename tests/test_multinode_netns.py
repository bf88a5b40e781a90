"""A real two-node run on one machine: two network namespaces joined by a veth pair (10.77.0.1 and
10.77.0.2, inside the namespaces only), one `torchrun` "node" of 2 processes in each, c10d
rendezvous over the veth link, `train.py` training a shrunken `tiny` with pp=2 x ep=2 (DualPipeV;
expert parallelism inside a node, the pipeline across the nodes, as DeepSeek-V3 places them). Its
losses must match the single-process run of the same job within 1e-5, and the pipeline traffic
must have crossed the veth link.

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

from train_helpers import build_corpus, job_args, read_metrics, run_train, train_env

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
    env = dict(train_env(), GLOO_SOCKET_IFNAME=f"{name}{'ab'[node]}")
    cmd = ["ip", "netns", "exec", f"{name}{node}", sys.executable, "-m", "torch.distributed.run",
           "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=10.77.0.1:{PORT}",
           f"--rdzv-id={name}", f"--rdzv-conf=is_host={int(node == 0)}", f"--local-addr=10.77.0.{node + 1}",
           *script_args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


JOB = ("model.num_hidden_layers=4", "train.steps=6", "train.global_batch=8", "train.micro_batch=1",
       "optim.lr=5e-4", "eval.every=3", "checkpoint.every=0")


def test_train_pp2_ep2_across_two_namespaces(tmp_path):
    name = f"mf{os.getpid() % 100000}"
    _hosts_or_skip(name)
    try:
        corpus = build_corpus(tmp_path / "corpus")
        single = run_train(job_args(corpus, tmp_path / "single", *JOB), timeout=300)
        assert single.returncode == 0, single.stdout + single.stderr
        before = _veth_bytes(name)
        script = [str(ROOT / "train.py"), *job_args(corpus, tmp_path / "two_nodes", *JOB, "parallel.pp=2",
                                                    "parallel.ep=2", "parallel.schedule=dualpipev")]
        logs = [tmp_path / f"node{i}.log" for i in range(2)]
        procs = [_launch(name, i, script, logs[i]) for i in range(2)]
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=300))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append("timeout")
        outputs = [log.read_text() for log in logs]
        assert codes == [0, 0], f"exit codes {codes}\nnode 0:\n{outputs[0][-4000:]}\nnode 1:\n{outputs[1][-4000:]}"
        assert "world 4 (dp 2)" in outputs[0], outputs[0][-3000:]
        crossed = _veth_bytes(name) - before
        assert crossed > 100_000, f"only {crossed} bytes crossed the veth link"
        ours, ref = read_metrics(tmp_path / "two_nodes"), read_metrics(tmp_path / "single")
        assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, 7))
        for a, b in zip(ours, ref):
            for key in ("loss", "mtp_loss", "val_loss"):
                if key in b:
                    assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    finally:
        subprocess.run(["bash", str(HELPER), "down", name], capture_output=True)
