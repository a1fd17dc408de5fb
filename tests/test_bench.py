"""bench.py: the one measuring helper, and `bench.py gpu` run on the CPU (its dry run), which must
leave a report of every part in DIR/report.md and DIR/report.json; common.progress, its progress bars."""
import json
import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
import common
from conftest import run_cli, write_toy_dataset

PARTS = ["build", "self-check", "cuda tests", "past 2^31", "train and sample", "kernels", "nearest", "rotary", "acceptance",
         "ddp"]


def test_help_lists_every_benchmark_and_a_wrong_name_is_one_line():
    r = run_cli(["bench.py", "--help"])
    assert all(f"python bench.py {name}" in r.stdout for name in bench.BENCHES), r.stdout
    r = run_cli(["bench.py", "nope"], check=False)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: usage: python bench.py <"), r.stderr


def test_measure_times_every_call_and_counts_memory():
    calls = []

    def fn():
        calls.append(1)
        return torch.ones(1000)  # 4000 bytes
    seconds, peak = bench.measure(fn, repeat=3, warmup=2, memory_on=torch.device("cpu"))
    assert len(calls) == 2 + 3 + 1 and seconds > 0  # warm-up, timed runs, one more for the memory
    assert peak >= 4000
    assert bench.measure(fn, repeat=2, warmup=0)[1] is None  # no memory_on: time only


def test_peak_memory_counts_what_a_composite_op_frees_inside_itself():
    """cross_entropy is log_softmax (a full-size intermediate) then nll_loss, freed inside cross_entropy: per-op
    net bytes placed at each op's start cancelled it, and the CPU peak read 0 where the op holds 8 MiB."""
    x, t = torch.randn(2048, 1024), torch.randint(1024, (2048,))
    for fn in (lambda: F.cross_entropy(x, t), lambda: torch.logsumexp(x, -1), lambda: (x * 2) + 1):
        assert bench._peak_extra_bytes(fn, torch.device("cpu")) >= x.numel() * 4
    peak = bench._peak_extra_bytes(lambda: (x * 2) + 1, torch.device("cpu"))
    assert 0 <= peak - 2 * x.numel() * 4 < 1024  # x * 2 and the sum (and the scalars' few bytes)


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
    for part in ("build", "self-check", "past 2^31", "kernels", "nearest", "rotary", "acceptance"):
        assert status[part] == "ok", doc["parts"]
    checks = doc["parts"][PARTS.index("self-check")]["figures"]  # every marked op checked against its oracle
    assert {r["op"] for r in checks} == {"score_entropy", "sedd_euler_step", "sedd_tweedie_step",
                                         "mdlm_ancestral_step", "nearest_embedding", "rotary"}
    assert all(r["passed"] and r["worst (1 = tolerance)"] <= 1 for r in checks), checks
    rows = doc["parts"][PARTS.index("kernels")]["figures"]
    assert {r["op"] for r in rows} == {"score_entropy fwd+bwd", "euler step", "tweedie step", "mdlm ancestral step"}
    assert all(r["kernel_s"] > 0 and r["eager_s"] > 0 for r in rows) and "## kernels" in md
    checks = doc["parts"][PARTS.index("acceptance")]["figures"]
    assert len(checks) == len(rows) + 2 and "dry run" in doc["parts"][PARTS.index("acceptance")]["summary"]
    assert all(c["met"] == "not judged" for c in checks), checks  # toy sizes: the clamp said "no"
    runs = doc["parts"][PARTS.index("train and sample")]["figures"]
    assert [r["method"] for r in runs] == ["ddpm", "mdlm"] and status["train and sample"] == "ok"
    assert all(r["train"] == "ok" and r["sample"] == "ok" and r["last eval"].startswith("eval") for r in runs), runs
    assert os.path.isfile(out / "runs" / "mdlm" / "ckpt.pt")
    assert "profiler_start" not in r.stdout + r.stderr  # the CPU peak's profiler: two lines per measurement


