"""
bench.py: benchmarks. Each prints ratios against a baseline measured in the same run, never
absolute claims from another machine.

    python bench.py mdlm_sampler      # cached vs uncached MDLM sampler: time and network calls
    python bench.py sample_speed      # time per sample and backbone rows: MDLM ddpm, ddpm_cache, AR
    python bench.py throughput        # MDLM vs the same backbone trained autoregressively
    python bench.py train_speed       # ar.py and mdlm.py training tok/s and peak memory vs a plain nanoGPT-style step
                                      # (--nanogpt=DIR: and nanoGPT's own GPT from a checkout)
    python bench.py sedd --ckpt_dir=out/sedd   # SEDD's samplers by step count: time, NLL, entropy
    python bench.py kernels           # fused kernels vs eager and torch.compile'd PyTorch oracles
    python bench.py nearest           # Diffusion-LM's clamp kernel vs the PyTorch expression (time, memory)
    python bench.py rotary            # the backbone's rotary kernel vs its PyTorch expression, forward and back
    python bench.py token_nll         # the heads' cross-entropy vs F.cross_entropy on fp32 logits: time, memory
    python bench.py methods --plot=docs/methods.png   # every text method vs the AR baseline (~40 min on 2 cores)
    python bench.py gpu --out=gpu_report   # validate a GPU in one call (on a CPU: a dry run of what can run)
    python bench.py <name> --help     # the options of one benchmark

Timings are medians of repeated runs after a warm-up (for a sampler: a two-step chain, untimed), with
glibc told to keep freed memory (see steady_allocator).
"""

import contextlib
import ctypes
import dataclasses
import importlib.util
import io
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
import torch.nn.functional as F

import common
import corpus
import trainer


def steady_allocator():
    """glibc hands freed blocks of more than about 128 KiB back to the OS and page-faults them in again
    at the next call, until its thresholds have grown past the sizes it has seen freed: whichever of a
    kernel and its PyTorch version runs first pays for that, several times its own cost on a small op.
    Keeping freed blocks up to 32 MiB (glibc's largest threshold) makes both meet the same warm
    allocator, as a long run's does. Elsewhere than glibc, nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: heap, not mmap, for blocks up to 32 MiB


def measure(fn, repeat=5, warmup=1, memory_on=None):
    """fn() measured: (median wall time in seconds, peak bytes or None). Every benchmark times through here.

    Time: `warmup` calls, then `repeat` timed calls (CUDA-synchronised when a GPU is in use); repeat=0:
    as many as fit in about half a second, between 5 and 100 (small ops are noisy). Memory, with
    memory_on=device: the bytes one more call allocates above what was live before it, output included.
    """
    gpus = range(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    sync = lambda: [torch.cuda.synchronize(d) for d in gpus]  # every GPU: fn may run on cuda:1 (--device)
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
    return statistics.median(times), (_peak_extra_bytes(fn, memory_on) if memory_on is not None else None)


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
    ap = common.ArgumentParser(prog="bench.py mdlm_sampler")
    ap.add_argument("--ckpt_dir", default="", help="out dir of a trained model (default: an untrained one)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    common.check_at_least(a, ("steps", "seq_len", "num_samples", "repeat"), 1)
    if a.ckpt_dir:
        cfg, model, _, _, _ = trainer.load_for_inference(mdlm.Config, {"out_dir": a.ckpt_dir}, "mdlm", mdlm.build_model)
    else:
        cfg = mdlm.Config(block_size=a.seq_len)
        model = mdlm.build_model(cfg, {"vocab_size": 65}).eval().to(common.get_device(cfg))  # as a checkpoint loads
        torch.nn.init.normal_(model.head.weight, std=0.02)  # not the zero init: a realistic, peaked output
    if a.seq_len > cfg.block_size:
        common.die(f"--seq_len={a.seq_len} exceeds the model's block_size={cfg.block_size}")
    rows, times = [], {}
    for sampler in ("ddpm", "ddpm_cache"):
        c = dataclasses.replace(cfg, sampler=sampler, steps=a.steps)
        fixed = torch.full((a.seq_len,), -1, dtype=torch.long)
        calls = []
        mdlm.generate(model, dataclasses.replace(c, steps=2), fixed, a.num_samples)  # warm-up, untimed

        def run():
            torch.manual_seed(0)
            calls.append(mdlm.generate(model, c, fixed, a.num_samples)[1])
        times[sampler] = measure(run, repeat=a.repeat, warmup=0)[0]
        rows.append((sampler, a.steps, a.seq_len, calls[-1], f"{times[sampler]:.2f}s"))
    table(rows, ("sampler", "steps", "seq_len", "network calls", "time"))
    print(f"speedup of ddpm_cache over ddpm: {times['ddpm'] / times['ddpm_cache']:.2f}x")


# ----------------------------------------------------------------------------------------------
# Sampling speed: MDLM's uncached ddpm, its per-sequence cache (ddpm_cache), AR's key/value cache


def count_rows(model):
    """A counter of the positions the backbone evaluates (sequences x positions per call): rows[0]."""
    rows = [0]
    model.backbone.register_forward_pre_hook(lambda m, args: rows.__setitem__(0, rows[0] + args[0].shape[0] * args[0].shape[1]))
    return rows


def bench_sample_speed(argv):
    import ar
    import mdlm
    ap = common.ArgumentParser(prog="bench.py sample_speed")
    ap.add_argument("--vocab", type=int, default=65, help="vocabulary size (65: Shakespeare characters, 50257: GPT-2)")
    ap.add_argument("--seq_len", type=int, default=128, help="sample length = the models' block_size")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--samplers", default="ddpm,ddpm_cache,ar")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    samplers, batches = _choices(a.samplers, "samplers", ("ddpm", "ddpm_cache", "ar")), _ints(a.batches, "batches")
    common.check_at_least(a, ("vocab", "seq_len", "steps", "repeat"), 1)
    torch.manual_seed(0)  # untrained models (same shapes as the defaults); a head that is not the zero init
    device = common.get_device(mdlm.Config())  # where --sample would run them
    models = {"mdlm": mdlm.build_model(mdlm.Config(block_size=a.seq_len), {"vocab_size": a.vocab}).eval().to(device),
              "ar": ar.build_model(ar.Config(block_size=a.seq_len), {"vocab_size": a.vocab}).eval().to(device)}
    for m in models.values():
        torch.nn.init.normal_(m.head.weight, std=0.02)
    rows, per = [], {}
    for batch in batches:
        for sampler in samplers:
            model = models["ar" if sampler == "ar" else "mdlm"]
            counter, times = count_rows(model), []
            c = mdlm.Config(block_size=a.seq_len, sampler=sampler, steps=a.steps)
            with torch.no_grad():  # warm-up, untimed: first-call allocations and kernel loading
                if sampler == "ar":
                    ar.generate(model, ar.Config(), torch.zeros(0, dtype=torch.long), 1, 4)
                else:
                    mdlm.generate(model, dataclasses.replace(c, steps=2), torch.full((a.seq_len,), -1), 1)
            for _ in range(a.repeat):
                torch.manual_seed(0)  # the same uniforms each run: ddpm and ddpm_cache must agree
                counter[0], t0 = 0, time.perf_counter()
                if sampler == "ar":
                    x, calls = ar.generate(model, ar.Config(), torch.zeros(0, dtype=torch.long), batch, a.seq_len)
                else:
                    x, calls = mdlm.generate(model, c, torch.full((a.seq_len,), -1), batch)
                if device.type == "cuda":  # ar.py's sampler never reads back: its last steps are still queued
                    torch.cuda.synchronize(device)
                times.append((time.perf_counter() - t0) / batch)
            per[sampler, batch] = statistics.median(times), x
            rows.append((sampler, batch, f"{1e3 * per[sampler, batch][0]:.1f}", f"{1e3 * min(times):.1f}-{1e3 * max(times):.1f}",
                         calls, counter[0] // batch))
    table(rows, ("sampler", "batch", f"ms/sample on {device.type} (median)", f"range of {a.repeat}", "network calls",
                 "rows/sample"))
    for batch in batches:
        if ("ddpm", batch) in per and ("ddpm_cache", batch) in per:
            same = torch.equal(per["ddpm", batch][1], per["ddpm_cache", batch][1])
            print(f"batch {batch}: ddpm_cache {per['ddpm', batch][0] / per['ddpm_cache', batch][0]:.2f}x faster "
                  f"than ddpm per sample; identical samples: {same}")


# ----------------------------------------------------------------------------------------------
# Training throughput: MDLM vs the same backbone as an autoregressive model


def step_config(prog, method, rest, uses):
    """--key=value settings of the model for a timing of training steps on random tokens -> the method's
    checked config. A verb, or a key the timing does not read (data, schedule, output, sampling, evaluation;
    only the device, the seed and `uses` of the run's keys count), is refused in one line."""
    unread = ({f.name for f in dataclasses.fields(common.BaseConfig)} | {"data_dir", "dataset", *common.READ_BY}
              | {*getattr(method.Config, "READ_BY", {}), "train_classifier", *common.VERBS}) - uses
    unread -= {"device", "seed", "dropout", "t_min"}  # where it runs, its draws, the model's and the loss's settings
    given = [arg[2:].partition("=")[0].replace("-", "_") for arg in rest if arg.startswith("--")]
    if any(k in unread for k in given):
        common.die(f"bench.py {prog} times training steps on random tokens and does not use "
                   f"--{', --'.join(k for k in given if k in unread)}; drop it")
    _, cfg, _ = common.parse_args(method.Config, ["--train"] + rest)
    method.check_config(cfg)
    return cfg


def bench_throughput(argv):
    import mdlm
    ap = common.ArgumentParser(prog="bench.py throughput")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    a, rest = ap.parse_known_args(argv)
    common.check_at_least(a, ("iters", "repeat"), 1)
    cfg = step_config("throughput", mdlm, rest, {"batch_size"})  # same size, batch, context as mdlm.py
    device = common.get_device(cfg)
    V = 65
    x0 = torch.randint(V, (cfg.batch_size, cfg.block_size), device=device)

    diff = mdlm.build_model(cfg, {"vocab_size": V}).to(device)
    ar_backbone = common.Transformer(V + 1, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout, causal=True)
    causal = torch.nn.ModuleDict({"backbone": ar_backbone, "head": torch.nn.Linear(cfg.n_embd, V, bias=False)}).to(device)

    def ar_loss(x):  # next-token cross-entropy on the causal backbone at all L positions, BOS (id V) shifted in as in ar.py
        logits = causal["head"](causal["backbone"](torch.cat([torch.full_like(x[:, :1], V), x[:, :-1]], 1)))
        return common.token_nll(logits.flatten(0, 1), x.flatten()).mean()

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
    t_mdlm = measure(steps(diff, lambda x: mdlm.loss_fn(diff, x, cfg, diff.mask_id)), repeat=a.repeat)[0]
    t_ar = measure(steps(causal, ar_loss), repeat=a.repeat)[0]
    table([("mdlm", f"{tokens / t_mdlm / 1e3:.1f}k"), ("ar (causal)", f"{tokens / t_ar / 1e3:.1f}k")],
          ("model", "train tok/s"))
    print(f"n_layer={cfg.n_layer} n_embd={cfg.n_embd} block_size={cfg.block_size} batch_size={cfg.batch_size} on {device}")
    print(f"mdlm / ar throughput: {t_ar / t_mdlm:.3f}")


# ----------------------------------------------------------------------------------------------
# Training speed: ar.py and mdlm.py steps (the trainer's step) against a plain nanoGPT-style step


def _spread(xs):
    """median [min-max] of a list of rates, formatted"""
    return f"{statistics.median(xs):.0f} [{min(xs):.0f}-{max(xs):.0f}]"


def _update(loss, model, opt, clip):
    """The end of every step kind below: backward, the gradient clipped to norm clip, one AdamW step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _trainer_step(model, loss, cfg):
    """One step as trainer.py takes it: loss, backward, clipping, its AdamW, EMA."""
    import copy
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = trainer.make_optimizer(model, cfg, next(model.parameters()).device)
    it = [0]

    def step(x0):
        _update(loss(model, x0), model, opt, cfg.grad_clip)
        trainer.ema_update(ema, model, cfg.ema, it[0])
        it[0] += 1
    return step


def _without_kernels(step):
    """step with every fused op's PyTorch oracle in its place (the rotary positions, in these steps)."""
    import difflm_ops

    def run(x0):
        with difflm_ops.oracles_only():
            step(x0)
    return run


def _plain_step(model, cfg, transposed=False):
    """The reference: nanoGPT's loop written plainly on the same AR model, a cross-entropy over
    contiguous (B*L, V) rows (transposed: over the (B, V, L) view, the form the methods used to take),
    clipping and AdamW, no EMA."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    def step(x0):
        logits = model.head(model.backbone(x0[:, :-1]))  # (B, L - 1, V)
        if transposed:
            loss = F.cross_entropy(logits.transpose(1, 2), x0[:, 1:])
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0[:, 1:].reshape(-1))
        _update(loss, model, opt, cfg.grad_clip)
    return step


def _nanogpt_step(path, V, cfg, device):
    """karpathy/nanoGPT's GPT from a local checkout (not part of difflm), stepped as its train.py steps it:
    the model's own loss, clipping at 1.0, its configure_optimizers AdamW; the same size, fp32, no dropout."""
    if not os.path.isfile(os.path.join(path, "model.py")):
        common.die(f"--nanogpt={path} has no model.py; give a checkout of karpathy/nanoGPT")
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(path, "model.py"))
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        model = nano.GPT(nano.GPTConfig(block_size=cfg.block_size, vocab_size=V, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                        n_embd=cfg.n_embd, dropout=0.0, bias=False)).to(device)
        opt = model.configure_optimizers(0.1, cfg.lr, (cfg.beta1, cfg.beta2), device.type)

    def step(x0):
        _, loss = model(x0[:, :-1].contiguous(), x0[:, 1:].contiguous())
        _update(loss, model, opt, 1.0)
    return step


