import gc
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# tests run from a fresh clone too, before or without `pip install -e .`
sys.path.insert(0, str(REPO / "plugins"))
os.environ.setdefault("PYTHONPATH", str(REPO / "plugins"))


def pytest_configure(config):
    """Under pytest-xdist (-n N) the N workers share the cores: each takes its share of
    torch's threads instead of all of them (tiny models: oversubscribed threads only wait)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def write_toml(tmp_path):
    """write_toml("name.toml", text) -> path"""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="module")
def process_group():
    """The rendezvous env of one process, for trainers built in the test process:
    torchtitan's Trainer starts the (gloo) process group from it on first use, later
    trainers reuse it. The rendezvous store is started here on a port the kernel picks
    (port 0) and stays up for the module; the process group connects to that live store
    (TORCHELASTIC_USE_AGENT_STORE, as torchrun's workers do), so no port is chosen,
    released and bound again later. The environment torchtitan writes (its NCCL /
    flight-recorder variables) is restored afterwards, and the garbage collector
    torchtitan's Trainer disables is turned back on. Trainers built on it are pinned to
    the CPU by the tests (`_train_helpers.CPU`)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    saved = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
    yield store
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)
    del store
    gc.enable()
