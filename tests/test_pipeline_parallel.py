"""Pipeline, expert and ZeRO-1 data parallelism under torchrun (gloo) against one process.

Each launch runs several cases of tests/dist_pipeline_train.py (a launch costs seconds, so cases are
batched): losses within 1e-5 and gradients equal to the single-process run (bitwise where the
summation order is the same), router loads exact,
forward-only evaluation, and for ZeRO-1 the optimizer-state bytes per rank and a checkpoint of the
sharded state read back by one process.
"""
import re

from tests.dist_launch import run_torchrun


def _check(output: str, n_cases: int) -> None:
    assert "PARALLEL OK" in output, output[-4000:]
    lines = [line for line in output.splitlines() if re.match(r"^(1f1b|interleaved_1f1b|zbv|dualpipev|no pipeline):",
                                                             line)]
    assert len(lines) == n_cases, "\n".join(lines)


def test_every_schedule_pp2(tmp_path):
    # 1F1B and interleaved accumulate every gradient in the same order as one process: bitwise equal.
    # The V schedules look the embedding up on two stages (first and last), so its gradient is summed
    # in another order: equal within round-off.
    cases = ["pp=2,schedule=1f1b,exact=1", "pp=2,schedule=interleaved_1f1b,exact=1", "pp=2,schedule=zbv",
             "pp=2,schedule=dualpipev"]
    _check(run_torchrun("dist_pipeline_train.py", 2, *cases, "--tmp", str(tmp_path)), len(cases))


def test_pipeline_with_expert_and_zero1_data_parallel(tmp_path):
    cases = ["pp=2,ep=2,gpn=4,schedule=dualpipev",
             "pp=2,dp=2,zero=1,schedule=zbv",
             "pp=2,ep=2,gpn=4,zero=1,schedule=interleaved_1f1b",
             "pp=4,schedule=1f1b,exact=1",
             "pp=4,layers=8,schedule=interleaved_1f1b,exact=1",
             "pp=1,dp=2,ep=2,gpn=2,zero=1"]
    output = run_torchrun("dist_pipeline_train.py", 4, *cases, "--tmp", str(tmp_path))
    _check(output, len(cases))
    fractions = re.search(r"pp=2 dp=2 ep=1 zero=True .* state fraction per rank=\[([^\]]*)\]", output).group(1)
    assert [float(f) for f in fractions.split(",")] == [0.5] * 4
