"""GGUF files: a damaged file is a ModelLoadError naming the file and the role; the converted
cache (the default target's safetensors folder, a quantised user GGUF's folder) is made again
when the source file changes and is never picked up half written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import requires_default
from tiny_models import make_tiny_llama, make_word_tokenizer

from speckv_env import models
from speckv_env.models import ModelLoadError, default_target_path, load_model, load_tokenizer

WORDS = ["<pad>", "<unk>", "</s>", *[f"w{i}" for i in range(61)]]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("SPECKV_CACHE", str(d))
    return d


def _entries(cache: Path) -> list[str]:
    """Everything in the cache folder (scratch folders included)."""
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _assert_names(err: pytest.ExceptionInfo[ModelLoadError], path: Path, role: str) -> None:
    msg = str(err.value)
    assert msg.startswith(f"{role}: ") and str(path) in msg, msg
    assert "GGUF" in msg and "\n" not in msg, msg


# ---- damaged files ------------------------------------------------------------------------

GARBAGE = {
    "random bytes": bytes(range(256)) * 20,
    "empty": b"",
    "magic only": b"GGUF\x03\x00\x00\x00",
    "header cut": b"GGUF\x03\x00\x00\x00" + (10).to_bytes(8, "little") + (3).to_bytes(8, "little") + b"\x05",
}


@pytest.mark.parametrize("content", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_gguf_is_an_error_naming_file_and_role(tmp_path: Path, cache: Path, content: str) -> None:
    p = tmp_path / "weights.gguf"
    p.write_bytes(GARBAGE[content])
    with pytest.raises(ModelLoadError) as e:
        load_model(str(p), role="target", device="cpu")
    _assert_names(e, p, "target")
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(str(p), role="draft")
    _assert_names(e, p, "draft")
    # quantised: the file is converted to a cached folder first; nothing is left in the cache
    with pytest.raises(ModelLoadError) as e:
        load_model(str(p), role="target", device="cpu", compression="int8")
    _assert_names(e, p, "target")
    assert _entries(cache) == []


@requires_default
@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(24, id="header"),
        pytest.param(1 << 20, id="metadata"),
        pytest.param(0.6, id="tensor data", marks=pytest.mark.slow),  # dequantises 60% of the file first
    ],
)
def test_truncated_gguf_is_an_error_naming_file_and_role(tmp_path: Path, cache: Path, keep: float) -> None:
    """The shipped GGUF cut short (in its header, its metadata, its tensor data), as a user's
    file and as the default target's (a damaged wheel)."""
    src = models.smollm2_gguf_path()
    n = int(keep * src.stat().st_size) if isinstance(keep, float) else keep
    p = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        p.write_bytes(f.read(n))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(p), role="draft", device="cpu")
    _assert_names(e, p, "draft")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "smollm2_gguf_path", lambda: p)
        with pytest.raises(ModelLoadError) as e:
            default_target_path(progress=False)
        _assert_names(e, p, "target")
    assert _entries(cache) == []


# ---- the converted cache ------------------------------------------------------------------


