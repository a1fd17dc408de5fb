"""bench.py: the one measuring helper, and `bench.py gpu` run on the CPU (its dry run), which must
leave a report of every part in DIR/report.md and DIR/report.json; common.progress, its progress bars."""
import json
import math
import os
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import bench
import common
import difflm_ops
import diffusion_lm
import mdlm
import sedd
from conftest import run_cli, write_toy_dataset

PARTS = ["build", "self-check", "cuda tests", "past 2^31", "train and sample", "kernels", "nearest", "rotary", "token_nll",
         "acceptance", "ddp"]


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
    for part in ("build", "self-check", "past 2^31", "kernels", "nearest", "rotary", "token_nll", "acceptance"):
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
    assert "torch.compile skipped" not in r.stdout  # the dry run compiles nothing; its budget was not what stopped it


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


def test_a_failed_build_leaves_the_later_runs_the_pytorch_path(tmp_path, monkeypatch):
    """Each training, sampling and test run of bench.py gpu is a process of its own: after a failed build each
    would build again (a CUDA compile, tens of seconds, one run at a time under the build lock) within its limit."""
    monkeypatch.setenv("DIFFLM_BUILD", "/proc/no_such_dir")
    monkeypatch.setenv("DIFFLM_KERNELS", "1")  # restored after the test, as the run sets it
    monkeypatch.setattr(difflm_ops, "_LOADED", {})  # this process's kernels, loaded by other tests: built again
    with pytest.warns(UserWarning, match="failed to build"):
        bench.bench_gpu([f"--out={tmp_path}", "--methods=", "--parts=self-check"])
    build = json.load(open(tmp_path / "report.json"))["parts"][0]
    assert build["status"] == "failed" and build["summary"].endswith("the runs below take the PyTorch path"), build
    assert difflm_ops.disabled()


def test_rotary_timing_and_its_bad_sizes():
    r = run_cli(["bench.py", "rotary", "--sizes=2,5,3,6;1,7,2,64", "--repeat=1", "--no_compile"])
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("rotary fwd+bwd")]
    assert [row[2] for row in rows] == ["2,5,3,6", "1,7,2,64"]
    assert all(float(row[5]) > 0 and float(row[-1]) == 2.0 for row in rows), rows  # peak: output + gradient
    r = run_cli(["bench.py", "rotary", "--sizes=2,5,3"], check=False)
    assert r.returncode == 1 and "use B,L,H,D" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_token_nll_timing_and_its_bad_options():
    """bench.py token_nll: a row per size, both versions timed; token_nll's peak is its gradient (one unit) and a chunk,
    F.cross_entropy's at least three units (an fp32 log-softmax, its gradient, z's); bad options are one line."""
    r = run_cli(["bench.py", "token_nll", "--sizes=64,66;3,1000", "--repeat=1", "--no_compile"])
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("token_nll fwd+bwd")]
    assert [row[2] for row in rows] == ["64,66", "3,1000"]
    assert all(float(row[3]) > 0 and float(row[5]) > 0 and float(row[-2]) >= 3 > float(row[-1]) for row in rows), rows
    for bad, said in (("--sizes=64", "use M,V"), ("--dtype=half", "use float32 or bfloat16")):
        r = run_cli(["bench.py", "token_nll", bad], check=False)
        assert r.returncode == 1 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_methods_refuses_before_the_work_and_a_failed_training_says_why(tmp_path, monkeypatch):
    """--plot failed only after every method had trained and sampled (about 45 minutes); a training run that
    failed said only where its output was."""
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
    with pytest.raises(SystemExit, match="unknown method\\(s\\) gpt, sdd; choose from "):
        bench.bench_methods(["--methods=ar,gpt,sdd", f"--out_root={tmp_path / 'out'}"])

    def fails(args, stdout, stderr):  # a training run that stops: its own error line, and where the rest is
        stdout.write("iter 0\nerror: --lr=5 diverged\n" if "ar.py" in args[1] else "Killed\n")
        return types.SimpleNamespace(returncode=1 if "ar.py" in args[1] else -9)
    monkeypatch.setattr(bench.subprocess, "run", fails)
    for methods, why in (("ar", "error: --lr=5 diverged"), ("diffuser", "exit status -9")):
        with pytest.raises(SystemExit) as e:
            bench.bench_methods([f"--methods={methods}", f"--out_root={tmp_path / 'out'}"])
        assert str(e.value) == f"error: training {methods} failed ({why}); see {tmp_path / 'out' / methods}/train.out"
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("trained"))  # diffuser's row has no judge:
    with pytest.raises(pytest.fail.Exception, match="trained"):  # not refused for the want of one
        bench.bench_methods(["--methods=diffuser", f"--out_root={tmp_path / 'out'}"])


