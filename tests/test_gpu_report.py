"""tools/bench/gpu_report.py: its CPU dry run end to end (one subprocess, every phase),
and its failure isolation (in-process, a planted failing phase or check)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from _train_helpers import REPO, subprocess_env

SCRIPT = REPO / "tools" / "bench" / "gpu_report.py"
PHASES = ("environment", "correctness", "memory", "throughput", "decoding", "memory_wall")
ROW_KEYS = {
    "environment": {"gpu", "cuda", "torch", "torchtitan", "git_commit"},
    "memory": {"shape", "ac", "mode", "num_blocks", "offload"},
    "throughput": {"shape", "mode", "tokens_per_s", "mfu"},
    "decoding": {"context", "dblocks_tokens_per_s", "e2e_tokens_per_s", "ratio"},
    "memory_wall": {"recipe", "deepest_real", "first_oom", "stopped_by", "tries"},
}
CORRECTNESS_CHECKS = {
    "trainer eager: finite, decreasing loss", "trainer compiled vs eager losses",
    "flex vs SDPA logits", "flex vs SDPA gradients", "fused CE kernel vs chunked head",
    "KV-cached vs uncached decoding (dblocks)", "KV-cached vs uncached decoding (e2e)",
}


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report") / "gpu_report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_dry_run_reports_every_phase(dry_run):
    report, _ = dry_run
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert tuple(report["phases"]) == PHASES
    for name, phase in report["phases"].items():
        assert phase["status"] == "ok", (name, phase["error"])
        assert phase["error"] is None and phase["wall_s"] > 0 and phase["rows"], name
        for row in phase["rows"]:
            assert not row["status"].startswith("fail"), (name, row)
            if row["status"] in ("real", "pass") and name in ROW_KEYS:
                assert ROW_KEYS[name] <= set(row), (name, row)


def test_dry_run_correctness_rows(dry_run):
    rows = dry_run[0]["phases"]["correctness"]["rows"]
    by_check = {row["check"]: row for row in rows}
    assert set(by_check) == CORRECTNESS_CHECKS
    assert by_check["trainer eager: finite, decreasing loss"]["status"] == "pass"
    assert by_check["flex vs SDPA logits"]["flex_mask"] == "BlockMask"
    assert by_check["flex vs SDPA gradients"]["status"] == "skipped: needs CUDA"
    assert by_check["fused CE kernel vs chunked head"]["status"] == "skipped: needs CUDA"


def test_dry_run_memory_rows_have_estimates(dry_run):
    rows = dry_run[0]["phases"]["memory"]["rows"]
    real = [r for r in rows if r["status"] == "real"]
    assert {r["mode"] for r in real} == {"e2e", "dblocks"}
    for row in real:
        assert 0.5 < row["measured_over_estimated"] < 2.0, row
    assert any(r["offload"] and r["status"] == "skipped: needs CUDA" for r in rows)


def test_markdown_table_has_a_line_per_row(dry_run):
    report, stdout = dry_run
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| phase | check | status | figures |"
    rows = sum(1 + len(p["rows"]) for p in report["phases"].values())
    assert len(table) == 1 + rows


def test_a_failing_phase_is_recorded_and_the_others_run(tmp_path):
    tool = load_tool()
    out = tmp_path / "r.json"
    assert tool.main(["--dry-run", "--out", str(out), "--phases", "memory,environment",
                      "--fail-phase", "memory"]) == 0
    phases = json.loads(out.read_text())["phases"]
    assert phases["memory"]["status"] == "failed"
    assert "planted failure" in phases["memory"]["error"]
    assert phases["environment"]["status"] == "ok" and phases["environment"]["rows"]


def test_a_phase_that_raises_keeps_its_error(monkeypatch):
    tool = load_tool()

    def broken(sizes, budget):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(tool.PHASE_FUNCTIONS, "decoding", broken)
    result = tool.run_phase("decoding", tool.dry_sizes(), None)
    assert result.status == "failed" and result.error == "ZeroDivisionError: boom"
    assert result.wall_s >= 0


def test_a_correctness_check_that_raises_does_not_stop_the_others(monkeypatch):
    tool = load_tool()

    def broken(sizes, budget):
        raise ValueError("planted")

    def fine(sizes, budget):
        return [{"check": "fine", "status": "pass"}]

    monkeypatch.setattr(tool, "CORRECTNESS_CHECKS", (broken, fine))
    rows = tool.phase_correctness(tool.dry_sizes(), tool.Budget(10))
    assert rows == [{"check": "broken", "status": "fail", "error": "ValueError: planted"},
                    {"check": "fine", "status": "pass"}]
