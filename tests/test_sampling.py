"""Sampling controls shared by MDLM and SEDD: infilling anywhere (--infill), held fixed positions at
every step, exact conditioning on an enumerable toy, the template checks at the command line."""
import dataclasses
import math
import itertools

import pytest
import torch

import common
import corpus
import mdlm
import sedd
from test_mdlm import ExactDenoiser, random_model, toy_distribution
from test_sedd import toy

def char_cfg(**kw):
    return mdlm.Config(**kw)


# ----------------------------------------------------------------------------------------------
# Templates -> fixed tensors, and the one-line errors


@pytest.mark.parametrize("template, expect", [
    ("_ab", [-1, 6, 7]),      # placeholder at the start
    ("ab_", [6, 7, -1]),      # at the end
    ("a__b", [6, -1, -1, 7]),  # in the middle
    ("A\\nB_", [1, 0, 2, -1]),  # a literal \n is a newline
])
def test_infill_template_positions(template, expect):
    tok = corpus.CharTokenizer("\nABC :ab_")  # '_' in the vocabulary too: the placeholder wins
    ids = [tok.stoi[c] if c != "_" else -1 for c in template.replace("\\n", "\n")]
    fixed = corpus.conditioning(tok, char_cfg(infill=template), 32)
    assert fixed.tolist() == ids and len(ids) == len(expect)
    padded = corpus.conditioning(tok, char_cfg(infill=template, seq_len=10), 10)  # --seq_len: free after the template
    assert padded.tolist() == ids + [-1] * (10 - len(ids))


def test_a_zero_uniform_never_draws_a_zero_probability_token():
    """The inverse-CDF draw takes the first token whose cumulative mass passes u: at u = 0 (torch.rand's float64
    draws include it) a token with no mass before it, cut by top_p or never reachable, must not be drawn."""
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert common.sample_categorical(probs, torch.zeros(2, dtype=torch.float64)).tolist() == [2, 1]


def test_infill_custom_placeholder_and_word_level():
    tok = corpus.CharTokenizer("\nABC :ab_")
    fixed = corpus.conditioning(tok, char_cfg(infill="a#_", placeholder="#"), 8)
    assert fixed.tolist() == [tok.stoi["a"], -1, tok.stoi["_"]]
    words = corpus.WordTokenizer.__new__(corpus.WordTokenizer)
    words.words = list(corpus.WordTokenizer.SPECIALS) + ["the", "of", ","]
    words.stoi = {w: i for i, w in enumerate(words.words)}
    words.vocab_size = len(words.words)
    fixed = corpus.conditioning(words, char_cfg(infill="_ the _ of _"), 16)
    assert fixed.tolist() == [-1, 4, -1, 5, -1]  # each placeholder is one free word


@pytest.mark.parametrize("kw, message", [
    (dict(infill="ab" * 20 + "_"), "--infill takes 41 tokens, more than the 32-token sequence"),
    (dict(infill="abab"), "--infill has no '_' placeholder"),
    (dict(infill="caf\u00e9_"), "--infill has characters outside"),
    (dict(infill="a_", prefix="a"), "--infill replaces --prefix and --suffix"),
    (dict(infill="a_", placeholder="##"), "must be one character"),
])
def test_infill_bad_templates_one_line(kw, message):
    tok = corpus.CharTokenizer("\nABC :ab_")
    with pytest.raises(SystemExit) as e:
        corpus.conditioning(tok, char_cfg(**kw), 32)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Every intermediate state holds the fixed positions


def record(store):
    return lambda i, x: store.append(x.clone())


def infill_fixed(L, V):
    fixed = torch.full((L,), -1)
    fixed[0], fixed[5], fixed[L - 1] = 1, V - 1, 2  # start, middle, end
    return fixed


def toy_sedd(**overrides):
    """A one-layer SEDD over 11 tokens, 16 positions, with a head large enough to make moves matter."""
    cfg = sedd.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, **overrides)
    torch.manual_seed(0)
    model = sedd.build_model(cfg, {"vocab_size": 11}).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return cfg, model


