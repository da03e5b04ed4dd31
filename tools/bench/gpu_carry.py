"""Build gpu_carry/: the wheels a GPU machine without network needs to run
tools/bench/gpu_report.py (docs/gpu.md).

    python tools/bench/gpu_carry.py [--out gpu_carry] [--python-version 3.12] [--list]

Downloads (pip download --no-deps) the Python 3.12 wheels of torchtitan 0.2.2 and the
dependencies the GPU machine lacks, each at its constraints.txt pin, and builds our
package's wheel from the working tree. Never torch, triton or nvidia-*: the machine's
own CUDA build stays. On the GPU machine, from the repo root:

    pip install --no-deps --no-index gpu_carry/*.whl && python tools/bench/gpu_report.py --out $OUT/gpu_report.json
"""

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "constraints.txt"

# torchtitan 0.2.2's Requires-Dist (torchdata, datasets, tomli, fsspec, tyro; tokenizers,
# tensorboard, einops, pillow are on the GPU machine) and theirs, where the machine has
# none or too old a one: tyro -> docstring-parser, typeguard -> typing-extensions >= 4.14;
# datasets -> dill, multiprocess, xxhash. datasets' pyarrow, pandas and huggingface-hub
# are taken from the machine (large or binary; the report's environment row names them).
CARRY = (
    "torchtitan", "tyro", "docstring-parser", "typeguard", "typing-extensions", "tomli",
    "torchdata", "datasets", "dill", "multiprocess", "xxhash", "fsspec",
)
NEVER = ("torch", "triton")  # and no nvidia-* package
INSTALL_LINE = ("pip install --no-deps --no-index gpu_carry/*.whl && "
                "python tools/bench/gpu_report.py --out $OUT/gpu_report.json")


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """constraints.txt's name==version lines, by canonical name."""
    found = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            found[canonical(name)] = version.strip()
    return found


def requirements(path: Path = CONSTRAINTS) -> list[str]:
    """name==version for every carried wheel; KeyError names one the lock lacks."""
    locked = pins(path)
    missing = [name for name in CARRY if canonical(name) not in locked]
    if missing:
        raise KeyError(f"not pinned in {path.name}: {', '.join(missing)}")
    return [f"{name}=={locked[canonical(name)]}" for name in CARRY]


def download(out: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux_2_28_x86_64", "-d", str(out), *requirements()]
    subprocess.run(cmd, check=True)


def build_own_wheel(out: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(REPO)], check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu_carry")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--list", action="store_true", help="print the pinned names and stop")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(requirements()))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    download(args.out, args.python_version)
    build_own_wheel(args.out)
    wheels = sorted(p.name for p in args.out.glob("*.whl"))
    size = sum(p.stat().st_size for p in args.out.glob("*.whl"))
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.out}:\n  " + "\n  ".join(wheels))
    print(f"on the GPU machine, from the repo root:\n  {INSTALL_LINE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