def test_gpu_command_bad_input(tmp_path):
    r = run_cli(["bench.py", "gpu", f"--out={tmp_path}", "--methods=mdlm,nope"], check=False)
    assert r.returncode == 1 and "choose from" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_progress_bar_on_a_terminal_and_a_line_a_minute_in_a_log(monkeypatch, capsys):
    """Without a terminal (a batch job's log) a long --eval or sampling pass printed nothing until it ended."""
    items = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert list(common.progress(items, "quiet")) == items and not capsys.readouterr().err  # a fast pass: no line
    with monkeypatch.context() as m:
        clock = iter(range(0, 1000, 25))  # each read of the clock 25 s later: a line at every third item or so
        m.setattr(common.time, "monotonic", lambda: next(clock))
        assert list(common.progress(range(6), "sampling")) == list(range(6))
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("sampling: ") and " of 6 after " in line for line in lines), lines
    assert list(common.progress((i for i in range(3)), "eval", every=0)) == [0, 1, 2]  # no length: no total
    assert capsys.readouterr().err.splitlines()[-1].startswith("eval: 3 after ")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = common.progress(iter(items), "shown", total=3)
    assert list(bar) == items and type(bar).__name__ == "tqdm"


def test_methods_with_samplers_measures_each_decoding_control(tmp_path):
    """bench.py methods --samplers: one row per step count for the exact sampler and each control."""
    rng = random.Random(0)
    data = write_toy_dataset(tmp_path / "toy", [[rng.randrange(8) for _ in range(4000)]], "abcdefgh")
    train = (f"--data_dir={data} --block_size=16 --max_iters=2 --eval_interval=2 --eval_iters=1 --n_layer=1 "
             "--n_embd=32 --n_head=2 --batch_size=4")
    r = run_cli(["bench.py", "methods", "--methods=ar,mdlm", f"--out_root={tmp_path / 'runs'}", f"--train_args={train}",
                 "--steps=2,4", "--num_samples=2", "--samplers"], timeout=600)
    doc = json.load(open(tmp_path / "runs" / "methods.json"))
    assert set(doc["curves"]) == {"ar", "mdlm", "mdlm (confidence)", "mdlm (t0.8 p0.9)"}
    assert set(doc) == {"rows", "curves", "judge", "num_samples"} and doc["num_samples"] == 2
    assert [(row["method"], row.get("tok_s") is not None) for row in doc["rows"]] == [
        ("ar", True), ("data (val)", False), ("mdlm", True), ("mdlm", False), ("mdlm (confidence)", False),
        ("mdlm (confidence)", False), ("mdlm (t0.8 p0.9)", False), ("mdlm (t0.8 p0.9)", False)]
    # the break-even table: each sampler's step count against the cached AR sampler, and its gen NLL at the
    # measured step count nearest to it, in their own columns
    lines = r.stdout.splitlines()
    be = lines[lines.index("break-even: below this many steps the diffusion sampler is faster per sample than the "
                           "cached AR sampler") + 2:][:3]
    t_ar = doc["curves"]["ar"][0][2]
    for line, key in zip(be, ("mdlm", "mdlm (confidence)", "mdlm (t0.8 p0.9)")):
        kind, s = bench.break_even([(p[0], p[2]) for p in doc["curves"][key]], t_ar)
        near = min(doc["curves"][key], key=lambda p: abs(p[0] - s))
        cell = {"<": f"< {s}", ">": f"> {s}", "=": f"{s:.0f}"}[kind]
        assert line.split() == [*key.split(), f"{t_ar:.3f}", *cell.split(), f"{near[1]:.3f}", "@", str(near[0])], line
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
        lines = [line.split() for line in out.splitlines() if line.strip().startswith(kind + "  ")]
        assert len(lines) == 2 and all(int(line[-1]) >= 0 for line in lines)  # the step's peak MiB
    assert out.count("peak MiB") == 2 and out.count("mdlm.py / ar.py: ") == 2 and out.count("ar.py / ar.py, no kernels: ") == 2 and "1.00x" in out


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
    (["mdlm_sampler", "--steps=abc"], "bench.py mdlm_sampler: argument --steps: invalid int value: 'abc'"),
    (["gpu"], "bench.py gpu: the following arguments are required: --out"),  # argparse's own, in one line too
    (["methods", "--num_samples=0"], "--num_samples=0 must be at least 1"), (["methods", "--plot=x.txt"], ".png file"),
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


# ----------------------------------------------------------------------------------------------
# The plumbing: the report writer, the runners, the timing loop, the rows and their cells, each subcommand's options


