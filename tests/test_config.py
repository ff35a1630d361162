"""compile.py --config FILE: a JSON or YAML file of the command line's options; flags override it;
the manifest records the resolved options and the file's hash; bad files get one clear line."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("torch")


def test_yaml_config_round_trip_with_a_flag_overriding(run_cli, tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text("block: encoder\nembed_dim: 32\nnum_heads: 4\ndim-feedforward: 64\nactivation: gelu\n"
                      "norm_first: true\nbatch_first: true\nkey_padding_mask: bool\ntarget: ort-cpu\ncheck: true\n"
                      f"out: {tmp_path / 'from-config'}\n")
    out = tmp_path / "overridden"
    result = run_cli("compile.py", "--config", config, "--target", "onnx-attention", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (tmp_path / "from-config").exists()  # --out on the command line won
    assert manifest["target"] == "onnx-attention" and manifest["options"]["target"] == "onnx-attention"
    spec = manifest["spec"]
    assert (spec["block"], spec["embed_dim"], spec["dim_feedforward"], spec["activation"], spec["norm_first"]) == \
        ("encoder", 32, 64, "gelu", True)
    assert manifest["options"]["key_padding_mask"] == "bool" and manifest["check"]["passed"]
    assert manifest["config"] == {"path": str(config), "sha256": hashlib.sha256(config.read_bytes()).hexdigest()}


def test_json_config_equals_the_same_flags(run_cli, tmp_path):
    config = tmp_path / "mha.json"
    config.write_text(json.dumps({"embed_dim": 16, "num_heads": 2, "self_attention": True, "causal": True, "bias": False,
                                  "seed": 3}))
    assert run_cli("compile.py", "--config", config, "--out", tmp_path / "a").returncode == 0
    assert run_cli("compile.py", "--embed-dim", "16", "--num-heads", "2", "--self-attention", "--causal", "--no-bias",
                   "--seed", "3", "--out", tmp_path / "b").returncode == 0
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


@pytest.mark.parametrize("text,suffix,message", [
    ('{"embed_dim": 8, "heads": 2}', ".json", "unknown option 'heads'"),
    ('{"embed_dim": "eight", "num_heads": 2}', ".json", "embed_dim must be int, got 'eight'"),
    ('{"target": "gpu"}', ".json", "target must be one of portable"),
    ('{"causal": "yes"}', ".json", "causal must be true or false"),
    ("[1", ".json", "is not valid JSON"),
    ("embed_dim: [8", ".yaml", "is not valid YAML"),
    ("- 8\n- 2\n", ".yaml", "must hold a mapping"),
])
def test_bad_config_is_one_clear_line(run_cli, tmp_path, text, suffix, message):
    config = tmp_path / f"bad{suffix}"
    config.write_text(text)
    result = run_cli("compile.py", "--config", config, "--out", tmp_path / "x")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_config_without_out_is_refused(run_cli, tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"embed_dim": 8, "num_heads": 2}')
    result = run_cli("compile.py", "--config", config)
    assert result.returncode == 2 and "--out (on the command line or in --config)" in result.stderr