def test_gpu_command_with_the_kernels_off(tmp_path):
    """DIFFLM_KERNELS=0: the build part says so, and every part that needs the kernels is skipped, not failed."""
    run_cli(["bench.py", "gpu", f"--out={tmp_path}", "--methods="], env={"DIFFLM_KERNELS": "0"})
    parts = {p["name"]: p for p in json.load(open(tmp_path / "report.json"))["parts"]}
    assert parts["build"]["status"] == "skipped" and parts["build"]["summary"] == "DIFFLM_KERNELS=0", parts["build"]
    for name in ("self-check", "past 2^31", "kernels", "nearest", "rotary"):
        assert parts[name]["status"] == "skipped" and parts[name]["summary"] == "no kernels", parts[name]


def test_the_far_check_compares_the_last_positions_and_catches_an_op_wrong_there():
    """bench.py gpu's "past 2^31" part, at 2^12 scores: each op's last 64 positions agree with the oracle run on
    them alone, the steps move some of them, and a stand-in wrong only at the last position fails there."""
    import difflm_ops
    assert difflm_ops.load() is not None, "the difflm kernels did not build"
    rows = bench.far_rows(torch.device("cpu"), 2**12, 66)
    assert len(rows) == 11 and all(r["passed"] for r in rows), rows  # 6 absorbing (mdlm's step too), 5 uniform
    assert {r["L,N"] for r in rows} == {f"{2**12 // 67 + 64},67", f"{2**12 // 66 + 64},66"}
    assert all(not r["detail"].startswith("0 of") for r in rows if "step" in r["op"]), rows
    real = difflm_ops.FUSED["sedd_tweedie_step"].spec.call

    def wrong_at_the_end(ls, *a):
        out = real(ls, *a).clone()
        out[:, -1] = (out[:, -1] + 1) % ls.shape[-1]
        return out

    with difflm_ops.replace("sedd_tweedie_step", wrong_at_the_end):
        rows = bench.far_rows(torch.device("cpu"), 2**12, 66)
    failed = [(r["op"], r["graph"]) for r in rows if not r["passed"]]
    assert failed == [("sedd_tweedie_step", "absorb"), ("sedd_tweedie_step (final)", "absorb"),
                      ("sedd_tweedie_step", "uniform"), ("sedd_tweedie_step (final)", "uniform")], rows
    assert all("1 of 64 tokens differ" in r["detail"] for r in rows if not r["passed"])


def test_acceptance_judged_against_the_bars():
    """Met, missed on speed, missed on bandwidth, not judged (the eager oracle did not fit, or no
    bandwidth measured), and the clamp judged only for d <= 256."""
    def k(op, eager_s, kernel_s, of_floor=None):
        return {"op": op, "graph": "uniform", "eager_s": eager_s, "kernel_s": kernel_s,
                **({"of_floor": of_floor} if of_floor is not None else {})}
    kernel_rows = [k("score_entropy fwd+bwd", 11.0, 1.0, 0.71), k("score_entropy fwd+bwd", 9.0, 1.0, 0.9),
                   k("euler step", 31.0, 1.0, 0.59), k("tweedie step", None, 1.0, 0.9), k("mdlm ancestral step", 40, 1)]
    nearest_rows = [{"metric": "cos", "N,d,V": "8192,256,50257", "eager_s": 3.1, "kernel_s": 1.0},
                    {"metric": "l2", "N,d,V": "8192,16,821", "eager_s": 2.9, "kernel_s": 1.0},
                    {"metric": "l2", "N,d,V": "8192,512,50257", "eager_s": 1.0, "kernel_s": 1.0}]
    rows = bench.judge(kernel_rows, nearest_rows)
    assert [r["met"] for r in rows] == ["yes", "no", "no", "not judged", "not judged", "yes", "no"]
    assert rows[0]["eager/kernel"] == 11.0 and rows[0]["bar"] == 10 and rows[2]["floor bar"] == 0.60
    assert rows[-1]["check"] == "clamp l2 at 8192,16,821"
    status, summary = bench.verdict(rows)
    assert status == "failed" and summary.startswith("missed: score_entropy fwd+bwd, uniform; euler step, uniform;")
    # on an H200 the uniform Tweedie oracle never fits: that alone is not a failure
    status, summary = bench.verdict([rows[0], rows[3]])
    assert status == "ok" and summary == "1 of 2 checks met; not judged: tweedie step, uniform", summary


