"""common.Transformer, the one backbone forward: the key/value cache computes the full causal
forward position by position (a refill included), embeddings in equal token ids in, and every
layout (plain, adaLN, the published DDiT options, Diffusion-LM's latent model) matches the block
equations restated here from scratch; and every method trains and samples under bf16 autocast, as on a GPU."""
import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import diffusion_lm
import trainer


def randomized(model, seed=0):
    """Every parameter random (norm weights near 1, matrices of unit gain), so zero-init gates and
    adaLN hide no term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny(vocab_size=11, block_size=16, **kw):
    torch.manual_seed(0)
    return randomized(common.Transformer(vocab_size, 2, 2, 32, block_size, **kw))


# ----------------------------------------------------------------------------------------------
# The block equations, restated in float64 from the parameters' names


def layer_norm(x, weight=None):
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return y if weight is None else y * weight


def rotate(x):
    """x (B, H, L, hd): the pair (i, i + hd/2) at position p turned by p / 10000^(2i/hd)."""
    hd, L = x.shape[-1], x.shape[2]
    angle = torch.arange(L).double()[:, None] / 10000.0 ** (torch.arange(0, hd, 2).double() / hd)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def linear(p, name, x):
    return x @ p[name + ".weight"].T + (p[name + ".bias"] if name + ".bias" in p else 0)


def reference(model, x, t=None, n_head=2, causal=False):
    """x: ids (B, L) or embeddings (B, L, C) -> hidden states (B, L, C), float64."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    h = p["wte.weight"][x] if x.dim() == 2 else x.double()
    B, L, C = h.shape
    c = None
    if t is not None:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(128).double() / 128)
        # the angles in float32 as the model takes them: their rounding is not what is under test
        args = (t.float()[:, None] * freqs.float()).double()
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        c = F.silu(linear(p, "time_mlp.2", F.silu(linear(p, "time_mlp.0", emb))))  # (B, cond_dim)
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        if c is None:
            mod = [0, 0, p[b + "gate1"], 0, 0, p[b + "gate2"]]
        else:
            mod = linear(p, b + "ada", c)[:, None].chunk(6, -1)
        a = layer_norm(h, p.get(b + "ln1.weight")) * (1 + mod[1]) + mod[0]
        q, k, v = linear(p, b + "attn.qkv", a).view(B, L, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(C // n_head)  # (B, H, L, L)
        if causal:
            scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
        h = h + mod[2] * linear(p, b + "attn.proj", y)
        m = layer_norm(h, p.get(b + "ln2.weight")) * (1 + mod[4]) + mod[3]
        h = h + mod[5] * linear(p, b + "mlp.2", gelu_tanh(linear(p, b + "mlp.0", m)))
    if c is None:
        return layer_norm(h, p["ln_f.weight"])
    shift, scale = linear(p, "ada_f", c)[:, None].chunk(2, -1)
    return layer_norm(h, p.get("ln_f.weight")) * (1 + scale) + shift


LAYOUTS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "adaLN": dict(cond_dim=16),
    "DDiT": dict(cond_dim=16, norm_weight=True, mlp_bias=True),
    "DDiT causal": dict(cond_dim=16, norm_weight=True, mlp_bias=True, causal=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_matches_the_restated_equations(layout):
    kw = LAYOUTS[layout]
    model = tiny(**kw)
    x = torch.randint(11, (3, 13), generator=torch.Generator().manual_seed(1))
    t = torch.rand(3, generator=torch.Generator().manual_seed(2)) * 100 if kw.get("cond_dim") else None
    with torch.no_grad():
        out = model(x, t)
    want = reference(model, x, t, causal=kw.get("causal", False))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_ddit_options_build_the_published_parameter_shapes():
    C, cond = 32, 16
    ddit = {k: tuple(v.shape) for k, v in common.Transformer(11, 2, 2, C, 16, cond_dim=cond, norm_weight=True,
                                                               mlp_bias=True).state_dict().items()}
    for name in ("blocks.1.ln1.weight", "blocks.1.ln2.weight", "ln_f.weight", "blocks.1.mlp.2.bias"):
        assert ddit[name] == (C,), name
    assert ddit["blocks.1.mlp.0.bias"] == (4 * C,)
    assert ddit["blocks.1.ada.weight"] == (6 * C, cond) and ddit["blocks.1.ada.bias"] == (6 * C,)
    assert ddit["ada_f.weight"] == (2 * C, cond) and ddit["ada_f.bias"] == (2 * C,)
    assert ddit["blocks.1.attn.qkv.weight"] == (3 * C, C) and "blocks.1.attn.qkv.bias" not in ddit
    assert not any("gate" in k or k.endswith("ln1.bias") for k in ddit)
    # the defaults keep today's layout: adaLN models have no norm weights and no MLP biases
    ada = common.Transformer(11, 2, 2, C, 16, cond_dim=cond).state_dict()
    assert set(ddit) - set(ada) == {"blocks.0.ln1.weight", "blocks.0.ln2.weight", "blocks.1.ln1.weight",
                                    "blocks.1.ln2.weight", "ln_f.weight", "blocks.0.mlp.0.bias",
                                    "blocks.0.mlp.2.bias", "blocks.1.mlp.0.bias", "blocks.1.mlp.2.bias"}
    assert set(ada) <= set(ddit)


# ----------------------------------------------------------------------------------------------
# Token ids or embeddings


@pytest.mark.parametrize("layout", ["plain", "causal", "adaLN"])
def test_embeddings_in_equal_ids_in(layout):
    model = tiny(**LAYOUTS[layout])
    x = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3.0, 700.0]) if LAYOUTS[layout].get("cond_dim") else None
    with torch.no_grad():
        assert torch.equal(model(model.wte(x), t), model(x, t))


@pytest.mark.parametrize("layout", ["plain", "adaLN"])
def test_padding_changes_no_real_positions_output(layout):
    """pad_mask (DiffusER's batches of unequal lengths): the real positions' outputs are those of the sequence
    alone, whatever the padding holds."""
    model = tiny(**LAYOUTS[layout])
    g = torch.Generator().manual_seed(5)
    x = torch.randint(11, (2, 9), generator=g)
    padded = torch.cat([x, torch.randint(11, (2, 4), generator=g)], 1)  # (2, 13)
    t = torch.tensor([3.0, 700.0]) if LAYOUTS[layout].get("cond_dim") else None
    with torch.no_grad():
        out = model(padded, t, pad_mask=(torch.arange(13) < 9).expand(2, 13))
        torch.testing.assert_close(out[:, :9], model(x, t), atol=1e-5, rtol=1e-5)


def test_a_model_without_a_token_table_takes_embeddings_only():
    model = tiny(vocab_size=0, cond_dim=16)
    assert model.wte is None and not any(k.startswith("wte") for k in model.state_dict())
    e = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([5.0, 50.0])
    with torch.no_grad():
        torch.testing.assert_close(model(e, t).double(), reference(model, e, t), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit):
        model(torch.zeros(2, 9, dtype=torch.long), t)


def test_diffusion_lm_latent_model_is_input_layer_backbone_head():
    """Diffusion-LM's denoiser: d -> C, learned positions, the adaLN backbone at time t * 1000 / T, head."""
    cfg = diffusion_lm.Config(n_layer=2, n_head=2, n_embd=32, block_size=12, embed_dim=8, T=200)
    torch.manual_seed(0)
    net = randomized(diffusion_lm.LatentTransformer(cfg, 8, 8, 2, cfg.T))
    xt = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 77, 199])
    with torch.no_grad():
        out = net(xt, t)
        e = net.inp(xt) + net.pos[:10]
        want = net.head(reference(net.backbone, e, t * 1000.0 / cfg.T).float())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert not any(k.startswith("backbone.wte") for k in net.state_dict())


