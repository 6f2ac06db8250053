"""bench/gpu_check.py: its CPU dry run measures every part, and its metric-sync check can fail."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
PARTS = ("hand_amp", "runner_amp", "runner_bf16", "fast_paths", "jpeg_loader", "ddp")


def table_rows(text: str) -> List[Dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


@pytest.mark.slow
def test_dry_run_measures_every_part_and_syncs_every_metric(tmp_path):
    from cvkit.metrics import METRICS, list_metrics

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--results", str(results),
                           "--budget", "240"], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert "## Other\n\nkept" in text, "another section was touched"
    section = text[text.index("## GPU check"):]
    assert "GPU figures pending" in section and "CPU dry run" in section
    rows = table_rows(section)
    failed = [r for r in rows if "FAILED" in r["result"] or "timed out" in r["result"] or "skipped" in r["result"]]
    assert not failed, failed
    for part in PARTS:
        rates = [float(r["images/s"]) for r in rows if r["part"] == part]
        assert rates and all(rate > 0 for rate in rates), f"{part}: {rates}"
    assert len([r for r in rows if r["part"] == "fast_paths"]) == 3
    assert len([r for r in rows if r["part"] == "jpeg_loader"]) == 2
    synced = {re.match(r"(\S+) on a gloo group", r["configuration"]).group(1): r["result"]
              for r in rows if r["part"] == "metric_sync"}
    with_example = [name for name in list_metrics() if METRICS.meta(name).get("example") is not None]
    assert sorted(synced) == sorted(with_example)
    assert all(result.startswith("equal after sync") for result in synced.values()), synced


def test_dry_run_refuses_the_real_results_file_by_default():
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("--dry-run needs --results PATH (its CPU numbers must not "
                                                          "stand for GPU figures)")


def test_metric_sync_check_reports_a_sync_that_changes_statistics(monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    from cvkit.metrics import Metric

    assert all(r.startswith("equal after sync") for r in gpu_check.check_metric_sync(torch.device("cpu")).values())

    def doubling_sync(self: Metric) -> None:
        for tensor in self.state_tensors():
            tensor.mul_(2)

    monkeypatch.setattr(Metric, "sync", doubling_sync)
    results = gpu_check.check_metric_sync(torch.device("cpu"))
    assert results and all(r.startswith("DIFFERS") for r in results.values()), results