def test_acceptance_bars_are_met_at_the_bar_and_missed_just_under_it():
    """score_entropy 10x and 70% of the floor; the Euler, Tweedie and MDLM steps 30x and 60%; the clamp 3x."""
    for op, speed, floor in (("score_entropy fwd+bwd", 10, 0.70), ("euler step", 30, 0.60), ("tweedie step", 30, 0.60),
                             ("mdlm ancestral step", 30, 0.60)):
        rows = [{"op": op, "graph": "absorb", "eager_s": e, "kernel_s": 1.0, "of_floor": f}
                for e, f in ((speed, floor), (speed - 0.5, 0.99), (100.0, floor - 0.01))]
        assert [r["met"] for r in bench.judge(rows, [])] == ["yes", "no", "no"], op
    clamp = [{"metric": "cos", "N,d,V": "8192,128,50257", "eager_s": e, "kernel_s": 1.0} for e in (3.0, 2.9)]
    assert [r["met"] for r in bench.judge([], clamp)] == ["yes", "no"]


def test_gbps_floor_share_ratios_and_peak_units_count_the_bytes_each_op_moves(monkeypatch):
    """GB/s = the floor's bytes (one read of the scores, plus one write of the gradient for score_entropy; four
    passes over the rotary projection) / the kernel's time / 1e9; of floor = the copy time of those bytes at the
    bandwidth / the kernel's time; the peaks in units of one B x L x N scores tensor of the input dtype."""
    row = bench._against_floor({"kernel_s": 4.0}, 4e9, 2e9)
    assert row["kernel_GBps"] == pytest.approx(1.0) and row["of_floor"] == pytest.approx(0.5)
    assert "kernel_GBps" not in bench._against_floor({"kernel_s": 4.0}, 4e9, None)  # no bandwidth measured
    assert bench._ratio(3.0, 0.5) == "6.0x" and bench._ratio(None, 0.5) == "-"

    def versus(oracle, kernel, args, device, *a, **k):  # figures, not timings: the input's bytes as the peak
        return {"kernel_s": 1.0, "kernel_peak": args[0].numel() * args[0].element_size(), "eager_s": 2.0,
                "eager_peak": 2 * args[0].numel() * args[0].element_size(), "compile_s": None}
    monkeypatch.setattr(bench, "versus", versus)
    B, L, V = 2, 3, 5
    ops = dict.fromkeys(("score_entropy", "euler_step", "tweedie_step", "ancestral_step", "rotary"))
    rows = bench.kernel_rows(torch.device("cpu"), ops, [(B, L, V)], torch.bfloat16,
                             ["score_entropy", "euler", "tweedie", "mdlm"], ["absorb", "uniform"], bw=1e9)
    assert len(rows) == 7
    for r in rows:
        N = V + 1 if r["graph"] == "absorb" else V
        scores = B * L * N * 2  # bf16
        floor = 2 * scores if r["op"] == "score_entropy fwd+bwd" else scores
        assert r["kernel_GBps"] == pytest.approx(floor / 1e9) and r["of_floor"] == pytest.approx(floor / 1e9), r
        assert r["kernel_peak_units"] == pytest.approx(1.0) and r["eager_peak_units"] == pytest.approx(2.0), r
    B, L, H, D = 2, 5, 3, 4
    (r,) = bench.rotary_rows(torch.device("cpu"), ops, [(B, L, H, D)], torch.float32, bw=1e9)
    assert r["kernel_GBps"] == pytest.approx(4 * B * L * 3 * H * D * 4 / 1e9) and r["kernel_peak_units"] == 1.0
    monkeypatch.setattr(bench, "measure", lambda fn, *a, **k: (0.5, None))
    assert bench.copy_bandwidth(torch.device("cpu"), nbytes=1 << 10) == 2 * 1024 / 0.5  # read + write