class _FakeModel:
    """Stands in for the dequantised model: saves the source file's bytes as its weights;
    ``crash`` = "raise" fails half way (disk full), "exit" kills the process half way."""

    def __init__(self, payload: bytes, crash: str | None = None) -> None:
        self.payload, self.crash = payload, crash

    def save_pretrained(self, d: Any) -> None:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(self.payload[: len(self.payload) // 2])
        if self.crash == "raise":
            raise OSError(28, "No space left on device")
        if self.crash == "exit":
            os._exit(137)
        (d / "model.safetensors").write_bytes(self.payload)


class _FakeTokenizer:
    def save_pretrained(self, d: Any) -> None:
        (Path(d) / "tokenizer.json").write_text("{}")


class _FakeConverter:
    """Replaces ``models._load_gguf`` and ``smollm2_gguf_path``: a GGUF file whose bytes are the
    'weights', and a count of conversions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gguf: Path) -> None:
        self.gguf, self.calls = gguf, 0
        self.crash: str | None = None
        monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
        monkeypatch.setattr(models, "_load_gguf", self.load)

    def load(self, path: Path, dtype: torch.dtype, role: str = "model") -> tuple[_FakeModel, _FakeTokenizer]:
        self.calls += 1
        return _FakeModel(Path(path).read_bytes(), self.crash), _FakeTokenizer()


def _rewrite(p: Path, content: bytes) -> None:
    """New content (the same size), and a modification time that surely differs."""
    st = p.stat()
    p.write_bytes(content)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _weights(folder: Path) -> bytes:
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    return (folder / "model.safetensors").read_bytes()


def test_default_target_cache_is_made_once_and_again_when_the_file_changes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights-v1")
    conv = _FakeConverter(monkeypatch, gguf)
    first = default_target_path(progress=False)
    assert _weights(first) == b"weights-v1" and conv.calls == 1
    assert default_target_path(progress=False) == first and conv.calls == 1  # cached
    _rewrite(gguf, b"weights-v2")  # same size: only the content and the mtime tell
    second = default_target_path(progress=False)
    assert _weights(second) == b"weights-v2" and conv.calls == 2
    assert default_target_path(progress=False) == second and conv.calls == 2
    assert [n for n in _entries(cache) if n.startswith(".")] == []  # no scratch folders left


def test_quantised_user_gguf_cache_follows_the_file(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_model(file.gguf, compression=int8) quantises a cached conversion: after the file
    changes, the loaded model has the new file's weights."""
    pytest.importorskip("bitsandbytes")
    gguf = tmp_path / "user.gguf"
    gguf.write_bytes(b"seed=1")
    loads: list[int] = []

    def fake_load(path: Path, dtype: torch.dtype, role: str = "model") -> tuple[Any, Any]:
        seed = int(Path(path).read_bytes().decode().split("=")[1])
        loads.append(seed)
        return make_tiny_llama(vocab=len(WORDS), seed=seed, eos=2), make_word_tokenizer(WORDS)

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    for seed in (1, 2):
        if seed == 2:
            _rewrite(gguf, b"seed=2")
        want = make_tiny_llama(vocab=len(WORDS), seed=seed, eos=2).lm_head.weight
        m = load_model(str(gguf), compression="int8", device="cpu", role="target")
        assert torch.equal(m.lm_head.weight, want), f"the int8 model is not the converted file {seed}"
    assert loads == [1, 2]
    load_model(str(gguf), compression="int8", device="cpu", role="target")
    assert loads == [1, 2], "an unchanged file is converted once"


def test_a_conversion_that_fails_half_way_is_not_picked_up(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights-v1")
    conv = _FakeConverter(monkeypatch, gguf)
    conv.crash = "raise"
    with pytest.raises(OSError, match="No space left"):
        default_target_path(progress=False)
    assert _entries(cache) == [], "the half-written conversion must be removed"
    conv.crash = None
    assert _weights(default_target_path(progress=False)) == b"weights-v1" and conv.calls == 2


def test_a_conversion_killed_half_way_is_not_picked_up(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed while writing the conversion (no cleanup runs) leaves only a scratch
    folder, which the next load ignores: it converts again and publishes a complete folder."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights-v1")
    code = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from speckv_env import models

        class M:
            def save_pretrained(self, d):
                d = Path(d)
                d.mkdir(parents=True, exist_ok=True)
                (d / "config.json").write_text("{}")
                (d / "model.safetensors").write_bytes(b"weig")
                os._exit(137)

        class T:
            def save_pretrained(self, d):
                (Path(d) / "tokenizer.json").write_text("{}")

        models.smollm2_gguf_path = lambda: Path(sys.argv[1])
        models._load_gguf = lambda path, dtype, role="model": (M(), T())
        models.default_target_path(progress=False)
        """
    )
    env = dict(os.environ, SPECKV_CACHE=str(cache))
    r = subprocess.run([sys.executable, "-c", code, str(gguf)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 137, r.stderr
    assert _entries(cache), "the killed conversion should have written something"
    conv = _FakeConverter(monkeypatch, gguf)
    out = default_target_path(progress=False)
    assert _weights(out) == b"weights-v1" and conv.calls == 1


def test_an_unfinished_folder_at_the_final_name_is_replaced(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder at the cache's final name without the finished marker (as a conversion written
    in place by older code leaves it) is converted again, not loaded."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights-v1")
    conv = _FakeConverter(monkeypatch, gguf)
    out = default_target_path(progress=False)
    (out / models.CONVERTED_MARKER).unlink()
    (out / "model.safetensors").write_bytes(b"weig")
    assert default_target_path(progress=False) == out and conv.calls == 2
    assert _weights(out) == b"weights-v1"
    shutil.rmtree(out)
    assert _weights(default_target_path(progress=False)) == b"weights-v1" and conv.calls == 3


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two loads convert at once: the second to finish finds the first's folder, keeps it and
    removes its own scratch copy (simulated by converting again from inside the conversion)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights-v1")
    conv = _FakeConverter(monkeypatch, gguf)
    inner: list[Path] = []
    inode: list[int] = []
    load = conv.load

    def racing_load(path: Path, dtype: torch.dtype, role: str = "model") -> tuple[_FakeModel, _FakeTokenizer]:
        if not inner:
            inner.append(Path())  # the other process starts and finishes while this one converts
            inner[0] = default_target_path(progress=False)
            inode.append(inner[0].stat().st_ino)
        return load(path, dtype, role)

    monkeypatch.setattr(models, "_load_gguf", racing_load)
    out = default_target_path(progress=False)
    assert out == inner[0] and _weights(out) == b"weights-v1" and conv.calls == 2
    assert out.stat().st_ino == inode[0], "the other process's folder (it may be loading it) was replaced"
    assert _entries(cache) == [out.name]
