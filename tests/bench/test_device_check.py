"""``bench/device_check.py --smoke``: the GPU device check's jobs, reduced to the CPU and the tiny model, so that the
script keeps working where no GPU runs it: every job runs, its checks pass, the results file has a row per job, a
failing or hanging job is reported without stopping the others, and the exit status says so."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.device_check import CHECK_TEST_METRICS, CHECK_VAL_METRICS, main

JOBS = ["lora-bf16", "lora-16-mixed", "full-8bit-fused", "predict", "test", "fsdp-1gpu", "ddp-2gpu"]
SKIPPED_ON_CPU = ["fsdp-1gpu", "ddp-2gpu"]


def _job_rows(report: str) -> dict[str, list[str]]:
    """The summary table's rows (job name -> cells), in order."""
    rows = {}
    for line in report.split("\n\n| job |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def _check_lines(report: str, job: str) -> list[str]:
    section = report.split(f"### {job}: ", 1)[1].split("\n### ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| check ")]


def test_smoke_runs_every_job_and_writes_a_row_per_job(tmp_path):
    out = tmp_path / "cpu_device_check_smoke.md"
    threads = torch.get_num_threads()
    rc = main(["--smoke", "--runner", "in-process", "--out", str(out), "--workdir", str(tmp_path / "work")])
    report = out.read_text()
    assert rc == 0, report
    assert torch.get_num_threads() == threads  # the jobs' one thread is not left behind

    rows = _job_rows(report)
    assert list(rows) == JOBS
    for job in [j for j in JOBS if j not in SKIPPED_ON_CPU]:
        assert rows[job][1] == "ok", report
        checks = _check_lines(report, job)
        assert checks and all("| ok |" in line for line in checks), checks
    assert all(rows[job][1].startswith("skipped") for job in SKIPPED_ON_CPU)
    assert "**FAILED**" not in report

    # What the GPU run is for, exercised here on the CPU: metric states on the module's device at every validation,
    # 8-bit AdamW inside backward, the step / UNet ratio, the DreamBench scorers' devices.
    for job in ("lora-bf16", "lora-16-mixed", "full-8bit-fused"):
        assert any(CHECK_VAL_METRICS in line and "cpu" in line for line in _check_lines(report, job))
        ratio = rows[job][9]
        assert float(ratio) > 0, rows[job]
    assert any("validations run | ok | 3 " in line for line in _check_lines(report, "lora-bf16"))
    full = "\n".join(_check_lines(report, "full-8bit-fused"))
    assert "OptimizerInBackward" in full and "uint8 state tensors" in full
    assert any(CHECK_TEST_METRICS in line for line in _check_lines(report, "test"))


def test_failing_and_hanging_jobs_are_reported_and_the_others_still_run(tmp_path, capsys):
    # Each job in its own process (the default runner, as on a GPU): predict fails at argument parsing, test runs.
    out = tmp_path / "report.md"
    args = ["--smoke", "--only", "predict,test", "--out", str(out), "--workdir", str(tmp_path / "work")]
    rc = main([*args, "--job-arg", "predict=--model.sampling.sampler=nonsense"])
    report = out.read_text()
    assert rc == 1
    assert "FAILED jobs: predict" in capsys.readouterr().err
    rows = _job_rows(report)
    assert list(rows) == ["predict", "test"]
    assert rows["predict"][1] == "FAILED" and rows["test"][1] == "ok", report
    assert "| exit status 0 | **FAILED** | exit 2 |" in report
    assert "model.sampling.sampler" in report  # the log's tail names the cause

    # A job past its timeout is killed (its process group) and reported as such.
    rc = main(["--smoke", "--only", "test", "--timeout-scale", "0.005", "--out", str(out),
               "--workdir", str(tmp_path / "work2")])  # fmt: skip
    assert rc == 1
    assert _job_rows(out.read_text())["test"][1] == "TIMEOUT"
    assert "killed at the timeout" in out.read_text()
    assert not list(Path(tmp_path / "work2" / "runs").glob("test/*/eval/report.json"))
