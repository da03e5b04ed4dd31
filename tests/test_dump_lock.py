"""One run per dump folder (components/dump_lock.py)."""

import json
import logging
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from diffusion_blocks.components.dump_lock import DumpFolderLock, LOCK_FILE
from diffusion_blocks.errors import ConfigError


def config_for(folder):
    return SimpleNamespace(job=SimpleNamespace(dump_folder=str(folder)), config_origins={})


def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_owner_and_is_released(tmp_path):
    lock = DumpFolderLock.take(config_for(tmp_path / "out"), rank=0)
    saved = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert saved["host"] == socket.gethostname() and saved["pid"] > 0
    lock.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_second_run_on_a_locked_folder_stops_naming_pid_and_host(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "out", live.pid)
        with pytest.raises(ConfigError) as raised:
            DumpFolderLock.take(config_for(tmp_path / "out"), rank=0)
    finally:
        live.kill()
        live.wait()
    message = str(raised.value)
    assert "\n" not in message
    assert f"in use by the run of pid {live.pid} on {socket.gethostname()}" in message


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    write_lock(tmp_path / "out", 1, host="elsewhere.example")
    with pytest.raises(ConfigError, match="pid 1 on elsewhere.example"):
        DumpFolderLock.take(config_for(tmp_path / "out"), rank=0)


def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, caplog):
    write_lock(tmp_path / "out", dead_pid())
    with caplog.at_level(logging.WARNING):
        lock = DumpFolderLock.take(config_for(tmp_path / "out"), rank=0)
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    import os
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_other_ranks_take_nothing(tmp_path):
    DumpFolderLock.take(config_for(tmp_path / "out"), rank=1).release()
    assert not (tmp_path / "out").exists()


def test_a_dump_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"dump_folder .*out is a file, not a folder$"):
        DumpFolderLock.take(config_for(tmp_path / "out"), rank=0)


def test_a_dump_folder_under_a_file_cannot_be_created_in_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"dump_folder .*out/run cannot be created: Not a directory$"):
        DumpFolderLock.take(config_for(tmp_path / "out" / "run"), rank=0)


def test_a_read_only_dump_folder_is_one_line(tmp_path, monkeypatch):
    """A folder the run cannot write (chmod 555 for a user; the suite may run as root,
    for whom every folder is writable, so os.access answers as it would for a user)."""
    import diffusion_blocks.components.dump_lock as dump_lock

    real_access = dump_lock.os.access
    read_only = tmp_path / "out"
    read_only.mkdir()
    monkeypatch.setattr(dump_lock.os, "access",
                        lambda path, mode: False if str(path) == str(read_only) else real_access(path, mode))
    with pytest.raises(ConfigError, match=r"dump_folder .*out is not writable \(read-only\?\)$"):
        DumpFolderLock.take(config_for(read_only), rank=0)
    assert not (read_only / LOCK_FILE).exists()