@pytest.mark.parametrize("sampler", mdlm.SAMPLERS)
def test_mdlm_fixed_positions_hold_at_every_step(sampler):
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, steps=24, sampler=sampler)
    model = random_model(cfg)
    for T in (16, 40):  # one chain, and semi-autoregressive rounds (the callback sees each window)
        fixed, states = infill_fixed(T, 11), []
        out, _ = mdlm.generate(model, cfg, fixed, 3, record(states))
        keep = fixed >= 0
        assert torch.equal(out[:, keep], fixed[keep].expand(3, -1))
        assert len(states) >= cfg.steps
        if T == 16:
            for x in states:
                assert torch.equal(x[:, keep], fixed[keep].expand(3, -1))


@pytest.mark.parametrize("graph", sedd.GRAPHS)
@pytest.mark.parametrize("sampler", sedd.SAMPLERS)
@pytest.mark.parametrize("t_end", [1e-5, 0.5])  # from 0.5 the last (denoising) step moves free and fixed rows alike
def test_sedd_fixed_positions_hold_at_every_step(graph, sampler, t_end):
    cfg, model = toy_sedd(steps=12, graph=graph, sampler=sampler, t_end=t_end)
    fixed, states = infill_fixed(16, 11), []
    out, _ = sedd.generate(model, cfg, fixed, 3, record(states))
    keep = fixed >= 0
    assert len(states) == cfg.steps and (out < 11).all()
    for x in states + [out]:
        assert torch.equal(x[:, keep], fixed[keep].expand(3, -1))
    assert len({tuple(x[0].tolist()) for x in states}) > 2  # the free positions do move: a running chain


# ----------------------------------------------------------------------------------------------
# Exact conditioning on the enumerable toy (vocabulary 3, length 3): the middle token fixed


def conditional_tv(samples, probs, V, L, pos, token):
    idx = (samples * V ** torch.arange(L - 1, -1, -1)).sum(-1)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    cond = torch.where(seqs[:, pos] == token, probs, torch.zeros_like(probs))
    cond = cond / cond.sum()
    emp = torch.bincount(idx, minlength=V ** L).double() / len(samples)
    noise = 0.5 * torch.sqrt(2 * cond / (torch.pi * len(samples))).sum().item()
    return 0.5 * (emp - cond).abs().sum().item(), noise


def test_mdlm_infill_follows_the_conditional_distribution():
    torch.manual_seed(0)
    V, L, n = 3, 3, 20000
    probs = toy_distribution(1)
    model = ExactDenoiser(probs, V, L)
    fixed = torch.tensor([-1, 0, -1])
    x = torch.where(fixed >= 0, fixed, V).expand(n, L).clone()  # the canvas generate() builds
    samples, _ = mdlm.sample_chain(model, x, mdlm.Config(steps=200, sampler="ddpm"))
    tv, noise = conditional_tv(samples, probs, V, L, 1, 0)
    assert tv < 2 * noise + 0.01, (tv, noise)


def test_sedd_absorbing_infill_follows_the_conditional_distribution():
    """Absorbing graph: a clean token at time t is the clean token at 0, so holding it and using the
    unconditional ratios is the exact conditional chain."""
    model = toy("absorb")
    cfg = sedd.Config(graph="absorb", sampler="analytic", steps=64)
    torch.manual_seed(5)
    n = 20000
    x = sedd.limit((n, 3), model.num_states, "absorb")
    out, _ = sedd.sample_chain(model, x, cfg, torch.tensor([-1, 0, -1]))
    tv, noise = conditional_tv(out, model.p, 3, 3, 1, 0)
    assert tv < 2 * noise + 0.01, (tv, noise)


# ----------------------------------------------------------------------------------------------
# Beyond one block: the shared semi-autoregressive rounds


def test_semi_autoregressive_rounds_hold_the_context():
    """A fake chain that fills free positions with fresh numbers: every window fits the block, its
    context is the output so far (held, not regenerated), and every position is filled once."""
    windows, counter = [], [100]

    def chain(w):
        windows.append(w.clone())
        out = w.clone()
        free = out < 0
        out[free] = torch.arange(counter[0], counter[0] + int(free.sum()))
        counter[0] += int(free.sum())
        return out, 1

    fixed = torch.full((2, 40), -1)
    fixed[:, 20] = 7
    out, calls = common.semi_autoregressive(chain, fixed, 16, 6)
    assert out.shape == (2, 40) and calls == len(windows) == 1 + 4 and (out >= 0).all()
    assert (out[:, 20] == 7).all() and len(set(out[out != 7].tolist())) == 2 * 39  # each free position drawn once
    done = 16
    for w in windows[1:]:
        new = min(6, 40 - done)
        assert w.shape[1] <= 16 and (w[:, :-new] >= 0).all()
        assert torch.equal(w[:, :-new], out[:, done - (w.shape[1] - new):done])
        done += new