def test_gpu_command_skips_the_parts_past_its_budget(tmp_path, capsys):
    bench.bench_gpu([f"--out={tmp_path}", "--budget=0"])
    doc = json.load(open(tmp_path / "report.json"))
    assert [p["name"] for p in doc["parts"]] == PARTS
    # the verdict on the timings taken costs nothing: it is never cut (here there are none to judge)
    assert all(p["status"] == "skipped" and ("--budget of 0 s was spent" in p["summary"]) != (p["name"] == "acceptance")
               for p in doc["parts"]), doc["parts"]
    report = bench.Report(str(tmp_path), {"device": "x"}, budget=100)
    assert report.left(300) <= 100 and report.left(30) == 30
    report.t0 -= 60  # a minute of the budget spent: a part's own --timeout is cut to what is left
    assert 39 <= report.left(300) <= 40 and report.left(30) == 30
    report.t0 -= 60
    assert report.left(300) == 1


def test_gpu_command_runs_the_parts_asked_for(tmp_path):
    """--parts: a second call on the GPU reruns what the first skipped or failed, after the build."""
    assert [p.split()[0] for p in PARTS] == ["build", *bench.GPU_PARTS]
    bench.bench_gpu([f"--out={tmp_path}", "--parts=acceptance,ddp", "--methods="])
    parts = json.load(open(tmp_path / "report.json"))["parts"]
    assert [(p["name"], p["summary"]) for p in parts[1:]] == [("acceptance", "no kernel timings"),
                                                              ("ddp", f"{torch.cuda.device_count()} GPU(s); a DDP step needs two")]
    assert parts[0]["name"] == "build" and parts[0]["status"] == "ok", parts[0]
    with pytest.raises(SystemExit, match=r"--parts=train,kernel: choose from self-check,cuda,past,train,kernels,"):
        bench.bench_gpu([f"--out={tmp_path / 'x'}", "--parts=train,kernel"])
    assert not os.path.exists(tmp_path / "x")  # refused before any work


def test_the_timings_compile_no_oracle_past_the_budget(capsys):
    """On a GPU the timings compile 12 oracles, seconds to a minute each: once bench.py gpu's --budget is spent
    the rows are still timed, eager and fused, without the compiled column."""
    x = torch.randn(64, 32)
    res = bench.versus(lambda v: v * 2, lambda v: v + v, (x,), torch.device("cpu"), repeat=1, compile=lambda: False)
    assert res["compile_s"] is None and res["eager_s"] > 0 and res["kernel_s"] > 0
    assert "torch.compile skipped: the --budget is spent" in capsys.readouterr().out


def test_the_report_keeps_what_a_failed_part_said(tmp_path):
    """A timed-out run's output came as a bytes repr without its stderr; a failed build's reason was only
    on stderr; a summary holding '|' or a newline broke report.md's table."""
    rc, text = bench._run(["-c", "import sys, time; print('out'); print('err', file=sys.stderr, flush=True); "
                                 "time.sleep(30)"], 3)
    assert rc == 124 and "out\n" in text and "err" in text and text.endswith("timed out after 3 s") and "b'" not in text
    report = bench.Report(str(tmp_path), {"device": "x"})
    report.part("boom", lambda: (_ for _ in ()).throw(RuntimeError("a | b\nsecond line")))
    assert "| boom | failed | " in open(tmp_path / "report.md").read().splitlines()[-3]
    r = run_cli(["bench.py", "gpu", f"--out={tmp_path / 'g'}", "--methods="], env={"DIFFLM_BUILD": "/proc/no_such_dir"})
    build = json.load(open(tmp_path / "g" / "report.json"))["parts"][0]
    assert build["status"] == "failed" and "/proc/no_such_dir" in build["summary"], (build, r.stderr[-1000:])


