"""DiffusER: the edit machinery (property tests), decoding (greedy / beam / 2D beam), learning, CLI."""
import dataclasses
import itertools
import json
import math
import os
import types
import re
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import relabelled, run_cli

import common
import corpus
import diffuser as D
import trainer

SPECIALS = corpus.WordTokenizer.SPECIALS

# ----------------------------------------------------------------------------------------------
# Edit machinery


def seqs(max_vocab=12, max_len=25):
    return st.integers(5, max_vocab).flatmap(
        lambda v: st.tuples(st.just(v), st.lists(st.integers(4, v - 1), max_size=max_len)))


def apply_edits(x, edits):
    """Replay an edit log on x_{t-1}; every consumed span must match. Returns x_t."""
    x, i, out = list(x), 0, []
    for kind, old, new in edits:
        assert list(x[i:i + len(old)]) == list(old), f"edit {kind} expects {list(old)} at {i}, found {x[i:i + len(old)]}"
        i += len(old)
        out += list(new)
    assert i == len(x), f"the edits consume {i} of {len(x)} tokens"
    return out


def apply_reverse(xt, tags, counts, fills):
    """x_t and its reverse edits -> x_{t-1}: the tagger's edits, then the generator's tokens in slot order."""
    canvas, slots = D.build_canvas(xt, tags, counts, vocab_size=0)
    assert len(slots) == len(fills), f"{len(slots)} slots but {len(fills)} fill tokens"
    for pos, w in zip(slots, fills):
        canvas[pos] = w
    return canvas


edit_probs = st.lists(st.floats(0, 1), min_size=4, max_size=4).filter(lambda p: sum(p) > 1e-3).map(
    lambda p: tuple(x / sum(p) for x in p))


def reference_levenshtein(a, b):
    """An independent Levenshtein distance: two rows, no backtrace."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@settings(max_examples=300, deadline=None)
@given(seqs(), edit_probs, st.floats(0, 6), st.integers(0, 40), st.integers(0, 2**32 - 1))
def test_corruption_log_replays_and_reverses(vx, probs, lam, max_len, seed):
    V, x = vx
    rng = np.random.default_rng(seed)
    noise = D.NoiseTokens([0] * 4 + [1] * (V - 4), "unigram")
    xt, edits = D.corrupt_step(x, rng, noise, probs, lam, max_len)
    assert apply_edits(x, edits) == xt  # the log takes x_{t-1} to x_t
    assert len(xt) <= max(max_len, len(x))  # insertions never grow past max_len
    assert all(4 <= w < V for w in xt)
    tags, counts, fills = D.reverse_edits(edits)
    assert len(tags) == len(xt) and len(counts) == len(xt) + 1
    assert apply_reverse(xt, tags, counts, fills) == list(x)  # the reverse edits take x_t back exactly


@settings(max_examples=100, deadline=None)
@given(seqs(), st.integers(0, 2**32 - 1))
def test_all_delete_step_reverses_to_insertions(vx, seed):
    V, x = vx
    noise = D.NoiseTokens([0] * 4 + [1] * (V - 4))
    xt, edits = D.corrupt_step(x, np.random.default_rng(seed), noise, (0, 0, 0, 1), 50.0)
    assert apply_edits(x, edits) == xt
    tags, counts, fills = D.reverse_edits(edits)
    if x:
        assert len(xt) < len(x) and sum(counts) == len(x) - len(xt)
    assert apply_reverse(xt, tags, counts, fills) == list(x)


def test_empty_sequences():
    noise = D.NoiseTokens([0, 0, 0, 0, 1, 1])
    rng = np.random.default_rng(0)
    grown = 0
    for _ in range(200):
        xt, edits = D.corrupt_step([], rng, noise, (0.6, 0.2, 0.1, 0.1), 3.0, 10)
        assert apply_edits([], edits) == xt and apply_reverse(xt, *D.reverse_edits(edits)) == []
        grown += bool(xt)
    assert 5 < grown < 40  # only an insertion (10%, Poisson length > 0) can grow an empty sequence
    assert D.levenshtein_edits([], []) == (0, [])
    assert apply_reverse([], *D.reverse_edits(D.levenshtein_edits([4, 5], [])[1])) == [4, 5]


@settings(max_examples=300, deadline=None)
@given(seqs(8, 14), seqs(8, 14))
def test_alignment_is_optimal_and_reverses(va, vb):
    a, b = va[1], vb[1]
    cost, edits = D.levenshtein_edits(a, b)
    assert cost == reference_levenshtein(a, b)
    assert cost == sum(kind != "keep" for kind, _, _ in edits)
    assert apply_edits(a, edits) == list(b)
    assert apply_reverse(b, *D.reverse_edits(edits)) == list(a)
    assert D.levenshtein_edits(list(a), list(b)) == (cost, edits)  # deterministic


def test_alignment_tie_breaking():
    # "4 5" -> "5 4" costs 2 three ways; the backtrace prefers the diagonal, then deletion
    assert D.levenshtein_edits([4, 5], [5, 4])[1] == [("replace", (4,), (5,)), ("replace", (5,), (4,))]
    assert D.levenshtein_edits([4, 5, 6], [5, 6, 7])[1] == [
        ("delete", (4,), ()), ("keep", (5,), (5,)), ("keep", (6,), (6,)), ("insert", (), (7,))]


def test_corruption_statistics_match_the_edit_distribution():
    lam, probs = 3.0, (0.55, 0.2, 0.15, 0.1)  # each its own, so no two kinds can trade places unseen
    rng = np.random.default_rng(1)
    noise = D.NoiseTokens([0] * 4 + [1] * 50)
    x = list(rng.integers(4, 54, 30000))
    _, edits = D.corrupt_step(x, rng, noise, probs, lam)
    kinds = [k for k, _, _ in edits]
    n = len(kinds)
    z = math.exp(-lam)  # a length-0 draw keeps one token
    expect = {"keep": probs[0] + (1 - probs[0]) * z, "replace": probs[1] * (1 - z),
              "insert": probs[2] * (1 - z), "delete": probs[3] * (1 - z)}
    for kind, p in expect.items():
        assert abs(kinds.count(kind) / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, kind
    for kind in ("replace", "insert", "delete"):  # zero-truncated Poisson mean
        lengths = [len(old) or len(new) for k, old, new in edits if k == kind]
        assert abs(np.mean(lengths) - lam / (1 - z)) < 0.15, kind


def corrupt_by_definition(n, rng, probs, lam, max_len):
    """The forward step over n tokens as the paper states it, an insertion with no room left drawn again until another
    edit comes up -> tokens (kept, replaced, inserted, deleted)."""
    counts, i, out = [0, 0, 0, 0], 0, 0
    while True:
        kind, k = int(rng.choice(4, p=probs)), int(rng.poisson(lam))
        if kind == 2 and k > 0 or i == n:
            k = max(0, min(k, max_len - out - (n - i))) if kind == 2 else 0
            counts[2], out = counts[2] + k, out + k
            if i == n:
                return counts
            continue
        kind, k = (kind, min(k, n - i)) if k else (0, 1)
        counts[kind], i, out = counts[kind] + k, i + k, out + (kind != 3) * k


def test_an_insertion_without_room_keeps_the_law_of_drawing_it_again():
    """corrupt_step draws at once from the law that re-drawing an insertion with no room left converges to: the same
    mean numbers of kept, replaced, inserted and deleted tokens as the step by its definition, near max_len."""
    probs, lam, n, max_len, N = (0.1, 0.2, 0.6, 0.1), 1.0, 6, 8, 2000
    noise = D.NoiseTokens([0] * 4 + [1] * 10)
    rng = np.random.default_rng(0)
    ours = np.array([[sum(len(new if kind == "insert" else old) for kind, old, new in D.corrupt_step(
        [4] * n, rng, noise, probs, lam, max_len)[1] if kind == k) for k in ("keep", "replace", "insert", "delete")]
        for _ in range(N)])
    ref = np.array([corrupt_by_definition(n, rng, probs, lam, max_len) for _ in range(N)])
    se = np.sqrt(ours.var(0) / N + ref.var(0) / N)
    assert (np.abs(ours.mean(0) - ref.mean(0)) < 5 * se).all(), (ours.mean(0), ref.mean(0))


def test_only_insertions_with_long_spans_finish_at_max_len():
    """With --p_insert=1 a full x_t keeps every token: no draw may wait e^lam tries for a span of 0."""
    x = list(range(4, 24))
    for lam in (20.0, 800.0):  # e^-800 is 0 in float64: the keep is still drawn
        xt, edits = D.corrupt_step(x, np.random.default_rng(0), D.NoiseTokens([0] * 4 + [1] * 20), (0, 0, 1, 0), lam, 20)
        assert xt == x and {kind for kind, _, _ in edits} == {"keep"}


def test_a_training_pair_corrupts_with_each_edits_own_probability():
    """make_example hands corrupt_step its --p_keep, --p_replace, --p_insert, --p_delete in corrupt_step's order:
    with only insertions x_0 survives in x_t, so the reverse edits delete and never replace or insert."""
    cfg = D.Config(p_keep=0.0, p_replace=0.0, p_insert=1.0, p_delete=0.0, T=1, boot_prob=0.0, target="prev")
    noise, rng, x0 = D.NoiseTokens([0] * 4 + [1] * 10), np.random.default_rng(0), list(range(4, 14))
    for _ in range(20):
        _, xt, tags, counts, _, _ = D.make_example([], x0, rng, noise, cfg)
        assert len(xt) >= len(x0) and D.REPLACE not in tags and sum(counts) == 0


def test_noise_distributions():
    counts = [100, 100, 5, 100, 10, 30, 60]  # <s> </s> <unk> <pad> a b c
    rng = np.random.default_rng(0)
    draws = np.array(D.NoiseTokens(counts, "unigram").draw(rng, 20000))
    assert not np.isin(draws, [0, 1, 3]).any()  # never <s>, </s>, <pad>
    freq = np.bincount(draws, minlength=7) / len(draws)
    np.testing.assert_allclose(freq[[2, 4, 5, 6]], np.array([5, 10, 30, 60]) / 105, atol=0.01)
    freq = np.bincount(np.array(D.NoiseTokens(counts, "uniform").draw(rng, 20000)), minlength=7) / 20000
    np.testing.assert_allclose(freq[[2, 4, 5, 6]], 0.25, atol=0.015)


@pytest.mark.parametrize("target", ["x0", "prev"])
def test_training_pairs_reverse_exactly(target):
    cfg = D.Config(T=5, boot_prob=0.3, max_len=30, target=target)
    rng = np.random.default_rng(3)
    noise = D.NoiseTokens([0] * 4 + [1] * 20)
    changed = 0
    for _ in range(300):
        src = list(rng.integers(4, 24, rng.integers(1, 10)))
        x0 = list(rng.integers(4, 24, rng.integers(0, 20)))
        s, xt, tags, counts, fills, t = D.make_example(src, x0, rng, noise, cfg)
        assert 1 <= t <= cfg.T + 1
        x_prev = apply_reverse(xt, tags, counts, fills)
        if t == cfg.T + 1:
            assert xt == src and x_prev == x0  # the bootstrap revision goes straight to x_0
        elif target == "x0":
            assert x_prev == x0  # every revision is trained to reach the text
            assert sum(tg != D.KEEP for tg in tags) + sum(counts) == D.levenshtein_edits(x0, xt)[0]
        else:
            changed += x_prev != x0  # the paper's target: one step back, usually not yet x_0
        batch = D.collate([(s, xt, tags, counts, fills, t)], 24)
        assert int((batch.tag_y >= 0).sum()) == len(xt) and int((batch.ins_y >= 0).sum()) == len(xt) + 1
        assert int((batch.gen_y >= 0).sum()) == len(fills)
    assert target == "x0" or changed > 50


def test_a_random_bootstrap_is_trained_as_it_is_decoded():
    """--bootstrap=random with a source (E2E): training drew len(x_0) words, so the revision never learnt a change
    of length and saw the target's; decoding draws --seq_len words."""
    cfg = D.Config(T=3, boot_prob=1.0, bootstrap="random", seq_len=24, max_len=30)
    rng, noise = np.random.default_rng(0), D.NoiseTokens([0] * 4 + [1] * 20)
    for n in (3, 11):
        assert len(D.make_example([4, 5], list(rng.integers(4, 24, n)), rng, noise, cfg)[1]) == 24