@pytest.mark.parametrize("T, stride", [(40, 6), (23, 5), (17, 15)])
def test_semi_autoregressive_windows_fill_the_block(T, stride):
    """Every round after the first sees a whole block: the last block_size - new generated tokens as its context,
    then the new positions; a context one token short conditions each round on less than the model can read."""
    windows = []

    def chain(w):
        windows.append(w.clone())
        return w.clamp(min=0) + 1, 1

    common.semi_autoregressive(chain, torch.full((1, T), -1), 16, stride)
    assert [w.shape[1] for w in windows] == [16] * len(windows) and len(windows) == 1 + math.ceil((T - 16) / stride)


@pytest.mark.parametrize("graph", sedd.GRAPHS)
def test_sedd_beyond_one_block(graph):
    cfg, model = toy_sedd(steps=8, graph=graph, stride=6)
    fixed = infill_fixed(40, 11)
    fixed[20] = 3  # a fixed position in a later round
    samples, calls = sedd.generate(model, cfg, fixed, 3)
    keep = fixed >= 0
    assert samples.shape == (3, 40) and (samples < 11).all()  # no [MASK] left
    assert torch.equal(samples[:, keep], fixed[keep].expand(3, -1))
    most = 5 * (cfg.steps + 1)  # 16 + 4 rounds of 6 new tokens
    assert calls == most if graph == "uniform" else 0 < calls <= most  # absorbing: nothing masked, no call


# ----------------------------------------------------------------------------------------------
# Decoding controls: temperature, nucleus, confidence-ordered unmasking (MDLM)


def test_mdlm_controls_off_give_the_default_samples():
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, steps=20)
    model = random_model(cfg)
    fixed = infill_fixed(16, 11)
    out = []
    for c in (cfg, dataclasses.replace(cfg, temperature=1.0, top_p=1.0)):
        torch.manual_seed(7)
        out.append(mdlm.generate(model, c, fixed, 4)[0])
    assert torch.equal(out[0], out[1])
    torch.manual_seed(7)
    assert not torch.equal(out[0], mdlm.generate(model, dataclasses.replace(cfg, temperature=0.5), fixed, 4)[0])


def draw_tokens(logits, n, cfg_kw, mask_id):
    """n tokens drawn by one ancestral step with p_unmask = 1 from the same logits (N,)."""
    z = mdlm.decoding_logits(logits.expand(1, n, -1).clone(), mask_id, **cfg_kw)
    x = torch.full((1, n), mask_id)
    u = torch.rand(1, n, 2, dtype=torch.float64)
    return mdlm.ancestral_step(z, x, torch.ones(1, dtype=torch.float64), u, mask_id)[0]


@pytest.mark.parametrize("top_p, temperature", [(0.9, 1.0), (0.5, 1.0), (0.8, 0.7)])
def test_top_p_matches_the_truncated_law(top_p, temperature):
    torch.manual_seed(1)
    V, n = 12, 200_000
    logits = torch.cat([torch.randn(V) * 1.5, torch.zeros(1)])  # [MASK] last
    p = torch.softmax(logits[:V].double() / temperature, -1)
    sp, order = p.sort(descending=True)
    keep = order[: int(((sp.cumsum(0) - sp) < top_p).sum())]  # smallest prefix holding top_p of the mass
    law = torch.zeros(V, dtype=torch.float64)
    law[keep] = p[keep] / p[keep].sum()
    counts = torch.bincount(draw_tokens(logits, n, dict(temperature=temperature, top_p=top_p), V), minlength=V + 1)
    assert counts[V] == 0 and counts[:V][law == 0].sum() == 0  # nothing outside the nucleus
    expected = n * law[keep]
    chi2 = float(((counts[keep].double() - expected) ** 2 / expected).sum())
    dof = len(keep) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof) + 5, (chi2, dof)  # ~5 sigma of the chi-square law


def test_a_tiny_temperature_draws_the_most_probable_token():
    """logits / 1e-39 overflowed fp32 to inf, the softmax was NaN and every position drew [MASK]."""
    torch.manual_seed(3)
    V = 7
    logits = torch.cat([torch.randn(V), torch.zeros(1)])  # [MASK] last
    for temperature in (1e-2, 1e-39, 1e-300):
        assert (draw_tokens(logits, 50, dict(temperature=temperature), V) == logits[:V].argmax()).all()


