"""tools/bench/gpu_carry.py's wheel list (the download itself needs the network and is
run by hand, docs/gpu.md)."""

import importlib.util

import pytest

from _train_helpers import REPO

# on the GPU machine already (torch's CUDA build and its stack; docs/gpu.md)
ON_GPU_MACHINE = {"tokenizers", "tensorboard", "einops", "pillow"}


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_carry", REPO / "tools" / "bench" / "gpu_carry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_carried_wheel_is_pinned_and_none_is_torch():
    tool = load_tool()
    reqs = tool.requirements()
    assert len(reqs) == len(tool.CARRY) and all("==" in r for r in reqs)
    assert "torchtitan==0.2.2" in reqs
    names = {tool.canonical(r.split("==")[0]) for r in reqs}
    assert not names & set(tool.NEVER) and not any(n.startswith("nvidia") for n in names)


def test_the_carry_covers_torchtitans_runtime_requirements():
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    tool = load_tool()
    carried = {tool.canonical(n) for n in tool.CARRY}
    needed = {tool.canonical(Requirement(r).name) for r in requires("torchtitan")
              if "extra ==" not in r}
    assert needed - ON_GPU_MACHINE <= carried, needed - ON_GPU_MACHINE - carried
    for name in ("tyro", "datasets"):  # their own runtime needs, machine-provided excepted
        deps = {tool.canonical(Requirement(r).name) for r in requires(name)
                if "extra ==" not in r and "python_version < '3.10'" not in r}
        assert {"docstring-parser", "typeguard", "dill", "multiprocess", "xxhash"} & deps <= carried


def test_an_unpinned_wheel_is_refused(tmp_path, monkeypatch):
    tool = load_tool()
    lock = tmp_path / "constraints.txt"
    lock.write_text("torchtitan==0.2.2\n")
    with pytest.raises(KeyError, match="tyro"):
        tool.requirements(lock)


def test_the_install_line_is_one_short_command():
    tool = load_tool()
    assert len(tool.INSTALL_LINE) < 2000 and "\n" not in tool.INSTALL_LINE
    assert "--no-deps --no-index gpu_carry/*.whl" in tool.INSTALL_LINE
    assert "--out $OUT/gpu_report.json" in tool.INSTALL_LINE