# ----------------------------------------------------------------------------------------------
# Incremental causal decoding through the key/value cache


def decode(model, x, prefill, t=None):
    """Hidden states of x (B, L) from a fresh cache: a prefill of `prefill` positions, then one at a time."""
    cache = model.new_cache()
    with torch.no_grad():
        pieces = [model(x[:, :prefill], t, cache=cache)]
        for i in range(prefill, x.shape[1]):
            pieces.append(model(x[:, i:i + 1], t, cache=cache))
    assert cache.pos == x.shape[1]
    return torch.cat(pieces, 1), cache


@pytest.mark.parametrize("layout", ["causal", "DDiT causal"])
@pytest.mark.parametrize("prefill", [1, 5, 16])
def test_cached_decode_equals_the_full_causal_forward(layout, prefill):
    model = tiny(**LAYOUTS[layout])
    seq = torch.randint(11, (3, 40), generator=torch.Generator().manual_seed(prefill))
    t = torch.tensor([1.0, 20.0, 300.0]) if LAYOUTS[layout].get("cond_dim") else None
    got, cache = decode(model, seq[:, :16], prefill, t)
    with torch.no_grad():
        full = model(seq[:, :16], t)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)  # position by position
    with pytest.raises(SystemExit):  # a full cache takes no more: the caller refills it
        model(seq[:, 16:17], t, cache=cache)
    # the refill: a fresh cache over a later window (positions start again at 0), as ar.py slides
    got, _ = decode(model, seq[:, 24:40], min(prefill, 8), t)
    with torch.no_grad():
        full = model(seq[:, 24:40], t)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_cache_refuses_misuse():
    causal = tiny(causal=True)
    cache = causal.new_cache()
    x = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        causal(x, cache=cache)
        with pytest.raises(SystemExit):  # several positions only into an empty cache
            causal(x, cache=cache)
    with pytest.raises(SystemExit):  # a bidirectional model has no incremental decode
        tiny().new_cache()
    with pytest.raises(SystemExit, match="pad_mask is for bidirectional Transformers"):  # a causal model pads on the right
        causal(x, pad_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(SystemExit, match="n_embd=32 must split into n_head=3 heads of even size"):  # rotary turns pairs
        common.Transformer(11, 1, 3, 32, 16)


# ----------------------------------------------------------------------------------------------
# A fresh model, and eval mode


@pytest.mark.parametrize("layout", ["plain", "causal", "adaLN"])
def test_a_fresh_transformer_is_the_identity_before_its_norm(layout):
    """Zero-initialised gates (learned per channel, or adaLN's from the time embedding): every block of a new
    model adds nothing, so its output is the final norm of the token embeddings, whatever the time."""
    kw = LAYOUTS[layout]
    torch.manual_seed(0)
    model = common.Transformer(11, 3, 2, 32, 16, **kw).eval()
    x = torch.randint(11, (2, 9), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.5, 900.0]) if kw.get("cond_dim") else None
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), F.layer_norm(model.wte(x), (32,)), atol=1e-6, rtol=1e-6)


