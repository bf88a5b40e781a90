"""torchrun worker (4 ranks, gloo): the trainer under several process layouts in one launch.

Launched by tests/test_parallel_train.py as
`dist_train_layouts.py OUT_ROOT LAYOUTS_JSON JOB_OVERRIDE...`, where LAYOUTS_JSON maps a name to the
`parallel.*` overrides of one layout. For each layout, in order, every rank builds the job as train.py
does (compose, validate, out_dir, Trainer, resume, run) with `out_dir=OUT_ROOT/<name>`, so each
layout leaves its metrics.jsonl and checkpoints there for the test to compare with one process. Also
checks that `train.micro_batch=null` gave every rank its whole share of the global batch in one
forward. Prints DIST_TRAIN_OK when all ranks pass.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_launch import finish_worker  # noqa: E402
from training.config import compose_job, data_parallel_size, validate  # noqa: E402
from training.distributed import init_distributed  # noqa: E402
from training.inputs import prepare_inputs  # noqa: E402
from training.loop import Trainer  # noqa: E402

FAILURES = []


def main():
    root, layouts, job = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
    dist = init_distributed("cpu")
    for name, overrides in layouts.items():
        cfg = compose_job([*job, *overrides, f"out_dir={root / name}"])
        mcfg = validate(cfg, dist.world)
        if dist.is_main:
            (root / name).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        trainer = Trainer(cfg, mcfg, dist, prepare_inputs(cfg, mcfg))
        share = cfg.train.global_batch // data_parallel_size(cfg, dist.world)
        if cfg.train.micro_batch is None and trainer.micro_batch != share:
            FAILURES.append(f"rank {dist.rank}: {name}: micro-batch {trainer.micro_batch}, expected the rank's "
                            f"share {share}")
        trainer.resume()
        trainer.run()
    finish_worker(FAILURES, "DIST_TRAIN_OK")


if __name__ == "__main__":
    main()
