"""The benchmark harness's arithmetic and timing."""

from __future__ import annotations

import time

import pytest
import torch

from dsv3.bench.harness import H200_PEAKS, Report, Row, Timer


def test_row_metrics():
    row = Row("op", "case", "cpu", us=1e6, bytes=int(2e9), flops=int(3e12), baseline="torch", baseline_us=4e6)
    assert row.gb_per_s == pytest.approx(2.0)
    assert row.tflop_per_s == pytest.approx(3.0)
    assert row.speedup == pytest.approx(4.0)
    assert row.percent_of_peak() is None


def test_gpu_rows_report_percent_of_h200_peaks():
    row = Row("op", "case", "cuda", us=1e3, bytes=int(2.4e9), flops=int(0.989e12), peak="bf16_flops")
    hbm, compute = row.percent_of_peak()
    assert hbm == pytest.approx(100 * 2.4e12 / H200_PEAKS["hbm_bytes"])
    assert compute == pytest.approx(100.0)
    fp8 = Row("op", "case", "cuda", us=1e3, flops=int(1.979e12), peak="fp8_flops")
    assert fp8.percent_of_peak()[1] == pytest.approx(100.0)


def test_cpu_timer_takes_the_median():
    durations = iter([0.0] * 2 + [0.001, 0.030, 0.002, 0.001, 0.001])
    timer = Timer(torch.device("cpu"), warmup=2, reps=5)
    median_us = timer(lambda: time.sleep(next(durations)))
    assert 900 < median_us < 5000  # the 30 ms outlier does not move the median


def test_cpu_timer_pair_alternates_op_and_baseline():
    calls: list[str] = []
    timer = Timer(torch.device("cpu"), warmup=1, reps=3)
    us, baseline_us = timer.pair(lambda: calls.append("op"), lambda: (calls.append("base"), time.sleep(0.002)))
    assert calls == ["op", "base"] * 4  # warm-up, then every repetition times one of each
    assert us < 1000 <= baseline_us < 50_000


def test_report_table_lists_every_row():
    report = Report("title")
    report.add(Row("alpha", "M=1", "cpu", us=10.0, bytes=1000, baseline="torch", baseline_us=20.0))
    report.add(Row("beta", "M=2", "cpu", us=5.0))
    table = report.table().splitlines()
    assert table[0] == "== title =="
    assert table[2].split()[:3] == ["alpha", "M=1", "10.00"] and table[2].split()[-1] == "2.00"
    assert table[3].split()[-1] == "-"


def test_a_failing_suite_is_reported_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    import json

    import dsv3.bench as bench

    def broken(device, quick, reps):
        raise RuntimeError("kernel launch failed")

    def working(device, quick, reps):
        report = Report("working suite")
        report.add(Row("op", "case", device.type, us=1.0))
        return report

    monkeypatch.setattr(bench, "SUITES", {"broken": broken, "working": working})
    path = tmp_path / "out.json"
    with pytest.raises(SystemExit, match="benchmark suites failed: broken"):
        bench.main(["all", "--device", "cpu", "--json", str(path)])
    assert "FAILED: RuntimeError: kernel launch failed" in capsys.readouterr().out
    reports = json.loads(path.read_text())["reports"]
    assert [r["error"] for r in reports] == ["RuntimeError: kernel launch failed", None]
    assert len(reports[1]["rows"]) == 1


def test_a_run_cut_short_keeps_the_suites_it_finished(monkeypatch, tmp_path):
    # a suite that never returns (a hung kernel, killed by a time limit) must not cost the JSON of the ones before it
    import json

    import dsv3.bench as bench

    def working(device, quick, reps):
        report = Report("working suite")
        report.add(Row("op", "case", device.type, us=1.0))
        return report

    def killed(device, quick, reps):
        raise KeyboardInterrupt  # as a signal would end it: not an error the harness catches

    monkeypatch.setattr(bench, "SUITES", {"working": working, "killed": killed})
    path = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["all", "--device", "cpu", "--json", str(path)])
    reports = json.loads(path.read_text())["reports"]
    assert [r["title"] for r in reports] == ["working suite"] and len(reports[0]["rows"]) == 1


def test_kernels_named_in_dsv3_skip_kernels_are_left_out_of_the_sweep(monkeypatch):
    """scripts/gpu_check.sh names there the untried kernels whose smoke run failed; the sweep must not time them."""
    import importlib.util
    import pathlib

    from dsv3.testing import GEMM_KERNEL_VARIANTS, skipped_kernels

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("sweep", root / "benchmarks" / "sweep_gemm_schedule.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    monkeypatch.delenv("DSV3_SKIP_KERNELS", raising=False)
    assert {(4, 0, 1), (5, 0, 1)} <= set(sweep.candidates(4096, 7168))
    assert not {(4, 0, 1), (5, 0, 1)} & set(sweep.candidates(64, 7168))  # 128-row tiles: from 128 tokens on
    monkeypatch.setenv("DSV3_SKIP_KERNELS", "overlap, mla_rows")
    assert skipped_kernels() == {"overlap", "mla_rows"}
    assert (4, 0, 1) not in sweep.candidates(4096, 7168) and (5, 0, 1) in sweep.candidates(4096, 7168)
    assert set(GEMM_KERNEL_VARIANTS) == {"overlap", "overlap_cluster", "decode"}
    # the decode kernel: up to 128 tokens, data-parallel and K split over clusters of up to 8 CTAs (K blocks allowing)
    assert {(6, 0, 1), (6, 1, 2), (6, 1, 8)} <= set(sweep.candidates(64, 7168))
    assert not any(v == 6 for v, _, _ in sweep.candidates(512, 7168))
    assert {s for v, d, s in sweep.candidates(1, 512) if v == 6} == {1, 2, 3, 4}  # 4 K blocks
    monkeypatch.setenv("DSV3_SKIP_KERNELS", "decode")
    assert not any(v == 6 for v, _, _ in sweep.candidates(64, 7168))


def test_the_smoke_script_covers_every_untried_kernel():
    import pathlib
    import subprocess
    import sys

    from dsv3.testing import GEMM_KERNEL_VARIANTS

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "smoke_untried_kernels.py"
    listed = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True, check=True)
    assert set(listed.stdout.split()) == set(GEMM_KERNEL_VARIANTS) | {"mla_rows"}


def test_suites_run_in_the_order_given_each_once(monkeypatch, tmp_path):
    import json

    import dsv3.bench as bench

    def suite(name):
        def run(device, quick, reps):
            report = Report(name)
            report.add(Row("op", "case", device.type, us=1.0))
            return report

        return run

    monkeypatch.setattr(bench, "SUITES", {name: suite(name) for name in ("a", "b", "c")})
    path = tmp_path / "out.json"
    bench.main(["c", "all", "--device", "cpu", "--json", str(path)])  # c first, then the others once
    assert [r["title"] for r in json.loads(path.read_text())["reports"]] == ["c", "a", "b"]
