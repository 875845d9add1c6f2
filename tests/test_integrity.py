"""Size and checksum records: digests against hashlib, each kind of damage named, atomic writes."""

import hashlib
import json

import pytest

from aoi_jax import integrity


def test_digest_is_size_and_sha256(tmp_path):
    data = bytes(range(256)) * 5000                                    # > 1 MiB: several blocks
    (tmp_path / "f").write_bytes(data)
    assert integrity.digest(tmp_path / "f") == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_problem_names_each_kind_of_damage(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    record = integrity.digest(path)
    assert integrity.problem(path, record) is None
    path.write_bytes(b"01234")
    assert integrity.problem(path, record) == "5 bytes, recorded 10 (truncated or extended)"
    path.write_bytes(b"0123456788")
    assert integrity.problem(path, record) == "different bytes than recorded, at the recorded size (altered in place)"
    path.unlink()
    assert integrity.problem(path, record) == "missing"


def test_sidecar_record(tmp_path):
    path = tmp_path / "cache.npy"
    path.write_bytes(b"abc")
    assert integrity.check_sidecar(path) == ("no checksum record cache.npy.sha256.json (an interrupted write, or "
                                             "written by an older version)")
    integrity.write_sidecar(path)
    assert json.loads((tmp_path / "cache.npy.sha256.json").read_text()) == integrity.digest(path)
    assert integrity.check_sidecar(path) is None
    path.write_bytes(b"abd")
    assert integrity.check_sidecar(path).startswith("different bytes")
    (tmp_path / "cache.npy.sha256.json").write_text("{")
    assert integrity.check_sidecar(path).startswith("unreadable checksum record cache.npy.sha256.json (JSONDecodeError")


def test_folder_records_and_problems(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"xx")
    (tmp_path / "y").write_bytes(b"y")
    (tmp_path / "skip").write_bytes(b"s")
    records = integrity.folder_records(tmp_path, exclude=("skip",))
    assert list(records) == ["a/x", "y"]
    (tmp_path / "a" / "x").write_bytes(b"x")
    (tmp_path / "y").unlink()
    (tmp_path / "new").write_bytes(b"n")                                # files without a record are not checked
    assert integrity.folder_problems(tmp_path, records) == ["a/x: 1 bytes, recorded 2 (truncated or extended)",
                                                            "y: missing"]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "f.json"
    integrity.write_json_atomic(path, {"a": 1})

    def fail(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        integrity.write_atomic(path, fail)
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        integrity.write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