def test_confidence_step_reveals_the_most_probable_and_k_in_expectation():
    torch.manual_seed(2)
    B, L, V = 64, 40, 9
    logits = torch.randn(B, L, V + 1) * 2
    x = torch.where(torch.rand(B, L) < 0.7, V, torch.randint(0, V, (B, L)))
    p_unmask = torch.full((B,), 0.3, dtype=torch.float64)
    u = torch.rand(B, L, 2, dtype=torch.float64)
    out = mdlm.confidence_step(logits, x, p_unmask, u, V)
    masked = x == V
    assert torch.equal(out[~masked], x[~masked])  # carry-over
    token = common.sample_categorical(torch.softmax(logits.double()[..., :V], -1), u[..., 1])
    conf = torch.softmax(logits.double()[..., :V], -1).gather(-1, token[..., None])[..., 0]
    revealed, left = masked & (out != V), masked & (out == V)
    assert torch.equal(out[revealed], token[revealed])
    for b in range(B):  # every revealed draw is at least as probable as every one left masked
        if revealed[b].any() and left[b].any():
            assert conf[b][revealed[b]].min() >= conf[b][left[b]].max()
    k = revealed.sum(-1).double()
    m = masked.sum(-1).double()
    assert ((k - 0.3 * m).abs() < 1).all()  # k rounds p_unmask * masked up or down
    assert abs(float(k.sum() - 0.3 * m.sum())) < 3 * math.sqrt(B * 0.25)  # unbiased rounding


def test_confidence_step_rounds_k_at_random_with_the_first_uniform():
    """k = floor(p m) + 1{u[b, 0, 0] < frac(p m)}: 10 masked positions at p_unmask = 0.23 reveal 2 or 3 (never a
    fixed rounding of 2.3), so that E[k] is the ancestral step's 2.3."""
    g = torch.Generator().manual_seed(4)
    B, L, V = 32, 10, 5
    logits, u = torch.randn(B, L, V + 1, generator=g), torch.rand(B, L, 2, dtype=torch.float64, generator=g)
    out = mdlm.confidence_step(logits, torch.full((B, L), V), torch.full((B,), 0.23, dtype=torch.float64), u, V)
    k = (out != V).sum(-1)
    assert torch.equal(k, 2 + (u[:, 0, 0] < 0.3).long()) and set(k.tolist()) == {2, 3}


def test_confidence_sampler_runs_and_holds_fixed_positions():
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, steps=10, sampler="confidence", top_p=0.9)
    model = random_model(cfg)
    fixed, states = infill_fixed(16, 11), []
    out, _ = mdlm.generate(model, cfg, fixed, 3, record(states))
    keep = fixed >= 0
    assert (out < 11).all() and torch.equal(out[:, keep], fixed[keep].expand(3, -1))
    masks = [int((x == 11).sum()) for x in states]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0


# ----------------------------------------------------------------------------------------------
# Decoding controls (SEDD): same samples when off, nucleus law on the move weights


@pytest.mark.parametrize("graph", sedd.GRAPHS)
@pytest.mark.parametrize("sampler", sedd.SAMPLERS)
def test_sedd_controls_off_give_the_default_samples(graph, sampler):
    cfg, model = toy_sedd(steps=8, graph=graph, sampler=sampler)
    fixed = infill_fixed(16, 11)
    out = []
    for c in (cfg, dataclasses.replace(cfg, temperature=1.0, top_p=1.0), dataclasses.replace(cfg, top_p=0.5)):
        torch.manual_seed(7)
        out.append(sedd.generate(model, c, fixed, 4)[0])
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    assert torch.equal(out[2][:, fixed >= 0], fixed[fixed >= 0].expand(4, -1))