def test_the_report_writes_every_part_key_and_figure_column(tmp_path):
    """report.json: the header, total_seconds and each part's five keys; report.md: the title, the header line,
    one table row per part and one table per part with figures, each cell under its own column; a die() or an
    exception fails its part with its type and message; past the budget a budgeted part is skipped uncalled."""
    report = bench.Report(str(tmp_path), {"device": "dev0", "torch": "t1", "gpus": 0})
    assert report.part("a", lambda: ("ok", "fine", [{"x": 1 / 3, "y": "p|q"}, {"x": 2, "y": None}])) == \
        [{"x": 1 / 3, "y": "p|q"}, {"x": 2, "y": None}]
    report.part("b", lambda: common.die("bad input"))
    report.part("c", lambda: (_ for _ in ()).throw(ValueError("v" * 400 + "\nsecond")))
    report.budget, called = 0, []
    report.part("late", lambda: called.append(1))
    report.part("free", lambda: ("ok", "free", None), budgeted=False)
    assert not called
    doc = json.load(open(tmp_path / "report.json"))
    assert set(doc) == {"device", "torch", "gpus", "total_seconds", "parts"} and doc["device"] == "dev0"
    assert doc["total_seconds"] >= 0 and all(set(p) == {"name", "status", "seconds", "summary", "figures"}
                                             for p in doc["parts"])
    got = [(p["name"], p["status"], p["summary"][:22]) for p in doc["parts"]]
    assert got == [("a", "ok", "fine"), ("b", "failed", "SystemExit: error: bad"), ("c", "failed", "ValueError: vvvvvvvvvv"),
                   ("late", "skipped", "the --budget of 0 s wa"), ("free", "ok", "free")]
    assert len(doc["parts"][2]["summary"]) == len("ValueError: ") + 300
    md = open(tmp_path / "report.md").read().splitlines()
    assert md[:5] == ["# difflm GPU validation: dev0", "", "torch t1 | gpus 0", "", "| part | status | seconds | summary |"]
    rows = [line for line in md if line.startswith("| ") and line.count("|") == 5][1:]
    assert [r.split(" | ")[:2] for r in rows] == [["| a", "ok"], ["| b", "failed"], ["| c", "failed"], ["| late", "skipped"],
                                                  ["| free", "ok"]]
    i = md.index("## a")
    assert md[i + 2:i + 6] == ["| x | y |", "|---|---|", "| 0.3333 | p/q |", "| 2 | None |"]
    end = md.index(rows[-1])  # the parts' table, then the total the JSON holds, then the figures
    assert md[end + 1:end + 3] == ["", f"total {doc['total_seconds']} s"] and "## b" not in md and i > end


def test_cell_ms_and_the_timing_columns():
    assert bench._cell(1 / 3) == "0.3333" and bench._cell(2) == "2" and bench._cell("a|b\nc") == "a/b c"
    assert bench._cell(None) == "None" and bench._ms(0.00123) == "1.23" and bench._ms(None) == "-"
    row = {"op": "euler step", "graph": "absorb", "B,L,V": "1,2,3", "eager_s": 0.004, "compile_s": None, "kernel_s": 0.002,
           "eager_peak_units": 3.0, "kernel_peak_units": 0.5, "kernel_GBps": 12.3, "of_floor": 0.456}
    cells = bench._kernel_cells(row, 1e9)
    assert cells == ["euler step", "absorb", "1,2,3", "4.00", "-", "2.00", "2.0x", "-", "3.00", "0.50", "12", "46%"]
    assert len(cells) == len(bench.KERNEL_HEADER) + 2 and len(bench._kernel_cells(row, None)) == len(bench.KERNEL_HEADER)
    row.update({"metric": "l2", "N,d,V": "4,3,5", "eager_peak": 2**21, "kernel_peak": None, "floor_bytes": 2**20,
                "same_ids": 0.5, "compile_s": 0.001})
    assert bench._nearest_cells(row) == ["l2", "4,3,5", "4.00", "1.00", "2.00", "2.0x", "0.5x", "2.0", "-", "1.0", "50.00%"]
    assert len(bench.NEAREST_HEADER) == len(bench._nearest_cells(row))
    row.update({"op": "rotary fwd+bwd", "B,L,H,D": "1,2,3,4"})
    assert bench._rotary_cells(row, None)[:3] == ["rotary fwd+bwd", "1,2,3,4", "4.00"]


def test_table_right_aligns_each_column_under_its_header(capsys):
    bench.table([("a", 12345), ("bb", 1)], ("name", "n"))
    assert capsys.readouterr().out.splitlines() == ["name      n", "   a  12345", "  bb      1"]


