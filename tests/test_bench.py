"""bench.py: the one measuring helper, and `bench.py gpu` run on the CPU (its dry run), which must
leave a report of every part in DIR/report.md and DIR/report.json; common.progress, its progress bars."""
import json
import os
import sys

import torch

import bench
import common
from conftest import run_cli

PARTS = ["build", "cuda tests", "kernels", "nearest", "train and sample", "ddp"]


def test_measure_times_every_call_and_counts_memory():
    calls = []

    def fn():
        calls.append(1)
        return torch.ones(1000)  # 4000 bytes
    seconds, peak = bench.measure(fn, repeat=3, warmup=2, memory_on=torch.device("cpu"))
    assert len(calls) == 2 + 3 + 1 and seconds > 0  # warm-up, timed runs, one more for the memory
    assert peak >= 4000
    assert bench.measure(fn, repeat=2, warmup=0)[1] is None  # no memory_on: time only


def test_gpu_command_dry_run_on_cpu(tmp_path):
    out = tmp_path / "report"
    r = run_cli(["bench.py", "gpu", f"--out={out}", "--methods=ddpm,mdlm"], timeout=600)
    doc = json.load(open(out / "report.json"))
    md = open(out / "report.md").read()
    assert [p["name"] for p in doc["parts"]] == PARTS and doc["dry_run"] is (not torch.cuda.is_available())
    status = {p["name"]: p["status"] for p in doc["parts"]}
    for p in doc["parts"]:
        assert f"| {p['name']} | {p['status']} |" in md and f"== {p['name']}: {p['status']} in" in r.stdout
    assert status["cuda tests"] == "skipped" and status["ddp"] == "skipped"  # no CUDA device, no second GPU
    kernels_on = os.environ.get("DIFFLM_KERNELS") != "0"
    assert status["build"] == ("ok" if kernels_on else "skipped")
    for part in ("kernels", "nearest"):
        assert status[part] == ("ok" if kernels_on else "skipped"), doc["parts"]
    if kernels_on:
        rows = doc["parts"][PARTS.index("kernels")]["figures"]
        assert {r["op"] for r in rows} == {"score_entropy fwd+bwd", "euler step", "tweedie step", "mdlm ancestral step"}
        assert all(r["kernel_s"] > 0 and r["eager_s"] > 0 for r in rows) and "## kernels" in md
    runs = doc["parts"][PARTS.index("train and sample")]["figures"]
    assert [r["method"] for r in runs] == ["ddpm", "mdlm"] and status["train and sample"] == "ok"
    assert all(r["train"] == "ok" and r["sample"] == "ok" and r["last eval"].startswith("eval") for r in runs), runs
    assert os.path.isfile(out / "runs" / "mdlm" / "ckpt.pt")


def test_gpu_command_bad_input(tmp_path):
    r = run_cli(["bench.py", "gpu", f"--out={tmp_path}", "--methods=mdlm,nope"], check=False)
    assert r.returncode == 1 and "choose from" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_progress_bar_only_on_a_terminal(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert common.progress(items, "quiet") is items  # logs, pipes and tests get the plain iterable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = common.progress(iter(items), "shown", total=3)
    assert list(bar) == items and type(bar).__name__ == "tqdm"


def test_sample_speed_reports_every_sampler_and_the_same_samples(capsys):
    bench.bench_sample_speed(["--vocab=11", "--seq_len=8", "--steps=6", "--batches=1,3", "--repeat=2"])
    out = capsys.readouterr().out
    for sampler in ("ddpm", "ddpm_cache", "ar"):
        assert sum(line.split()[0] == sampler for line in out.splitlines() if line.strip()) == 2
    assert out.count("identical samples: True") == 2
    ddpm_rows = [int(line.split()[-1]) for line in out.splitlines() if line.startswith("      ddpm ")]
    assert ddpm_rows == [6 * 8, 6 * 8]  # the whole sequence every step
