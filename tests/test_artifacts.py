import pytest

from attention_compiler.artifacts import files, output_folders


def _write(out, contents, *, force=False):
    with output_folders.staged_directory(out, force=force) as staging:
        for name, data in contents.items():
            files.write_file(staging / name, data)
        files.write_manifest(staging, {"files": {name: {} for name in contents}})


def test_a_failure_half_way_leaves_no_folder(tmp_path, monkeypatch):
    calls = []
    real = files.write_file

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(files, "write_file", failing)
    with pytest.raises(OSError, match="No space left"):
        _write(tmp_path / "a" / "out", {"model.onnx": b"abc"})
    assert calls == ["model.onnx", "manifest.json"]
    assert list(tmp_path.iterdir()) == []  # nor the parent folder it made


def test_force_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, {"model.onnx": b"old"})
    monkeypatch.setattr(
        files, "write_file", lambda path, data: (_ for _ in ()).throw(OSError("disk gone"))
    )
    with pytest.raises(OSError):
        _write(out, {"model.onnx": b"new"}, force=True)
    assert (out / "model.onnx").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    _write(tmp_path / "out", {"model.onnx": b"x"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.onnx"]