def test_generator_batches_show_a_random_subset_of_the_slots():
    cfg = D.Config(T=4, boot_prob=0.2, max_len=30, bootstrap="null")
    rng = np.random.default_rng(5)
    noise = D.NoiseTokens([0] * 4 + [1] * 20)
    shown_frac = []
    for _ in range(400):
        ex = D.make_example(None, list(rng.integers(4, 24, rng.integers(1, 20))), rng, noise, cfg)
        _, xt, tags, counts, fills, _ = ex
        batch = D.collate([ex], 24, rng)
        canvas, slots = D.build_canvas(xt, tags, counts, 24)
        row, y = batch.gen_in[0, 1:1 + len(canvas)].tolist(), batch.gen_y[0, 1:1 + len(canvas)].tolist()
        assert [row[p] for p in range(len(canvas)) if p not in slots] == [c for p, c in enumerate(canvas) if p not in slots]
        open_ = [y[p] >= 0 for p in slots]
        for p, w, o in zip(slots, fills, open_):
            assert (row[p], y[p]) == ((canvas[p], w) if o else (w, -100))  # open: placeholder + target; else the word
        assert not slots or any(open_)  # at least one target
        if len(slots) >= 4:
            shown_frac.append(1 - np.mean(open_))
    assert 0.3 < np.mean(shown_frac) < 0.55  # u ~ U(0, 1), one slot kept open


def test_each_loss_term_is_a_mean_over_its_targets():
    """The tag, insertion and generator cross-entropies average over the positions with a target (y >= 0), as
    F.cross_entropy's ignore_index does, not over every position: padding must not reweight the terms."""
    torch.manual_seed(0)
    logits, y = torch.randn(4, 7, 5), torch.randint(5, (4, 7))
    y[torch.rand(4, 7) < 0.5] = -100
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert torch.allclose(D.mean_ce(logits, y), want, rtol=1e-6)
    assert D.mean_ce(logits, torch.full_like(y, -100)) == 0  # a batch without targets adds nothing