def bench_train_speed(argv):
    import ar
    import mdlm
    ap = common.ArgumentParser(prog="bench.py train_speed")
    ap.add_argument("--vocab", default="65,50257", help="vocabulary sizes, comma-separated")
    ap.add_argument("--iters", type=int, default=5, help="training steps per timed run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per step kind (at least 3)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--transposed", action="store_true", help="also time the reference over a (B, V, L) view")
    ap.add_argument("--nanogpt", default="", help="a karpathy/nanoGPT checkout: also time its GPT's step")
    a, rest = ap.parse_known_args(argv)
    common.check_at_least(a, ("iters", "batch_size"), 1)
    if a.repeat < 3:
        common.die("--repeat must be at least 3 (a spread needs three runs)")
    vocabs = _ints(a.vocab, "vocab")
    uses = {"batch_size", "lr", "beta1", "beta2", "weight_decay", "grad_clip", "ema"}  # the trainer's step reads these
    acfg, mcfg = (step_config("train_speed", m, [f"--batch_size={a.batch_size}"] + rest, uses) for m in (ar, mdlm))
    device = common.get_device(acfg)
    for V in vocabs:
        torch.manual_seed(0)
        x0 = torch.randint(V, (a.batch_size, acfg.block_size), device=device)
        ref_model = ar.build_model(acfg, {"vocab_size": V}).to(device)
        ar_model = ar.build_model(acfg, {"vocab_size": V}).to(device)
        m_model = mdlm.build_model(mcfg, {"vocab_size": V}).to(device)
        kinds = {"reference (plain, contiguous CE)": _plain_step(ref_model, acfg),
                 "ar.py": _trainer_step(ar_model, lambda m, x: ar.loss_fn(m, x, ar_model.bos_id), acfg),
                 "mdlm.py": _trainer_step(m_model, lambda m, x: mdlm.loss_fn(m, x, mcfg, m_model.mask_id), mcfg)}
        if a.transposed:
            kinds["reference over (B, V, L)"] = _plain_step(ar.build_model(acfg, {"vocab_size": V}).to(device), acfg, True)
        if a.nanogpt:
            kinds["nanoGPT (its model.py)"] = _nanogpt_step(a.nanogpt, V, acfg, device)
        plain_ar = ar.build_model(acfg, {"vocab_size": V}).to(device)
        kinds["ar.py, no kernels"] = _without_kernels(
            _trainer_step(plain_ar, lambda m, x: ar.loss_fn(m, x, plain_ar.bos_id), acfg))
        rates = {k: [] for k in kinds}
        for k, step in kinds.items():
            step(x0)  # warm-up
        for _ in range(a.repeat):  # interleaved, so a slow spell of a shared machine hits every kind
            for k, step in kinds.items():
                t = measure(lambda: [step(x0) for _ in range(a.iters)], repeat=1, warmup=0)[0]
                trained = acfg.block_size - 1 if k.startswith(("reference", "nanoGPT")) else acfg.block_size  # x[1:] from x[:-1]
                rates[k].append(a.iters * a.batch_size * trained / t)
        peaks = {k: _peak_extra_bytes(lambda: step(x0), device) for k, step in kinds.items()}  # one step each, untimed
        ref = rates["reference (plain, contiguous CE)"]
        rows = [(k, _spread(r), f"{statistics.median(r) / statistics.median(ref):.2f}x", f"{peaks[k] / 2**20:.0f}")
                for k, r in rates.items()]
        print(f"\nV = {V}, batch {a.batch_size}, L = {acfg.block_size}, {acfg.n_layer}x{acfg.n_embd} "
              f"({a.repeat} runs of {a.iters} steps, {device}, float32 without autocast, {torch.get_num_threads()} threads)")
        table(rows, ("step", "train tok/s median [min-max]", "vs reference", "peak MiB"))
        for name, other in (("mdlm.py", "ar.py"), ("ar.py", "nanoGPT (its model.py)"), ("ar.py", "ar.py, no kernels")):
            if other in rates:
                m, r = rates[name], rates[other]
                print(f"{name} / {other.split(' (')[0]}: {statistics.median(m) / statistics.median(r):.2f}x "
                      f"[{min(m) / max(r):.2f}-{max(m) / min(r):.2f}x]")


# ----------------------------------------------------------------------------------------------
# SEDD: analytic (Tweedie) vs Euler tau-leaping


