"""
bench.py: benchmarks. Each prints ratios against a baseline measured in the same run, never
absolute claims from another machine.

    python bench.py mdlm_sampler      # cached vs uncached MDLM sampler: time and network calls
    python bench.py throughput        # MDLM vs the same backbone trained autoregressively
    python bench.py kernels           # fused kernels vs eager and torch.compile'd PyTorch oracles
    python bench.py nearest           # Diffusion-LM's clamp kernel vs the PyTorch expression (time, memory)
    python bench.py methods --plot=docs/methods.png   # every text method vs the AR baseline (~45 min on 2 cores)
    python bench.py <name> --help     # the options of one benchmark

Timings are medians of repeated runs after a warm-up.
"""

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

import common
import kernels


def timeit(fn, repeat=5, warmup=1):
    """Median wall time of fn() in seconds (CUDA-synchronised when a GPU is in use).
    repeat=0: as many runs as fit in about half a second, between 5 and 100 (small ops are noisy)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    while len(times) < (repeat or 100):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if not repeat and len(times) >= 5 and sum(times) > 0.5:
            break
    return statistics.median(times)


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))  # noqa: E731
    print(line(header))
    for r in rows:
        print(line(r))


# ----------------------------------------------------------------------------------------------
# MDLM: cached vs uncached ancestral sampler


def bench_mdlm_sampler(argv):
    import mdlm
    ap = argparse.ArgumentParser(prog="bench.py mdlm_sampler")
    ap.add_argument("--ckpt_dir", default="", help="out dir of a trained model (default: an untrained one)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    if a.ckpt_dir:
        cfg, model, _, _, _ = common.load_for_inference(mdlm.Config, {"out_dir": a.ckpt_dir}, "mdlm", mdlm.build_model)
    else:
        cfg = mdlm.Config(block_size=a.seq_len)
        model = mdlm.build_model(cfg, {"vocab_size": 65}).eval()
        torch.nn.init.normal_(model.head.weight, std=0.02)  # not the zero init: a realistic, peaked output
    if a.seq_len > cfg.block_size:
        common.die(f"--seq_len={a.seq_len} exceeds the model's block_size={cfg.block_size}")
    rows, times = [], {}
    for sampler in ("ddpm", "ddpm_cache"):
        c = dataclasses.replace(cfg, sampler=sampler, steps=a.steps)
        fixed = torch.full((a.seq_len,), -1, dtype=torch.long)
        calls = []

        def run():
            torch.manual_seed(0)
            calls.append(mdlm.generate(model, c, fixed, a.num_samples)[1])
        times[sampler] = timeit(run, repeat=a.repeat, warmup=0)
        rows.append((sampler, a.steps, a.seq_len, calls[-1], f"{times[sampler]:.2f}s"))
    table(rows, ("sampler", "steps", "seq_len", "network calls", "time"))
    print(f"speedup of ddpm_cache over ddpm: {times['ddpm'] / times['ddpm_cache']:.2f}x")


# ----------------------------------------------------------------------------------------------
# Training throughput: MDLM vs the same backbone as an autoregressive model


def bench_throughput(argv):
    import mdlm
    ap = argparse.ArgumentParser(prog="bench.py throughput")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    a, rest = ap.parse_known_args(argv)
    _, cfg, _ = common.parse_args(mdlm.Config, ["--train"] + rest)  # same size, batch, context as mdlm.py
    device = common.get_device(cfg)
    V = 65
    x0 = torch.randint(V, (cfg.batch_size, cfg.block_size), device=device)

    diff = mdlm.build_model(cfg, {"vocab_size": V}).to(device)
    ar_backbone = common.Transformer(V, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout, causal=True)
    ar = torch.nn.ModuleDict({"backbone": ar_backbone, "head": torch.nn.Linear(cfg.n_embd, V, bias=False)}).to(device)

    def ar_loss(x):  # next-token cross-entropy on the causal backbone
        logits = ar["head"](ar["backbone"](x[:, :-1])).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))

    def steps(model, loss):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            for _ in range(a.iters):
                with common.autocast(device):
                    l = loss(x0)
                l.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return run

    tokens = a.iters * cfg.batch_size * cfg.block_size
    t_mdlm = timeit(steps(diff, lambda x: mdlm.loss_fn(diff, x, cfg, diff.mask_id)), repeat=a.repeat)
    t_ar = timeit(steps(ar, ar_loss), repeat=a.repeat)
    table([("mdlm", f"{tokens / t_mdlm / 1e3:.1f}k"), ("ar (causal)", f"{tokens / t_ar / 1e3:.1f}k")],
          ("model", "train tok/s"))
    print(f"n_layer={cfg.n_layer} n_embd={cfg.n_embd} block_size={cfg.block_size} batch_size={cfg.batch_size} on {device}")
    print(f"mdlm / ar throughput: {t_ar / t_mdlm:.3f}")


# ----------------------------------------------------------------------------------------------
# SEDD: analytic (Tweedie) vs Euler tau-leaping


def bench_sedd(argv):
    import sedd
    ap = argparse.ArgumentParser(prog="bench.py sedd")
    ap.add_argument("--ckpt_dir", default="out/sedd", help="out dir of a trained sedd.py model")
    ap.add_argument("--steps", default="16,64,256", help="comma-separated step counts")
    ap.add_argument("--num_samples", type=int, default=16)
    ap.add_argument("--t_samples", type=int, default=32, help="time samples per generated sequence for its ELBO")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args(argv)
    cfg, model, _, _, _ = sedd.load({"out_dir": a.ckpt_dir})
    device = next(model.parameters()).device
    fixed = torch.full((cfg.block_size,), -1, dtype=torch.long)
    rows = []
    for steps in [int(s) for s in a.steps.split(",")]:
        for sampler in sedd.SAMPLERS:
            c = dataclasses.replace(cfg, sampler=sampler, steps=steps)
            torch.manual_seed(0)
            out = {}
            t = timeit(lambda: out.update(x=sedd.generate(model, c, fixed, a.num_samples)[0]), repeat=a.repeat, warmup=0)
            x = out["x"]
            # the samples' NLL under the model's own ELBO (nats per token), with many times per sequence
            torch.manual_seed(1)
            xs = x.repeat(a.t_samples, 1)
            with torch.no_grad(), common.autocast(device):
                ts = common.sample_times(xs.shape[0], cfg.t_min, device)
                nll = float(sedd.nelbo_terms(model, xs, ts, cfg, model.num_states).sum()) / xs.numel() \
                    + sedd.prior_kl(cfg, model.num_states)
            counts = torch.bincount(x.flatten(), minlength=model.num_states).double()
            p = counts[counts > 0] / counts.sum()
            rows.append((sampler, steps, f"{t:.2f}", f"{nll:.3f}", f"{float(-(p * p.log()).sum()):.3f}"))
    table(rows, ("sampler", "steps", "time s", "ELBO nats/tok", "unigram entropy"))
    print(f"{a.num_samples} samples of {cfg.block_size} tokens, {cfg.graph} graph, {sedd.schedule_kind(cfg)} schedule, "
          f"on {device}; ELBO with {a.t_samples} time samples per sequence (lower is better)")


# ----------------------------------------------------------------------------------------------
# Fused kernels (csrc/) against their PyTorch oracles in sedd.py and mdlm.py


def _kernels_on(name):
    """--device (auto: cuda when there is one) -> (device, the compiled ops), or a one-line exit."""
    device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    k = kernels.load()
    if not kernels.available(device):
        common.die(f"the difflm kernels are not available on {device} (build failed, or DIFFLM_KERNELS=0)")
    return device, k


def _sizes(text, form):
    """--sizes "a,b,c;a,b,c" -> [(a, b, c), ...], or a one-line exit naming the form."""
    try:
        sizes = [tuple(int(v) for v in s.split(",")) for s in text.split(";")]
        assert all(len(s) == 3 for s in sizes)
    except (ValueError, AssertionError):
        common.die(f"--sizes={text!r}: use {form};{form}")
    return sizes


def _peak_extra_bytes(fn, device):
    """Peak bytes allocated by fn() above what was live before it (its output included).

    CUDA: the caching allocator's peak counter. CPU: torch's profiler (profile_memory=True) records
    the bytes each op allocates net of its own frees, and frees outside ops as [memory] events;
    replaying them in time order (an op's bytes at its start) gives the peak of live bytes. Only
    torch tensors are counted (the kernels' per-thread scratch rows, <= 8 N bytes per thread, are
    not), which is the memory this benchmark is about.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _copy_bandwidth(device, nbytes=1 << 30):
    """Measured device-to-same-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeat=10, warmup=2)
    return 2 * nbytes / t


def bench_kernels(argv):
    import mdlm
    import sedd
    ap = argparse.ArgumentParser(prog="bench.py kernels")
    ap.add_argument("--sizes", default="", help="B,L,V;B,L,V... (default CPU: 32,256,66;4,256,50258; "
                                                 "GPU: 32,256,66;4,256,50258;64,1024,50258)")
    ap.add_argument("--dtype", default="", help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--ops", default="score_entropy,euler,tweedie,mdlm")
    ap.add_argument("--graphs", default="absorb,uniform")
    ap.add_argument("--no_compile", action="store_true", help="skip torch.compile(oracle)")
    ap.add_argument("--no_eager", action="store_true", help="skip the eager oracle (e.g. where it runs out of memory)")
    ap.add_argument("--repeat", type=int, default=0, help="runs per median (0: as many as fit in ~0.5 s, 5-100)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    device, k = _kernels_on(a.device)
    # torch.compile reports each graph break with a warning and a traceback; the absorbing oracle has one
    # by design, said once under the table instead of pages of log in the middle of it
    torch._logging.set_logs(dynamo=logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    dtype = {"": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}.get(a.dtype)
    if dtype is None:
        common.die(f"--dtype={a.dtype!r}: use float32 or bfloat16")
    sizes = _sizes(a.sizes or "32,256,66;4,256,50258" + (";64,1024,50258" if device.type == "cuda" else ""), "B,L,V")
    bw = _copy_bandwidth(device) if device.type == "cuda" else None
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []

    def measure(name, graph, size, make, oracle, kernel, floor_bytes):
        """make() -> args; oracle(*args), kernel(*args) each return a tensor."""
        B, L, V = size
        args = make()
        t_k = timeit(lambda: kernel(*args), repeat=a.repeat)
        m_k = _peak_extra_bytes(lambda: kernel(*args), device)
        t_e = m_e = t_c = None
        if not a.no_eager:
            t_e = timeit(lambda: oracle(*args), repeat=a.repeat)
            m_e = _peak_extra_bytes(lambda: oracle(*args), device)
        if not a.no_compile:
            try:
                compiled = torch.compile(oracle, dynamic=False)
                t_c = timeit(lambda: compiled(*args), repeat=a.repeat, warmup=2)
            except Exception as e:  # a compiler failure is a result too; say so and go on
                print(f"  torch.compile({name}, {graph}) failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        grad_bytes = B * L * args[0].shape[-1] * args[0].element_size()
        fmt = lambda t: f"{t * 1e3:.2f}" if t else "-"  # noqa: E731
        ratio = lambda t: f"{t / t_k:.1f}x" if t else "-"  # noqa: E731
        mem = lambda m: f"{m / grad_bytes:.2f}" if m is not None else "-"  # noqa: E731
        row = [name, graph, f"{B},{L},{V}", fmt(t_e), fmt(t_c), fmt(t_k), ratio(t_e), ratio(t_c), mem(m_e), mem(m_k)]
        if bw:
            row += [f"{floor_bytes / t_k / 1e9:.0f}", f"{100 * floor_bytes / bw / t_k:.0f}%"]
        rows.append(row)
        print("  " + "  ".join(row), flush=True)
        del args

    for size in sizes:
        B, L, V = size
        for graph in a.graphs.split(","):
            N = V + 1 if graph == "absorb" else V
            elt = torch.finfo(dtype).bits // 8

            def states():
                if graph == "absorb":  # half the positions masked
                    x0 = torch.randint(V, (B, L), generator=gen, device=device)
                    return torch.where(torch.rand(B, L, generator=gen, device=device) < 0.5, N - 1, x0), x0
                xt = torch.randint(N, (B, L), generator=gen, device=device)
                return xt, torch.where(torch.rand(B, L, generator=gen, device=device) < 0.5, xt,
                                       torch.randint(N, (B, L), generator=gen, device=device))

            def scores(calibrated):
                h = torch.randn(B, L, N, generator=gen, device=device)
                if calibrated:  # sum_y s_y ~ 1 (t ~ 0.5): realistic move probabilities
                    h -= math.log(N) + 0.5
                return h.to(dtype)

            if "score_entropy" in a.ops:
                def make_se():
                    xt, x0 = states()
                    ls = scores(False).requires_grad_()
                    sb = torch.rand(B, generator=gen, device=device) * 3 + 0.05
                    w = torch.rand(B, generator=gen, device=device)[:, None]  # sigma(t) / B per sequence
                    return ls, xt, x0, sb, w

                def fwd_bwd(fn):
                    def run(ls, xt, x0, sb, w):
                        return torch.autograd.grad((fn(ls, xt, x0, sb, graph) * w).sum(), ls)[0]
                    return run
                measure("score_entropy fwd+bwd", graph, size, make_se, fwd_bwd(sedd.score_entropy.oracle),
                        fwd_bwd(sedd.score_entropy.kernel), 2 * B * L * N * elt)

            def make_step(p):
                def make():
                    xt, _ = states()
                    return (scores(True), xt, torch.full((B,), p, dtype=torch.float64, device=device),
                            torch.rand(B, L, 2, generator=gen, dtype=torch.float64, device=device))
                return make
            with torch.no_grad():
                if "euler" in a.ops:
                    measure("euler step", graph, size, make_step(0.015),
                            lambda ls, xt, t, u: sedd.euler_step.oracle(ls, xt, t, u, graph),
                            lambda ls, xt, t, u: k.sedd_euler_step(ls, xt, t, u, graph), B * L * N * elt)
                if "tweedie" in a.ops:
                    measure("tweedie step", graph, size, make_step(0.015),
                            lambda ls, xt, t, u: sedd.tweedie_step.oracle(ls, xt, t, u, graph),
                            lambda ls, xt, t, u: k.sedd_tweedie_step(ls, xt, t, u, graph, False), B * L * N * elt)
                if "mdlm" in a.ops and graph == "absorb":
                    measure("mdlm ancestral step", graph, size, make_step(0.0156),
                            lambda lg, xt, p, u: mdlm.ancestral_step.oracle(lg, xt, p, u, N - 1),
                            lambda lg, xt, p, u: k.mdlm_ancestral_step(lg, xt, p, u, N - 1), B * L * N * elt)

    header = ["op", "graph", "B,L,V", "eager ms", "compile ms", "kernel ms", "eager/kernel", "compile/kernel",
              "peak eager", "peak kernel"]
    if bw:
        header += ["kernel GB/s", "of floor"]
    print()
    table(rows, header)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{dtype} on {where}; medians of {a.repeat or '5-100'} runs; peak = extra memory in units of one B x L x N "
          f"tensor of the input dtype (the gradient), output included")
    print("steps: half the absorbing positions masked, scores calibrated to sum ~1 (t ~ 0.5), sigma dt = "
          "dsigma = 0.015, MDLM p_unmask = 0.0156 (a 128-step chain at t ~ 0.5)")
    if not a.no_compile and "score_entropy" in a.ops and "absorb" in a.graphs:
        print("compile: the absorbing score_entropy oracle copies out its masked rows (a data-dependent shape), "
              "so torch.compile runs it in pieces with a graph break there")
    if bw:
        print(f"copy bandwidth {bw / 1e9:.0f} GB/s; floor = one read of the scores (+ one write of the gradient "
              f"for score_entropy) at that bandwidth")


# ----------------------------------------------------------------------------------------------
# Every text method against the autoregressive baseline: bound, generative quality, sampling cost

# name -> (method file, its --train overrides); each trains at its own default CPU budget
METHODS = {
    "ar": ("ar", []),
    "mdlm": ("mdlm", []),
    "sedd": ("sedd", []),  # absorbing graph
    "sedd_uniform": ("sedd", ["--graph=uniform"]),
    "diffuser": ("diffuser", []),  # E2E, word level: no likelihood bound and no judge on its data
}
BOUND_KEYS = ("val_nll", "val_nelbo")


def train_log(out):
    """(median training tokens/s, training seconds) from a run's log.jsonl."""
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    tps = [r["tok_per_s"] for r in recs if "tok_per_s" in r and r["iter"] > 0]
    times = [r["time"] for r in recs if "time" in r and "eval_full" not in r]
    return (statistics.median(tps) if tps else None), (max(times) if times else None)


def methods_table(rows):
    """rows: dicts with method, tok_s, bits (None: no likelihood bound), steps, gen_nll, entropy,
    sec; a missing figure prints as a dash. Returns the table's text."""
    fmt = {"tok_s": lambda v: f"{v / 1e3:.1f}k", "bits": lambda v: f"{v:.3f}", "steps": str,
           "gen_nll": lambda v: f"{v:.3f}", "entropy": lambda v: f"{v:.3f}", "sec": lambda v: f"{v:.3f}"}
    header = ("method", "train tok/s", "val bound bits/char", "steps", "gen NLL nats/tok", "unigram H nats", "s/sample")
    out = [[r["method"]] + [fmt[k](r[k]) if r.get(k) is not None else "-" for k in fmt] for r in rows]
    widths = [max(len(str(x[i])) for x in out + [list(header)]) for i in range(len(header))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(x, widths)) for x in [list(header)] + out)