def test_revision_history_replays():
    cfg, model = tiny_model(1)
    srcs, starts = random_problems(9, 8)
    for strategy, b, r in (("greedy", 1, 1), ("beam", 3, 2)):
        for h in D.decode(model, starts, srcs, cfg, [3, 2, 1], strategy, b, r):
            xs = [e[1] for e in h.history] + [h.x]
            for (t, xt, tags, counts, fills), nxt in zip(h.history, xs[1:]):
                if len(fills) == sum(counts) + sum(tg == D.REPLACE for tg in tags):  # not cut at max_len
                    assert apply_reverse(xt, tags, counts, fills) == nxt


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=4), st.integers(1, 7), st.integers(0, 2**32 - 1))
def test_kbest_is_exact(sizes, b, seed):
    rng = np.random.default_rng(seed)
    logps = [np.log(rng.dirichlet(np.ones(c))) for c in sizes]
    scores, choices = D.kbest(logps, b)
    brute = sorted((sum(lp[k] for lp, k in zip(logps, c)) for c in itertools.product(*[range(len(lp)) for lp in logps])),
                   reverse=True)[:b]
    np.testing.assert_allclose(scores, brute, rtol=1e-12, atol=1e-12)
    for s, c in zip(scores, choices):
        assert math.isclose(s, sum(lp[k] for lp, k in zip(logps, c)), abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# Decoding on a random model


def test_insertion_counts_follow_max_len():
    # a gap takes at most max_len insertions (x_t never grows past max_len), so the head has max_len + 1 classes
    model = D.DiffusER(D.Config(max_len=7, n_layer=1, n_head=2, n_embd=16, block_size=20), 12)
    assert model.ins_head.out_features == 8
    with pytest.raises(SystemExit, match="unknown config key --max_ins"):
        D.main(["--train", "--max_ins=8"])


def tiny_model(seed, T=3, V=12):
    torch.manual_seed(seed)
    cfg = D.Config(T=T, n_layer=1, n_head=2, n_embd=32, block_size=40, max_len=12, seq_len=5)
    model = D.DiffusER(cfg, V).eval()
    with torch.no_grad():  # sharpen the heads so choices differ and ties are unlikely
        for head in (model.tag_head, model.ins_head, model.gen_head):
            head.weight.normal_(0, 1.0)
            head.bias.normal_(0, 1.0)
    return cfg, model


def random_problems(seed, n, V=12):
    g = np.random.default_rng(seed)
    srcs = [list(g.integers(4, V, g.integers(1, 6))) for _ in range(n)]
    starts = [list(g.integers(4, V, g.integers(0, 6))) for _ in range(n)]
    return srcs, starts


@pytest.mark.parametrize("seed", range(4))
def test_2d_beam_with_r1_b1_equals_greedy(seed):
    cfg, model = tiny_model(seed)
    srcs, starts = random_problems(seed, 6)
    times = [4, 3, 2, 1]
    greedy = D.decode(model, starts, srcs, cfg, times, "greedy")
    beam = D.decode(model, starts, srcs, cfg, times, "beam", b=1, r=1)
    for g, h in zip(greedy, beam):
        assert g.x == h.x
        assert math.isclose(g.score, h.score, rel_tol=1e-9, abs_tol=1e-9)
        assert [e[2:] for e in g.history] == [e[2:] for e in h.history]


@pytest.mark.parametrize("seed", range(4))
def test_larger_beams_never_score_lower(seed):
    cfg, model = tiny_model(seed)
    srcs, starts = random_problems(100 + seed, 6)
    # one revision: the best of a b-beam is monotone in b (the b best edit sets and fills are nested)
    prev = None
    for b in (1, 2, 4, 8):
        best = [h.score for h in D.decode(model, starts, srcs, cfg, [2], "beam", b=b, r=1)]
        if prev is not None:
            assert all(s >= p - 1e-9 for s, p in zip(best, prev)), (b, best, prev)
        prev = best
    # two revisions: keeping more hypotheses across revisions (r) never loses the best
    for b in (1, 3):
        prev = None
        for r in (1, 2, 4):
            best = [h.score for h in D.decode(model, starts, srcs, cfg, [2, 1], "beam", b=b, r=r)]
            if prev is not None:
                assert all(s >= p - 1e-9 for s, p in zip(best, prev)), (b, r, best, prev)
            prev = best


@pytest.mark.parametrize("strategy, b, r", [("greedy", 1, 1), ("beam", 2, 1), ("beam", 2, 2)])
def test_a_hypothesis_scores_its_fills_too(strategy, b, r, monkeypatch):
    """A hypothesis's score is the log-probability of its edits and of the words filled into them, at every
    revision: the beams rank whole revisions. Every fill made 5 nats less likely: every score 5 nats less per revision."""
    cfg, model = tiny_model(1)
    srcs, starts = random_problems(7, 4)
    times = [3, 2, 1]
    base = D.decode(model, starts, srcs, cfg, times, strategy, b=b, r=r)
    real = D.fill_slots
    monkeypatch.setattr(D, "fill_slots", lambda *a: [(s - 5.0, x, f) for s, x, f in real(*a)])
    worse = D.decode(model, starts, srcs, cfg, times, strategy, b=b, r=r)
    for h, w in zip(base, worse):
        assert w.x == h.x and math.isclose(w.score, h.score - 5.0 * len(times), rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("strategy, b", [("greedy", 1), ("beam", 3)])
def test_an_empty_sequence_must_insert(strategy, b):
    """A revision of an empty x_t inserts at least one word, however likely the insertion head finds none."""
    cfg, model = tiny_model(2)
    with torch.no_grad():
        model.ins_head.bias[0] = 50.0  # zero insertions at every gap: by far the most probable choice
    srcs, _ = random_problems(3, 3)
    for h in D.decode(model, [[], [], []], srcs, cfg, [2], strategy, b=b):
        assert len(h.x) >= 1 and h.history[0][1] == [] and sum(h.history[0][3]) == len(h.x)


@pytest.mark.parametrize("b, r", [(3, 1), (3, 2), (1, 3)])
def test_a_beam_carries_r_hypotheses_to_the_next_revision(b, r, monkeypatch):
    """--decode=beam (r = 1) searches b edit sets within a revision and carries only the best hypothesis to the next;
    beam2d carries the r best (at most b per hypothesis). The tagger reads one row per hypothesis carried."""
    cfg, model = tiny_model(0)
    srcs, starts = random_problems(5, 4)
    rows, real = [], D.network_logprobs
    monkeypatch.setattr(D, "network_logprobs", lambda model, xs, t, which, *a, **k:
                        (rows.append(len(xs)) if which == "tag" else None) or real(model, xs, t, which, *a, **k))
    D.decode(model, starts, srcs, cfg, [3, 2, 1], "beam", b=b, r=r)
    assert rows == [4, 4 * min(b, r), 4 * min(b * min(b, r), r)]


def test_sampling_and_null_bootstrap():
    cfg, model = tiny_model(0)
    torch.manual_seed(0)
    srcs = [None] * 8
    out = D.decode(model, [[] for _ in srcs], srcs, cfg, [3, 2, 1], "sample")
    for h in out:
        assert len(h.history[0][1]) == 0 and sum(h.history[0][3]) >= 1  # an empty start is forced to insert
        assert all(w not in (0, 1, 3) for w in h.x) and len(h.x) <= cfg.max_len
    cfg.top_p, cfg.temperature = 1e-9, 1.0  # a vanishing nucleus is greedy
    a = D.decode(model, [[5, 6]] * 3, [None] * 3, cfg, [2, 1], "sample")
    g = D.decode(model, [[5, 6]] * 3, [None] * 3, cfg, [2, 1], "greedy")
    assert [h.x for h in a] == [h.x for h in g]


@pytest.mark.parametrize("temperature,top_p,law", [(1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
                                                   (0.5, 1.0, [25 / 36.5, 9 / 36.5, 2.25 / 36.5, 0.25 / 36.5]),
                                                   (1.0, 0.7, [0.625, 0.375, 0, 0]),
                                                   (2.0, 0.5, [0.5 ** 0.5 / (0.5 ** 0.5 + 0.3 ** 0.5), 0.3 ** 0.5 / (0.5 ** 0.5 + 0.3 ** 0.5), 0, 0])])
def test_a_sampled_choice_follows_the_tempered_nucleus_law(temperature, top_p, law):
    """--decode=sample: p^(1/temperature) renormalised, then cut to the smallest most-probable set holding top_p."""
    torch.manual_seed(0)
    n = 20000
    lp = np.log(np.tile([[0.5, 0.3, 0.15, 0.05]], (n, 1)))
    freq = np.bincount(D.sample_choice(lp, temperature, top_p), minlength=4) / n
    se = np.sqrt(np.array(law) * (1 - np.array(law)) / n)
    assert (np.abs(freq - law) <= 5 * se + 1e-12).all(), (freq, law)


# ----------------------------------------------------------------------------------------------
# Learning: restore a corrupted sorted sequence (end to end: --train, then decode)

LETTERS = [chr(ord("a") + i) for i in range(10)]


def sorted_task(rng, n):
    rows = []
    for _ in range(n):
        x = sorted(rng.choice(10, int(rng.integers(5, 9)), replace=False).tolist())
        src = list(x)
        i = int(rng.integers(len(x) - 1))
        src[i], src[i + 1] = src[i + 1], src[i]  # one adjacent transposition
        rows.append(([4 + w for w in src], [4 + w for w in x]))
    return rows


def write_seq2seq(path, rows_by_split):
    texts = {f"{split}.jsonl": [json.dumps({"mr": {}, "src": src, "text": text, "ref": " ".join(LETTERS[w - 4] for w in text)})
                                + "\n" for src, text in rows] for split, rows in rows_by_split.items()}
    flat = [w for s, t in rows_by_split["train"] for w in t]
    corpus.write_split(path, flat, flat[:100], {"tokenizer": "word", "words": list(SPECIALS) + LETTERS,
                                               "vocab_size": 4 + len(LETTERS), "seq2seq": True}, texts=texts)
    return path


def test_learns_to_repair_sorted_sequences(tmp_path):
    rng = np.random.default_rng(0)
    data = write_seq2seq(str(tmp_path / "sorted"), {"train": sorted_task(rng, 3000), "valid": sorted_task(rng, 100),
                                                    "test": sorted_task(rng, 10)})
    out = str(tmp_path / "out")
    args = [f"--data_dir={data}", f"--out_dir={out}", "--T=3", "--n_layer=2", "--n_embd=64", "--n_head=4",
            "--block_size=32", "--max_len=12", "--batch_size=32", "--lr=3e-3", "--warmup_iters=20",
            "--eval_interval=500", "--log_interval=100", "--boot_prob=0.5", "--ema=0.99", "--max_iters=500"]
    run_cli(["diffuser.py", "--train"] + args, timeout=400)
    cfg, model, tok, meta, _ = D.load({"data_dir": data, "out_dir": out})
    rows = sorted_task(np.random.default_rng(7), 100)
    srcs = [s for s, _ in rows]
    best = D.run_decode(model, cfg, meta, srcs)  # the source bootstrap, its revision t = T + 1, then T..1, greedy
    repaired = np.mean([h.x == x for h, (_, x) in zip(best, rows)])
    # chance: every source is unsorted, so copying it repairs 0%; a random edit almost never does
    assert repaired >= 0.6, repaired


# ----------------------------------------------------------------------------------------------
# Data and CLI on the real E2E data


@pytest.fixture(scope="session")
def e2e_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    run_cli(["data/e2e/prepare.py", f"--out_dir={out}"])
    return str(out)


def test_bleu_counts_words_as_the_tokenizer_split_them():
    """<unk> is one wrong word, as a missed rare word is: sacrebleu's default tokenizer cut it into three
    wrong words (<, unk, >), each breaking more n-grams (46.7 BLEU here against 64.3)."""
    refs = [["the pub is near the river ."]]
    one_wrong = D.bleu(["the pub is near the lake ."], refs)
    assert D.bleu(["the pub is near the <unk> ."], refs) == pytest.approx(one_wrong)
    assert D.bleu(["the pub is near the river ."], refs) == pytest.approx(100.0)
    assert D.bleu(["a b-c d e"], [["a b-c d e"]]) == pytest.approx(100.0)
    assert D.bleu(["a b - c d e"], [["a b-c d e"]]) < 50  # a hyphenated word is one word, not split again


def test_bleu_reads_every_reference_of_each_hypothesis():
    """MRs have different numbers of references: each hypothesis is scored against all of its own, not only as
    many as the MR with the fewest has."""
    hyps = ["there is a pub .", "the pub is near the river ."]
    refs = [["there is a pub ."], ["a pub by the lake .", "the pub is near the river ."]]
    assert D.bleu(hyps, refs) == pytest.approx(100.0)
    assert D.bleu(hyps[1:], refs[1:]) == pytest.approx(100.0) and D.bleu(hyps[1:], [refs[1][:1]]) < 50


def test_e2e_prepare(e2e_data):
    meta = json.load(open(os.path.join(e2e_data, "meta.json")))
    assert meta["tokenizer"] == "word" and meta["words"][:4] == list(SPECIALS)
    assert meta["examples"] == {"train": 42061, "valid": 4672, "test": 4693}
    tok = corpus.WordTokenizer(meta["words"])
    first = json.loads(open(os.path.join(e2e_data, "train.jsonl")).readline())
    assert first["mr"] == {"name": "The Vaults", "Type": "pub", "price": "more than £ 30",
                           "customer rating": "5 out of 5", "near": "Café Adriatic"}
    assert tok.decode(first["text"]).startswith("The Vaults pub near Café Adriatic")
    data = np.fromfile(os.path.join(e2e_data, "train.bin"), dtype=meta["dtype"])
    assert data[0] == tok.START and data[len(first["text"]) + 1] == tok.END


def test_e2e_prepare_fails_clearly(tmp_path):
    r = run_cli(["data/e2e/prepare.py", f"--input_dir={tmp_path}", f"--out_dir={tmp_path}/o"], check=False)
    assert r.returncode != 0 and "has no src1_train.txt" in r.stderr


def test_cli_train_sample_eval_and_bad_inputs(e2e_data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    small = [f"--data_dir={e2e_data}", f"--out_dir={out}", "--n_layer=1", "--n_embd=32", "--n_head=2",
             "--batch_size=8", "--eval_iters=1"]
    r = run_cli(["diffuser.py", "--train", "--max_iters=6", "--eval_interval=6", "--log_interval=3"] + small)
    assert "eval      5 | val_loss" in r.stdout
    r = run_cli(["diffuser.py", "--sample", "--show", "--num_samples=2", "--steps=3"] + small[:2])
    assert r.stdout.count("=== sample") == 2 and "MR: name :" in r.stdout and "t=13 |" in r.stdout
    r = run_cli(["diffuser.py", "--sample", "--decode=beam2d", "--beam_b=2", "--beam_r=2", "--steps=2",
                 "--source=name : The Eagle | Type : pub"] + small[:2])
    assert r.stdout.count("MR: name : The Eagle | Type : pub") == 1  # beam decoding is deterministic: once
    r = run_cli(["diffuser.py", "--sample", "--decode=sample", "--num_samples=3", "--steps=1",
                 "--source=name : The Eagle | Type : pub"] + small[:2])
    assert r.stdout.count("MR: name : The Eagle | Type : pub") == 3, r.stdout  # --num_samples was ignored
    r = run_cli(["diffuser.py", "--eval", "--eval_mrs=4", "--steps=1"] + small[:2])
    assert re.search(r"E2E validation BLEU \d+\.\d\d \(greedy", r.stdout) and "val_tag_ce" in r.stdout
    r = run_cli(["diffuser.py", "--eval", "--eval_mrs=2", "--steps=1", "--eval_split=test"] + small[:2])
    assert re.search(r"E2E test BLEU \d+\.\d\d \(greedy, b=1, r=1, 2 MRs", r.stdout)
    records = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")) if "eval_full" in x]
    assert [(r["eval_split"], r["eval_mrs"], r["steps"]) for r in records[-2:]] == [("val", 4, 1), ("test", 2, 1)]

    def fails(args, message):  # in-process: bad input must stop with one line, before any work
        with pytest.raises(SystemExit) as e:
            D.main(args + small[:2])
        assert message in str(e.value), (args, str(e.value))

    fails(["--sample", "--bootstrap=zeros"], "unknown --bootstrap='zeros'")
    fails(["--sample", "--bootstrap=autoregressive"], "on E2E use --bootstrap=source")
    fails(["--eval", "--gen"], "an E2E model is scored by BLEU")
    fails(["--sample", "--beam_b=0", "--decode=beam"], "--beam_b=0 must be at least 1")
    fails(["--sample", "--beam_r=-1", "--decode=beam2d"], "--beam_r=-1 must be at least 1")
    fails(["--sample", "--top_p=0.6"], "shape --decode=sample's draws, not greedy's")  # greedy ignored them
    fails(["--sample", "--decode=viterbi"], "unknown --decode='viterbi'")
    fails(["--train", "--target=x1"], "unknown --target='x1'")
    fails(["--sample", "--source=" + " ".join(["name : The Eagle"] * 20)], "does not fit the model's context")
    fails(["--sample", "--top_p=0"], "0 < --top_p <= 1")
    fails(["--sample", "--steps=50"], "exceeds the trained --T=12")
    fails(["--sample", "--T=20"], "--T is fixed by the checkpoint (12)")  # t = 21 would be an untrained time
    fails(["--sample", "--max_len=30"], "--max_len is fixed by the checkpoint (48)")  # the insertion head's width
    other = relabelled(e2e_data, tmp_path / "other")  # E2E prepared again with another vocabulary: refused
    for verbs in (["--sample"], ["--eval", "--eval_mrs=1"]):
        with pytest.raises(SystemExit, match="the same size, other symbols"):
            D.main(verbs + [f"--data_dir={other}", f"--out_dir={out}", "--steps=1"])
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import sacrebleu now raises ImportError
    fails(["--eval", "--eval_mrs=2", "--steps=1"], "BLEU needs sacrebleu")


def test_what_cannot_train_or_be_scored_is_one_line(e2e_data, tmp_path, monkeypatch):
    """Edit batches from characters, from examples longer than --max_len, or from a source that leaves no room
    in the context for --max_len words; and an unconditional sample stream with no word to score."""
    meta = corpus.prepare_data(D.Config(data_dir=e2e_data))

    def fails(cfg, meta, message):
        with pytest.raises(SystemExit) as e:
            D.EditBatches(cfg, meta, 0)
        assert str(e.value).startswith("error: ") and message in str(e.value), str(e.value)

    fails(D.Config(data_dir=e2e_data), {**meta, "tokenizer": "char"}, "DiffusER edits words: --dataset=e2e has a char tokenizer")
    fails(D.Config(data_dir=e2e_data, max_len=1), meta, "example fits --max_len=1; raise it")  # (train holds a one-word text)
    fails(D.Config(data_dir=e2e_data, block_size=60), meta, "a source plus --max_len=48 needs")
    fails(D.Config(data_dir=e2e_data, block_size=60), meta, "more than --block_size=60; raise --block_size or lower --max_len")
    # a folder missing its examples names the command that writes them again, at that folder
    shutil.copytree(e2e_data, tmp_path / "e2e")
    os.remove(tmp_path / "e2e" / "valid.jsonl")
    with pytest.raises(SystemExit) as e:
        D.validation_mrs(D.Config(data_dir=str(tmp_path / "e2e")), meta)
    assert str(e.value).startswith(f"error: missing {tmp_path / 'e2e' / 'valid.jsonl'}; re-prepare the folder: python ")
    run_cli(shlex.split(str(e.value).split("re-prepare the folder: python ", 1)[1]))  # as the line gives it
    assert len(D.validation_mrs(D.Config(data_dir=str(tmp_path / "e2e")), meta)) > 500
    monkeypatch.setattr(D, "run_decode", lambda model, cfg, meta, srcs: [types.SimpleNamespace(x=[]) for _ in srcs])
    with pytest.raises(SystemExit, match="every sample is empty; nothing to score"):
        D.sample_stream(None, D.Config(), meta, 2)


def test_unconditional_word_shakespeare(tmp_path):
    data = str(tmp_path / "shk")
    run_cli(["data/shakespeare_word/prepare.py", f"--out_dir={data}"])
    out = str(tmp_path / "out")
    small = [f"--data_dir={data}", f"--out_dir={out}", "--dataset=shakespeare_word", "--n_layer=1", "--n_embd=32",
             "--n_head=2", "--batch_size=8", "--eval_iters=1", "--seq_len=12", "--max_len=24",
             "--block_size=32"]
    r = run_cli(["diffuser.py", "--train", "--sample", "--bootstrap=null", "--max_iters=4", "--eval_interval=4",
                 "--num_samples=2", "--T=3"] + small)
    assert r.stdout.count("=== sample") == 2 and "from the null bootstrap" in r.stdout
    r = run_cli(["diffuser.py", "--sample", "--bootstrap=random", "--decode=sample", "--top_p=0.6"] + small[:2])
    assert "from the random bootstrap" in r.stdout
    with pytest.raises(SystemExit, match="--bootstrap=source needs sequence-to-sequence data"):
        D.main(["--train", "--max_iters=2", "--bootstrap=source"] + small)
    with pytest.raises(SystemExit, match="random bootstrap has --seq_len=30 words, more than --max_len=24"):
        D.main(["--sample", "--bootstrap=random", "--seq_len=30"] + small[:2])  # was cut to 24 in silence


# ----------------------------------------------------------------------------------------------
# The autoregressive bootstrap and --eval --gen: ar.py drafts and judges on the same words

CYCLE = ["one", "two", "three", "four", "five", "six"]


def write_word_stream(path, words, n=6000, seed=0):
    """A word-level dataset: the words in a cycle (w_i -> w_{i+1}), jumping to a random word ~1 time in 8."""
    rng = np.random.default_rng(seed)
    stream, i = [], 0
    for _ in range(n):
        if rng.random() < 0.125:
            i = int(rng.integers(len(words)))
        stream.append(4 + i % len(words))
        i += 1
    corpus.write_split(path, stream[:9 * n // 10], stream[9 * n // 10:],
                       {"tokenizer": "word", "words": list(SPECIALS) + list(words), "vocab_size": 4 + len(words)})
    return path


def cycle_share(seqs):
    """Share of consecutive word pairs that follow the cycle (chance: 1/6)."""
    pairs = [(a, b) for s in seqs for a, b in zip(s, s[1:])]
    return np.mean([b - 4 == (a - 4 + 1) % len(CYCLE) for a, b in pairs])


AR_SMALL = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=16", "--eval_iters=1",
            "--log_interval=50", "--warmup_iters=10", "--lr=3e-3"]


@pytest.fixture(scope="module")
def word_models(tmp_path_factory):
    """A toy word dataset, an ar.py checkpoint on it (through its CLI) and a tiny DiffusER on it."""
    root = tmp_path_factory.mktemp("words")
    data = write_word_stream(str(root / "data"), CYCLE)
    ar_ckpt = str(root / "ar")
    run_cli(["ar.py", "--train", f"--data_dir={data}", f"--out_dir={ar_ckpt}", "--max_iters=150",
             "--eval_interval=150"] + AR_SMALL)
    out = str(root / "diffuser")
    small = [f"--data_dir={data}", f"--out_dir={out}"]
    run_cli(["diffuser.py", "--train", "--bootstrap=null", "--T=3", "--n_layer=1", "--n_embd=32", "--n_head=2",
             "--batch_size=8", "--seq_len=8", "--max_len=16", "--block_size=20", "--max_iters=20",
             "--eval_interval=20", "--eval_iters=1", "--log_interval=10"] + small)
    return {"root": root, "data": data, "out": out, "ar": os.path.join(ar_ckpt, "ckpt.pt"), "small": small}


def test_e2e_keys_are_refused_for_an_unconditional_model(word_models):
    """--eval --eval_split=test on words of your own scored the validation split and logged it as the test's;
    --eval_mrs was ignored (both pick E2E's meaning representations, as --source does)."""
    for verb, key in (("--eval", "--eval_split=test"), ("--eval", "--eval_mrs=3"), ("--sample", "--source=name[x]")):
        with pytest.raises(SystemExit, match=f"{key.split('=')[0]} is for sequence-to-sequence models .* unconditional: drop it"):
            D.main([verb, key, f"--out_dir={word_models['out']}", f"--data_dir={word_models['data']}"])


def test_ar_drafts_follow_the_drafter(word_models):
    _, model, _, meta, _ = D.load({"data_dir": word_models["data"], "out_dir": word_models["out"]})
    torch.manual_seed(0)
    drafts = D.ar_drafts(word_models["ar"], meta, 64, 12, torch.device("cpu"))
    assert len(drafts) == 64 and all(len(d) == 12 for d in drafts)
    assert all(w not in (0, 1, 3) and w < 4 + len(CYCLE) for d in drafts for w in d)  # never <s> </s> <pad>
    share = cycle_share(drafts)
    assert share > 0.6, share  # the drafter learned the cycle (chance 1/6, data ~0.88)


def test_ar_drafts_match_an_uncached_sampler(word_models):
    """The cached drafter draws, for the same uniforms, what one causal forward per word over [BOS] + every word
    so far gives, up to a draft as long as the drafter's context; a longer draft stops with one line."""
    _, _, _, meta, _ = D.load({"data_dir": word_models["data"], "out_dir": word_models["out"]})
    n, L = 16, 16  # L: the drafter's block_size (AR_SMALL)
    torch.manual_seed(1)
    cached = D.ar_drafts(word_models["ar"], meta, n, L, torch.device("cpu"))
    torch.manual_seed(1)  # then load as ar_drafts does (building the modules draws their initial weights)
    judge, _ = trainer.load_judge(word_models["ar"], meta)
    assert judge["backbone"].block_size == L
    x, V = torch.zeros((n, 0), dtype=torch.long), judge["head"].out_features
    with torch.no_grad(), common.autocast(torch.device("cpu")):
        for _ in range(L):
            logits = judge["head"](judge["backbone"](torch.cat([torch.full((n, 1), V), x], 1))[:, -1])
            probs = torch.softmax(logits.double(), -1)
            probs[:, D.SPECIALS] = 0.0
            x = torch.cat([x, common.sample_categorical(probs, torch.rand(n, dtype=torch.float64))[:, None]], 1)
    assert cached == x.tolist()
    with pytest.raises(SystemExit, match="does not fit the drafter's context"):
        D.ar_drafts(word_models["ar"], meta, 2, L + 1, torch.device("cpu"))


def test_cli_autoregressive_bootstrap_and_eval_gen(word_models):
    small, ar_ckpt = word_models["small"], word_models["ar"]
    r = run_cli(["diffuser.py", "--sample", "--show", "--bootstrap=autoregressive", f"--ar_ckpt={ar_ckpt}",
                 "--steps=2", "--num_samples=3"] + small)
    assert r.stdout.count("=== sample") == 3 and "from the autoregressive bootstrap, 2 revisions" in r.stdout
    assert "t= 4 |" not in r.stdout  # no bootstrap revision (t = T + 1): the draft gets the ordinary t = 2, 1
    drafts = [line.split("|", 1)[1].split() for line in r.stdout.splitlines() if line.startswith("  t= 2 |")]
    assert len(drafts) == 3 and all(sum(not w.startswith("[+") for w in d) == 8 for d in drafts)  # seq_len words
    samples = [line.split() for line in r.stdout.splitlines()
               if line and not line.startswith(("===", "  t=", "("))]
    assert len(samples) == 3 and all(set(s) <= set(CYCLE) | {"<unk>"} for s in samples)

    for boot in ("null", "autoregressive"):
        r = run_cli(["diffuser.py", "--eval", "--gen", f"--bootstrap={boot}", f"--judge={ar_ckpt}",
                     f"--ar_ckpt={ar_ckpt}", "--num_samples=4", "--steps=2"] + small)
        m = re.search(r"gen: NLL (\S+) nats/token under the judge", r.stdout)
        assert m and math.isfinite(float(m.group(1))) and float(m.group(1)) >= 0, r.stdout
        assert ("flatters" in r.stdout) == (boot == "autoregressive")
        assert re.search(r"\(4 samples, \d+ tokens packed", r.stdout), r.stdout  # not "4 samples of <the stream>"
        log = [json.loads(line) for line in open(os.path.join(word_models["out"], "log.jsonl"))]
        assert math.isclose(log[-1]["eval_full"]["gen_nll"], float(m.group(1)), abs_tol=1e-4)


def test_autoregressive_bootstrap_bad_inputs(word_models):
    small, root = word_models["small"], word_models["root"]
    other = write_word_stream(str(root / "other"), ["red", "green", "blue"], n=600)
    run_cli(["ar.py", "--train", f"--data_dir={other}", f"--out_dir={root / 'ar_other'}", "--max_iters=2",
             "--eval_interval=2"] + AR_SMALL)
    wrong = str(root / "ar_other" / "ckpt.pt")
    r = run_cli(["diffuser.py", "--sample", "--bootstrap=autoregressive", f"--ar_ckpt={wrong}"] + small, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"--ar_ckpt={wrong} was trained on another tokenizer/vocabulary" in r.stderr

    def fails(args, message):
        with pytest.raises(SystemExit) as e:
            D.main(args + small)
        assert message in str(e.value) and "\n" not in str(e.value), (args, str(e.value))

    missing = str(root / "nowhere.pt")
    fails(["--sample", "--bootstrap=autoregressive", f"--ar_ckpt={missing}"], f"no ar.py checkpoint at --ar_ckpt={missing}")
    fails(["--eval", "--gen", f"--judge={missing}", "--num_samples=1", "--steps=1"], f"no ar.py checkpoint at --judge={missing}")
    fails(["--eval", "--gen", f"--judge={wrong}", "--num_samples=1", "--steps=1"], "another tokenizer/vocabulary")
    fails(["--sample", "--bootstrap=autoregressive", f"--ar_ckpt={word_models['ar']}", "--seq_len=40"],
          "more than --max_len=16")
    fails(["--train", "--bootstrap=autoregressive", "--max_iters=1"], "is a decoding option")


def test_windows_of_unconditional_text_reach_its_last_word(tmp_path):
    """Random windows of seq_len words start anywhere up to len - seq_len inclusive; a split of exactly
    seq_len words is one window (it was refused, and the last word of every split was never drawn)."""
    words = list(SPECIALS) + LETTERS
    meta = corpus.write_split(str(tmp_path), [4 + i for i in range(10)], [4, 5, 6], {"tokenizer": "word", "words": words,
                                                                                     "vocab_size": len(words)})
    cfg = D.Config(data_dir=str(tmp_path), seq_len=3, bootstrap="null")
    batches = D.EditBatches(cfg, meta, 0)
    rng = np.random.default_rng(0)
    assert {batches.draw_x0("train", rng)[1][0] for _ in range(300)} == set(range(4, 12))  # starts 0..7 of 10 words
    assert batches.draw_x0("val", rng)[1] == [4, 5, 6]
    assert isinstance(batches.streams["train"], np.memmap)  # a window at a time: the split is never read whole
    assert batches.unigram == [0] * 4 + [1] * 10 + [0] * (len(words) - 14)
    with pytest.raises(SystemExit, match="a val split of at least --seq_len words"):
        D.EditBatches(dataclasses.replace(cfg, seq_len=4), meta, 0)


def test_a_random_bootstrap_longer_than_max_len_is_refused_before_training():
    """On E2E, --bootstrap=random --seq_len above --max_len trained on bootstraps cut to max_len, then decoding
    refused that --seq_len; both now stop at the boundary."""
    with pytest.raises(SystemExit, match="the random bootstrap has --seq_len=49 words, more than --max_len=48"):
        D.check_config(D.Config(bootstrap="random", seq_len=49))
    D.check_config(D.Config(bootstrap="source", seq_len=49))  # a source bootstrap does not read --seq_len


def test_a_batch_of_empty_drafts_has_finite_losses():
    """--bootstrap=null drafts x_t = [] half the time: a batch of only those has no tag target, and the tag
    cross-entropy was 0/0 = NaN, which stopped the run as diverged. Each term is a mean over its targets,
    0 where there are none, and the others still learn."""
    torch.manual_seed(0)
    cfg = D.Config(T=3, n_layer=1, n_head=2, n_embd=32, block_size=40, max_len=12, seq_len=5, bootstrap="null", boot_prob=1.0)
    model = D.DiffusER(cfg, 12)
    rng = np.random.default_rng(0)
    batch = D.collate([D.make_example(None, [4, 5, 6, 7, 8], rng, D.NoiseTokens([0] * 4 + [1] * 8), cfg)], 12, rng)
    assert (batch.tag_y < 0).all()  # the draft is empty: no token to tag
    terms = D.loss_terms(model, batch)
    tag, ins, gen = (float(v.detach()) for v in terms)
    assert tag == 0.0 and math.isfinite(ins) and ins > 0 and gen > 0
    sum(terms).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_show_marks_the_words_a_cut_at_max_len_drops():
    """Insertions that push a revision past max_len cut the canvas there; --show printed the words after the
    cut as kept (and the cut slots as [+...+]), though x_{t-1} holds none of them."""
    tok = corpus.WordTokenizer.__new__(corpus.WordTokenizer)
    tok.words = list(SPECIALS) + LETTERS  # a = 4, b = 5, ...
    xt, tags, counts = [4, 5, 6], [D.KEEP, D.KEEP, D.REPLACE], [2, 2, 2, 2]
    canvas, slots = D.build_canvas(xt, tags, counts, len(tok.words), limit=4)
    assert canvas[2] == 4 and len(slots) == 3  # two slots, a, one slot: b, c and the rest are cut
    assert D.mark_revision(tok, xt, tags, counts, [7, 8, 9], limit=4) == "[+d+] [+e+] a [+f+] [-b-] [-c-]"
    assert D.mark_revision(tok, [4, 5], [D.KEEP, D.DELETE], [0, 0, 1], [7], limit=4) == "a [-b-] [+d+]"  # no cut


def test_the_bootstrap_revision_runs_only_on_the_bootstrap_it_learnt(monkeypatch):
    """t = T + 1 learnt to turn the training's bootstrap (the MR, on E2E) into the text; decoding from another
    (random words, the empty sequence) ran it all the same, on inputs it never saw."""
    seen = []
    monkeypatch.setattr(D, "decode", lambda model, starts, srcs, cfg, times, *a: seen.append(times))
    model = types.SimpleNamespace(max_len=8, tagger=types.SimpleNamespace(block_size=40))
    for trained, bootstrap in (("source", "source"), ("source", "random"), ("source", "null"), (True, "null"), ("", "null")):
        meta = {"boot_trained": trained, "unigram": [0] * 4 + [1] * 8}
        D.run_decode(model, D.Config(T=3, bootstrap=bootstrap, seq_len=4), meta, [[4, 5]])
    assert seen == [[4, 3, 2, 1], [3, 2, 1], [3, 2, 1], [4, 3, 2, 1], [3, 2, 1]]  # True: an older checkpoint, as before
    with pytest.raises(SystemExit, match="--bootstrap=source needs a source and a model trained with it"):
        D.run_decode(model, D.Config(T=3), {"boot_trained": "random", "unigram": [1] * 12}, [[4, 5]])


# ----------------------------------------------------------------------------------------------
# Guards found by a mutation probe: each pins one rule of the edit machinery or of decoding


def test_the_canvas_tells_kept_replaced_and_open_slots_apart():
    """The generator's canvas: a kept word as itself, a word to replace as V + w (the generator sees what it
    replaces, and that it must go), an insertion slot as 2V, an id no word or replacement has; deletions gone."""
    V = 10
    xt, tags, counts = [4, 5, 6, 9], [D.KEEP, D.REPLACE, D.DELETE, D.REPLACE], [1, 0, 2, 0, 1]
    canvas, slots = D.build_canvas(xt, tags, counts, V)
    assert canvas == [2 * V, 4, V + 5, 2 * V, 2 * V, V + 9, 2 * V]
    assert slots == [0, 2, 3, 4, 5, 6]


def test_noise_draws_no_special_token_at_the_ends_of_its_cdf():
    """rng.random() is in [0, 1), so u = 0 happens: the inverse CDF must then give the first word with mass,
    never <s> (a zero-mass head of the CDF), and u just below 1 the last word with mass."""
    class Fixed:  # an rng whose uniforms are all u
        def __init__(self, u):
            self.u = u

        def random(self, k):
            return np.full(k, self.u)

    noise = D.NoiseTokens([7, 7, 5, 7, 10, 0, 30])  # <s> </s> <unk> <pad> a b (unseen) c
    assert noise.draw(Fixed(0.0), 3) == (2, 2, 2)
    assert noise.draw(Fixed(np.nextafter(1.0, 0.0)), 1) == (6,)


def test_each_revision_is_conditioned_on_its_own_time_step(monkeypatch):
    """A training pair of step t is labelled t (T + 1: the bootstrap revision), and decoding revision t feeds
    that t to the tagger and the generator: a shift would run each revision with another step's conditioning."""
    cfg = D.Config(T=4, boot_prob=0.3, bootstrap="null", max_len=20)
    rng, noise = np.random.default_rng(0), D.NoiseTokens([0] * 4 + [1] * 8)
    exs = [D.make_example(None, [4, 5, 6, 7], rng, noise, cfg) for _ in range(30)]
    assert D.collate(exs, 12).t.tolist() == [float(e[5]) for e in exs]
    cfg, model = tiny_model(0)
    seen = []
    for name in ("tag", "fill"):
        real = getattr(model, name)
        monkeypatch.setattr(model, name, lambda ids, mask, t, real=real, name=name:
                            seen.append((name, tuple(set(t.tolist())))) or real(ids, mask, t))
    srcs, starts = random_problems(1, 3)
    D.decode(model, starts, srcs, cfg, [4, 3, 1], "greedy")
    assert [t for name, t in seen if name == "tag"] == [(4.0,), (3.0,), (1.0,)]
    fill_times = [t for name, t in seen if name == "fill"]
    assert fill_times and set(fill_times) <= {(4.0,), (3.0,), (1.0,)}


def test_a_bootstrap_longer_than_max_len_is_cut_alike_in_training_and_decoding():
    """x_t never has more than max_len words (the insertion head's range, the context): a longer source
    bootstrap is cut to its first max_len words when training draws it and when decoding starts from it."""
    cfg = D.Config(T=3, boot_prob=1.0, bootstrap="source", max_len=5)
    src = [4, 5, 6, 7, 8, 9, 10, 11]
    _, xt, _, _, _, t = D.make_example(src, [4, 5, 6], np.random.default_rng(0), D.NoiseTokens([0] * 4 + [1] * 8), cfg)
    assert t == cfg.T + 1 and xt == src[:5]
    cfg, model = tiny_model(0)  # max_len = 12
    long = list(range(4, 12)) * 2
    h = D.decode(model, [long], [[4, 5]], cfg, [1], "greedy")[0]
    assert h.history[0][1] == long[:cfg.max_len]


def replay_fill(model, pre, canvas, slots, fills, t):
    """log p of each fill, one generator forward per slot over the prefix and the canvas filled so far."""
    cur, lps = list(canvas), []
    for pos, w in zip(slots, fills):
        ids = torch.tensor([pre + cur])
        with torch.no_grad():
            lp = model.fill(ids, torch.ones_like(ids, dtype=torch.bool), torch.tensor([float(t)]))[0, len(pre) + pos]
        lp = lp.double().log_softmax(-1)
        lp[list(D.SPECIALS)] = -math.inf
        lps.append(lp)
        cur[pos] = w
    return cur, lps


def test_fills_are_the_generators_choices_at_their_slots():
    """Slot k is filled by the generator's distribution at its own position (after the conditioning prefix),
    given the words already chosen for slots < k; the job's score is the sum of the chosen words' log p."""
    cfg, model = tiny_model(3)
    V = model.vocab_size
    jobs = [([4, 5, 1, 0], [2 * V, 6, V + 7, 2 * V], [0, 2, 3]), ([0], [8, 2 * V], [1]), ([9, 1, 0], [5], [])]
    for (pre, canvas, slots), (score, x, fills) in zip(jobs, D.fill_slots(model, jobs, 2, "greedy", cfg)):
        cur, lps = replay_fill(model, pre, canvas, slots, fills, 2)
        assert x == cur and len(fills) == len(slots)
        assert fills == [int(lp.argmax()) for lp in lps]
        assert math.isclose(score, sum(float(lp[w]) for lp, w in zip(lps, fills)), rel_tol=1e-5, abs_tol=1e-5)
        assert score < 0 or not slots


@pytest.mark.parametrize("temperature, top_p", [(1e-4, 1.0), (1.0, 1e-9)])
def test_sampling_at_a_vanishing_temperature_or_nucleus_is_greedy(temperature, top_p):
    """--decode=sample tempers and truncates both the edit choices and the fills; at a vanishing temperature or
    nucleus it is greedy decoding: the same revisions, and the same log-probability scores."""
    cfg, model = tiny_model(1)
    cfg.temperature, cfg.top_p = temperature, top_p
    srcs, starts = random_problems(11, 8)
    torch.manual_seed(0)
    sampled = D.decode(model, starts, srcs, cfg, [3, 2, 1], "sample")
    greedy = D.decode(model, starts, srcs, cfg, [3, 2, 1], "greedy")
    for s, g in zip(sampled, greedy):
        assert s.x == g.x and [e[2:] for e in s.history] == [e[2:] for e in g.history]
        assert math.isclose(s.score, g.score, rel_tol=1e-9, abs_tol=1e-9)


def test_sampled_decoding_draws_the_fills_too():
    """--decode=sample draws the generator's words as well as the edits: with the edits certain (replace every
    word, insert nothing), copies of one start still come out different."""
    cfg, model = tiny_model(4)
    with torch.no_grad():
        for head, bias in ((model.tag_head, [0.0, 0.0, 50.0]), (model.ins_head, [50.0] + [0.0] * cfg.max_len)):
            head.weight.zero_()
            head.bias.copy_(torch.tensor(bias))
    torch.manual_seed(0)
    out = D.decode(model, [[4, 5, 6]] * 16, [None] * 16, cfg, [1], "sample")
    assert all(h.history[0][2] == [D.REPLACE] * 3 and sum(h.history[0][3]) == 0 for h in out)
    assert len({tuple(h.x) for h in out}) > 1


def test_greedy_edits_read_each_tokens_own_position():
    """The tag of word j of x_t is read at its own position (after the prefix and <s>), the insertion count of
    the gap after it there too, and the front gap's at <s>: greedy takes each one's argmax."""
    cfg, model = tiny_model(5)
    srcs, starts = random_problems(13, 8)
    checked = 0
    for s, x, h in zip(srcs, starts, D.decode(model, starts, srcs, cfg, [2], "greedy")):
        if not x:
            continue
        ids = torch.tensor([D.prefix(s) + [corpus.WordTokenizer.START] + x])
        with torch.no_grad():
            tag, ins = model.tag(ids, torch.ones_like(ids, dtype=torch.bool), torch.tensor([2.0]))
        o = len(D.prefix(s))
        assert h.history[0][2] == tag[0, o + 1:].argmax(-1).tolist()
        assert h.history[0][3] == ins[0, o:].argmax(-1).tolist()
        checked += 1
    assert checked >= 4


def test_only_an_empty_sequence_is_forced_to_insert():
    """A non-empty x_t may keep every word and insert nothing, however short (the forced insertion is for the
    empty sequence alone)."""
    cfg, model = tiny_model(2)
    with torch.no_grad():
        for head, bias in ((model.tag_head, [50.0, 0.0, 0.0]), (model.ins_head, [50.0] + [0.0] * cfg.max_len)):
            head.weight.zero_()
            head.bias.copy_(torch.tensor(bias))
    for h in D.decode(model, [[7], [5, 6]], [[4], [4]], cfg, [2], "greedy"):
        assert h.x == h.history[0][1] and sum(h.history[0][3]) == 0


def test_decode_flags_pick_the_search():
    """--decode: greedy and sample are single hypotheses; beam searches beam_b edit sets and carries 1; beam2d
    carries beam_r hypotheses across revisions (the paper's 2D beam, b = 5, r = 3)."""
    cfg = D.Config(beam_b=4, beam_r=2)
    assert [D.strategy_of(dataclasses.replace(cfg, decode=d)) for d in ("greedy", "sample", "beam", "beam2d")] == [
        ("greedy", 1, 1), ("sample", 1, 1), ("beam", 4, 1), ("beam", 4, 2)]


def test_evaluate_reports_the_mean_of_each_term(monkeypatch):
    """--eval and training's evals: each cross-entropy averaged over the eval_iters batches, val_loss their sum
    (the training loss)."""
    cfg = D.Config(T=3, n_layer=1, n_head=2, n_embd=32, block_size=40, max_len=12, bootstrap="null", eval_iters=2)
    torch.manual_seed(0)
    model = D.DiffusER(cfg, 12)
    rng, noise = np.random.default_rng(0), D.NoiseTokens([0] * 4 + [1] * 8)
    batches = [D.collate([D.make_example(None, [4, 5, 6, 7, 8], rng, noise, cfg) for _ in range(3)], 12, rng)
               for _ in range(2)]
    monkeypatch.setattr(corpus, "val_batches", lambda b, c: iter(b))
    stats = D.evaluate(model, batches, cfg)
    with torch.no_grad():
        want = np.mean([[float(v) for v in D.loss_terms(model, b)] for b in batches], 0)
    got = [stats["val_tag_ce"], stats["val_ins_ce"], stats["val_gen_ce"]]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert math.isclose(stats["val_loss"], sum(want), rel_tol=1e-5)


def test_a_nucleus_stops_at_the_first_prefix_reaching_top_p():
    """Nucleus: the smallest most-probable set whose mass reaches top_p; a word that only completes a mass
    already at top_p is cut."""
    lp = np.log(np.tile([[0.5, 0.25, 0.25]], (300, 1)))
    torch.manual_seed(0)
    assert (D.sample_choice(lp, 1.0, 0.5) == 0).all()
    assert set(D.sample_choice(lp, 1.0, 0.75).tolist()) == {0, 1}


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_fills_are_never_special_tokens(strategy):
    """A slot holds a word: never <s>, </s> or <pad>, however likely the generator finds them (<unk> may)."""
    cfg, model = tiny_model(6)
    V = model.vocab_size
    with torch.no_grad():
        model.gen_head.weight.zero_()
        model.gen_head.bias.fill_(0.0)
        model.gen_head.bias[list(D.SPECIALS)] = 50.0
    torch.manual_seed(0)
    out = D.fill_slots(model, [([0], [2 * V, 2 * V, V + 5], [0, 1, 2])] * 4, 1, strategy, cfg)
    assert all(len(f) == 3 and not set(f) & set(D.SPECIALS) for _, _, f in out)


def test_show_marks_each_kind_of_edit():
    """--show writes a revision as kept words plain, [-deleted-], [old->new] for a replacement (the word of x_t,
    then the generator's), and [+inserted+], in slot order."""
    tok = corpus.WordTokenizer.__new__(corpus.WordTokenizer)
    tok.words = list(SPECIALS) + LETTERS  # a = 4, b = 5, ...
    xt, tags, counts = [4, 5, 6], [D.KEEP, D.REPLACE, D.DELETE], [1, 0, 0, 1]
    assert D.mark_revision(tok, xt, tags, counts, [7, 8, 9], limit=10) == "[+d+] a [b->e] [-c-] [+f+]"


def test_decoding_in_chunks_changes_nothing():
    """--decode_batch only splits the network calls: each row keeps its own slot position, so chunks of two rows
    decode what one call for all does."""
    cfg, model = tiny_model(7)
    srcs, starts = random_problems(17, 7)
    whole = D.decode(model, starts, srcs, cfg, [2, 1], "beam", b=2, r=2)
    cfg.decode_batch = 2
    for a, c in zip(whole, D.decode(model, starts, srcs, cfg, [2, 1], "beam", b=2, r=2)):
        assert a.x == c.x and math.isclose(a.score, c.score, rel_tol=1e-6, abs_tol=1e-6)