def test_sedd_decoding_weights_keep_the_move_mass_and_truncate():
    torch.manual_seed(3)
    w = torch.rand(5, 7, 9, dtype=torch.float64) ** 3
    q = sedd.decoding_weights(w, temperature=0.6, top_p=0.7)
    assert torch.allclose(q.sum(-1), w.sum(-1))  # the probability of moving is unchanged
    p = w ** (1 / 0.6)
    p = p / p.sum(-1, keepdim=True)
    sp, order = p.sort(-1, descending=True)
    kept = ((sp.cumsum(-1) - sp) < 0.7).scatter(-1, order, (sp.cumsum(-1) - sp) < 0.7)
    expect = torch.where(kept, p, 0.0)
    assert torch.allclose(q, expect / expect.sum(-1, keepdim=True) * w.sum(-1, keepdim=True))
    assert torch.equal(sedd.decoding_weights(w), w)
    # a low temperature on small weights: the largest weight takes all the mass (w^(1/T) underflowed to 0 for
    # every token, so nothing moved); a row without weight stays without
    small = torch.tensor([[[0.0, 2e-3, 1e-3, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    q = sedd.decoding_weights(small, temperature=0.001)
    want = torch.tensor([[[0.0, 3e-3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    assert torch.allclose(q, want, rtol=1e-12, atol=1e-200)  # the runner-up keeps 2^-1000 of it
    # a negative weight (a uniform Tweedie step's staggered score can be one) counts as 0, as in the race
    neg = torch.tensor([[[0.5, -0.2, 0.3, 0.0]]], dtype=torch.float64)
    want = torch.tensor([[[0.25, 0.0, 0.09, 0.0]]], dtype=torch.float64) / 0.34 * 0.8  # w^2 on the clamped weights
    assert torch.allclose(sedd.decoding_weights(neg, temperature=0.5), want, rtol=1e-12)


def test_sedd_top_p_final_step_matches_the_truncated_law():
    """The absorbing denoising step resolves every [MASK]: the drawn tokens follow the tempered,
    truncated law of the move weights (chi-square over many rows)."""
    torch.manual_seed(4)
    V, n = 10, 200_000
    cfg = sedd.Config(graph="absorb", temperature=0.8, top_p=0.85)
    log_score = (torch.randn(V + 1) * 1.5).expand(1, n, -1).clone()
    x = torch.full((1, n), V)
    dsigma = torch.full((1,), 0.3, dtype=torch.float64)
    w, _ = sedd.tweedie_weights(log_score, x[:, :1], dsigma, "absorb", final=True)
    law = sedd.decoding_weights(w, cfg.temperature, cfg.top_p)[0, 0]
    law = law / law.sum()
    out = sedd.controlled_step(log_score, x, dsigma, torch.rand(1, n, 2, dtype=torch.float64), cfg, final=True)[0]
    counts = torch.bincount(out, minlength=V + 1).double()
    assert counts[V] == 0 and counts[law == 0].sum() == 0 and (law[:V] == 0).any()
    keep = law > 0
    chi2 = float(((counts[keep] - n * law[keep]) ** 2 / (n * law[keep])).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof) + 5, (chi2, dof)


def test_a_tiny_temperature_keeps_only_the_most_likely_token():
    """The logits (or log-weights) were divided by the temperature before the max was taken: at 1e-308 they
    overflowed to inf and inf - inf gave NaN (MDLM drew [MASK] at every step, SEDD moved nothing)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g) * 3
    p = mdlm.decoding_logits(logits.clone(), 6, temperature=1e-308).softmax(-1)
    assert torch.equal(p, torch.nn.functional.one_hot(logits[..., :6].argmax(-1), 7).float())
    w = torch.rand(2, 5, 7, generator=g, dtype=torch.float64)
    w[0, 0] = 0.0  # a row with no weight stays 0
    q = sedd.decoding_weights(w, temperature=1e-308)
    want = torch.nn.functional.one_hot(w.argmax(-1), 7) * w.sum(-1, keepdim=True)
    want[0, 0] = 0.0
    assert torch.allclose(q, want, rtol=1e-12, atol=0)


def test_a_one_token_context_cannot_extend_past_itself():
    """block_size 1 and --seq_len 4: the default stride block_size // 2 is 0, and the rounds never advanced (a hang)."""
    with pytest.raises(SystemExit, match="a model of block_size=1 cannot extend past its context with stride 0; use --seq_len <= 1"):
        common.semi_autoregressive(lambda w: (w.clamp(min=0), 1), torch.full((2, 4), -1), 1, 0)
    x, calls = common.semi_autoregressive(lambda w: (w.clamp(min=0), 1), torch.full((2, 4), -1), 2, 1)
    assert x.shape == (2, 4) and calls == 3


def test_show_prints_eight_evenly_spaced_steps_and_the_last(capsys):
    """--show: the first sequence after steps 1, 1 + steps // 8, ... and after the last step, each headed by its number."""
    tok = corpus.CharTokenizer("ab")
    assert common.show_steps(tok, mdlm.Config(steps=20)) is None  # no --show: no callback
    for steps, want in ((20, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 20]), (16, [1, 3, 5, 7, 9, 11, 13, 15, 16]),
                        (5, [1, 2, 3, 4, 5])):
        show = common.show_steps(tok, mdlm.Config(steps=steps, show=True))
        capsys.readouterr()
        for i in range(steps):
            show(i, torch.tensor([[0, 1, 1], [1, 1, 1]]))
        out = capsys.readouterr().out
        assert out == "".join(f"--- step {k}/{steps}\nabb\n" for k in want), out


def test_a_prefix_and_suffix_may_fill_the_whole_sequence():
    """--prefix and --suffix that take every position leave nothing to sample but are a valid request (no chain
    runs on the fixed positions); one token more is refused."""
    tok = corpus.CharTokenizer("\nABC :ab_")
    a, b = tok.stoi["a"], tok.stoi["b"]
    assert corpus.conditioning(tok, char_cfg(prefix="ab", suffix="ba"), 4).tolist() == [a, b, b, a]
    assert corpus.conditioning(tok, char_cfg(prefix="ab", suffix="a"), 4).tolist() == [a, b, -1, a]
    with pytest.raises(SystemExit, match="--prefix and --suffix take 5 tokens, more than the 4-token sequence"):
        corpus.conditioning(tok, char_cfg(prefix="abb", suffix="ba"), 4)


# ----------------------------------------------------------------------------------------------
# The float64 decoding work, a block of sequences at a time


def test_by_blocks_is_one_call_made_a_block_of_sequences_at_a_time(monkeypatch):
    sizes = []

    def fn(a, b, c):  # a per-sequence result; c passed whole
        sizes.append(a.shape[0])
        return a.sum((1, 2)) * b[:, 0] + c

    a, b = torch.randn(7, 3, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    whole = fn(a, b, 1.0)
    for block, want in ((10**6, [7]), (2 * 15, [2, 2, 2, 1]), (1, [1] * 7)):  # 15 entries a sequence
        monkeypatch.setattr(common, "CONTROL_BLOCK", block)
        sizes.clear()
        assert torch.equal(common.by_blocks(fn, a, b, 1.0), whole) and sizes == want, block


def control_runs(method):
    """(sample(B) -> tokens, B) for a sampler whose steps work in float64 (--top_p, the confidence step), on 300
    states so that the float64 (B, L, N) tensors outweigh everything else."""
    if method.startswith("sedd"):
        cfg = sedd.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, graph=method.split("-")[1], steps=3, top_p=0.9)
        torch.manual_seed(0)
        model = sedd.build_model(cfg, {"vocab_size": 300}).eval()
        torch.nn.init.normal_(model.head.weight, std=0.5)
        return lambda B: sedd.generate(model, cfg, torch.full((16,), -1), B)[0]
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, sampler=method.split("-")[1], steps=1, top_p=0.9)
    model = random_model(cfg, V=300)
    return lambda B: mdlm.generate(model, cfg, torch.full((16,), -1), B)[0]


@pytest.mark.parametrize("method", ["sedd-absorb", "sedd-uniform", "mdlm-ddpm", "mdlm-ddpm_cache", "mdlm-confidence"])
def test_float64_decoding_runs_a_block_of_sequences_at_a_time(monkeypatch, method):
    """The decoding controls and the confidence step make several float64 (B, L, N) tensors: 26 GB each at B = 64,
    L = 1024, N = 50258. They run on a block of sequences at a time (common.by_blocks): the same tokens as one call
    over the batch, and a peak that the batch size no longer multiplies."""
    import bench
    sample = control_runs(method)

    def run(B):
        torch.manual_seed(3)
        return sample(B)

    def peak(B):
        return bench._peak_extra_bytes(lambda: run(B), torch.device("cpu"))

    whole, whole_peak = run(16), peak(16)
    # a block: one sequence of (16, N), or 16 of the rows that the absorbing and cached samplers pass as sequences
    # of length 1
    monkeypatch.setattr(common, "CONTROL_BLOCK", 16 * 301)
    assert torch.equal(run(16), whole)
    blocked_peak = peak(16)
    assert 3 * blocked_peak < whole_peak, (blocked_peak, whole_peak)
