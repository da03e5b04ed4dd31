import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# tests run from a fresh clone too, before or without `pip install -e .`
sys.path.insert(0, str(REPO / "plugins"))
os.environ.setdefault("PYTHONPATH", str(REPO / "plugins"))


@pytest.fixture
def write_toml(tmp_path):
    """write_toml("name.toml", text) -> path"""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write