def test_in_process_and_run_report_the_code_and_the_end_of_the_output(tmp_path, monkeypatch):
    """A die() in a dry run's method is a failure with its line; a crash too; a plain exit code is kept; the
    output kept is its last 4000 characters; _run passes its env and returns the child's exit code."""
    (tmp_path / "probe_dies.py").write_text("import common\ndef main(args):\n    common.die('bad ' + ' '.join(args))\n")
    (tmp_path / "probe_crash.py").write_text("def main(args):\n    print('x' * 5000)\n    raise ValueError('boom')\n")
    (tmp_path / "probe_exit.py").write_text("import sys\ndef main(args):\n    sys.exit(3)\n")
    (tmp_path / "probe_fine.py").write_text("def main(args):\n    print('hello', args)\n")
    (tmp_path / "probe_done.py").write_text("import sys\ndef main(args):\n    sys.exit()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert bench._in_process("probe_dies", ["a"]) == (1, "error: bad a\n")
    rc, text = bench._in_process("probe_crash", [])
    assert rc == 1 and text.endswith("x\nValueError: boom\n") and len(text) == 4000
    assert bench._in_process("probe_exit", [])[0] == 3 and bench._in_process("probe_fine", ["z"]) == (0, "hello ['z']\n")
    assert bench._in_process("probe_done", [])[0] == 0  # sys.exit() with no code is a success, as for Python
    rc, text = bench._run(["-c", "import os, sys; print('y' * 5000); print(os.getcwd()); print(os.environ['PROBE']); "
                                 "sys.exit(3)"], 60, env={"PROBE": "seen"})
    assert rc == 3 and text.endswith(f"y\n{common.ROOT}\nseen\n") and len(text) == 4000  # from the root: CUDA_TESTS


def test_last_line_and_tail():
    text = "iter 1 a\neval 1\n  iter 2 b  \niter 3 c  \nx iter 4\neval 2 end\n"
    assert bench._last_line(text, "iter") == "iter 3 c" and bench._last_line(text, "eval") == "eval 2 end"
    assert bench._last_line(text, "nope") == "" and bench._tail(text + "\n\n") == "eval 2 end"
    assert bench._tail("") == "" and bench._tail("z" * 400) == "z" * 300


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    perf_counter = time

    def sleep(self, secs):
        self.now += secs


def test_train_and_sample_on_a_gpu_keeps_to_its_timeout(tmp_path, monkeypatch):
    """Training (concurrent processes) gets 70% of the part's timeout, a run past it is killed and failed with
    what it said; each run's time is when it ended, whatever the order; each sampling run gets what is left; a
    method whose training failed is not sampled; each method's whole output is kept in its log."""
    clock, seen, killed = FakeClock(), [], []
    done = "done: 10 iterations in 0:10; checkpoint ckpt.pt; peak GPU memory 1.25 GiB"  # trainer.py's last line
    runs = {"ddpm": (30, 0, f"iter 0: loss 1\niter 10: loss 0.5\neval 10: val 0.4\n{done}\n"),
            "mdlm": (20, 1, "Traceback\nValueError: x\n"), "ar": (None, None, "iter 0: loss 2\n")}

    class Proc:  # ends (writes its output, sets its code) at its time on the clock
        def __init__(self, args, stdout, **kw):
            self.m, self.log, self.start, self.returncode = args[1][:-3], stdout.name, clock.now, None
            seen.append(("train", args[1:]))

        def poll(self):
            secs, rc, text = runs[self.m]
            if self.returncode is None and secs is not None and clock.now - self.start >= secs:
                with open(self.log, "a") as f:
                    f.write(text)
                self.returncode = rc
            return self.returncode

        def kill(self):
            killed.append(self.m)
            with open(self.log, "a") as f:
                f.write(runs[self.m][2])
            self.returncode = -9

        def wait(self):
            return self.returncode

    def run(args, timeout, env=None):
        seen.append(("sample", args, timeout))
        clock.now += 5
        return 0, "a\nb\nc\nd\n"
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench.subprocess, "Popen", Proc)
    monkeypatch.setattr(bench, "_run", run)
    monkeypatch.setattr(bench.corpus, "prepare_data", lambda cfg: None)
    rows = bench.train_and_sample(str(tmp_path), ["ddpm", "mdlm", "ar"], False, 7, 100)
    train = ["--train", "--overwrite", f"--out_dir={tmp_path / 'ddpm'}", "--max_iters=7", "--eval_interval=7",
             "--compile=true"]
    assert seen[0] == ("train", ["ddpm.py"] + train)
    assert killed == ["ar"]
    assert [s for s in seen if s[0] == "sample"] == [("sample", ["ddpm.py", "--sample", f"--out_dir={tmp_path / 'ddpm'}"],
                                                      30)]
    assert [(r["method"], r["train"], r["train_s"], r.get("sample")) for r in rows] == [
        ("ddpm", "ok", 30, "ok"), ("mdlm", "failed (1)", 20, None), ("ar", "failed (-9)", 70, None)]
    assert rows[0]["last log"] == "iter 10: loss 0.5" and rows[0]["last eval"] == "eval 10: val 0.4"
    assert rows[0]["done"] == done and rows[1]["done"] == ""  # the report's row carries the run's peak memory
    assert rows[0]["output"] == "b / c / d" and rows[0]["sample_s"] == 5
    assert rows[1]["last eval"] == "ValueError: x" and rows[2]["last eval"] == "timed out after 70 s"
    assert (tmp_path / "ddpm.log").read_text() == (f"$ python ddpm.py {' '.join(train)}\n{runs['ddpm'][2]}\n"
                                                   f"$ python ddpm.py --sample --out_dir={tmp_path / 'ddpm'}\na\nb\nc\nd\n")
    assert (tmp_path / "mdlm.log").read_text().endswith("\nTraceback\nValueError: x\n")
    assert (tmp_path / "ar.log").read_text().endswith("\niter 0: loss 2\n\ntimed out after 70 s")


