"""
bench.py: benchmarks. Each prints ratios against a baseline measured in the same run, never
absolute claims from another machine.

    python bench.py mdlm_sampler      # cached vs uncached MDLM sampler: time and network calls
    python bench.py throughput        # MDLM vs the same backbone trained autoregressively
    python bench.py <name> --help     # the options of one benchmark

Timings are medians of repeated runs after a warm-up.
"""

import argparse
import dataclasses
import statistics
import sys
import time

import torch

import common


def timeit(fn, repeat=5, warmup=1):
    """Median wall time of fn() in seconds (CUDA-synchronised when a GPU is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
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
                ts = sedd.sample_times(xs.shape[0], cfg.t_min, device)
                nll = float(sedd.elbo_terms(model, xs, ts, cfg, model.num_states).sum()) / xs.numel() \
                    + sedd.prior_kl(cfg, model.num_states)
            counts = torch.bincount(x.flatten(), minlength=model.num_states).double()
            p = counts[counts > 0] / counts.sum()
            rows.append((sampler, steps, f"{t:.2f}", f"{nll:.3f}", f"{float(-(p * p.log()).sum()):.3f}"))
    table(rows, ("sampler", "steps", "time s", "ELBO nats/tok", "unigram entropy"))
    print(f"{a.num_samples} samples of {cfg.block_size} tokens, {cfg.graph} graph, {sedd.noise_kind(cfg)} noise, "
          f"on {device}; ELBO with {a.t_samples} time samples per sequence (lower is better)")


# ----------------------------------------------------------------------------------------------

BENCHES = {
    "mdlm_sampler": bench_mdlm_sampler,
    "throughput": bench_throughput,
    "sedd": bench_sedd,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        common.die(f"usage: python bench.py <{'|'.join(BENCHES)}> [options]")
    BENCHES[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
