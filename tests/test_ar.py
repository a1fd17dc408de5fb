"""ar.py (the autoregressive baseline), trainer's generative evaluation (the AR judge) and
bench.py's methods table: cache parity, exact NLL, toy-language learning, --eval --gen end to end
for every method, bad inputs."""
import json
import math
import os

import pytest
import torch

import ar
import bench
import common
import corpus
import trainer
from conftest import run_cli, write_toy_dataset
from test_sedd import CHARS, legal_fraction, toy_language


def tiny_cfg(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)
    return ar.Config(**{**base, **kw})


def random_model(V=7, **kw):
    torch.manual_seed(0)
    model = ar.build_model(tiny_cfg(**kw), {"vocab_size": V}).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # not the zero init: a peaked, position-dependent output
    return model


# ----------------------------------------------------------------------------------------------
# The cached sampler draws what full forwards over the same context would (tests/test_backbone.py
# checks the cache itself position by position)


@pytest.mark.parametrize("P", [0, 3, 20])
def test_cached_sampler_equals_full_forwards_over_its_sliding_context(P):
    model = random_model()
    for p in model.backbone.parameters():  # the zero-init gates would leave every block the identity
        torch.nn.init.normal_(p, std=0.3)
    L, n, length = model.backbone.block_size, 3, 45
    prefix = torch.randint(7, (P,), generator=torch.Generator().manual_seed(P))
    torch.manual_seed(5)
    x, calls = ar.generate(model, tiny_cfg(), prefix, n, length)
    # the same draws from one full forward per token over [BOS] + the window the cache holds:
    # everything from `start`, which jumps to the last L // 2 tokens when [BOS] + window overflows L
    torch.manual_seed(5)
    out, start = prefix.expand(n, -1).clone(), P - L // 2 if P >= L else 0
    while out.shape[1] < length:
        if 1 + out.shape[1] - start > L:
            start = out.shape[1] - L // 2
        inp = torch.cat([torch.full((n, 1), model.bos_id), out[:, start:]], 1)
        with torch.no_grad():
            probs = torch.softmax(model(inp)[:, -1].double(), -1)
        nxt = common.sample_categorical(probs, torch.rand(n, dtype=torch.float64))
        out = torch.cat([out, nxt[:, None]], 1)
    assert torch.equal(x, out)
    assert calls == length - P


def test_sampler_draws_from_the_chain_rule_distribution():
    """Samples of length 2 from a fixed random model: empirical joint vs p(x1) p(x2 | x1) (chi-square)."""
    model = random_model(V=4)
    cfg = tiny_cfg(temperature=1.0)
    n = 20_000
    torch.manual_seed(1)
    x, calls = ar.generate(model, cfg, torch.zeros(0, dtype=torch.long), n, 2)
    assert calls == 2  # the prefill ([BOS]) and one cached step
    counts = torch.bincount(x[:, 0] * 4 + x[:, 1], minlength=16).double()
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2)
    with torch.no_grad():
        p = torch.exp(-ar.nll_terms(model, grid, model.bos_id).sum(1).double())  # exact joint of each pair
    assert abs(float(p.sum()) - 1) < 1e-5
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 37.7, f"chi-square {chi2:.1f} on 15 degrees of freedom (p = 0.001 at 37.7)"


def test_prefix_is_kept_and_long_samples_slide_the_cache():
    model = random_model()
    prefix = torch.tensor([1, 2, 3])
    x, calls = ar.generate(model, tiny_cfg(), prefix, 3, 40)  # 40 > block_size 16: the cache is refilled
    assert x.shape == (3, 40) and (x[:, :3] == prefix).all() and int(x.max()) < 7
    assert calls == 40 - 3


def test_a_one_token_context_samples_from_bos_alone():
    """block_size 1: each refill keeps no token (out[:, -0:] kept them all, longer than the context)."""
    x, calls = ar.generate(random_model(block_size=1), tiny_cfg(block_size=1), torch.zeros(0, dtype=torch.long), 2, 5)
    assert x.shape == (2, 5) and calls == 5


def test_a_prefix_as_long_as_the_sample_costs_no_network_call():
    x, calls = ar.generate(random_model(), tiny_cfg(), torch.tensor([1, 2, 3]), 2, 3)
    assert x.tolist() == [[1, 2, 3]] * 2 and calls == 0