def test_train_and_sample_dry_runs_in_process_with_small_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "_in_process", lambda m, args: calls.append((m, args)) or (0, "iter 1\neval 1: x\nend\n"))
    monkeypatch.setattr(bench.corpus, "prepare_data", lambda cfg: None)
    rows = bench.train_and_sample(str(tmp_path), ["ddpm", "ar"], True, 3, 100)
    assert calls == [("ddpm", ["--train", "--overwrite", f"--out_dir={tmp_path / 'ddpm'}", "--max_iters=3",
                               "--eval_interval=3", "--eval_iters=1", "--log_interval=1", "--batch_size=4"]),
                     ("ar", ["--train", "--overwrite", f"--out_dir={tmp_path / 'ar'}", "--max_iters=3", "--eval_interval=3",
                             "--eval_iters=1", "--log_interval=1", "--batch_size=4"]),
                     ("ddpm", ["--sample", f"--out_dir={tmp_path / 'ddpm'}"] + bench.DRY_SAMPLE["ddpm"]),
                     ("ar", ["--sample", f"--out_dir={tmp_path / 'ar'}"] + bench.DRY_SAMPLE["ar"])]
    assert all(r["train"] == "ok" and r["sample"] == "ok" and r["last eval"] == "eval 1: x" for r in rows)
    log = (tmp_path / "ar.log").read_text()
    assert log.startswith("$ python ar.py --train --overwrite") and log.count("eval 1: x") == 2  # training, sampling


def test_gpu_train_part_fails_where_a_method_did_not_sample_and_keeps_to_the_budget(tmp_path, monkeypatch):
    got = []
    outcome = {"sample": "failed (1)"}

    def fake(out, methods, dry, iters, timeout):
        got.append((out, methods, dry, iters, timeout))
        return [{"method": "ddpm", "train": "ok", **outcome}, {"method": "mdlm", "train": "ok", "sample": "ok"}]
    monkeypatch.setattr(bench, "train_and_sample", fake)
    monkeypatch.setenv("DIFFLM_KERNELS", "0")  # the build part, always run, then says so and builds nothing
    bench.bench_gpu([f"--out={tmp_path}", "--parts=train", "--methods=ddpm,mdlm", "--budget=50", "--train_iters=3"])
    part = json.load(open(tmp_path / "report.json"))["parts"][-1]
    assert (part["name"], part["status"], part["summary"]) == ("train and sample", "failed", "failed: ddpm")
    (out, methods, dry, iters, timeout), = got
    assert (out, methods, dry, iters) == (str(tmp_path / "runs"), ["ddpm", "mdlm"], not torch.cuda.is_available(), 3)
    assert 1 <= timeout <= 50
    outcome["sample"] = "ok"
    bench.bench_gpu([f"--out={tmp_path}", "--parts=train", "--methods=ddpm,mdlm", "--timeout=20"])
    part = json.load(open(tmp_path / "report.json"))["parts"][-1]
    assert (part["status"], part["summary"]) == ("ok", "2 methods trained (2 iterations) and sampled")
    assert got[1][4] == 20 and got[1][3] == 2


