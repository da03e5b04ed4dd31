"""One run per dump folder: rank 0 takes `<dump_folder>/diffusion_blocks.lock` (a JSON
file with its pid and host) before anything is built and removes it at exit. A second
run on the same folder stops with one line naming the owner; a lock left by a process
that is gone (a dead pid on this host, or an unreadable file) is taken over, with a log
line. A lock of another host is never taken over: its pid cannot be checked here."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from torchtitan.tools.logging import logger

from ..errors import ConfigError, origin_of

LOCK_FILE = "diffusion_blocks.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_owner(path: Path) -> dict | None:
    """The lock's {"pid", "host"}, or None when it cannot be read as such."""
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner.get("pid"), int) and "host" in owner else None
    except (OSError, ValueError, AttributeError):
        return None


def is_stale(owner: dict | None) -> bool:
    if owner is None:
        return True
    return owner["host"] == socket.gethostname() and not pid_alive(owner["pid"])


def make_dump_folder(job_config) -> Path:
    """The dump folder, created; ConfigError (one line) when it cannot be (a file, or
    a read-only parent) or is not writable."""
    folder = Path(job_config.job.dump_folder)
    where = origin_of(job_config, "job", "dump_folder")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{where}: [job] dump_folder {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{where}: [job] dump_folder {folder} cannot be created: {error.strerror}"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: [job] dump_folder {folder} is not writable (read-only?)")
    return folder


@dataclass
class DumpFolderLock:
    path: Path | None  # None: not rank 0, nothing held

    @classmethod
    def take(cls, job_config, rank: int | None = None) -> "DumpFolderLock":
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        if rank != 0:
            return cls(None)
        path = make_dump_folder(job_config) / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(path)
                if not is_stale(owner):
                    raise ConfigError(
                        f"[job] dump_folder {path.parent} is in use by the run of pid "
                        f"{owner['pid']} on {owner['host']} ({path}); wait for it to end or "
                        "use another dump_folder"
                    ) from None
                logger.warning(f"Taking over the stale lock {path} (owner: {owner or 'unreadable'})")
                path.unlink(missing_ok=True)
                continue
            except OSError as error:
                raise ConfigError(
                    f"[job] dump_folder {path.parent} cannot be written: {error.strerror}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return cls(path)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.path is not None and read_owner(self.path) == {
            "pid": os.getpid(), "host": socket.gethostname()
        }:
            self.path.unlink(missing_ok=True)
        self.path = None
