"""kernels.autotune: the launch shapes it times, the recorded-table writer, and its answer without a GPU."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kernels import autotune
from kernels.inspect import load_model_config
from kernels.triton import configs
from kernels.triton.configs import GemmConfig

ROOT = Path(__file__).resolve().parents[1]


def test_without_gpu_one_line_and_status_2():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "kernels.autotune", "--write"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stdout


def test_table_writer_round_trips(tmp_path):
    path = tmp_path / "configs.py"
    shutil.copy(autotune.CONFIGS_PY, path)
    original = path.read_text()
    assert autotune.read_table(path) == configs.TUNED
    table = {("fprop", 4096, 7168): GemmConfig(64, 128, 8, 4, 8), ("wgrad_grouped", 7168, 2048): GemmConfig(128, 64, 8, 3, 1)}
    autotune.write_table(table, path)
    assert autotune.read_table(path) == table
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # the written file is valid Python
    assert namespace["TUNED"] == table and namespace["DEFAULTS"] == configs.DEFAULTS
    autotune.write_table(configs.TUNED, path)
    assert path.read_text() == original


def test_tuned_entries_are_looked_up_by_kind_and_shape():
    key, tuned = ("fprop", 4096, 7168), GemmConfig(64, 128, 8, 4, 8)
    saved = dict(configs.TUNED)
    try:
        configs.TUNED[key] = tuned
        assert configs.gemm_config(*key) == tuned
        assert configs.gemm_config("fprop", 4096, 2048) == configs.DEFAULTS["fprop"]
        with configs.forced({"fprop": configs.CANDIDATES["fprop"][1]}):
            assert configs.gemm_config(*key) == configs.CANDIDATES["fprop"][1]
    finally:
        configs.TUNED.clear()
        configs.TUNED.update(saved)


def test_launch_shapes_cover_every_kind_of_v3_671b():
    shapes = autotune.launch_shapes(load_model_config("v3_671b"), 4096, 8)
    keys = {(s.kind, s.n, s.k) for s in shapes}
    assert len(keys) == len(shapes)
    # o_proj: Fprop 7168 x 16384, Dgrad 16384 x 7168, Wgrad over 4096 tokens; routed experts: 1024 rows in 8 groups
    assert {("fprop", 7168, 16384), ("fprop", 16384, 7168), ("wgrad", 7168, 16384)} <= keys
    routed = [s for s in shapes if s.kind == "fprop_grouped" and (s.n, s.k) == (4096, 7168)]
    assert routed and routed[0].counts == (128,) * 8
    assert {s.kind for s in shapes} == set(configs.KINDS)