def test_rotary_timing_and_its_bad_sizes():
    r = run_cli(["bench.py", "rotary", "--sizes=2,5,3,6;1,7,2,64", "--repeat=1", "--no_compile"])
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("rotary fwd+bwd")]
    assert [row[2] for row in rows] == ["2,5,3,6", "1,7,2,64"]
    assert all(float(row[5]) > 0 and float(row[-1]) == 2.0 for row in rows), rows  # peak: output + gradient
    r = run_cli(["bench.py", "rotary", "--sizes=2,5,3"], check=False)
    assert r.returncode == 1 and "use B,L,H,D" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_methods_plot_without_matplotlib_is_refused_before_the_work(tmp_path, monkeypatch):
    """--plot failed only after every method had trained and sampled (about 45 minutes)."""
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        bench.bench_methods(["--methods=ar", f"--out_root={tmp_path / 'out'}", f"--plot={tmp_path / 'm.png'}"])
    assert not os.path.exists(tmp_path / "out")
    # nor a judge: methods without ar trained, then found no OUT_ROOT/ar/ckpt.pt (out/bench/ar, not out/ar, by default)
    with pytest.raises(SystemExit, match=f"no judge at {tmp_path / 'out' / 'ar' / 'ckpt.pt'}: add ar to --methods"):
        bench.bench_methods(["--methods=mdlm", f"--out_root={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match="no judge at nowhere.pt: pass --judge"):  # ar trained first, then refused
        bench.bench_methods(["--methods=ar,mdlm", f"--out_root={tmp_path / 'out'}", "--judge=nowhere.pt"])
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("trained"))  # diffuser's row has no judge:
    with pytest.raises(pytest.fail.Exception, match="trained"):  # not refused for the want of one
        bench.bench_methods(["--methods=diffuser", f"--out_root={tmp_path / 'out'}"])


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


def test_methods_with_samplers_measures_each_decoding_control(tmp_path):
    """bench.py methods --samplers: one row per step count for the exact sampler and each control."""
    rng = random.Random(0)
    data = write_toy_dataset(tmp_path / "toy", [[rng.randrange(8) for _ in range(4000)]], "abcdefgh")
    train = (f"--data_dir={data} --block_size=16 --max_iters=2 --eval_interval=2 --eval_iters=1 --n_layer=1 "
             "--n_embd=32 --n_head=2 --batch_size=4")
    run_cli(["bench.py", "methods", "--methods=ar,mdlm", f"--out_root={tmp_path / 'runs'}", f"--train_args={train}",
             "--steps=2,4", "--num_samples=2", "--samplers"], timeout=600)
    doc = json.load(open(tmp_path / "runs" / "methods.json"))
    assert set(doc["curves"]) == {"ar", "mdlm", "mdlm (confidence)", "mdlm (t0.8 p0.9)"}
    # again over the same runs: refused by the trainer for the checkpoint there, after their logs were deleted
    run_cli(["bench.py", "methods", "--methods=ar", f"--out_root={tmp_path / 'runs'}", f"--train_args={train}",
             "--num_samples=2"], timeout=600)
    assert os.path.isfile(tmp_path / "runs" / "ar" / "log.jsonl")
    for key in ("mdlm", "mdlm (confidence)", "mdlm (t0.8 p0.9)"):
        assert [p[0] for p in doc["curves"][key]] == [2, 4]
        assert all(math.isfinite(p[1]) and p[2] > 0 for p in doc["curves"][key])


def test_train_speed_prints_every_step_kind_with_its_spread(capsys):
    bench.bench_train_speed(["--vocab=11,29", "--iters=1", "--repeat=3", "--transposed", "--n_layer=1",
                             "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=4"])
    out = capsys.readouterr().out
    for V in (11, 29):
        assert f"V = {V}, batch 4, L = 16, 1x32 (3 runs of 1 steps" in out
    for kind in ("reference (plain, contiguous CE)", "ar.py", "mdlm.py", "reference over (B, V, L)",
                 "ar.py, no kernels"):
        assert sum(line.strip().startswith(kind + "  ") for line in out.splitlines()) == 2
    assert out.count("mdlm.py / ar.py: ") == 2 and out.count("ar.py / ar.py, no kernels: ") == 2 and "1.00x" in out


NANOGPT_STAND_IN = """
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F

@dataclass
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 11
    n_layer: int = 1
    n_head: int = 1
    n_embd: int = 8
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        print("number of parameters: (a stand-in)")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)

    def forward(self, idx, targets):
        logits = self.wte(idx) @ self.wte.weight.T
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
"""


def test_train_speed_times_a_nanogpt_checkout_beside_ar(tmp_path, capsys):
    (tmp_path / "model.py").write_text(NANOGPT_STAND_IN)  # the interface of karpathy/nanoGPT's model.py
    bench.bench_train_speed(["--vocab=11", "--iters=1", "--repeat=3", "--n_layer=1", "--n_embd=32", "--n_head=2",
                             "--block_size=16", "--batch_size=4", f"--nanogpt={tmp_path}"])
    out = capsys.readouterr().out
    assert sum(line.strip().startswith("nanoGPT (its model.py)  ") for line in out.splitlines()) == 1
    assert "ar.py / nanoGPT: " in out and "mdlm.py / ar.py: " in out
    assert "number of parameters" not in out
    r = run_cli(["bench.py", "train_speed", f"--nanogpt={tmp_path / 'nowhere'}"], check=False)
    assert r.returncode == 1 and "has no model.py; give a checkout of karpathy/nanoGPT" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["kernels", "--repeat=-1"], "--repeat=-1"), (["kernels", "--sizes=0,5,66"], "each a positive integer"),
    (["rotary", "--sizes=0,5,3,6"], "each a positive integer"), (["kernels", "--graphs=absorbing"], "choose from absorb,uniform"),
    (["kernels", "--ops=foo"], "choose from score_entropy,euler"), (["kernels", "--device=gpu"], "unknown --device=gpu"),
    (["nearest", "--metrics=none"], "--metrics='none': choose from cos,l2"), (["gpu", "--out=/proc/x"], "choose another --out"),
    (["methods", "--steps=a"], "--steps='a': give positive integers"), (["sample_speed", "--batches=a"], "--batches='a'"),
    (["train_speed", "--vocab=0"], "--vocab='0'"), (["throughput", "--compile=true", "--grad_accum=4"],
                                                    "does not use --compile, --grad_accum"),
    (["mdlm_sampler", "--seq_len=0"], "--seq_len=0 must be at least 1"), (["sample_speed", "--vocab=0"], "--vocab=0"),
    (["sample_speed", "--steps=0"], "--steps=0"), (["throughput", "--iters=0"], "--iters=0"),
    (["throughput", "--dropout=2"], "--dropout=2.0 must be in [0, 1)"), (["throughput", "--schedule=abc"], "--schedule='abc'"),
    (["train_speed", "--batch_size=0"], "--batch_size=0"), (["sedd", "--num_samples=0"], "--num_samples=0"),
    (["sedd", "--t_samples=0"], "--t_samples=0"), (["rotary", "--sizes=1,2,1,3"], "the head size D must be even"),
    (["throughput", "--show"], "does not use --show; drop it"), (["throughput", "--sample"], "does not use --sample"),
    (["train_speed", "--eval", "--max_iters=9"], "does not use --eval, --max_iters"),
    (["train_speed", "--dataset=e2e"], "does not use --dataset"), (["train_speed", "--temperature=0.5"], "--temperature"),
    (["train_speed", "--dropout=2"], "--dropout=2.0"), (["kernels", "--dtype=fp8"], "--dtype='fp8': use float32 or bfloat16"),
])
def test_bad_arguments_are_one_line(args, message, monkeypatch):
    """Each was a traceback (StatisticsError, ZeroDivisionError, RuntimeError, ValueError), an empty table, or
    options a benchmark took and ignored. Each is refused before the kernels are built (a minute, the first time)."""
    monkeypatch.setattr(bench, "_ops_or_die", lambda device: pytest.fail("kernels asked for before the arguments were checked"))
    with pytest.raises(SystemExit) as e:
        bench.BENCHES[args[0]](args[1:])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code), str(e.value.code)
    assert "\n" not in str(e.value.code)


def test_train_speed_bad_input():
    r = run_cli(["bench.py", "train_speed", "--repeat=2"], check=False)
    assert r.returncode == 1 and "--repeat must be at least 3" in r.stderr


def test_sample_speed_reports_every_sampler_and_the_same_samples(capsys):
    bench.bench_sample_speed(["--vocab=11", "--seq_len=8", "--steps=6", "--batches=1,3", "--repeat=2"])
    out = capsys.readouterr().out
    for sampler in ("ddpm", "ddpm_cache", "ar"):
        assert sum(line.split()[0] == sampler for line in out.splitlines() if line.strip()) == 2
    assert out.count("identical samples: True") == 2
    ddpm_rows = [int(line.split()[-1]) for line in out.splitlines() if line.startswith("      ddpm ")]
    assert ddpm_rows == [6 * 8, 6 * 8]  # the whole sequence every step
