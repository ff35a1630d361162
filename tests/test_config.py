"""compile.py --config FILE: a JSON or YAML file of the command line's options; flags override it;
the manifest records the resolved options and the file's hash; bad files get one clear line."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("torch")


def test_yaml_config_round_trip_with_a_flag_overriding(run_cli, tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text(
        "block: encoder\nembed_dim: 32\nnum_heads: 4\ndim-feedforward: 64\nactivation: gelu\n"
        "norm_first: true\nbatch_first: true\nkey_padding_mask: bool\ntarget: ort-cpu\ncheck: true\n"
        f"out: {tmp_path / 'from-config'}\n"
    )
    out = tmp_path / "overridden"
    result = run_cli("compile.py", "--config", config, "--target", "onnx-attention", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (tmp_path / "from-config").exists()  # --out on the command line won
    assert (
        manifest["target"] == "onnx-attention" and manifest["options"]["target"] == "onnx-attention"
    )
    spec = manifest["spec"]
    assert (
        spec["block"],
        spec["embed_dim"],
        spec["dim_feedforward"],
        spec["activation"],
        spec["norm_first"],
    ) == ("encoder", 32, 64, "gelu", True)
    assert manifest["options"]["key_padding_mask"] == "bool" and manifest["check"]["passed"]
    assert manifest["config"] == {
        "path": str(config),
        "sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
    }


def test_json_config_equals_the_same_flags(run_cli, tmp_path):
    config = tmp_path / "mha.json"
    config.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "num_heads": 2,
                "self_attention": True,
                "causal": True,
                "bias": False,
                "seed": 3,
            }
        )
    )
    assert run_cli("compile.py", "--config", config, "--out", tmp_path / "a").returncode == 0
    assert (
        run_cli(
            "compile.py",
            *"--embed-dim 16 --num-heads 2 --self-attention --causal --no-bias".split(),
            *"--seed 3 --out".split(),
            tmp_path / "b",
        ).returncode
        == 0
    )
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (
        tmp_path / "b" / "model.onnx"
    ).read_bytes()


@pytest.mark.parametrize(
    "text,suffix,message",
    [
        ('{"embed_dim": 8, "heads": 2}', ".json", "unknown option 'heads'"),
        (
            '{"embed_dim": "eight", "num_heads": 2}',
            ".json",
            "embed_dim must be an integer, got 'eight'",
        ),
        ('{"target": "gpu"}', ".json", "target must be one of portable"),
        ('{"causal": "yes"}', ".json", "causal must be true or false"),
        ("[1", ".json", "is not valid JSON"),
        ("embed_dim: [8", ".yaml", "is not valid YAML"),
        ("- 8\n- 2\n", ".yaml", "must hold a mapping"),
    ],
)
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


# Hostile and surprising files (docs/RELIABILITY.md) ---------------------------------------------

import time  # noqa: E402

from attention_compiler.benchmark.memory import PeakRss  # noqa: E402
from attention_compiler.cli import compile as compile_script  # noqa: E402

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh")
)


def _config_refused(tmp_path, capsys, path, message):
    """exit 2, one line under 400 characters holding ``message``, in bounded time and memory."""
    started = time.monotonic()
    with (
        PeakRss() as peak,
        pytest.raises(SystemExit) as exit_,
    ):  # argparse's exit: refused while parsing
        compile_script.main(
            [
                "--config",
                str(path),
                *"--embed-dim 8 --num-heads 2 --out".split(),
                str(tmp_path / "out"),
            ]
        )
    status = exit_.value.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and len(err) < 400 and message in err, err
    assert time.monotonic() - started < 3 and peak.growth < 200 * 2**20, (
        time.monotonic() - started,
        peak.growth,
    )
    assert not (tmp_path / "out").exists()


def test_hostile_config_files_are_refused_fast_in_little_memory(tmp_path, capsys):
    import os

    (tmp_path / "laughs.yaml").write_text(LAUGHS)  # 9**8 strings once expanded, in 380 bytes
    _config_refused(tmp_path, capsys, tmp_path / "laughs.yaml", "expands to more than 10000 values")
    _config_refused(tmp_path, capsys, "/dev/zero", "is not a regular file")
    os.mkfifo(tmp_path / "fifo.yaml")  # nobody writes: reading it would block forever
    _config_refused(tmp_path, capsys, tmp_path / "fifo.yaml", "is not a regular file")
    (tmp_path / "big.json").write_bytes(b" " * (2**20 + 1))
    _config_refused(tmp_path, capsys, tmp_path / "big.json", "more than a config file may have")
    (tmp_path / "long.json").write_text(json.dumps({"target": "x" * 500_000}))
    _config_refused(tmp_path, capsys, tmp_path / "long.json", "target must be one of portable")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    _config_refused(tmp_path, capsys, tmp_path / "deep.json", "is not valid JSON")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("float.yaml", "seed: 16.7\n", "seed: "),
        ("float.json", '{"embed_dim": 16.7}', "embed_dim must be an integer, got 16.7"),
        ("overflow.json", '{"embed_dim": 1e400}', "embed_dim must be an integer, got inf"),
        ("nan.yaml", "dropout: .nan\n", "dropout must be a finite number, got nan"),
        (
            "base60.yaml",
            "seed: 1:0\n",
            "seed: 1:0 is a base-60 number in YAML 1.1 (1:0 would mean 60)",
        ),
        ("octal.yaml", "seed: 010\n", "seed: 010 is an octal number in YAML 1.1 (it would mean 8)"),
        ("twice.yaml", "seed: 1\nseed: 2\n", "option 'seed' is given twice (line 2)"),
        ("twice.json", '{"seed": 1, "seed": 2}', "option 'seed' is given twice"),
        ("key.yaml", "1: 2\n", "has the key 1 (int); option names are text"),
        (
            "utf16.yaml",
            "seed: 5\n".encode("utf-16-le"),
            "holds NUL bytes: UTF-16 without a byte-order mark",
        ),
        ("latin1.yaml", "out: caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
        (
            "negative.yaml",
            "seed: -1\n",
            "seed: expected a whole number from 0 to 2**64-1, got '-1'",
        ),
    ],
)
def test_surprising_config_values_are_refused_naming_the_key(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    _config_refused(tmp_path, capsys, path, message)


def test_config_values_in_their_natural_types_are_taken(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(
        "latency_shape: [1, 8, 8]\nmemory_limit: 17179869184\nmax_len: 64\nseed: 0x10\n".encode(
            "utf-16"
        )
    )  # with its byte-order mark
    out = tmp_path / "out"
    assert (
        compile_script.main(
            [
                "--config",
                str(config),
                *"--embed-dim 8 --num-heads 2 --quiet --out".split(),
                str(out),
            ]
        )
        == 0
    )
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert (options["latency_shape"], options["memory_limit"], options["seed"]) == (
        [1, 8, 8],
        17179869184,
        16,
    )