def break_even(points, t_ar):
    """points: [(steps, s/sample)] of one diffusion sampler -> the step count where it costs as much as
    the cached AR sampler, linearly interpolated; ("<", s0) / (">", s1) outside the measured range."""
    points = sorted(points)
    if points[0][1] >= t_ar:
        return ("<", points[0][0])
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if t0 < t_ar <= t1:
            return ("=", s0 + (s1 - s0) * (t_ar - t0) / (t1 - t0))
    return (">", points[-1][0])


def bench_methods(argv):
    ap = argparse.ArgumentParser(prog="bench.py methods", description="train (or reuse) every text method at its "
                                 "default CPU budget, then one table: train tok/s, validation bound, generative NLL "
                                 "under the AR judge and unigram entropy at several step counts, time per sample")
    ap.add_argument("--methods", default="ar,mdlm,sedd,sedd_uniform", help=f"comma-separated, from {','.join(METHODS)}")
    ap.add_argument("--out_root", default="out", help="checkpoints go to OUT_ROOT/<name>")
    ap.add_argument("--reuse", action="store_true", help="reuse OUT_ROOT/<name>/ckpt.pt where it exists")
    ap.add_argument("--steps", default="16,32,64,128,256", help="sampling step counts of the diffusion samplers")
    ap.add_argument("--num_samples", type=int, default=16)
    ap.add_argument("--judge", default="", help="default OUT_ROOT/ar/ckpt.pt")
    ap.add_argument("--train_args", default="", help="extra --key=value overrides for every training run (tests)")
    ap.add_argument("--plot", default="", help="write quality and cost vs steps to this PNG")
    a = ap.parse_args(argv)
    names = [n for n in a.methods.split(",") if n]
    bad = [n for n in names if n not in METHODS]
    if bad:
        common.die(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if "ar" in names:
        names.remove("ar")
        names.insert(0, "ar")  # the judge first
    judge = a.judge or os.path.join(a.out_root, "ar", "ckpt.pt")
    steps_list = [int(s) for s in a.steps.split(",")]
    rows, curves, t0_all = [], {}, time.time()
    for name in names:
        module, extra = METHODS[name]
        out = os.path.join(a.out_root, name)
        if not (a.reuse and os.path.isfile(os.path.join(out, "ckpt.pt"))):
            print(f"[{name}] training: python {module}.py --train --out_dir={out} {' '.join(extra)} {a.train_args}", flush=True)
            os.makedirs(out, exist_ok=True)
            if os.path.isfile(os.path.join(out, "log.jsonl")):
                os.remove(os.path.join(out, "log.jsonl"))  # tok/s from this run only
            with open(os.path.join(out, "train.out"), "w") as f:
                r = subprocess.run([sys.executable, os.path.join(common.ROOT, module + ".py"), "--train",
                                    f"--out_dir={out}"] + extra + a.train_args.split(), stdout=f, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                common.die(f"training {name} failed; see {out}/train.out")
        tok_s, train_s = train_log(out)
        print(f"[{name}] trained: {tok_s or 0:.0f} tok/s, {train_s or 0:.0f} s of training", flush=True)
        if module == "diffuser":  # no bound; its data (E2E) has no autoregressive judge here
            rows.append({"method": name, "tok_s": tok_s})
            continue
        mod = importlib.import_module(module)
        cfg, model, tok, meta, _ = common.load_for_inference(mod.Config, {"out_dir": out}, module, mod.build_model)
        cfg = dataclasses.replace(cfg, data_dir=cfg.data_dir or common.data_path(cfg))
        with torch.no_grad(), common.autocast(next(model.parameters()).device):
            torch.manual_seed(cfg.seed)
            stats = mod.evaluate(model, common.Batches(cfg, meta, cfg.seed), cfg, full=True)
        bits = stats["val_bits"] if any(k in stats for k in BOUND_KEYS) else None
        L = cfg.block_size
        with torch.no_grad():  # warm-up: kernel loading and first-call allocations stay out of the timings
            if module == "ar":
                mod.generate(model, cfg, torch.zeros(0, dtype=torch.long), 1, 4)
            else:
                mod.generate(model, dataclasses.replace(cfg, steps=2), torch.full((L,), -1, dtype=torch.long), 1)
        if module == "ar":
            torch.manual_seed(0)
            g = common.generative_eval(judge, lambda n: mod.generate(model, cfg, torch.zeros(0, dtype=torch.long), n, L)[0],
                                       a.num_samples, meta, "ar, cached sampler")
            rows.append({"method": name, "tok_s": tok_s, "bits": bits, "steps": L, "gen_nll": g["gen_nll"],
                         "entropy": g["gen_entropy"], "sec": g["sec_per_sample"]})
            curves[name] = [(L, g["gen_nll"], g["sec_per_sample"])]
            # the reference: the judge on real validation windows
            data = next(common.Batches(cfg, meta, cfg.seed).sequential("val", a.num_samples))
            j, _ = common.load_judge(judge, meta)
            rows.append({"method": "data (val)", "steps": None, "gen_nll": common.judge_nll(j, data),
                         "entropy": common.unigram_entropy(data)})
            print(methods_table(rows), flush=True)
            continue
        free = torch.full((L,), -1, dtype=torch.long)
        curves[name] = []
        for i, s in enumerate(steps_list):
            c = dataclasses.replace(cfg, steps=s)
            torch.manual_seed(0)
            g = common.generative_eval(judge, lambda n: mod.generate(model, c, free, n)[0], a.num_samples, meta,
                                       f"{name}, {s} steps")
            rows.append({"method": name, "tok_s": tok_s if i == 0 else None, "bits": bits if i == 0 else None,
                         "steps": s, "gen_nll": g["gen_nll"], "entropy": g["gen_entropy"], "sec": g["sec_per_sample"]})
            curves[name].append((s, g["gen_nll"], g["sec_per_sample"]))
        print(methods_table(rows), flush=True)  # the table so far, in case a later method is interrupted
    print()
    print(methods_table(rows))
    print(f"{a.num_samples} samples per row, one block each; bound: exact NLL for ar, the NELBO/ELBO for the "
          f"diffusion methods (bits per token = bits per char here); gen NLL under the judge {judge}; "
          f"wall time per sample from a batch of {a.num_samples}; total {fmt_s(time.time() - t0_all)}")
    if "ar" in curves:
        t_ar = curves["ar"][0][2]
        be_rows = []
        for name, pts in curves.items():
            if name == "ar":
                continue
            kind, s = break_even([(p[0], p[2]) for p in pts], t_ar)
            near = min(pts, key=lambda p: abs(p[0] - s))
            be_rows.append((name, f"{t_ar:.3f}", {"<": f"< {s}", ">": f"> {s}", "=": f"{s:.0f}"}[kind],
                            f"{near[1]:.3f} @ {near[0]}"))
        if be_rows:
            print("\nbreak-even: below this many steps the diffusion sampler is faster per sample than the cached AR sampler")
            table(be_rows, ("method", "ar s/sample", "break-even steps", "gen NLL at the nearest measured steps"))
    json_path = os.path.join(a.out_root, "methods.json")
    with open(json_path, "w") as f:
        json.dump({"rows": rows, "curves": curves, "judge": judge, "num_samples": a.num_samples}, f, indent=1)
    print(f"results: {json_path}")
    if a.plot:
        plot_methods(curves, rows, a.plot)


def fmt_s(s):
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


def plot_methods(curves, rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        common.die("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in curves.items():
        s, nll, sec = zip(*pts)
        if name == "ar":
            ax1.axhline(nll[0], color="k", ls="--", label=f"ar (cached, {s[0]} tokens)")
            ax2.axhline(sec[0], color="k", ls="--", label="ar (cached)")
        else:
            ax1.plot(s, nll, "o-", label=name)
            ax2.plot(s, sec, "o-", label=name)
    ref = [r for r in rows if r["method"] == "data (val)"]
    if ref:
        ax1.axhline(ref[0]["gen_nll"], color="gray", ls=":", label="validation text")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.legend(fontsize=8)
    ax1.set_ylabel("NLL of samples under the AR judge (nats/token)")
    ax2.set_ylabel("wall time per sample (s)")
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------
# Diffusion-LM's clamp: the fused nearest-embedding kernel against the PyTorch expression


def bench_nearest(argv):
    import diffusion_lm
    ap = argparse.ArgumentParser(prog="bench.py nearest")
    ap.add_argument("--sizes", default="", help="N,d,V;N,d,V... (default: 8192,16,821;8192,128,50257, "
                                                 "plus 8192,256,50257 on GPU)")
    ap.add_argument("--metrics", default="cos,l2")
    ap.add_argument("--no_compile", action="store_true", help="skip torch.compile(expression)")
    ap.add_argument("--repeat", type=int, default=0, help="runs per median (0: as many as fit in ~0.5 s, 5-100)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    device, k = _kernels_on(a.device)
    sizes = _sizes(a.sizes or "8192,16,821;8192,128,50257" + (";8192,256,50257" if device.type == "cuda" else ""),
                   "N,d,V")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for N, d, V in sizes:
        x = torch.randn(N, d, generator=gen, device=device)
        E = torch.randn(V, d, generator=gen, device=device)
        for metric in a.metrics.split(","):
            expr = lambda x, E: diffusion_lm.nearest_embedding.oracle(x, E, metric)  # noqa: E731
            kern = lambda x, E: k.nearest_embedding(x, E, metric)  # noqa: E731
            ref, got = expr(x, E), kern(x, E)
            agree = float((ref == got).float().mean())  # check before timing (near-ties may differ)
            t_e = timeit(lambda: expr(x, E), repeat=a.repeat)
            t_k = timeit(lambda: kern(x, E), repeat=a.repeat)
            m_e = _peak_extra_bytes(lambda: expr(x, E), device)
            m_k = _peak_extra_bytes(lambda: kern(x, E), device)
            t_c = None
            if not a.no_compile:
                try:
                    compiled = torch.compile(expr, dynamic=False)
                    t_c = timeit(lambda: compiled(x, E), repeat=a.repeat, warmup=2)
                except Exception as e:
                    print(f"  torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
            row = [metric, f"{N},{d},{V}", f"{t_e * 1e3:.2f}", f"{t_c * 1e3:.2f}" if t_c else "-", f"{t_k * 1e3:.2f}",
                   f"{t_e / t_k:.1f}x", f"{t_c / t_k:.1f}x" if t_c else "-", mib(m_e), mib(m_k),
                   mib(N * 8 + (V * d + V) * 4), f"{100 * agree:.2f}%"]
            rows.append(row)
            print("  " + "  ".join(row), flush=True)
    print()
    table(rows, ["metric", "N,d,V", "eager ms", "compile ms", "kernel ms", "eager/kernel", "compile/kernel",
                 "peak eager MiB", "peak kernel MiB", "N+Vd MiB", "same ids"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"float32 on {where}; medians of {a.repeat or '5-100'} runs; eager = argmax(normalize(x) @ normalize(E).T) "
          "(l2: argmax(x @ E.T - |E|^2 / 2)); peak = extra memory allocated during the call, output included; "
          "N+Vd = ids (int64) + one table copy + its bias; same ids: agreement with eager (fp32 near-ties may differ)")


# ----------------------------------------------------------------------------------------------

BENCHES = {
    "methods": bench_methods,
    "mdlm_sampler": bench_mdlm_sampler,
    "throughput": bench_throughput,
    "kernels": bench_kernels,
    "sedd": bench_sedd,
    "nearest": bench_nearest,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        common.die(f"usage: python bench.py <{'|'.join(BENCHES)}> [options]")
    BENCHES[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
