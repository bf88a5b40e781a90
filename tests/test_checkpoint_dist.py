"""Checkpoint faults across two ranks (torchrun, gloo): a full disk on one rank, a failed meta.json
write on rank 0, corruption seen by one rank only, an asynchronous save beside training
collectives, and a hanging rank hitting the collective timeout (tests/dist_checkpoint_faults.py)."""
from dist_launch import run_torchrun


def test_checkpoint_faults_across_ranks(tmp_path):
    out = run_torchrun("dist_checkpoint_faults.py", 2, str(tmp_path), timeout=240)
    assert "checkpoint faults ok" in out, out[-4000:]
    assert "rank 0: collective failed after" in out