def test_residual_projections_start_smaller_by_sqrt_two_n_layer():
    """GPT-2's init: weights N(0, 0.02), those that write into the residual stream (attention's proj, the MLP's
    second Linear) N(0, 0.02 / sqrt(2 n_layer)); adaLN's layers start at 0 and norms at 1."""
    torch.manual_seed(0)
    n_layer = 8
    model = common.Transformer(11, n_layer, 2, 64, 16, mlp_bias=True, norm_weight=True, cond_dim=16)
    scaled = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if ".ada." in name or name.startswith("ada_f."):
            assert not p.any(), name
        elif name.endswith(("attn.proj.weight", "mlp.2.weight")):
            assert p.std().item() == pytest.approx(scaled, rel=0.1), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith(("ln1.weight", "ln2.weight")) or name == "ln_f.weight":
            assert torch.equal(p, torch.ones_like(p)), name


@pytest.mark.parametrize("layout", ["plain", "causal", "adaLN"])
def test_dropout_is_off_in_eval_mode(layout):
    """A model trained with --dropout samples and evaluates deterministically: in eval mode its forward is the
    dropout-free model's (attention's dropout too, which SDPA takes as an argument)."""
    kw = LAYOUTS[layout]
    x = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3.0, 700.0]) if kw.get("cond_dim") else None
    with torch.no_grad():
        torch.testing.assert_close(tiny(dropout=0.5, **kw)(x, t), tiny(**kw)(x, t), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# common.token_nll: the cross-entropy of every head over token ids (AR, MDLM, DiffusER, Diffusion-LM's rounding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,V,chunk", [(0, 5, 10), (1, 1, 1), (7, 3, 6), (10, 9, 27), (37, 50, 10**9), (64, 1000, 3000)])
def test_token_nll_is_cross_entropy_forward_and_back(monkeypatch, dtype, M, V, chunk):
    """token_nll(z, y) (M,) and its gradient are F.cross_entropy's in float64 on the same logits, chunk by chunk (chunks
    of chunk // V rows: a partial last one, one row each, one chunk for all), with an excluded -inf column, targets
    < 0 that count 0 with no gradient, and a strided z; the gradient comes in z's dtype, rounded once."""
    monkeypatch.setattr(common, "NLL_CHUNK", chunk)
    g = torch.Generator().manual_seed(M * V)
    z0 = (4 * torch.randn(M, 2 * V, generator=g)).to(dtype)[:, ::2]  # (M, V), every other column of a wider tensor
    y = torch.randint(V, (M,), generator=g)
    if V > 3:
        z0[:, 2] = -math.inf  # MDLM's [MASK] column: no target takes it
        y[y == 2] = 0
    y[1::3] = -100  # DiffusER's positions without a target
    w = torch.rand(M, generator=g)  # a weight per row, as MDLM's and the means' backward bring
    z = z0.clone().requires_grad_()
    nll = common.token_nll(z, y)
    (nll * w).sum().backward()
    ref_z = z0.double().requires_grad_()
    ref = F.cross_entropy(ref_z, y, ignore_index=-100, reduction="none")
    (ref * w.double()).sum().backward()
    assert nll.dtype == torch.float32 and nll.shape == (M,) and z.grad.dtype == dtype
    torch.testing.assert_close(nll.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), ref_z.grad, rtol=2**-8 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert not z.grad[1::3].any() and (V <= 3 or not z.grad[:, 2].any())


def test_token_nll_keeps_the_logits_alone_for_its_backward(monkeypatch):
    """The backward holds z itself (no copy) and a number a row, and fp32 work a chunk of rows at a time: forward and
    backward together allocate z's gradient and little more, where F.cross_entropy(z.float()) holds fp32 copies."""
    import bench
    monkeypatch.setattr(common, "NLL_CHUNK", 2**16)  # 16 rows of 4096 a chunk
    z = torch.randn(512, 4096, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(4096, (512,))
    nll = common.token_nll(z, y)  # alive while its node's tensors are read (torch 2.6 frees them with it)
    saved = nll.grad_fn.saved_tensors
    assert saved[0] is z or saved[0].data_ptr() == z.data_ptr()
    assert all(t.numel() <= 512 for t in saved[1:])

    def step(loss):
        z.grad = None
        loss(z, y).sum().backward()
        return z.grad

    size = z.numel() * z.element_size()
    ours = bench._peak_extra_bytes(lambda: step(common.token_nll), torch.device("cpu"))
    theirs = bench._peak_extra_bytes(lambda: step(lambda z, y: F.cross_entropy(z.float(), y, reduction="none")), torch.device("cpu"))
    chunk = 4 * common.NLL_CHUNK  # bytes of one fp32 chunk: its softmax, and the fp32 copy of its logits that makes it
    assert ours < size + 2.5 * chunk, (ours - size) / chunk  # its gradient and two chunks: a third when one outlives its loop
    assert 4 * size < theirs  # fp32 copies (2 units each) and the gradient


TINY = ["--n_layer=1", "--n_embd=32", "--batch_size=4", "--max_iters=4", "--eval_interval=4", "--eval_iters=1",
        "--log_interval=1", "--device=cpu"]
BF16_RUNS = {  # method -> (its --train settings on top of TINY, its --sample settings)
    "ddpm": (["--T=50"], ["--num_samples=64"]),
    "diffusion_lm": (["--n_head=2", "--T=50", "--steps=10"], ["--num_samples=2", "--mbr=1", "--steps=5"]),
    "mdlm": (["--n_head=2", "--block_size=32"], ["--num_samples=2", "--steps=8"]),
    "sedd": (["--n_head=2", "--block_size=32"], ["--num_samples=2", "--steps=8"]),
    "sedd_uniform": (["--n_head=2", "--block_size=32", "--graph=uniform"], ["--num_samples=2", "--steps=8"]),
    "diffuser": (["--n_head=2"], ["--num_samples=2", "--steps=1"]),
    "ar": (["--n_head=2", "--block_size=32"], ["--num_samples=2"]),
}


@pytest.mark.parametrize("run", sorted(BF16_RUNS))
def test_every_method_trains_and_samples_under_bf16_autocast(run, char_data, tmp_path, monkeypatch, capsys):
    """On a GPU common.autocast runs training, its evaluations and SEDD's and DiffusER's samplers in bf16, which
    the CPU never does. torch's CPU autocast casts nearly the same ops to bf16 and keeps the same ones in fp32,
    so it stands in for the GPU's: each method trains four iterations and samples with no dtype clash, every
    loss finite and within bf16 rounding of the same run in fp32 (same weights, batches and noise)."""
    method = run.split("_uniform")[0]
    mod = importlib.import_module(method)
    train_args, sample_args = BF16_RUNS[run]
    data = [f"--data_dir={char_data}"] if mod.Config.dataset == "shakespeare_char" else []  # prepared once, outside the repo
    losses = {}
    for precision in ("fp32", "bf16"):
        if precision == "bf16":
            bf16 = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
            monkeypatch.setattr(common, "autocast", bf16)
            monkeypatch.setattr(trainer, "autocast", bf16)
        out = f"--out_dir={tmp_path / precision}"
        mod.main(["--train", out] + TINY + train_args + data)
        with open(tmp_path / precision / "log.jsonl") as f:
            records = [json.loads(line) for line in f]
        losses[precision] = [r["loss"] for r in records if "loss" in r]
        mod.main(["--sample", out] + sample_args)
    capsys.readouterr()
    assert len(losses["bf16"]) == 4 and all(math.isfinite(x) for x in losses["bf16"]), losses
    assert losses["bf16"] != losses["fp32"]  # the forward did run in bf16
    torch.testing.assert_close(torch.tensor(losses["bf16"]), torch.tensor(losses["fp32"]), rtol=3e-2, atol=0)
