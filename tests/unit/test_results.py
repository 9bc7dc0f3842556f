"""results: atomic writers leave files with the mode the user's umask asks for."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from peft_core import results


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


WRITERS = {
    "json": lambda path: results.write_json(path, {"a": 1}),
    "text": lambda path: results.write_text(path, "x\n"),
    "parquet": lambda path: results.write_parquet(path, __import__("pandas").DataFrame({"a": [1, 2]})),
    "safetensors": lambda path: results.write_safetensors(path, {"w": __import__("torch").zeros(2)}),
    "torch": lambda path: results.write_torch(path, {"w": 1}),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_honour_the_umask(tmp_path, umask, kind, mask, mode):
    umask(mask)
    path = tmp_path / f"out.{kind}"
    WRITERS[kind](path)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_overwrite_takes_the_current_umask(tmp_path, umask):
    path = tmp_path / "metrics.json"
    umask(0o077)
    results.write_json(path, {"a": 1})
    umask(0o022)
    results.write_json(path, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and results.read_json(path) == {"a": 2}


def test_reading_the_umask_does_not_change_it(umask):
    umask(0o027)
    assert results._umask() == 0o027
    assert os.umask(0o027) == 0o027


def test_umask_fallback_without_proc(umask, monkeypatch):
    umask(0o027)
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert results._umask() == 0o027
    assert os.umask(0o027) == 0o027


def test_writers_in_threads_all_get_the_umask_mode(tmp_path, umask):
    umask(0o022)
    threads = [threading.Thread(target=results.write_text, args=(tmp_path / f"{i}.txt", "x")) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}