def bench_sedd(argv):
    import sedd
    ap = common.ArgumentParser(prog="bench.py sedd")
    ap.add_argument("--ckpt_dir", default="out/sedd", help="out dir of a trained sedd.py model")
    ap.add_argument("--steps", default="16,64,256", help="comma-separated step counts")
    ap.add_argument("--num_samples", type=int, default=16)
    ap.add_argument("--t_samples", type=int, default=32, help="time samples per generated sequence for its ELBO")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args(argv)
    common.check_at_least(a, ("num_samples", "t_samples", "repeat"), 1)
    cfg, model, _, _, _ = sedd.load({"out_dir": a.ckpt_dir})
    device = next(model.parameters()).device
    fixed = torch.full((cfg.block_size,), -1, dtype=torch.long)
    rows = []
    for steps in common.progress(_ints(a.steps, "steps"), "step counts"):
        for sampler in sedd.SAMPLERS:
            c = dataclasses.replace(cfg, sampler=sampler, steps=steps)
            sedd.generate(model, dataclasses.replace(c, steps=2), fixed, a.num_samples)  # warm-up, untimed
            torch.manual_seed(0)
            out = {}
            t = measure(lambda: out.update(x=sedd.generate(model, c, fixed, a.num_samples)[0]), a.repeat, warmup=0)[0]
            x = out["x"]
            # the samples' NLL under the model's own NELBO (nats per token), with many times per sequence
            torch.manual_seed(1)
            xs = x.repeat(a.t_samples, 1)
            with torch.no_grad(), common.autocast(device):
                ts = common.sample_times(xs.shape[0], cfg.t_min, device)
                nll = float(sedd.nelbo_terms(model, xs, ts, cfg, model.num_states).sum()) / xs.numel() \
                    + sedd.prior_kl(cfg, model.num_states)
            rows.append((sampler, steps, f"{t:.2f}", f"{nll:.3f}", f"{trainer.unigram_entropy(x):.3f}"))
    table(rows, ("sampler", "steps", "time s", "NELBO nats/tok", "unigram entropy"))
    print(f"{a.num_samples} samples of {cfg.block_size} tokens, {cfg.graph} graph, {sedd.schedule_kind(cfg)} schedule, "
          f"on {device}; NELBO with {a.t_samples} time samples per sequence (lower is better)")


# ----------------------------------------------------------------------------------------------
# Fused kernels (csrc/) against their PyTorch oracles in sedd.py, mdlm.py and diffusion_lm.py


def kernel_ops(device):
    """The fused ops usable on device, by name, each called like its oracle; None when there are none
    (the build failed, or DIFFLM_KERNELS=0). The oracles are the marked functions' .oracle, the ops
    their .kernel."""
    import diffusion_lm
    import difflm_ops
    import mdlm
    import sedd
    difflm_ops.load()
    if not difflm_ops.available(device):
        return None
    return {"score_entropy": sedd.score_entropy.kernel,
            "euler_step": sedd.euler_step.kernel,
            "tweedie_step": lambda ls, xt, t, u, graph, shift=None: sedd.tweedie_step.kernel(ls, xt, t, u, graph, False,
                                                                                            shift),
            "ancestral_step": mdlm.ancestral_step.kernel,
            "nearest_embedding": diffusion_lm.nearest_embedding.kernel,
            "rotary": common.apply_rotary.kernel}


def _ops_or_die(device):
    ops = kernel_ops(device)
    if ops is None:
        common.die(f"the difflm kernels are not available on {device} (build failed, or DIFFLM_KERNELS=0)")
    return ops


