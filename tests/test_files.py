"""abs_deploy/files.py: outputs are written whole or not at all, and what a killed run left
(its temporary files and folders) is removed by the next run, and nothing else is."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abs_deploy import files
from abs_deploy.errors import UserError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _named(folder: Path, target: str, host: str, pid: int) -> Path:
    return folder / f".{target}.abs-tmp-{host}-{pid}-0123abcd"


def test_stale_temporaries_of_dead_runs_go_and_nothing_else(tmp_path):
    host, dead = files._HOST, _dead_pid()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    gone = [_named(tmp_path, "model.onnx", host, dead), _named(tmp_path, "fp.pt", host, dead)]
    gone[0].mkdir()
    (gone[0] / "model.onnx").write_bytes(b"half")
    gone[1].write_bytes(b"half")
    link = _named(tmp_path, "link.pt", host, dead)
    link.symlink_to(outside)  # removed as a link; what it points to stays
    kept = [_named(tmp_path, "live.pt", host, os.getpid()),  # a run still going
            _named(tmp_path, "other.pt", "otherhost", dead),  # another machine's, same folder
            tmp_path / ".abs-export-k2j4h1",  # an older version's name: no pid to judge by
            tmp_path / f".fp.pt.abs-tmp-{host}-{dead}-notours",
            tmp_path / "model.pt", outside]
    for p in kept[:-1]:
        p.write_bytes(b"x")
    files.remove_stale(tmp_path)
    assert not any(os.path.lexists(p) for p in [*gone, link])
    assert all(p.exists() for p in kept) and (outside / "keep.txt").exists()


def test_write_bytes_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = files.write_bytes(tmp_path / "a.bin", b"first")
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["a.bin"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(UserError, match="No space left on device"):
        files.write_bytes(tmp_path / "a.bin", b"second")
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["a.bin"]


def test_check_output_refuses_a_folder_a_missing_folder_and_an_input(tmp_path):
    given = tmp_path / "in.pt"
    given.write_bytes(b"x")
    with pytest.raises(UserError, match="is a folder"):
        files.check_output(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        files.check_output(tmp_path / "nope" / "o.pt")
    with pytest.raises(UserError, match="is the input"):
        files.check_output(tmp_path / "." / "in.pt", [given])
    assert files.check_output(tmp_path / "o.pt", [given]) == tmp_path / "o.pt"
    assert os.listdir(tmp_path) == ["in.pt"]  # the probe is gone
