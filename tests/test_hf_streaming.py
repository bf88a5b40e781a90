"""Streaming conversion (model/hf.py, model/safetensors_io.py): `python -m model.hf import` and
`export` never hold the model.

`bench.hf_convert` writes a random Hugging Face directory of a 16-layer variant of `tiny` whose
routed experts make it 0.2 GB in fp32, then measures the peak RSS of `import` and of `export` of the
resulting checkpoint, each in a fresh process, above the peak of that process after its imports: a
converter that builds the model holds at least its fp32 bytes (1.0); these hold about one layer.
The conversion round trip itself is checked bit for bit. The same benchmark on `small` is the
acceptance figure in the README (whole-process peak under 0.5x the fp32 bytes).
"""
import json
import subprocess
import sys

from safetensors.torch import load_file

from train_helpers import ROOT, train_env

MODEL = ["model.num_hidden_layers=16", "model.n_routed_experts=32", "model.moe_intermediate_size=128"]


def _tensors(hf_dir):
    out = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_import_and_export_hold_about_one_layer(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.hf_convert", "--model", "tiny", "--dir", str(tmp_path),
                           *MODEL], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {json.loads(line)["case"].split()[0]: json.loads(line) for line in proc.stdout.splitlines()}
    for direction in ("import", "export"):
        row = rows[direction]
        above = (row["ours"] - row["base_gib"]) / row["peer_value"]
        print(direction, row, f"above imports: {above:.3f} x fp32 bytes")
        assert 0.15 < row["peer_value"] < 0.3 and above < 0.5, (direction, row, above)
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "hf_back")
    assert original.keys() == back.keys() and len(original) > 500
    assert all(back[name].equal(t) for name, t in original.items())