def _timing_args(ap, argv):
    """The options every kernel timing shares, parsed -> (args, device); the caller checks its own options
    before _ops_or_die builds the kernels, so a bad one costs no build."""
    ap.add_argument("--no_compile", action="store_true", help="skip torch.compile of the PyTorch version")
    ap.add_argument("--repeat", type=int, default=0, help="runs per median (0: as many as fit in ~0.5 s, 5-100)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    if a.repeat < 0:
        common.die(f"--repeat={a.repeat}: give 0 (as many as fit in ~0.5 s) or a number of runs")
    device = common.get_device(dataclasses.replace(common.BaseConfig(), device=a.device))  # one line if unknown or absent
    return a, device


def _ints(text, flag):
    """--flag "a,b,c" -> [a, b, c], positive integers, or a one-line exit."""
    try:
        values = [int(v) for v in text.split(",")]
        assert values and min(values) >= 1
    except (ValueError, AssertionError):
        common.die(f"--{flag}={text!r}: give positive integers, comma-separated (e.g. 16,32)")
    return values


def _choices(text, flag, known):
    """--flag "a,b" -> [a, b], each one of known, or a one-line exit naming them."""
    names = [n for n in text.split(",") if n]
    if not names or any(n not in known for n in names):
        common.die(f"--{flag}={text!r}: choose from {','.join(known)}")
    return names


def _dtype(text, device):
    """--dtype "float32" | "bfloat16" -> the dtype; empty: bfloat16 on a GPU, float32 on a CPU; else a one-line exit."""
    dtype = {"": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}.get(text)
    if dtype is None:
        common.die(f"--dtype={text!r}: use float32 or bfloat16")
    return dtype


def _sizes(text, form):
    """--sizes "a,b,c;a,b,c" -> [(a, b, c), ...], or a one-line exit naming the form."""
    try:
        sizes = [tuple(int(v) for v in s.split(",")) for s in text.split(";")]
        assert all(len(s) == form.count(",") + 1 and min(s) >= 1 for s in sizes)
    except (ValueError, AssertionError):
        common.die(f"--sizes={text!r}: use {form};{form}, each a positive integer")
    return sizes


def _peak_extra_bytes(fn, device):
    """Peak bytes allocated by fn() above what was live before it (its output included).

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation timeline (each tensor's
    creation and destruction at its own time), replayed in order. Per-op memory figures would not do:
    an op's net bytes put at its start lose what a composite op (cross_entropy, a backward node)
    allocates and frees inside itself. Only torch tensors are counted (the kernels' per-thread
    scratch rows, <= 8 N bytes per thread, are not), which is the memory this benchmark is about.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's own start and stop lines would crowd the tables
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action  # the timeline's own names (export_memory_timeline reads it)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        out = fn()
        del out
    live = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def copy_bandwidth(device, nbytes=1 << 30):
    """Measured device-to-same-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / measure(lambda: dst.copy_(src), repeat=10, warmup=2)[0]


def versus(oracle, kernel, args, device, repeat=0, eager=True, compile=True):
    """The kernel against its eager and torch.compile'd oracle on the same args: seconds and peak bytes,
    {"kernel_s", "kernel_peak", "eager_s", "eager_peak", "compile_s"} (None where not run). compile: True,
    False, or a function asked before compiling (bench.py gpu's: whether its --budget is left)."""
    res = dict.fromkeys(("eager_s", "eager_peak", "compile_s"))
    res["kernel_s"], res["kernel_peak"] = measure(lambda: kernel(*args), repeat, memory_on=device)
    if eager:
        try:
            res["eager_s"], res["eager_peak"] = measure(lambda: oracle(*args), repeat, memory_on=device)
        except torch.OutOfMemoryError:  # a float64 oracle at the largest sizes: say so, time the rest
            print("  the eager oracle does not fit in this device's memory at this size")
            torch.cuda.empty_cache()
            compile = False  # the compiled oracle holds the same float64 intermediates
    if callable(compile) and not compile():  # a compile takes seconds to a minute; the timings above, milliseconds
        print("  torch.compile skipped: the --budget is spent")
        compile = False
    if compile:
        try:
            compiled = torch.compile(oracle, dynamic=False)
            res["compile_s"] = measure(lambda: compiled(*args), repeat, warmup=2)[0]
        except Exception as e:  # a compiler failure is a result too; say so and go on
            print(f"  torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    return res


def _ms(t):
    return f"{t * 1e3:.2f}" if t else "-"


def _ratio(t, t_k):
    return f"{t / t_k:.1f}x" if t else "-"


def score_states(graph, B, L, N, gen):
    """xt, x0 (B, L) on gen's device: absorbing, half the positions masked (MASK = N - 1); uniform, xt = x0
    about half the time."""
    device = gen.device
    if graph == "absorb":
        x0 = torch.randint(N - 1, (B, L), generator=gen, device=device)
        return torch.where(torch.rand(B, L, generator=gen, device=device) < 0.5, N - 1, x0), x0
    xt = torch.randint(N, (B, L), generator=gen, device=device)
    return xt, torch.where(torch.rand(B, L, generator=gen, device=device) < 0.5, xt,
                           torch.randint(N, (B, L), generator=gen, device=device))


def kernel_rows(device, ops, sizes, dtype, names, graphs, repeat=0, eager=True, compile=True, bw=None):
    """Each fused SEDD/MDLM op in names, for each size (B, L, V) and graph, against its oracle ->
    rows (dicts: the versus() figures, peaks in units of one B x L x N tensor of dtype, GB/s and the
    share of the bandwidth floor when bw is given); each row is printed as it is measured."""
    import mdlm
    import sedd
    # torch.compile reports each graph break with a warning and a traceback; the absorbing oracle has one
    # by design, said once under the table instead of pages of log in the middle of it
    torch._logging.set_logs(dynamo=logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for B, L, V in common.progress(sizes, "sizes"):
        for graph in graphs:
            N = V + 1 if graph == "absorb" else V
            elt = torch.finfo(dtype).bits // 8

            def scores(calibrated, shift=None):
                h = torch.randn(B, L, N, generator=gen, device=device)
                if calibrated:  # sum_y s_y ~ 1 (t ~ 0.5): realistic move probabilities
                    h -= math.log(N) + 0.5
                if shift is not None:
                    h += shift[:, None, None]
                return h.to(dtype)

            def step_args(p, sedd_step=True):  # as SEDD's sampler calls them: absorbing, the head's output and offset
                xt, _ = score_states(graph, B, L, N, gen)
                sb = torch.full((B,), 1.0, device=device)
                shift = sedd.absorb_offset(sb, N) if sedd_step and graph == "absorb" else None
                return (scores(True, shift), xt, torch.full((B,), p, dtype=torch.float64, device=device),
                        torch.rand(B, L, 2, generator=gen, dtype=torch.float64, device=device), shift)

            def fwd_bwd(fn):
                def run(ls, xt, x0, sb, shift, w):
                    return torch.autograd.grad((fn(ls, xt, x0, sb, graph, shift) * w).sum(), ls)[0]
                return run

            def run(name, make, oracle, kernel, floor_bytes, grad=False):
                args = make()
                with torch.set_grad_enabled(grad):
                    res = versus(oracle, kernel, args, device, repeat, eager, compile)
                del args
                unit = B * L * N * elt
                row = {"op": name, "graph": graph, "B,L,V": f"{B},{L},{V}", **res,
                       "eager_peak_units": res["eager_peak"] / unit if res["eager_peak"] is not None else None,
                       "kernel_peak_units": res["kernel_peak"] / unit}
                rows.append(_against_floor(row, floor_bytes, bw))
                print("  " + "  ".join(_kernel_cells(row, bw)), flush=True)

            if "score_entropy" in names:
                def make_se():  # as sedd.py's loss calls it: the head's output and, absorbing, its offset
                    xt, x0 = score_states(graph, B, L, N, gen)
                    ls = scores(False).requires_grad_()
                    sb = torch.rand(B, generator=gen, device=device) * 3 + 0.05
                    shift = sedd.absorb_offset(sb, N) if graph == "absorb" else None
                    w = torch.rand(B, generator=gen, device=device)[:, None]  # sigma(t) / B per sequence
                    return ls, xt, x0, sb, shift, w
                run("score_entropy fwd+bwd", make_se, fwd_bwd(sedd.score_entropy.oracle), fwd_bwd(ops["score_entropy"]),
                    2 * B * L * N * elt, grad=True)
            if "euler" in names:
                run("euler step", lambda: step_args(0.015),
                    lambda ls, xt, t, u, sh: sedd.euler_step.oracle(ls, xt, t, u, graph, sh),
                    lambda ls, xt, t, u, sh: ops["euler_step"](ls, xt, t, u, graph, sh), B * L * N * elt)
            if "tweedie" in names:
                run("tweedie step", lambda: step_args(0.015),
                    lambda ls, xt, t, u, sh: sedd.tweedie_step.oracle(ls, xt, t, u, graph, False, sh),
                    lambda ls, xt, t, u, sh: ops["tweedie_step"](ls, xt, t, u, graph, sh), B * L * N * elt)
            if "mdlm" in names and graph == "absorb":
                run("mdlm ancestral step", lambda: step_args(0.0156, sedd_step=False),
                    lambda lg, xt, p, u, _: mdlm.ancestral_step.oracle(lg, xt, p, u, N - 1),
                    lambda lg, xt, p, u, _: ops["ancestral_step"](lg, xt, p, u, N - 1), B * L * N * elt)
    return rows


def _against_floor(row, floor_bytes, bw):
    """row with the kernel's GB/s and its share of the floor (floor_bytes at the copy bandwidth bw), when
    bw was measured."""
    if bw:
        row["kernel_GBps"] = floor_bytes / row["kernel_s"] / 1e9
        row["of_floor"] = floor_bytes / bw / row["kernel_s"]
    return row


def far_rows(device, entries, V, tail=64):
    """Each fused SEDD/MDLM op on one sequence of more than `entries` bf16 scores per graph (2^31 on a GPU:
    offsets past 32 bits, which the self-check's small inputs never reach), its last `tail` positions
    against the oracle run on those positions alone (the oracle of the whole would not fit), with the
    self-check's tolerances -> rows {"op", "graph", "L,N", "passed", "worst (1 = tolerance)", "detail"}."""
    import difflm_ops as kmod
    import mdlm
    import sedd
    gen, rows = torch.Generator(device=device).manual_seed(0), []
    for graph in ("absorb", "uniform"):
        N = V + 1 if graph == "absorb" else V
        L = entries // N + tail  # B = 1: the last `tail` positions start past `entries` scores
        ls = torch.randn(1, L, N, generator=gen, device=device, dtype=torch.bfloat16).mul_(2)  # (1, L, N)
        xt, x0 = score_states(graph, 1, L, N, gen)  # (1, L)
        u = torch.rand(1, L, 2, generator=gen, device=device, dtype=torch.float64)
        t, sb = torch.full((1,), 0.3, dtype=torch.float64, device=device), torch.full((1,), 1.3, device=device)
        shift = sedd.absorb_offset(sb, N) if graph == "absorb" else None  # as SEDD's absorbing loss passes it
        end = lambda *ts: [x[:, -tail:].contiguous() for x in ts]  # noqa: E731
        checks = []
        f, got = sedd.score_entropy, []
        for fn, args in ((f.kernel, (ls, xt, x0)), (f.oracle, end(ls, xt, x0))):
            leaf = args[0].detach().requires_grad_()
            loss = fn(leaf, *args[1:], sb, graph, shift)[:, -tail:]  # (1, tail)
            got.append((loss.detach(), torch.autograd.grad(loss.sum(), leaf)[0][:, -tail:]))
            del leaf, loss
        checks += [("score_entropy", "loss", *kmod._gap(got[0][0], got[1][0], *kmod.LOSS_TOL)),
                   ("score_entropy", "gradient", *kmod._gap(got[0][1], got[1][1], *kmod.GRAD_TOL[torch.bfloat16]))]
        del got
        # sum_y s_y ~ e^0.5 (absorbing), ~ N e^0.5 (uniform, rate 1/N): some positions move in a step of 0.3;
        # absorbing, the steps get the offset too, as the sampler passes them
        ls.sub_(math.log(N) + 1.5 if graph == "absorb" else 1.5)
        if shift is not None:
            ls.add_(shift)
        calls = [(sedd.euler_step, "", (graph, shift)), (sedd.tweedie_step, "", (graph, False, shift)),
                 (sedd.tweedie_step, "final", (graph, True, shift))]
        calls += [(mdlm.ancestral_step, "", (N - 1,))] if graph == "absorb" else []
        with torch.no_grad():
            for f, what, rest in calls:
                out = f.kernel(ls, xt, t, u, *rest)[:, -tail:]  # (1, tail)
                ref = f.oracle(*end(ls, xt), t, *end(u), *rest)
                worst, said = kmod._tokens_gap(out, ref)
                checks.append((f.name, what, worst, f"{int((ref != xt[:, -tail:]).sum())} of {tail} moved; {said}"))
        for name, what, worst, detail in checks:
            rows.append({"op": name + (f" ({what})" if what else ""), "graph": graph, "L,N": f"{L},{N}",
                         "passed": worst <= 1, "worst (1 = tolerance)": worst, "detail": detail})
        del ls
    return rows


TIMING_HEADER = ["eager ms", "compile ms", "kernel ms", "eager/kernel", "compile/kernel", "peak eager", "peak kernel"]
KERNEL_HEADER = ["op", "graph", "B,L,V"] + TIMING_HEADER


def _timing_cells(row, bw):
    """The cells every kernel row shares: times, ratios, peaks in units, and GB/s and floor when bw is known."""
    units = lambda m: f"{m:.2f}" if m is not None else "-"  # noqa: E731
    cells = [_ms(row["eager_s"]), _ms(row["compile_s"]), _ms(row["kernel_s"]), _ratio(row["eager_s"], row["kernel_s"]),
             _ratio(row["compile_s"], row["kernel_s"]), units(row["eager_peak_units"]), units(row["kernel_peak_units"])]
    return cells + ([f"{row['kernel_GBps']:.0f}", f"{100 * row['of_floor']:.0f}%"] if bw else [])


def _kernel_cells(row, bw):
    return [row["op"], row["graph"], row["B,L,V"]] + _timing_cells(row, bw)


def bench_kernels(argv):
    ap = common.ArgumentParser(prog="bench.py kernels")
    ap.add_argument("--sizes", default="", help="B,L,V;B,L,V... (default CPU: 32,256,66;4,256,50258; "
                                                 "GPU: 32,256,66;4,256,50258;64,1024,50258)")
    ap.add_argument("--dtype", default="", help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--ops", default="score_entropy,euler,tweedie,mdlm")
    ap.add_argument("--graphs", default="absorb,uniform")
    ap.add_argument("--no_eager", action="store_true", help="skip the eager oracle (e.g. where it runs out of memory)")
    a, device = _timing_args(ap, argv)
    dtype = _dtype(a.dtype, device)
    sizes = _sizes(a.sizes or "32,256,66;4,256,50258" + (";64,1024,50258" if device.type == "cuda" else ""), "B,L,V")
    names = _choices(a.ops, "ops", ("score_entropy", "euler", "tweedie", "mdlm"))
    graphs = _choices(a.graphs, "graphs", ("absorb", "uniform"))
    ops = _ops_or_die(device)
    bw = copy_bandwidth(device) if device.type == "cuda" else None
    rows = kernel_rows(device, ops, sizes, dtype, names, graphs, a.repeat, not a.no_eager, not a.no_compile, bw)
    print()
    table([_kernel_cells(r, bw) for r in rows], KERNEL_HEADER + (["kernel GB/s", "of floor"] if bw else []))
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
# --samplers: decoding controls measured beside each diffusion method's exact sampler, as sample-time overrides
SAMPLERS = {"mdlm": {"confidence": {"sampler": "confidence"}, "t0.8 p0.9": {"temperature": 0.8, "top_p": 0.9}},
            "sedd": {"t0.8 p0.9": {"temperature": 0.8, "top_p": 0.9}}}


def train_log(out):
    """(median training tokens/s, training seconds) from a run's log.jsonl; (None, None) without one."""
    if not os.path.isfile(os.path.join(out, "log.jsonl")):
        return None, None
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
    ap = common.ArgumentParser(prog="bench.py methods", description="train (or reuse) every text method at its "
                                 "default CPU budget, then one table: train tok/s, validation bound, generative NLL "
                                 "under the AR judge and unigram entropy at several step counts, time per sample")
    ap.add_argument("--methods", default="ar,mdlm,sedd,sedd_uniform", help=f"comma-separated, from {','.join(METHODS)}")
    ap.add_argument("--out_root", default="out/bench", help="checkpoints go to OUT_ROOT/<name> (retrained there "
                    "unless --reuse; out/<method>, the methods' own default, is left alone)")
    ap.add_argument("--reuse", action="store_true", help="reuse OUT_ROOT/<name>/ckpt.pt where it exists")
    ap.add_argument("--steps", default="16,32,64,128,256", help="sampling step counts of the diffusion samplers")
    ap.add_argument("--num_samples", type=int, default=16)
    ap.add_argument("--judge", default="", help="default OUT_ROOT/ar/ckpt.pt")
    ap.add_argument("--train_args", default="", help="extra --key=value overrides for every training run (tests)")
    ap.add_argument("--plot", default="", help="write quality and cost vs steps to this PNG")
    ap.add_argument("--samplers", action="store_true", help="also each method's decoding controls "
                    "(MDLM: confidence, temperature 0.8 with top-p 0.9; SEDD: temperature 0.8 with top-p 0.9)")
    a = ap.parse_args(argv)
    names = [n for n in a.methods.split(",") if n]
    bad = [n for n in names if n not in METHODS]
    if bad:
        common.die(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if "ar" in names:
        names.remove("ar")
        names.insert(0, "ar")  # the judge first
    if a.num_samples < 1:  # each check before the hour of work, not after it
        common.die(f"--num_samples={a.num_samples} must be at least 1")
    if a.plot and not a.plot.endswith(".png"):
        common.die(f"--plot={a.plot} must name a .png file")
    if a.plot and importlib.util.find_spec("matplotlib") is None:
        common.die("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')")
    judge = a.judge or os.path.join(a.out_root, "ar", "ckpt.pt")
    scored = any(METHODS[n][0] != "diffuser" for n in names)  # diffuser's row has no judge
    if scored and (a.judge or "ar" not in names):  # a judge bench does not train is checked before the training
        if judge.endswith(".pt") and not os.path.isfile(judge):
            common.die(f"no judge at {judge}: {'' if a.judge else 'add ar to --methods, or '}pass --judge=PATH of an ar.py "
                       "checkpoint (the quick start's: out/ar/ckpt.pt)")
        trainer.read_judge(judge)
    steps_list = _ints(a.steps, "steps")
    rows, curves, t0_all = [], {}, time.time()
    for name in common.progress(names, "methods"):
        module, extra = METHODS[name]
        out = os.path.join(a.out_root, name)
        if not (a.reuse and os.path.isfile(os.path.join(out, "ckpt.pt"))):
            print(f"[{name}] training: python {module}.py --train --out_dir={out} {' '.join(extra)} {a.train_args}", flush=True)
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "train.out"), "w") as f:  # --overwrite: its first checkpoint replaces an
                r = subprocess.run([sys.executable, os.path.join(common.ROOT, module + ".py"), "--train", "--overwrite",
                                    f"--out_dir={out}"] + extra + a.train_args.split(),  # earlier run, log and all
                                   stdout=f, stderr=subprocess.STDOUT)
            if r.returncode != 0:  # its own one-line error, where it gave one
                said = _last_line(open(os.path.join(out, "train.out"), errors="replace").read(), "error:")
                common.die(f"training {name} failed ({said or f'exit status {r.returncode}'}); see {out}/train.out")
        tok_s, train_s = train_log(out)
        print(f"[{name}] trained: {tok_s or 0:.0f} tok/s, {train_s or 0:.0f} s of training", flush=True)
        if module == "diffuser":  # no bound; its data (E2E) has no autoregressive judge here
            rows.append({"method": name, "tok_s": tok_s})
            continue
        mod = importlib.import_module(module)
        cfg, model, tok, meta, _ = trainer.load_for_inference(mod.Config, {"out_dir": out}, module, mod.build_model)
        cfg = dataclasses.replace(cfg, data_dir=cfg.data_dir or corpus.data_path(cfg))
        with torch.no_grad(), common.autocast(next(model.parameters()).device):
            torch.manual_seed(cfg.seed)
            stats = mod.evaluate(model, corpus.Batches(cfg, meta, cfg.seed), cfg, full=True)
        bits = stats["val_bits"] if any(k in stats for k in BOUND_KEYS) else None
        L = cfg.block_size
        with torch.no_grad():  # warm-up: kernel loading and first-call allocations stay out of the timings
            if module == "ar":
                mod.generate(model, cfg, torch.zeros(0, dtype=torch.long), 1, 4)
            else:
                mod.generate(model, dataclasses.replace(cfg, steps=2), torch.full((L,), -1, dtype=torch.long), 1)
        if module == "ar":
            torch.manual_seed(0)
            g = trainer.generative_eval(judge, lambda n: mod.generate(model, cfg, torch.zeros(0, dtype=torch.long), n, L)[0],
                                       a.num_samples, meta, tok, "ar, cached sampler")
            rows.append({"method": name, "tok_s": tok_s, "bits": bits, "steps": L, "gen_nll": g["gen_nll"],
                         "entropy": g["gen_entropy"], "sec": g["sec_per_sample"]})
            curves[name] = [(L, g["gen_nll"], g["sec_per_sample"], g["gen_entropy"])]
            # the reference: the judge on real validation windows
            data = next(iter(corpus.Batches(cfg, meta, cfg.seed).sequential("val", a.num_samples)))
            nll = trainer.judge_samples(judge, data, meta, tok, next(model.parameters()).device)[0]
            rows.append({"method": "data (val)", "steps": None, "gen_nll": nll, "entropy": trainer.unigram_entropy(data)})
            print(methods_table(rows), flush=True)
            continue
        free = torch.full((L,), -1, dtype=torch.long)
        variants = {"": {}, **(SAMPLERS.get(module, {}) if a.samplers else {})}
        for label, overrides in variants.items():
            key = f"{name} ({label})" if label else name
            curves[key] = []
            for i, s in enumerate(steps_list):
                c = dataclasses.replace(cfg, steps=s, **overrides)
                torch.manual_seed(0)
                g = trainer.generative_eval(judge, lambda n: mod.generate(model, c, free, n)[0], a.num_samples, meta,
                                           tok, f"{key}, {s} steps")
                first = i == 0 and not label
                rows.append({"method": key, "tok_s": tok_s if first else None, "bits": bits if first else None,
                             "steps": s, "gen_nll": g["gen_nll"], "entropy": g["gen_entropy"],
                             "sec": g["sec_per_sample"]})
                curves[key].append((s, g["gen_nll"], g["sec_per_sample"], g["gen_entropy"]))
        print(methods_table(rows), flush=True)  # the table so far, in case a later method is interrupted
    print()
    print(methods_table(rows))
    print(f"{a.num_samples} samples per row, one block each; bound: exact NLL for ar, the NELBO/ELBO for the "
          f"diffusion methods (bits per token = bits per char here); gen NLL under the judge {judge}; "
          f"wall time per sample from a batch of {a.num_samples}; total {trainer.fmt_time(time.time() - t0_all)}")
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


def plot_methods(curves, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, pts in curves.items():
        s, nll, sec, ent = zip(*pts)
        if name == "ar":
            ax1.axhline(nll[0], color="k", ls="--", label=f"ar (cached, {s[0]} tokens)")
            ax3.axhline(ent[0], color="k", ls="--", label="ar (cached)")
            ax2.axhline(sec[0], color="k", ls="--", label="ar (cached)")
        else:
            ax1.plot(s, nll, "o-", label=name)
            ax3.plot(s, ent, "o-", label=name)
            ax2.plot(s, sec, "o-", label=name)
    ref = [r for r in rows if r["method"] == "data (val)"]
    if ref:
        ax1.axhline(ref[0]["gen_nll"], color="gray", ls=":", label="validation text")
        ax3.axhline(ref[0]["entropy"], color="gray", ls=":", label="validation text")
    for ax in (ax1, ax3, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.legend(fontsize=8)
    ax3.set_ylabel("unigram entropy of samples (nats)")
    ax1.set_ylabel("NLL of samples under the AR judge (nats/token)")
    ax2.set_ylabel("wall time per sample (s)")
    ax2.set_yscale("log")
    fig.tight_layout()
    common.write_file(path, lambda f: fig.savefig(f, format="png", dpi=120), "choose another --plot")
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------
# Diffusion-LM's clamp: the fused nearest-embedding kernel against the PyTorch expression


def nearest_rows(device, ops, sizes, metrics, repeat=0, compile=True):
    """The clamp kernel against diffusion_lm's PyTorch expression for each size (N, d, V) and metric ->
    rows (dicts: the versus() figures and the share of ids that agree); printed as measured."""
    import diffusion_lm
    import difflm_ops
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    # TF32 off (get_device turns it on; its scores pick other rows near ties): the bar is set against
    # cuBLAS in fp32, the search whose ids the kernel gives
    with difflm_ops.cublas_off("allow_tf32"):
        for N, d, V in common.progress(sizes, "sizes"):
            x = torch.randn(N, d, generator=gen, device=device)
            E = torch.randn(V, d, generator=gen, device=device)
            for metric in metrics:
                expr = lambda x, E: diffusion_lm.nearest_embedding.oracle(x, E, metric)  # noqa: E731
                kern = lambda x, E: ops["nearest_embedding"](x, E, metric)  # noqa: E731
                try:  # checked before timing (near-ties may differ)
                    agree = float((expr(x, E) == kern(x, E)).float().mean())
                except torch.OutOfMemoryError:  # versus() says so too, and times the kernel
                    agree = None
                row = {"metric": metric, "N,d,V": f"{N},{d},{V}", **versus(expr, kern, (x, E), device, repeat, True,
                                                                            compile),
                       "floor_bytes": N * 8 + (V * d + V) * 4, "same_ids": agree}
                rows.append(row)
                print("  " + "  ".join(_nearest_cells(row)), flush=True)
    return rows


NEAREST_HEADER = ["metric", "N,d,V", "eager ms", "compile ms", "kernel ms", "eager/kernel", "compile/kernel",
                  "peak eager MiB", "peak kernel MiB", "N+Vd MiB", "same ids"]


def _nearest_cells(row):
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"  # noqa: E731
    return [row["metric"], row["N,d,V"], _ms(row["eager_s"]), _ms(row["compile_s"]), _ms(row["kernel_s"]),
            _ratio(row["eager_s"], row["kernel_s"]), _ratio(row["compile_s"], row["kernel_s"]), mib(row["eager_peak"]),
            mib(row["kernel_peak"]), mib(row["floor_bytes"]),
            f"{100 * row['same_ids']:.2f}%" if row["same_ids"] is not None else "-"]


def bench_nearest(argv):
    ap = common.ArgumentParser(prog="bench.py nearest")
    ap.add_argument("--sizes", default="", help="N,d,V;N,d,V... (default: 8192,16,821;8192,128,50257, "
                                                 "plus 8192,256,50257 on GPU)")
    ap.add_argument("--metrics", default="cos,l2")
    a, device = _timing_args(ap, argv)
    sizes = _sizes(a.sizes or "8192,16,821;8192,128,50257" + (";8192,256,50257" if device.type == "cuda" else ""),
                   "N,d,V")
    metrics = _choices(a.metrics, "metrics", ("cos", "l2"))
    ops = _ops_or_die(device)
    rows = nearest_rows(device, ops, sizes, metrics, a.repeat, not a.no_compile)
    print()
    table([_nearest_cells(r) for r in rows], NEAREST_HEADER)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"float32 on {where}; medians of {a.repeat or '5-100'} runs; eager = argmax(normalize(x) @ normalize(E).T) "
          "(l2: argmax(x @ E.T - |E|^2 / 2)); peak = extra memory allocated during the call, output included; "
          "N+Vd = ids (int64) + one table copy + its bias; same ids: agreement with eager (fp32 near-ties may differ)")


def rotary_rows(device, ops, sizes, dtype, repeat=0, compile=True, bw=None):
    """The rotary op, forward and backward, against common.apply_rotary's expression for each size
    (B, L, H, D) -> rows (dicts: the versus() figures, peaks in units of one (B, L, 3, H, D)
    projection, GB/s and the share of the floor when bw is given); printed as measured."""
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for B, L, H, D in common.progress(sizes, "sizes"):
        cos, sin = (t.to(device) for t in common.rotary_tables(L, D))
        qkv = torch.randn(B, L, 3, H, D, generator=gen, device=device).to(dtype).requires_grad_()
        grad = torch.randn(qkv.shape, generator=gen, device=device).to(dtype)

        def fwd_bwd(fn):
            return lambda qkv, cos, sin: torch.autograd.grad(fn(qkv, cos, sin), qkv, grad)[0]
        res = versus(fwd_bwd(common.apply_rotary.oracle), fwd_bwd(ops["rotary"]), (qkv, cos, sin), device, repeat,
                     True, compile)
        unit = qkv.numel() * qkv.element_size()
        row = {"op": "rotary fwd+bwd", "B,L,H,D": f"{B},{L},{H},{D}", **res,
               "eager_peak_units": res["eager_peak"] / unit if res["eager_peak"] is not None else None,
               "kernel_peak_units": res["kernel_peak"] / unit}
        # floor: read the projection, write the output; then read the gradient, write its own
        rows.append(_against_floor(row, 4 * unit, bw))
        print("  " + "  ".join(_rotary_cells(row, bw)), flush=True)
    return rows


ROTARY_HEADER = ["op", "B,L,H,D"] + TIMING_HEADER


def _rotary_cells(row, bw):
    return [row["op"], row["B,L,H,D"]] + _timing_cells(row, bw)


def bench_rotary(argv):
    ap = common.ArgumentParser(prog="bench.py rotary")
    ap.add_argument("--sizes", default="", help="B,L,H,D;B,L,H,D... (default CPU: 16,256,6,64; GPU: 64,1024,12,64 "
                                                 "in bf16)")
    a, device = _timing_args(ap, argv)
    cuda = device.type == "cuda"
    sizes = _sizes(a.sizes or ("64,1024,12,64" if cuda else "16,256,6,64"), "B,L,H,D")
    if any(D % 2 for *_, D in sizes):
        common.die(f"--sizes={a.sizes!r}: the head size D must be even (rotary positions turn pairs)")
    dtype = torch.bfloat16 if cuda else torch.float32
    ops = _ops_or_die(device)
    bw = copy_bandwidth(device) if cuda else None
    rows = rotary_rows(device, ops, sizes, dtype, a.repeat, not a.no_compile, bw)
    print()
    table([_rotary_cells(r, bw) for r in rows], ROTARY_HEADER + (["kernel GB/s", "of floor"] if bw else []))
    print(f"{dtype}; medians of {a.repeat or '5-100'} runs; forward and backward of the queries, keys and values "
          "(B, L, 3, H, D); peak = extra memory in units of that projection, output included"
          + (f"; floor = four passes over it at the copy bandwidth, {bw / 1e9:.0f} GB/s" if bw else ""))


# ----------------------------------------------------------------------------------------------
# The heads' cross-entropy: common.token_nll against F.cross_entropy on fp32 logits, forward and backward


def token_nll_rows(device, sizes, dtype, repeat=0, compile=True):
    """common.token_nll against F.cross_entropy(z.float(), y), the plain expression every loss over token ids
    would write, for each size (M, V) -> rows (the versus() figures, peaks in units of the logits z (M, V))."""
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for M, V in common.progress(sizes, "sizes"):
        z = torch.randn(M, V, generator=gen, device=device).to(dtype).requires_grad_()
        y = torch.randint(V, (M,), generator=gen, device=device)
        w = torch.rand(M, generator=gen, device=device)  # a weight a row, as the losses' means and NELBO weights bring

        def fwd_bwd(fn):
            return lambda z, y: torch.autograd.grad(fn(z, y), z, w)[0]
        plain = lambda z, y: F.cross_entropy(z.float(), y, reduction="none")  # noqa: E731
        res = versus(fwd_bwd(plain), fwd_bwd(common.token_nll), (z, y), device, repeat, True, compile)
        unit = z.numel() * z.element_size()
        row = {"op": "token_nll fwd+bwd", "M,V": f"{M},{V}", **res, "kernel_peak_units": res["kernel_peak"] / unit,
               "eager_peak_units": res["eager_peak"] / unit if res["eager_peak"] is not None else None}
        rows.append(row)
        print("  " + "  ".join(_token_nll_cells(row)), flush=True)
    return rows


TOKEN_NLL_HEADER = ["op", "M,V"] + [h.replace("kernel", "token_nll") for h in TIMING_HEADER]


def _token_nll_cells(row):
    return [row["op"], row["M,V"]] + _timing_cells(row, None)


def bench_token_nll(argv):
    ap = common.ArgumentParser(prog="bench.py token_nll")
    ap.add_argument("--sizes", default="", help="M,V;M,V... rows and vocabulary (default CPU: 16384,65;4096,50258; "
                                                 "GPU: 65536,50258 in bf16, B=64 x L=1024 rows)")
    ap.add_argument("--dtype", default="", help="float32 or bfloat16 (default: bfloat16 on a GPU, float32 on a CPU)")
    a, device = _timing_args(ap, argv)
    sizes = _sizes(a.sizes or ("65536,50258" if device.type == "cuda" else "16384,65;4096,50258"), "M,V")
    dtype = _dtype(a.dtype, device)
    rows = token_nll_rows(device, sizes, dtype, a.repeat, not a.no_compile)
    print()
    table([_token_nll_cells(r) for r in rows], TOKEN_NLL_HEADER)
    print(f"{dtype}; medians of {a.repeat or '5-100'} runs; forward and backward, to the gradient of the logits z (M, V); "
          "eager = F.cross_entropy(z.float()); peak = extra memory in units of z, the gradient included")


# ----------------------------------------------------------------------------------------------
# One command that validates a GPU: build, CUDA tests, kernel timings, every method trained and sampled, DDP

GPU_METHODS = ("ddpm", "diffusion_lm", "mdlm", "sedd", "diffuser", "ar")
# after the build; training, whose time --timeout bounds, before the timings, whose compiles the --budget cuts short
GPU_PARTS = ("self-check", "cuda", "past", "train", "kernels", "nearest", "rotary", "token_nll", "acceptance", "ddp")
# --sample overrides: the dry run's few steps (each method's own kind of step count); a GPU samples at defaults
DRY_SAMPLE = {"ddpm": ["--steps=4", "--num_samples=64"], "diffusion_lm": ["--steps=4", "--num_samples=2"],
              "mdlm": ["--steps=4", "--num_samples=2"], "sedd": ["--steps=4", "--num_samples=2"],
              "diffuser": ["--steps=1", "--num_samples=2"], "ar": ["--num_samples=2", "--seq_len=16"]}
CUDA_TESTS = ("tests/test_kernels_cuda.py", "tests/test_kernel_nearest_cuda.py")
# what the kernels must reach on a GPU at B=64, L=1024, V=50258 in bf16: (eager / kernel, share of the
# bandwidth floor) per op; the clamp, eager / kernel against cuBLAS matmul + argmax for d <= 256
KERNEL_BARS = {"score_entropy fwd+bwd": (10, 0.70), "euler step": (30, 0.60), "tweedie step": (30, 0.60),
               "mdlm ancestral step": (30, 0.60)}
CLAMP_BAR, CLAMP_MAX_D = 3, 256


def judge(kernel_rows, nearest_rows):
    """The timings against KERNEL_BARS and CLAMP_BAR -> rows (check, figures, bars, met: yes | no |
    not judged, where the eager oracle did not fit or no bandwidth was measured)."""
    def row(check, r, speed, floor):
        ratio = r["eager_s"] / r["kernel_s"] if r["eager_s"] else None
        share = r.get("of_floor") if floor else None
        judged = ratio is not None and (share is not None or not floor)
        met = judged and ratio >= speed and (not floor or share >= floor)
        return {"check": check, "eager/kernel": ratio, "bar": speed, "of floor": share, "floor bar": floor,
                "met": ("yes" if met else "no") if judged else "not judged"}
    out = [row(f"{r['op']}, {r['graph']}", r, *KERNEL_BARS[r["op"]]) for r in kernel_rows]
    return out + [row(f"clamp {r['metric']} at {r['N,d,V']}", r, CLAMP_BAR, None) for r in nearest_rows
                  if int(r["N,d,V"].split(",")[1]) <= CLAMP_MAX_D]


def verdict(rows):
    """judge()'s rows -> (status, summary): failed only where a bar was missed; a check that could not
    be judged (the eager oracle did not fit) is named, not counted as missed."""
    missed, unjudged = ([r["check"] for r in rows if r["met"] == m] for m in ("no", "not judged"))
    summary = f"missed: {'; '.join(missed)}" if missed else f"{len(rows) - len(unjudged)} of {len(rows)} checks met"
    return ("failed" if missed else "ok"), summary + (f"; not judged: {'; '.join(unjudged)}" if unjudged else "")


class Report:
    """The parts of a validation run, each with its status (ok | failed | skipped), seconds, a summary line
    and its figures; rewritten to DIR/report.md and DIR/report.json after every part, so a run cut short
    still leaves what it found."""

    def __init__(self, out, header, budget=math.inf):
        self.out, self.header, self.parts, self.t0, self.budget = out, header, [], time.time(), budget
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            common.die(f"cannot write the report to --out={out}: {e.strerror or e}; choose another --out")

    def left(self, timeout):
        """Seconds a part with its own --timeout may take: no more than what remains of the budget."""
        return max(1, min(timeout, self.budget - (time.time() - self.t0)))

    def part(self, name, fn, budgeted=True):
        """fn() -> (status, summary, figures); an exception or a die() fails this part, not the run. Once
        the budget is spent the budgeted parts left are skipped, so the run ends in time with what it found."""
        print(f"== {name} ...", flush=True)
        t0 = time.time()
        try:
            if budgeted and t0 - self.t0 >= self.budget:
                status, summary, figures = "skipped", f"the --budget of {self.budget:g} s was spent", None
            else:
                status, summary, figures = fn()
        except (Exception, SystemExit) as e:
            status, summary, figures = "failed", f"{type(e).__name__}: {str(e).strip()[:300]}", None
        secs = time.time() - t0
        self.parts.append({"name": name, "status": status, "seconds": round(secs, 1), "summary": summary,
                           "figures": figures})
        print(f"== {name}: {status} in {secs:.1f} s: {summary}", flush=True)
        self.write()
        return figures

    def write(self):
        doc = {**self.header, "total_seconds": round(time.time() - self.t0, 1), "parts": self.parts}
        md = [f"# difflm GPU validation: {self.header['device']}", "",
              " | ".join(f"{k} {v}" for k, v in self.header.items() if k != "device"), "",
              "| part | status | seconds | summary |", "|---|---|---|---|"]
        md += [f"| {p['name']} | {p['status']} | {p['seconds']} | {_cell(p['summary'])} |" for p in self.parts]
        md += ["", f"total {doc['total_seconds']} s"]
        for p in self.parts:
            rows = p["figures"] if isinstance(p["figures"], list) else []
            if rows:
                keys = list(rows[0])
                md += ["", f"## {p['name']}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                md += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
        for name, text in (("report.json", json.dumps(doc, indent=1)), ("report.md", "\n".join(md) + "\n")):
            common.write_file(os.path.join(self.out, name), [text], "choose another --out")  # never half a report


def _cell(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/").replace("\n", " ")


def _run(args, timeout, env=None):
    """python args... from the project root -> (return code, the output's last 4000 characters)."""
    try:
        r = subprocess.run([sys.executable] + args, cwd=common.ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return r.returncode, (r.stdout + r.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:  # its output comes as bytes, whatever text=True asked
        text = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o for o in (e.stdout, e.stderr) if o)
        return 124, f"{text[-3000:]}\ntimed out after {timeout} s"


def _last_line(text, prefix):
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return lines[-1].strip() if lines else ""


def _in_process(module, args):
    """module.main(args) in this process -> (return code, the output's last 4000 characters); the dry
    run's way, with no interpreter start per run."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            importlib.import_module(module).main(args)
            rc = 0
        except SystemExit as e:  # common.die: its line is the finding
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)  # sys.exit(): success, as Python has it
            print(e.code if isinstance(e.code, str) else "")
        except Exception as e:  # a crash is a finding too
            rc = 1
            print(f"{type(e).__name__}: {e}")
    return rc, out.getvalue()[-4000:]


def train_and_sample(out, methods, dry, iters, timeout):
    """Every method trained, then sampled; one row each, and the whole output of both in out/<method>.log.
    GPU: bf16 autocast (common's default there) and --compile, the runs concurrent (small models leave a GPU
    mostly idle), training within 70% of timeout and sampling within what is left of it. Dry run: a few
    iterations of small batches, in this process, one after another."""
    train = {m: ["--train", "--overwrite", f"--out_dir={os.path.join(out, m)}", f"--max_iters={iters}",
                 f"--eval_interval={iters}"]
             + (["--eval_iters=1", "--log_interval=1", "--batch_size=4"] if dry else ["--compile=true"])
             for m in methods}
    for m in methods:  # prepare each corpus once, here, not in several runs at the same time
        if m != "ddpm":  # ddpm's toy data is made in code
            corpus.prepare_data(importlib.import_module(m).Config())
    os.makedirs(out, exist_ok=True)
    log = {m: os.path.join(out, f"{m}.log") for m in methods}
    for m in methods:
        with open(log[m], "w") as f:
            f.write(f"$ python {m}.py {' '.join(train[m])}\n")
    t0, done, procs = time.time(), {}, {}
    if dry:
        for m in common.progress(methods, "training"):
            rc, text = _in_process(m, train[m])
            done[m] = rc, _append(log[m], text), round(time.time() - t0, 1)
    else:
        for m, a in train.items():
            with open(log[m], "a") as f:  # the run appends all its output to the file itself
                procs[m] = subprocess.Popen([sys.executable, f"{m}.py"] + a, cwd=common.ROOT, stdout=f,
                                            stderr=subprocess.STDOUT)
    train_limit = 0.7 * timeout  # the rest of the part's limit is the sampling's
    while len(done) < len(methods):  # the runs end in any order; each one's time is its own
        late = time.time() - t0 >= train_limit
        for m, p in procs.items():
            if m not in done and (p.poll() is not None or late):
                said = ""
                if p.poll() is None:
                    p.kill()
                    p.wait()
                    said = f"\ntimed out after {train_limit:.0f} s"
                done[m] = p.returncode, _append(log[m], said), round(time.time() - t0, 1)
        if len(done) < len(methods):
            time.sleep(0.5)
    rows = []
    for m in common.progress(methods, "sampling"):
        rc, text, secs = done[m]
        row = {"method": m, "train": "ok" if rc == 0 else f"failed ({rc})", "train_s": secs,
               "last log": _last_line(text, "iter"), "last eval": _last_line(text, "eval") or _tail(text),
               "done": _last_line(text, "done:")}  # with the run's peak GPU memory
        if rc == 0:
            t1 = time.time()
            args = ["--sample", f"--out_dir={os.path.join(out, m)}"] + (DRY_SAMPLE[m] if dry else [])
            rc, text = _in_process(m, args) if dry else _run([f"{m}.py"] + args, max(1, timeout - (t1 - t0)))
            _append(log[m], f"\n$ python {m}.py {' '.join(args)}\n{text}")
            row.update(sample="ok" if rc == 0 else f"failed ({rc})", sample_s=round(time.time() - t1, 1),
                       output=" / ".join(text.strip().splitlines()[-3:])[:300])
        rows.append(row)
    return rows


def _append(path, text):
    """text appended to the file at path -> the whole file, the output of every run written to it."""
    with open(path, "a+", errors="replace") as f:
        f.write(text)
        f.seek(0)
        return f.read()


def _tail(text):
    return (text.strip().splitlines() or [""])[-1][:300]


def bench_gpu(argv):
    ap = common.ArgumentParser(prog="bench.py gpu", description="validate a GPU in one call: build the kernels, run "
                                 "the CUDA tests, time every kernel, train and sample every method, a DDP step; "
                                 "writes DIR/report.md and DIR/report.json. Without CUDA: a dry run of what can run.")
    ap.add_argument("--out", required=True, help="folder for the report and the runs' checkpoints")
    ap.add_argument("--methods", default=",".join(GPU_METHODS))
    ap.add_argument("--train_iters", type=int, default=0, help="iterations per method (default: 600 on a GPU, 2 dry)")
    ap.add_argument("--no_compile", action="store_true", help="skip torch.compile in the kernel timings")
    ap.add_argument("--timeout", type=int, default=300, help="seconds the CUDA tests, the training and sampling, "
                    "and the DDP step may each take")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run: parts not started by "
                    "then are skipped, and the timings compile no more oracles")
    ap.add_argument("--parts", default="", help=f"only these parts, named by their first word, comma-separated "
                    f"({', '.join(GPU_PARTS)}); the build always runs: a second call takes what the first skipped or failed")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dry, n_gpu = not cuda, torch.cuda.device_count()
    methods, chosen = [m for m in a.methods.split(",") if m], {p for p in a.parts.split(",") if p}
    if any(m not in GPU_METHODS for m in methods):
        common.die(f"--methods={a.methods}: choose from {','.join(GPU_METHODS)}")
    if chosen - set(GPU_PARTS):
        common.die(f"--parts={a.parts}: choose from {','.join(GPU_PARTS)}")
    where = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores), dry run"
    report = Report(a.out, {"device": where,
                            "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": n_gpu,
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry}, a.budget)
    ops = {}

    def within_budget():  # the timings' torch.compile'd oracles, while the budget lasts
        return time.time() - report.t0 < a.budget
    may_compile = within_budget if cuda and not a.no_compile else False  # the CPU's dry run compiles nothing

    def compiled(rows):
        return f"; torch.compile timed for {sum(r['compile_s'] is not None for r in rows)} of {len(rows)}" if cuda else ""

    def build():
        t0 = time.time()
        with warnings.catch_warnings(record=True) as said:  # why a build failed, for the report as well
            warnings.simplefilter("always")
            ops["ops"] = kernel_ops(device)  # JIT-builds csrc/ on first use, then loads from the cache
        for w in said:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        secs = time.time() - t0
        if ops["ops"] is None:
            import difflm_ops as kmod
            off = kmod.disabled()
            why = "; ".join(str(w.message).splitlines()[0] for w in said) or "no warning was given"
            if off:
                return "skipped", "DIFFLM_KERNELS=0", None
            os.environ["DIFFLM_KERNELS"] = "0"  # or each run after this one would build again, minutes of its time
            return "failed", f"no kernels: {why}"[:240] + "; the runs below take the PyTorch path", None
        return "ok", f"kernels on {device} built or loaded in {secs:.1f} s", {"build_s": round(secs, 1)}

    def cuda_tests():
        if not cuda:
            return "skipped", "no CUDA device", None
        rc, text = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider"] + list(CUDA_TESTS), report.left(a.timeout))
        return ("ok" if rc == 0 else "failed"), _tail(text), text[-2000:]

    def self_check():
        if ops.get("ops") is None:
            return "skipped", "no kernels", None
        import difflm_ops as kmod
        rows = []
        for name, f in sorted(kmod.FUSED.items()):
            t0 = time.perf_counter()
            try:
                worst, what = f.spec.check(f, device)
            except Exception as e:
                worst, what = math.inf, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append({"op": name, "passed": worst <= 1, "worst (1 = tolerance)": worst, "detail": what,
                         "seconds": round(time.perf_counter() - t0, 4)})
        off = [r["op"] for r in rows if not r["passed"]]
        return ("failed" if off else "ok"), (f"switched off: {', '.join(off)}" if off else
                                             f"all {len(rows)} ops agree with their oracles on {device}"), rows

    def far():
        if ops.get("ops") is None:
            return "skipped", "no kernels", None
        entries, V = (2**31, 50258) if cuda else (2**12, 66)
        rows = far_rows(device, entries, V)
        if cuda:
            torch.cuda.empty_cache()  # its 4 GB blocks, cached, would crowd the timings' largest tensors
        bad = sorted({f"{r['op']}, {r['graph']}" for r in rows if not r["passed"]})
        return ("failed" if bad else "ok"), (f"wrong past {entries} scores: {'; '.join(bad)}" if bad else
                                             f"all {len(rows)} agree on the last 64 positions past {entries} scores"), rows

    def kernels():
        if ops.get("ops") is None:
            return "skipped", "no kernels", None
        ops["bw"] = bw = copy_bandwidth(device) if cuda else None  # the rotary part's floor too
        sizes, dtype = ([(64, 1024, 50258)], torch.bfloat16) if cuda else ([(2, 5, 66)], torch.float32)
        rows = kernel_rows(device, ops["ops"], sizes, dtype, ["score_entropy", "euler", "tweedie", "mdlm"],
                           ["absorb", "uniform"], repeat=0 if cuda else 1, compile=may_compile, bw=bw)
        where = f"copy bandwidth {bw / 1e9:.0f} GB/s" if bw else "float32, small sizes, no compile"
        return "ok", f"{len(rows)} ops at {sizes[0]} {dtype}; {where}{compiled(rows)}", rows

    def nearest():
        if ops.get("ops") is None:
            return "skipped", "no kernels", None
        sizes = [(8192, 16, 821), (8192, 256, 50257)] if cuda else [(64, 16, 101)]  # Diffusion-LM's; GPT-2's
        rows = nearest_rows(device, ops["ops"], sizes, ["cos", "l2"], repeat=0 if cuda else 1, compile=may_compile)
        agree = [r["same_ids"] for r in rows if r["same_ids"] is not None]
        said = f"ids agree with eager on {min(agree):.2%}" if agree else "the eager clamp did not fit"
        return "ok", f"clamp at (N, d, V) = {', '.join(map(str, sizes))}; {said}{compiled(rows)}", rows

    def rotary():
        if ops.get("ops") is None:
            return "skipped", "no kernels", None
        sizes, dtype = ([(64, 1024, 12, 64)], torch.bfloat16) if cuda else ([(2, 5, 3, 6)], torch.float32)
        rows = rotary_rows(device, ops["ops"], sizes, dtype, repeat=0 if cuda else 1, compile=may_compile,
                           bw=ops.get("bw"))
        return "ok", f"rotary fwd+bwd at (B, L, H, D) = {sizes[0]} {dtype}{compiled(rows)}", rows

    def token_nll():  # no kernel: the losses' cross-entropy, at the papers' B x L rows of GPT-2 logits
        sizes, dtype = ([(64 * 1024, 50258)], torch.bfloat16) if cuda else ([(64, 66)], torch.float32)
        rows = token_nll_rows(device, sizes, dtype, repeat=0 if cuda else 1, compile=may_compile)
        eager = rows[0]["eager_peak_units"]  # None where F.cross_entropy did not fit
        peaks = f"peak {rows[0]['kernel_peak_units']:.2f} units of the logits, F.cross_entropy's {'-' if eager is None else f'{eager:.2f}'}"
        return "ok", f"token_nll fwd+bwd at (M, V) = {sizes[0]} {dtype}; {peaks}{compiled(rows)}", rows

    def acceptance():
        found = {p["name"]: p["figures"] for p in report.parts}
        if not found.get("kernels") and not found.get("nearest"):
            return "skipped", "no kernel timings", None
        rows = judge(found.get("kernels") or [], found.get("nearest") or [])
        if dry:  # toy sizes on a CPU: the bars are for an H200
            rows = [{**r, "met": "not judged"} for r in rows]
            return "ok", f"dry run: {len(rows)} checks at toy sizes, not judged against the GPU bars", rows
        return (*verdict(rows), rows)

    def train():
        iters = a.train_iters or (2 if dry else 600)
        rows = train_and_sample(os.path.join(a.out, "runs"), methods, dry, iters, report.left(a.timeout))
        bad = [r["method"] for r in rows if r["train"] != "ok" or r.get("sample") != "ok"]
        if bad:
            return "failed", f"failed: {', '.join(bad)}", rows
        return "ok", f"{len(rows)} methods trained ({iters} iterations) and sampled", rows

    def ddp():
        if n_gpu < 2:
            return "skipped", f"{n_gpu} GPU(s); a DDP step needs two", None
        rc, text = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "mdlm.py", "--train",
                         "--overwrite", f"--out_dir={os.path.join(a.out, 'runs', 'ddp')}", "--max_iters=20",
                         "--eval_interval=20"], report.left(a.timeout))
        if rc == 0:
            return "ok", _last_line(text, "done:") or _tail(text), None
        return "failed", _last_line(text, "error:") or _tail(text), text[-2000:]  # torchrun's footer says nothing

    parts = (("build", build), ("self-check", self_check), ("cuda tests", cuda_tests), ("past 2^31", far),
             ("train and sample", train), ("kernels", kernels), ("nearest", nearest), ("rotary", rotary),
             ("token_nll", token_nll), ("acceptance", acceptance), ("ddp", ddp))
    for name, fn in parts:
        if name == "build" or not chosen or name.split()[0] in chosen:
            report.part(name, fn, budgeted=name != "acceptance")  # the verdict on timings taken costs nothing
    total = trainer.fmt_time(time.time() - report.t0)
    print(f"report: {os.path.join(a.out, 'report.md')} and report.json; total {total}")


# ----------------------------------------------------------------------------------------------

BENCHES = {
    "methods": bench_methods,
    "mdlm_sampler": bench_mdlm_sampler,
    "sample_speed": bench_sample_speed,
    "throughput": bench_throughput,
    "train_speed": bench_train_speed,
    "kernels": bench_kernels,
    "sedd": bench_sedd,
    "nearest": bench_nearest,
    "rotary": bench_rotary,
    "token_nll": bench_token_nll,
    "gpu": bench_gpu,
}


def main():
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        common.die(f"usage: python bench.py <{'|'.join(BENCHES)}> [options]")
    steady_allocator()
    BENCHES[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