def test_gpu_parts_are_named_by_their_first_word(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("DIFFLM_KERNELS", "0")
    bench.bench_gpu([f"--out={tmp_path}", "--parts=cuda,ddp", "--methods="])
    parts = json.load(open(tmp_path / "report.json"))["parts"]
    assert [(p["name"], p["status"], p["summary"]) for p in parts[1:]] == [
        ("cuda tests", "skipped", "no CUDA device"), ("ddp", "skipped", "1 GPU(s); a DDP step needs two")]


def test_gpu_self_check_fails_on_an_op_that_disagrees(tmp_path):
    real = difflm_ops.FUSED["sedd_tweedie_step"].spec.call

    def wrong(ls, *a):
        out = real(ls, *a).clone()
        out[..., -1] = (out[..., -1] + 1) % ls.shape[-1]
        return out
    with difflm_ops.replace("sedd_tweedie_step", wrong):
        bench.bench_gpu([f"--out={tmp_path}", "--parts=self-check", "--methods="])
    part = json.load(open(tmp_path / "report.json"))["parts"][-1]
    assert (part["status"], part["summary"]) == ("failed", "switched off: sedd_tweedie_step"), part
    assert [r["op"] for r in part["figures"] if not r["passed"]] == ["sedd_tweedie_step"]


def test_gpu_self_check_reports_a_check_that_raises_and_checks_the_other_ops(tmp_path, monkeypatch):
    def raises(f, device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
    monkeypatch.setattr(difflm_ops.FUSED["rotary"].spec, "check", raises)
    bench.bench_gpu([f"--out={tmp_path}", "--parts=self-check", "--methods="])
    part = json.load(open(tmp_path / "report.json"))["parts"][-1]
    assert (part["status"], part["summary"]) == ("failed", "switched off: rotary"), part
    row = next(r for r in part["figures"] if r["op"] == "rotary")
    assert row["detail"] == "raised RuntimeError: CUDA error: an illegal memory access was encountered", row
    assert len(part["figures"]) == len(difflm_ops.FUSED) and all(r["passed"] for r in part["figures"] if r is not row)


def test_measure_warmup_repeat_and_median(monkeypatch):
    """repeat=N: N timed calls after the warm-up; repeat=0: at least 5, until half a second is spent, at most 100."""
    clock, calls = FakeClock(), []
    monkeypatch.setattr(bench, "time", clock)

    def taking(*secs):
        def fn():
            clock.now += secs[len(calls) % len(secs)]
            calls.append(1)
        return fn
    assert bench.measure(taking(0.0), repeat=0, warmup=2) == (0.0, None) and len(calls) == 102
    calls.clear()
    assert bench.measure(taking(1.0), repeat=0, warmup=1)[0] == 1.0 and len(calls) == 6
    calls.clear()
    assert bench.measure(taking(1.0), repeat=7, warmup=0)[0] == 1.0 and len(calls) == 7
    calls.clear()
    assert bench.measure(taking(5.0, 1.0, 2.0), repeat=3, warmup=0)[0] == 2.0


def test_peak_memory_on_the_cpu_counts_what_is_freed_before_the_next_allocation():
    def fn():
        for _ in range(4):
            y = torch.ones(1 << 18)  # 1 MiB, freed before the next
            del y
    peak = bench._peak_extra_bytes(fn, torch.device("cpu"))
    assert 1 << 20 <= peak < 2 << 20, peak


def test_steady_allocator_keeps_freed_memory_and_is_quiet_without_glibc(monkeypatch):
    said = []

    class Libc:
        def mallopt(self, param, value):
            said.append((param, value))
    monkeypatch.setattr(bench.ctypes, "CDLL", lambda name: Libc())
    bench.steady_allocator()
    assert said == [(-1, 1 << 30), (-3, 1 << 25)]  # M_TRIM_THRESHOLD 1 GiB, M_MMAP_THRESHOLD 32 MiB

    def no_glibc(name):
        raise OSError(name)
    monkeypatch.setattr(bench.ctypes, "CDLL", no_glibc)
    assert bench.steady_allocator() is None and len(said) == 2


def test_kernel_and_nearest_rows_are_labelled_with_their_size_op_graph_and_dtype(monkeypatch):
    """Each row's op called with its own graph on scores of the dtype asked for, labelled B,L,V (not N), score
    entropy and the SEDD steps with the absorbing offset as SEDD passes it; the clamp's rows labelled N,d,V with
    its metric passed and the share of ids that agree with the expression."""
    calls, shifts = [], []

    def op(name):
        def f(*a):
            if name in ("score_entropy", "euler_step", "tweedie_step"):
                shifts.append((name, a[5]))
                a = a[:5]
            calls.append((name, a[0].dtype, a[-1]))
            return a[0].float().sum(-1) if name == "score_entropy" else a[1]
        return f

    def versus(oracle, kernel, args, device, *a, **k):
        kernel(*args)
        return {"kernel_s": 1.0, "kernel_peak": 1, "eager_s": 2.0, "eager_peak": 2, "compile_s": None}
    monkeypatch.setattr(bench, "versus", versus)
    ops = {k: op(k) for k in ("score_entropy", "euler_step", "tweedie_step", "ancestral_step")}
    rows = bench.kernel_rows(torch.device("cpu"), ops, [(2, 3, 5)], torch.bfloat16,
                             ["score_entropy", "euler", "tweedie", "mdlm"], ["absorb", "uniform"])
    assert [(r["op"], r["graph"], r["B,L,V"]) for r in rows] == [
        (op_, g, "2,3,5") for g in ("absorb", "uniform") for op_ in
        ("score_entropy fwd+bwd", "euler step", "tweedie step", "mdlm ancestral step")[:4 if g == "absorb" else 3]]
    assert [c[0] for c in calls] == ["score_entropy", "euler_step", "tweedie_step", "ancestral_step",
                                     "score_entropy", "euler_step", "tweedie_step"]
    assert all(dt == torch.bfloat16 for _, dt, _ in calls)
    assert [c[2] for c in calls] == ["absorb", "absorb", "absorb", 5, "uniform", "uniform", "uniform"]  # MASK = N - 1
    # (B,) absorbing, as SEDD's loss and sampler pass them; none on the uniform graph
    assert [(name, None if sh is None else tuple(sh.shape)) for name, sh in shifts] == [
        (name, (2,) if g == "absorb" else None) for g in ("absorb", "uniform")
        for name in ("score_entropy", "euler_step", "tweedie_step")]

    matmul, tf32 = torch.backends.cuda.matmul, []

    def clamp(x, E, metric):
        ids = diffusion_lm.nearest_embedding.oracle(x, E, metric).clone()
        calls.append(metric)
        tf32.append(matmul.allow_tf32)
        ids[: len(ids) // 2] = (ids[: len(ids) // 2] + 1) % E.shape[0]
        return ids
    calls.clear()
    matmul.allow_tf32 = True  # as get_device leaves it on a GPU
    try:
        rows = bench.nearest_rows(torch.device("cpu"), {"nearest_embedding": clamp}, [(4, 3, 5)], ["cos", "l2"])
        assert matmul.allow_tf32 is True  # given back as found
    finally:
        matmul.allow_tf32 = False
    assert [(r["metric"], r["N,d,V"], r["same_ids"], r["floor_bytes"]) for r in rows] == [
        ("cos", "4,3,5", 0.5, 4 * 8 + (5 * 3 + 5) * 4), ("l2", "4,3,5", 0.5, 4 * 8 + (5 * 3 + 5) * 4)]
    assert calls[0] == "cos" and calls[-1] == "l2"
    assert tf32 and not any(tf32)  # the clamp is timed against cuBLAS in plain fp32, where the bar was set


def test_kernel_timing_commands_pass_their_options_on(monkeypatch, capsys):
    got = {}
    monkeypatch.setattr(bench, "_ops_or_die", lambda device: {})
    monkeypatch.setattr(bench, "kernel_rows", lambda *a: got.update(kernels=a) or [])
    monkeypatch.setattr(bench, "nearest_rows", lambda *a: got.update(nearest=a) or [])
    monkeypatch.setattr(bench, "rotary_rows", lambda *a: got.update(rotary=a) or [])
    cpu = torch.device("cpu")
    bench.bench_kernels(["--dtype=bfloat16", "--sizes=1,2,3;4,5,6", "--ops=euler", "--graphs=uniform", "--no_eager",
                         "--repeat=4", "--device=cpu"])
    assert got["kernels"] == (cpu, {}, [(1, 2, 3), (4, 5, 6)], torch.bfloat16, ["euler"], ["uniform"], 4, False, True, None)
    bench.bench_kernels(["--dtype=float32", "--no_compile", "--device=cpu"])
    assert got["kernels"][2:] == ([(32, 256, 66), (4, 256, 50258)], torch.float32, ["score_entropy", "euler", "tweedie",
                                  "mdlm"], ["absorb", "uniform"], 0, True, False, None)
    bench.bench_kernels(["--device=cpu"])
    assert got["kernels"][3] == torch.float32 and got["kernels"][8] is True
    bench.bench_nearest(["--sizes=7,8,9", "--metrics=l2", "--repeat=2", "--no_compile", "--device=cpu"])
    assert got["nearest"] == (cpu, {}, [(7, 8, 9)], ["l2"], 2, False)
    bench.bench_nearest(["--device=cpu"])
    assert got["nearest"][2:] == ([(8192, 16, 821), (8192, 128, 50257)], ["cos", "l2"], 0, True)
    bench.bench_rotary(["--sizes=1,2,3,4", "--repeat=3", "--device=cpu"])
    assert got["rotary"] == (cpu, {}, [(1, 2, 3, 4)], torch.float32, 3, True, None)
    bench.bench_rotary(["--no_compile", "--device=cpu"])
    assert got["rotary"][2:] == ([(16, 256, 6, 64)], torch.float32, 0, False, None)


def test_choices_refuse_an_empty_list():
    with pytest.raises(SystemExit, match="--graphs=',': choose from absorb,uniform"):
        bench._choices(",", "graphs", ("absorb", "uniform"))
    assert bench._choices("b,,a", "x", ("a", "b")) == ["b", "a"]


def test_mdlm_sampler_and_throughput_take_their_sizes(capsys):
    bench.bench_mdlm_sampler(["--steps=2", "--seq_len=8", "--repeat=1"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in out[1:3]] == [["ddpm", "2", "8", "2"], ["ddpm_cache", "2", "8", "2"]]
    bench.bench_throughput(["--iters=1", "--repeat=1", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16",
                            "--batch_size=3"])
    assert "n_layer=1 n_embd=32 block_size=16 batch_size=3 on cpu" in capsys.readouterr().out


def test_break_even_sorts_its_points_and_meets_the_ends():
    pts = [(64, 0.4), (16, 0.1), (32, 0.2)]
    assert bench.break_even(pts, 0.1) == ("<", 16) and bench.break_even(pts, 0.2) == ("=", 32.0)
    assert bench.break_even(pts, 0.4) == ("=", 64.0) and bench.break_even(pts, 0.40001) == (">", 64)


def test_the_far_check_fails_a_loss_off_by_more_than_its_tolerance_not_only_a_wrong_token(tmp_path):
    """A float result past the tolerance (worst > 1, finite) fails its row, as a differing token (worst = inf) does."""
    assert difflm_ops.load() is not None, "the difflm kernels did not build"

    def off_at_the_end(ls, *a):
        out = sedd.score_entropy.oracle(ls, *a)
        return torch.cat([out[:, :-1], out[:, -1:] + 0.01], 1)  # past LOSS_TOL (1e-4 + 1e-4 relative), finite
    with difflm_ops.replace("score_entropy", off_at_the_end):
        rows = bench.far_rows(torch.device("cpu"), 2**12, 66)
        bench.bench_gpu([f"--out={tmp_path}", "--parts=past", "--methods="])
    loss = [r for r in rows if r["op"] == "score_entropy (loss)"]
    assert len(loss) == 2 and all(not r["passed"] and 1 < r["worst (1 = tolerance)"] < math.inf for r in loss), loss
    part = json.load(open(tmp_path / "report.json"))["parts"][-1]  # bench.py gpu's part fails, naming them
    assert part["name"] == "past 2^31" and part["status"] == "failed", part
    assert part["summary"].startswith("wrong past 4096 scores: score_entropy (loss), absorb; score_entropy (loss), uniform")


def test_mdlm_sampler_on_a_checkpoint_samples_seq_len_positions(monkeypatch, capsys):
    """--seq_len shorter than the checkpoint's block_size: that many positions sampled (the row says so); as long
    as it: accepted; longer: refused in one line."""
    cfg = mdlm.Config(block_size=16, n_layer=1, n_embd=32, n_head=2)
    monkeypatch.setattr(bench.trainer, "load_for_inference", lambda *a: (cfg, "model", None, None, None))
    lengths = []
    monkeypatch.setattr(mdlm, "generate", lambda model, c, fixed, n: lengths.append(len(fixed)) or (None, c.steps))
    bench.bench_mdlm_sampler(["--ckpt_dir=x", "--steps=3", "--seq_len=8", "--repeat=1"])
    rows = [line.split()[:4] for line in capsys.readouterr().out.splitlines()[1:3]]
    assert set(lengths) == {8} and rows == [["ddpm", "3", "8", "3"], ["ddpm_cache", "3", "8", "3"]], rows
    bench.bench_mdlm_sampler(["--ckpt_dir=x", "--steps=3", "--seq_len=16", "--repeat=1"])
    with pytest.raises(SystemExit, match="--seq_len=17 exceeds the model's block_size=16"):
        bench.bench_mdlm_sampler(["--ckpt_dir=x", "--seq_len=17"])


def test_sedd_samplers_on_a_checkpoint_give_a_row_each_with_its_bound(char_data, tmp_path, capsys):
    """`python bench.py sedd` (docs/sedd.md): every sampler at every step count, each row with its time, the
    samples' NELBO under the model and their unigram entropy, which no test ran."""
    out = str(tmp_path / "sedd")
    sedd.main(["--train", f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
               "--eval_iters=1", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=4",
               "--device=cpu"])
    capsys.readouterr()
    bench.bench_sedd([f"--ckpt_dir={out}", "--steps=2,3", "--num_samples=2", "--t_samples=2"])
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()[1:] if line.split() and line.split()[0] in sedd.SAMPLERS]
    assert [(r[0], r[1]) for r in rows] == [(s, n) for n in ("2", "3") for s in sedd.SAMPLERS], text
    log_v = math.log(65)  # a random model's samples: a bound near log V per character, their entropy at most log V
    assert all(0 < float(r[3]) < 2 * log_v and 0 <= float(r[4]) <= log_v + 1e-6 for r in rows), text
    assert "2 samples of 16 tokens, absorb graph" in text and "NELBO with 2 time samples per sequence" in text


def test_the_methods_plot_draws_every_curve_beside_ar_and_the_data(tmp_path, capsys):
    """--plot (bench.py methods): the three panels from the curves that --plot is given, written as a PNG."""
    curves = {"ar": [(128, 2.1, 0.01, 3.2)], "mdlm": [(16, 2.9, 0.02, 3.0), (64, 2.6, 0.06, 3.1)]}
    rows = [{"method": "data (val)", "steps": None, "gen_nll": 1.9, "entropy": 3.3}]
    path = tmp_path / "plots" / "methods.png"
    bench.plot_methods(curves, rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {path}" in capsys.readouterr().out
