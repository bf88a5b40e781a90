"""scripts/slurm/train.sbatch without Slurm: stand-ins for srun (one task per node, signals forwarded),
scontrol and torchrun record what the script runs. Checks the torchrun command line of 2 nodes (c10d
rendezvous on the first node, train.py accepts the overrides for the whole world), and that the
preemption signal reaches every training process, not torchrun, and the job requeues itself."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"

SRUN = """#!/bin/bash
# srun stand-in: skip options, run the command once per node (SLURM_NODEID), forward USR1 to the tasks.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
done
trap 'kill -USR1 "${pids[@]}"' USR1
for pid in "${pids[@]}"; do
  while kill -0 $pid 2>/dev/null; do wait $pid; done
done
status=0
for pid in "${pids[@]}"; do wait $pid || status=$?; done
exit $status
"""

SCONTROL = """#!/bin/bash
# scontrol stand-in: two host names; other commands are recorded.
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a17\\ngpu-a18\\n'; else echo "$*" >> "$RECORD/scontrol"; fi
"""

TORCHRUN = """#!/bin/bash
# torchrun stand-in: records its arguments, then (FAKE_WORKER=1) runs a worker that waits for USR1.
printf '%s\\n' "$@" > "$RECORD/torchrun.$SLURM_NODEID"
if [ "${FAKE_WORKER:-0}" = 1 ]; then
  "$PYTHON_BIN" -c '
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
open(os.path.join(sys.argv[1], "ready." + os.environ["SLURM_NODEID"]), "w").close()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
open(os.path.join(sys.argv[1], "signalled." + os.environ["SLURM_NODEID"]), "w").close()
' "$RECORD" &
  wait $!
fi
"""


def fake_slurm(tmp_path: Path, **extra):
    """A PATH with the stand-ins and the environment of a 2-node allocation."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("torchrun", TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(record), PYTHON_BIN=sys.executable,
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_JOB_NUM_NODES="2",
               GPUS_PER_NODE="8", TORCHRUN=str(bin_dir / "torchrun"), OUT_DIR=str(tmp_path / "shared" / "run"),
               **extra)
    return env, record


def test_two_node_command_line_is_accepted_by_train_py(tmp_path, monkeypatch, capsys):
    env, record = fake_slurm(tmp_path)
    overrides = ["model=v2_lite", "parallel.pp=2", "parallel.ep=8", "train.micro_batch=1", "train.global_batch=64"]
    done = subprocess.run(["bash", str(SCRIPT), *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    commands = [(record / f"torchrun.{node}").read_text().splitlines() for node in (0, 1)]
    assert commands[0] == commands[1]  # the rendezvous, not the command line, gives each node its rank
    args = commands[0]
    for option in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a17:29500",
                   "--rdzv-id=4242", "--max-restarts=0"):
        assert option in args
    train_args = args[args.index("train.py") + 1:]
    assert train_args == [f"out_dir={env['OUT_DIR']}", *overrides]
    assert not (record / "scontrol").exists()
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert train.main(["--cfg", *train_args]) == 0
    assert f"out_dir: {env['OUT_DIR']}" in capsys.readouterr().out


def test_preemption_signal_reaches_the_workers_and_requeues(tmp_path):
    env, record = fake_slurm(tmp_path, FAKE_WORKER="1")
    job = subprocess.Popen(["bash", str(SCRIPT), "model=tiny"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not all((record / f"ready.{n}").exists() for n in (0, 1)):
        assert time.time() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert all((record / f"signalled.{n}").exists() for n in (0, 1))
    assert (record / "scontrol").read_text().split() == ["requeue", "4242"]
    assert "USR1 received" in out


def test_out_dir_is_required(tmp_path):
    env, _ = fake_slurm(tmp_path)
    del env["OUT_DIR"]
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "OUT_DIR" in done.stderr


@pytest.mark.parametrize("line", ["#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"])
def test_directives(line):
    assert line in SCRIPT.read_text().splitlines()