def test_a_tiny_temperature_is_greedy():
    """logits / 1e-308 overflowed to inf and the softmax gave NaN, so every token became the last id."""
    model = random_model()
    draws = []
    for temperature, seed in ((1e-308, 0), (1e-100, 1)):
        torch.manual_seed(seed)
        draws.append(ar.generate(model, tiny_cfg(temperature=temperature), torch.zeros(0, dtype=torch.long), 3, 12)[0])
    with torch.no_grad():
        first = int(model(torch.full((1, 1), model.bos_id))[0, -1].argmax())  # the greedy first token
    assert torch.equal(draws[0], draws[1]) and (draws[0][:, 0] == first).all() and first != 6  # (6: the NaN draw's id)


def test_contiguous_row_loss_matches_the_transposed_view():
    """nll_terms over (B*L, V) rows gives cross-entropy over the transposed (B, V, L) view, forward
    and backward, to float rounding (the CPU kernels sum a row in a different order)."""
    V = 23
    model = random_model(V)
    x0 = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for fn in (lambda: ar.nll_terms(model, x0, model.bos_id),
               lambda: torch.nn.functional.cross_entropy(model(ar.shift_in_bos(x0, model.bos_id)).float().transpose(1, 2),
                                                         x0, reduction="none")):
        model.zero_grad()
        terms = fn()
        terms.mean().backward()
        results.append([terms.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_untrained_model_scores_log_v_and_evaluate_is_the_mean_nll(tmp_path):
    data = write_toy_dataset(tmp_path / "d", [toy_language(3000)], CHARS)
    cfg = tiny_cfg(data_dir=data, batch_size=8)
    meta = corpus.prepare_data(cfg)
    model = ar.build_model(cfg, meta).eval()  # zero head: uniform predictions
    stats = ar.evaluate(model, corpus.Batches(cfg, meta, 0), cfg, full=True)
    assert abs(stats["val_nll"] - math.log(len(CHARS))) < 1e-5
    assert abs(stats["val_bits"] - math.log2(len(CHARS))) < 1e-5


def test_full_evaluate_scores_every_validation_window_once(tmp_path):
    """--eval (full=True) is the mean NLL per token over every val window in order, not eval_iters random batches."""
    data = write_toy_dataset(tmp_path / "d", [toy_language(3000)], CHARS)
    cfg = tiny_cfg(data_dir=data, batch_size=8, eval_iters=1)
    meta = corpus.prepare_data(cfg)
    model = random_model(meta["vocab_size"])  # peaked, position-dependent: windows differ in NLL
    windows = torch.cat(list(corpus.Batches(cfg, meta, 0).sequential("val", 8)))
    assert len(windows) > cfg.batch_size * cfg.eval_iters
    with torch.no_grad():
        expect = float(ar.nll_terms(model, windows, model.bos_id).double().mean())
    stats = ar.evaluate(model, corpus.Batches(cfg, meta, 0), cfg, full=True)
    assert abs(stats["val_nll"] - expect) < 1e-5 and abs(stats["val_ppl"] - math.exp(expect)) < 1e-4


# ----------------------------------------------------------------------------------------------
# Learning, and the judge agreeing with ar.py's own evaluation


def test_learns_a_toy_language_and_judges_like_its_own_eval(tmp_path):
    data = write_toy_dataset(tmp_path / "data", [toy_language(40_000)], CHARS)
    cfg = ar.Config(data_dir=data, out_dir=str(tmp_path / "out"), n_layer=2, n_head=2, n_embd=64, block_size=24,
                    batch_size=32, max_iters=300, warmup_iters=20, eval_interval=300, eval_iters=4, log_interval=1000,
                    ema=0.9, device="cpu")  # the judge below compares fp32 on the CPU
    meta = corpus.prepare_data(cfg)
    torch.manual_seed(0)
    model = ar.build_model(cfg, meta)
    ema = trainer.train(cfg, "ar", model, lambda m, x0: ar.loss_fn(m, x0, model.bos_id),
                       lambda m, b: ar.evaluate(m, b, cfg), meta)
    torch.manual_seed(1)
    samples, _ = ar.generate(ema, cfg, torch.zeros(0, dtype=torch.long), 64, 24)
    frac = legal_fraction(samples)
    print(f"ar: {frac:.3f} of adjacent pairs legal")
    assert frac > 0.9, f"{frac:.3f} of adjacent pairs legal (chance 0.333)"
    # the entropy rate of the language is log 2 per token (two equally likely successors)
    stats = ar.evaluate(ema, corpus.Batches(cfg, meta, 0), cfg, full=True)
    assert stats["val_nll"] < math.log(2) + 0.15, stats
    # trainer's judge rebuilds the same model from the checkpoint and gives the same NLL on the same windows
    judge, _ = trainer.load_judge(os.path.join(cfg.out_dir, "ckpt.pt"), meta)
    windows = torch.cat(list(corpus.Batches(cfg, meta, 0).sequential("val", 64)))
    with torch.no_grad():
        own = float(ar.nll_terms(ema, windows, ema.bos_id).mean())
    assert abs(trainer.judge_nll(judge, windows) - own) < 1e-5
    # its own samples are scored near the entropy rate, far below a uniform draw's log 6
    assert trainer.judge_nll(judge, samples) < math.log(2) + 0.3
    assert trainer.judge_nll(judge, torch.randint(6, (64, 24))) > math.log(2) + 0.5


def test_unigram_entropy():
    assert trainer.unigram_entropy(torch.zeros(4, 8, dtype=torch.long)) == 0.0
    assert abs(trainer.unigram_entropy(torch.arange(8).repeat(3, 1)) - math.log(8)) < 1e-12


# ----------------------------------------------------------------------------------------------
# CLI: train, sample, --eval --gen for every method on tiny checkpoints, bad inputs

TINY = ["--max_iters=12", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_interval=12", "--eval_iters=2", "--log_interval=6", "--warmup_iters=2"]


def finite_gen_line(stdout):
    line = [x for x in stdout.splitlines() if x.startswith("gen: NLL")]
    assert line, stdout[-2000:]
    nums = [float(w) for w in line[0].replace("(", " ").replace(")", " ").split() if w.replace(".", "").isdigit()]
    assert nums and all(math.isfinite(v) for v in nums), line[0]
    return line[0]


@pytest.fixture(scope="module")
def tiny_ar(char_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ar"))
    run_cli(["ar.py", "--train", f"--data_dir={char_data}", f"--out_dir={out}"] + TINY)
    return out


def test_cli_train_sample_eval_gen(tiny_ar, char_data):
    r = run_cli(["ar.py", "--sample", f"--out_dir={tiny_ar}", "--prefix=ROMEO:", "--num_samples=2", "--seq_len=50"])
    assert r.stdout.count("=== sample") == 2 and "ROMEO:" in r.stdout and "key/value cache" in r.stdout
    assert "--- " not in r.stdout
    r = run_cli(["ar.py", "--sample", f"--out_dir={tiny_ar}", "--num_samples=1", "--seq_len=16", "--show"])
    assert [line for line in r.stdout.splitlines() if line.startswith("---")] == [
        f"--- {n}/16 tokens" for n in (2, 4, 6, 8, 10, 12, 14, 16)]  # every length // 8 tokens, and the last
    r = run_cli(["ar.py", "--eval", "--gen", f"--out_dir={tiny_ar}", f"--judge={tiny_ar}/ckpt.pt", "--num_samples=3"])
    assert "val NLL" in r.stdout and "(exact)" in r.stdout
    finite_gen_line(r.stdout)
    log = [json.loads(x) for x in open(os.path.join(tiny_ar, "log.jsonl"))]
    assert "gen_nll" in log[-1]["eval_full"] and log[-1]["eval_full"]["data"] == "val"


@pytest.mark.parametrize("method,extra", [("mdlm", []), ("sedd", []), ("sedd", ["--graph=uniform"])])
def test_eval_gen_end_to_end(method, extra, tiny_ar, char_data, tmp_path):
    run_cli([f"{method}.py", "--train", f"--data_dir={char_data}", f"--out_dir={tmp_path}"] + TINY + extra)
    r = run_cli([f"{method}.py", "--eval", "--gen", f"--out_dir={tmp_path}", f"--judge={tiny_ar}/ckpt.pt",
                 "--steps=6", "--num_samples=3", "--eval_t_samples=1"])
    assert "6 steps" in finite_gen_line(r.stdout)


def test_cli_bad_inputs(tiny_ar, tmp_path):
    def fails(args, *words):
        r = run_cli(args, check=False)
        assert r.returncode != 0 and all(w in r.stderr for w in words), r.stderr[-1500:]
        assert "val NLL" not in r.stdout, "the refusal came after the evaluation's work"
    fails(["ar.py", "--sample", f"--out_dir={tiny_ar}", "--suffix=abc"], "--suffix is not used by ar.py")
    fails(["ar.py", "--sample", f"--out_dir={tiny_ar}", "--temperature=0"], "--temperature")
    fails(["ar.py", "--sample", f"--out_dir={tiny_ar}", "--prefix=" + "a" * 40], "--prefix", "--seq_len")
    fails(["ar.py", "--eval", "--gen", f"--out_dir={tiny_ar}", f"--judge={tmp_path}/none.pt"], "no ar.py checkpoint at --judge=")
    fails(["ar.py", "--eval", "--gen", f"--out_dir={tiny_ar}", f"--judge={tiny_ar}"], "is a run folder",
          f"--judge={os.path.join(tiny_ar, 'ckpt.pt')}")  # not taken for a transformers model's folder
    fails(["ar.py", "--sample", f"--out_dir={tmp_path}"], "no checkpoint", "ar.py --train")


def test_a_prefix_that_fills_the_sequence_is_the_sample(tiny_ar):
    """--prefix as long as the sequence is allowed (one longer is refused): printed as it is, with no network call."""
    r = run_cli(["ar.py", "--sample", f"--out_dir={tiny_ar}", "--prefix=ROMEO:", "--num_samples=1", "--seq_len=6"])
    assert "=== sample 0\nROMEO:\n" in r.stdout and "0 network calls" in r.stdout, r.stdout


def test_judge_refuses_another_vocabulary_or_method(tiny_ar, tmp_path):
    meta = common.load_checkpoint(os.path.join(tiny_ar, "ckpt.pt"), "ar")["meta"]
    with pytest.raises(SystemExit, match="another tokenizer"):
        trainer.load_judge(os.path.join(tiny_ar, "ckpt.pt"), {**meta, "vocab_size": 10, "chars": list("abcdefghij")})
    judge, _ = trainer.load_judge(os.path.join(tiny_ar, "ckpt.pt"), meta)
    with pytest.raises(SystemExit, match="outside the judge"):
        trainer.judge_nll(judge, torch.full((2, 8), meta["vocab_size"]))  # a [MASK] id left in a sample
    fake = common.load_checkpoint(os.path.join(tiny_ar, "ckpt.pt"), "ar")
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), {**fake, "method": "mdlm"})
    with pytest.raises(SystemExit, match="must be an ar.py checkpoint"):
        trainer.load_judge(str(tmp_path / "ckpt.pt"))


# ----------------------------------------------------------------------------------------------
# bench.py methods: the table writer and the break-even step count


def test_methods_table_prints_a_dash_for_a_method_without_a_bound():
    rows = [{"method": "ar", "tok_s": 20000.0, "bits": 2.3, "steps": 128, "gen_nll": 1.6, "entropy": 3.1, "sec": 0.02},
            {"method": "diffuser", "tok_s": 9000.0}]
    text = bench.methods_table(rows).splitlines()
    assert len(text) == 3 and "val bound bits/char" in text[0]
    ar_cells, diffuser_cells = text[1].split(), text[2].split()
    assert ar_cells == ["ar", "20.0k", "2.300", "128", "1.600", "3.100", "0.020"]
    assert diffuser_cells == ["diffuser", "9.0k", "-", "-", "-", "-", "-"]


def test_break_even():
    pts = [(16, 0.1), (32, 0.2), (64, 0.4)]
    assert bench.break_even(pts, 0.3) == ("=", 48.0)
    assert bench.break_even(pts, 0.05) == ("<", 16)
    assert bench.break_even(pts, 1.0) == (">", 64)
