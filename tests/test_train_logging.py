"""metrics.jsonl follows the contract, W&B offline keeps metrics and config under out_dir/wandb, a
resume after a torn metrics line keeps every step in both, and a run whose steps keep failing stops
with a checkpoint and an error."""
import shutil
import json
import math
import struct

import pytest
import yaml

from train_helpers import build_corpus, job_args, read_metrics, run_train, train_env

CONTRACT = ("step", "tokens", "loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "maxvio", "time",
            "skipped_steps", "balance_loss")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def wandb_records(path):
    """Protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of CRC/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_file):
    history, logged_config = [], {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            logged_config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return history, logged_config


def test_metrics_and_wandb_offline(corpus, tmp_path):
    out_dir = tmp_path / "run"
    env = {k: v for k, v in train_env().items() if k not in ("WANDB_MODE", "WANDB_SILENT")}
    args = job_args(corpus, out_dir, "train.steps=8", "logging.every=2", "eval.every=4", "checkpoint.every=4",
                    "logging.wandb.mode=offline")
    proc = run_train(args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_metrics(out_dir)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for r in records:
        assert set(CONTRACT) <= set(r) and all(math.isfinite(r[k]) for k in CONTRACT)
        assert r["tokens"] == r["step"] * 4 * 32 and r["skipped_steps"] == 0
        assert ("val_loss" in r) == (r["step"] % 4 == 0) and ("val_bpb" in r) == ("val_loss" in r)
    assert records[-1]["val_bpb"] < records[-1]["val_loss"]  # > 1 byte per token on code
    assert "step 8/8" in proc.stdout and "tok/s" in proc.stdout and "eta" in proc.stdout

    config = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert config["train"]["steps"] == 8 and config["model"]["hidden_size"] == 64

    runs = list((out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history, logged_config = wandb_history(runs[0])
    assert [h["step"] for h in history] == [2, 4, 6, 8]  # plotted against `step`; W&B's own _step increases
    for h, r in zip(history, records):
        assert h["loss"] == r["loss"] and h["lr"] == r["lr"] and h.get("val_loss") == r.get("val_loss")
    assert logged_config["train"]["steps"] == 8 and logged_config["out_dir"] == str(out_dir)

    # the job dies after step 8's metrics line was half written and before its checkpoint was complete
    shutil.rmtree(out_dir / "checkpoints" / "step_8")
    with (out_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "tokens": 11')
    again = run_train(args, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "metrics.jsonl:5: dropped a torn line" in again.stdout
    assert [r["step"] for r in read_metrics(out_dir)] == [2, 4, 6, 8]
    assert read_metrics(out_dir) == records[:2] + read_metrics(out_dir)[2:]
    second = [r for r in (out_dir / "wandb").glob("offline-run-*/run-*.wandb") if r != runs[0]]
    assert len(second) == 1 and second[0].parent.name.endswith(runs[0].parent.name.split("-")[-1])
    replayed, _ = wandb_history(second[0])
    assert [h["step"] for h in replayed] == [6, 8]  # the replayed steps are kept, none dropped
    assert [h["loss"] for h in replayed] == [r["loss"] for r in records[2:]]


def test_non_finite_steps_in_a_row_stop_with_checkpoint(corpus, tmp_path):
    out_dir = tmp_path / "run"
    proc = run_train(job_args(corpus, out_dir, "train.steps=20", "optim.lr=1e30", "optim.warmup_frac=0",
                              "optim.grad_clip=0", "train.max_skipped_in_row=3", "checkpoint.every=0"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "steps in a row had a non-finite loss or gradient norm (train.max_skipped_in_row=3)" in proc.stderr
    records = read_metrics(out_dir)
    skipped = [r for r in records if r.get("skipped")]
    assert [r["skipped_steps"] for r in skipped] == [1, 2, 3]
    last = records[-1]["step"]
    assert [r["step"] for r in skipped] == [last - 2, last - 1, last] and last < 20
    assert (out_dir / "checkpoints" / f"step_{last}" / "meta.json").is_file()
    assert f"step {skipped[0]['step']} skipped" in proc.stdout


def test_vocabulary_mismatch_is_a_config_error(corpus, tmp_path):
    out_dir = tmp_path / "run"
    args = [a for a in job_args(corpus, out_dir) if not a.startswith("model.vocab_size=")]
    proc = run_train(args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"model.vocab_size (4096) differs from the vocabulary of data.tokenizer={corpus['tokenizer']} " \
           f"({corpus['vocab_size']}); set model.vocab_size={corpus['vocab_size']}" in proc.stderr
    assert not out_dir.exists()
