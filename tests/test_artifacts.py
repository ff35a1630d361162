import pytest

from compiler import artifacts


def test_a_failure_half_way_leaves_no_folder(tmp_path, monkeypatch):
    calls = []
    real = artifacts.write_file

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(artifacts, "write_file", failing)
    with pytest.raises(OSError, match="No space left"):
        artifacts.write_directory(tmp_path / "out", {"model.onnx": b"abc"}, {"a": 1})
    assert calls == ["model.onnx", "manifest.json"]
    assert list(tmp_path.iterdir()) == []


def test_force_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    artifacts.write_directory(out, {"model.onnx": b"old"}, {})
    monkeypatch.setattr(artifacts, "write_file", lambda path, data: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        artifacts.write_directory(out, {"model.onnx": b"new"}, {}, force=True)
    assert (out / "model.onnx").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    artifacts.write_directory(tmp_path / "out", {"model.onnx": b"x"}, {"k": 1})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.onnx"]
