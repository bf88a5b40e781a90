"""DualPipeV's overlapped forward and backward (parallel/pipeline_overlap.py)."""
import threading
import time

import pytest

from parallel.pipeline_overlap import BWD, COMM, COMPUTE, FWD, Baton, DualPipeOverlap
from tests.dist_launch import run_torchrun


def test_overlap_changes_no_result_pp2_ep2():
    # One launch: every schedule with and without overlap, DualPipeV also in bf16 autocast and with
    # the hierarchical dispatcher.
    output = run_torchrun("dist_pipeline_overlap.py", 4)
    assert "OVERLAP OK" in output, output[-4000:]
    lines = [line for line in output.splitlines() if "bitwise equal" in line]
    assert len(lines) == 6, "\n".join(lines)
    buckets = [line for line in output.splitlines() if "gradient buckets started during the step" in line]
    assert len(buckets) == 2, "\n".join(buckets)


def test_baton_interleaves_compute_with_the_other_sides_communication():
    baton, log = Baton(), []

    def side(name, steps):
        """steps: "compute" or the seconds an all-to-all takes."""
        baton.switch(name, COMPUTE)
        for i, step in enumerate(steps):
            if step == COMPUTE:
                log.append((name, i))
            else:
                baton.switch(name, COMM)
                time.sleep(step)
                baton.switch(name, COMPUTE)
        baton.finish(name)

    baton.open(BWD)
    helper = threading.Thread(target=side, args=(BWD, [COMPUTE, 0.05, COMPUTE, 0.05, COMPUTE]))
    helper.start()
    side(FWD, [COMPUTE, 0.2, COMPUTE])
    helper.join()
    baton.close()
    # B computes first; F computes during B's first all-to-all, B twice during F's (at 50 and 100 ms),
    # F after its own (200 ms), B being done.
    assert log == [(BWD, 0), (FWD, 0), (BWD, 2), (BWD, 4), (FWD, 2)]
    assert baton.overlaps == 3


def test_baton_does_nothing_outside_an_overlapped_action():
    baton = Baton()
    baton.switch(FWD, COMM)
    baton.switch(BWD, COMPUTE)
    assert baton.overlaps == 0


def test_runtime_without_custom_functions_is_refused():
    with pytest.raises(RuntimeError, match="parallel.overlap=false"):
        DualPipeOverlap(object(), [], pp=2)
