"""The published SEDD and MDLM checkpoints (--init_from, hub.py), offline.

Tiny synthetic checkpoints are written in each published file layout (the authors' key names and
config.json; model.safetensors or pytorch_model.bin) with random weights, adaLN included. They
must load with no key missing or extra, and difflm's logits must equal those of the DDiT block
equations restated below, written from the architecture, not from difflm's modules.
"""
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import corpus
import hub
import mdlm
import sedd
from conftest import ROOT, run_cli, shared_data

# ----------------------------------------------------------------------------------------------
# Synthetic checkpoints in the published layouts


def ddit_state(n_out, d, c, n_blocks, n_heads, prefix, seed):
    """Random weights under the authors' names (DDiT: sigma_map, blocks, output_layer) + the rotary buffer."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    w = {"vocab_embed.embedding": rnd(n_out, d), "sigma_map.mlp.0.weight": rnd(c, 256, scale=0.1),
         "sigma_map.mlp.0.bias": rnd(c, scale=0.1), "sigma_map.mlp.2.weight": rnd(c, c, scale=c ** -0.5),
         "sigma_map.mlp.2.bias": rnd(c, scale=0.1), "rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, d // n_heads, 2).float() / (d // n_heads))}
    for i in range(n_blocks):
        b = f"blocks.{i}."
        w.update({b + "norm1.weight": 1 + rnd(d, scale=0.1), b + "norm2.weight": 1 + rnd(d, scale=0.1),
                  b + "attn_qkv.weight": rnd(3 * d, d, scale=d ** -0.5), b + "attn_out.weight": rnd(d, d, scale=d ** -0.5),
                  b + "mlp.0.weight": rnd(4 * d, d, scale=d ** -0.5), b + "mlp.0.bias": rnd(4 * d, scale=0.1),
                  b + "mlp.2.weight": rnd(d, 4 * d, scale=(4 * d) ** -0.5), b + "mlp.2.bias": rnd(d, scale=0.1),
                  b + "adaLN_modulation.weight": rnd(6 * d, c, scale=0.3 * c ** -0.5), b + "adaLN_modulation.bias": rnd(6 * d, scale=0.1)})
    w.update({"output_layer.norm_final.weight": 1 + rnd(d, scale=0.1), "output_layer.linear.weight": rnd(n_out, d, scale=d ** -0.5),
              "output_layer.linear.bias": rnd(n_out, scale=0.1), "output_layer.adaLN_modulation.weight": rnd(2 * d, c, scale=0.3 * c ** -0.5),
              "output_layer.adaLN_modulation.bias": rnd(2 * d, scale=0.1)})
    return {prefix + k: v.contiguous() for k, v in w.items()}


def write(path, config, state, fmt):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if fmt == "safetensors":
        save_file(state, os.path.join(path, "model.safetensors"))
    else:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    return str(path)


def write_sedd(path, tokens, hidden, cond, n_blocks, n_heads, length, graph="absorb", fmt="safetensors", seed=0):
    """SEDD's layout: config.json is the training config (the hub mixin's), weights at the top level."""
    config = {"ngpus": 8, "tokens": tokens, "training": {"batch_size": 512, "ema": 0.9999},
              "graph": {"type": graph, "file": "data", "report_all": False},
              "noise": {"type": "loglinear" if graph == "absorb" else "geometric", "sigma_min": 1e-4, "sigma_max": 20},
              "model": {"name": "small", "type": "ddit", "hidden_size": hidden, "cond_dim": cond, "length": length,
                        "n_blocks": n_blocks, "n_heads": n_heads, "scale_by_sigma": graph == "absorb", "dropout": 0.1}}
    n_out = tokens + (graph == "absorb")
    return write(path, config, ddit_state(n_out, hidden, cond, n_blocks, n_heads, "", seed), fmt)


def write_mdlm(path, vocab_size, hidden, cond, n_blocks, n_heads, length, fmt="safetensors", seed=0):
    """MDLM's layout: a transformers-style MDLMConfig, every weight under backbone."""
    config = {"architectures": ["MDLM"], "model_type": "mdlm", "vocab_size": vocab_size, "model_length": length,
              "hidden_dim": hidden, "cond_dim": cond, "n_blocks": n_blocks, "n_heads": n_heads, "dropout": 0.1,
              "time_conditioning": False, "return_dict": False, "torch_dtype": "float32"}
    return write(path, config, ddit_state(vocab_size, hidden, cond, n_blocks, n_heads, "backbone.", seed), fmt)


SMALL = dict(hidden=16, cond=8, n_blocks=1, n_heads=2, length=8)  # the error tests' layout: 20 tokens, 21 ids in MDLM

LAYOUTS = {  # name -> (writer, its arguments): tiny dims, each set differently so config.json must be read
    "sedd-small": (write_sedd, dict(tokens=50, hidden=24, cond=16, n_blocks=2, n_heads=3, length=12)),
    "sedd-medium": (write_sedd, dict(tokens=50, hidden=32, cond=8, n_blocks=3, n_heads=4, length=16, fmt="bin")),
    "mdlm-owt": (write_mdlm, dict(vocab_size=51, hidden=24, cond=12, n_blocks=2, n_heads=2, length=12)),
}

# ----------------------------------------------------------------------------------------------
# The DDiT equations, restated (float64)


def reference_logits(W, p, x, sigma, n_heads, scale_by_sigma):
    """W: the authors' state dict, p its prefix; x (B, L) ids; sigma (B,) -> (B, L, n_out)."""
    W = {k[len(p):]: v.double() for k, v in W.items()}

    def lin(h, name):
        return h @ W[name + ".weight"].T + (W[name + ".bias"] if name + ".bias" in W else 0)

    def norm(h, name):  # LayerNorm, weight only
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * W[name + ".weight"]

    B, L = x.shape
    h = W["vocab_embed.embedding"][x]
    d = h.shape[-1]
    hd = d // n_heads
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    emb = torch.cat([torch.cos(sigma.double()[:, None] * freqs), torch.sin(sigma.double()[:, None] * freqs)], -1)
    c = F.silu(lin(F.silu(lin(emb, "sigma_map.mlp.0")), "sigma_map.mlp.2"))  # (B, cond)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * (1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cos, sin = torch.cos(angle).repeat(1, 2), torch.sin(angle).repeat(1, 2)  # (L, hd)

    def rotate(q):  # q (B, L, H, hd): pairs (i, i + hd/2) turn by position
        q1, q2 = q[..., :hd // 2], q[..., hd // 2:]
        return q * cos[:, None] + torch.cat([-q2, q1], -1) * sin[:, None]

    i = 0
    while f"blocks.{i}.norm1.weight" in W:
        b = f"blocks.{i}."
        s1, a1, g1, s2, a2, g2 = lin(c, b + "adaLN_modulation")[:, None].chunk(6, -1)
        qkv = lin(norm(h, b + "norm1") * (1 + a1) + s1, b + "attn_qkv").view(B, L, 3, n_heads, hd)
        q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
        att = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
        y = torch.einsum("bhij,bjhd->bihd", att.softmax(-1), v).reshape(B, L, d)
        h = h + g1 * lin(y, b + "attn_out")
        m = lin(norm(h, b + "norm2") * (1 + a2) + s2, b + "mlp.0")
        h = h + g2 * lin(F.gelu(m, approximate="tanh"), b + "mlp.2")
        i += 1
    shift, scale = lin(c, "output_layer.adaLN_modulation")[:, None].chunk(2, -1)
    out = lin(norm(h, "output_layer.norm_final") * (1 + scale) + shift, "output_layer.linear")
    if scale_by_sigma:  # SEDD, absorbing: log-scores, minus log(e^sigma - 1) and log(n_out - 1), 0 at x
        out = out - torch.log(torch.expm1(sigma.double()))[:, None, None] - math.log(out.shape[-1] - 1)
        out = out.scatter(-1, x[..., None], 0.0)
    return out


def load(path, method, vocab):
    module = {"sedd": sedd, "mdlm": mdlm}[method]
    cfg, model, _ = hub.load_model(path, method, module.Config, {}, module.build_model,
                                   lambda cfg: {"tokenizer": "char", "vocab_size": vocab})
    return cfg, model.eval()


@pytest.mark.parametrize("name", LAYOUTS)
def test_published_layout_loads_and_matches_the_ddit_equations(name, tmp_path):
    writer, kw = LAYOUTS[name]
    path = writer(tmp_path / name, **kw)
    method = name.split("-")[0]
    vocab = kw.get("tokens", kw.get("vocab_size", 0) - 1)
    cfg, model = load(path, method, vocab)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.cond_dim, cfg.block_size) == \
        (kw["n_blocks"], kw["hidden"], kw["n_heads"], kw["cond"], kw["length"])  # read from config.json
    W = hub.read_weights(path)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(vocab + 1, (3, kw["length"]), generator=g)
    sigma = torch.tensor([0.05, 1.3, 6.0])
    with torch.no_grad():
        if method == "sedd":
            got = model(x, sigma)
            want = reference_logits(W, "", x, sigma, kw["n_heads"], True)
        else:  # MDLM-OWT: no time conditioning, adaLN fed sigma = 0 whatever t is
            got = model(x, sigma)
            want = reference_logits(W, "backbone.", x, torch.zeros(3), kw["n_heads"], False)
            assert torch.equal(got, model(x, torch.zeros(3)))
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() < 1e-5
    assert want[..., :-1].std() > 0.5  # the adaLN and biases were not zero: the test can fail


def test_uniform_graph_checkpoint_loads_unscaled(tmp_path):
    path = write_sedd(tmp_path / "u", tokens=20, **SMALL, graph="uniform")
    cfg, model = load(path, "sedd", 20)
    assert cfg.graph == "uniform" and cfg.schedule == "geometric" and (cfg.sigma_min, cfg.sigma_max) == (1e-4, 20)
    x, sigma = torch.randint(20, (2, 8)), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        want = reference_logits(hub.read_weights(path), "", x, sigma, 2, False).scatter(-1, x[..., None], 0.0)
        assert (model(x, sigma).double() - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# The command line: sample, eval and fine-tune from a directory, offline


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """A tiny GPT-2-token corpus (a slice of tiny Shakespeare), as data/shakespeare/prepare.py writes it."""
    os.environ.setdefault("DIFFLM_DATA", shared_data())
    sys.path.insert(0, os.path.join(ROOT, "data", "shakespeare_char"))
    from prepare import load_text
    text = load_text("")[:12000]
    enc = corpus.gpt2_encoding()
    out = tmp_path_factory.mktemp("gpt2_tiny")
    corpus.write_split(str(out), np.array(enc.encode_ordinary(text[:10000])), np.array(enc.encode_ordinary(text[10000:])),
                       {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot": enc.eot_token})
    return str(out)


@pytest.fixture(scope="module")
def gpt2_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("published")
    return {"sedd": write_sedd(d / "sedd", tokens=50257, hidden=16, cond=8, n_blocks=1, n_heads=2, length=32),
            "mdlm": write_mdlm(d / "mdlm", vocab_size=50258, hidden=16, cond=8, n_blocks=1, n_heads=2, length=32)}


def env():
    """Offline: the hub client must fail at once (HF_HUB_OFFLINE, a dead proxy), never wait on a network."""
    return {"DIFFLM_DATA": shared_data(), "HF_HUB_OFFLINE": "1", "https_proxy": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HOME": os.path.join(ROOT, "out", "no_such_hf_home")}


@pytest.mark.parametrize("method", ["sedd", "mdlm"])
def test_cli_sample_eval_and_finetune_from_a_directory(method, gpt2_checkpoints, gpt2_data, tmp_path):
    ckpt, data = gpt2_checkpoints[method], f"--data_dir={gpt2_data}"
    r = run_cli([f"{method}.py", "--sample", f"--init_from={ckpt}", "--prefix=ROMEO:", "--suffix= the end.", "--steps=4",
                 "--num_samples=2", "--device=cpu", "--n_embd=16", "--n_head=2", f"--out_dir={tmp_path / 's'}"], env=env())
    assert not (tmp_path / "s").exists()  # --sample writes nothing (it made an empty out_dir); its shape given again is taken
    texts = r.stdout.split("=== sample ")[1:]
    assert len(texts) == 2 and all(t.split("\n", 1)[1].startswith("ROMEO:") for t in texts), r.stdout
    assert all(t.split("\n(")[0].rstrip("\n").endswith(" the end.") for t in texts), r.stdout
    # --stride against the published model's block_size (32), known only once its config is read (not the default 128)
    r = run_cli([f"{method}.py", "--sample", f"--init_from={ckpt}", "--seq_len=40", "--stride=20", "--steps=2",
                 "--num_samples=1", "--device=cpu"], env=env())
    assert "samples of 40 tokens" in r.stdout, r.stdout[-500:]
    r = run_cli([f"{method}.py", "--sample", f"--init_from={ckpt}", "--stride=32", "--device=cpu"], env=env(), check=False)
    assert r.returncode == 1 and "--stride=32 must be below the model's block_size=32" in r.stderr, r.stderr[-500:]
    r = run_cli([f"{method}.py", "--eval", f"--init_from={ckpt}", data, "--eval_t_samples=1", f"--out_dir={tmp_path / 'e'}",
                 "--device=cpu"], env=env())
    nelbo = float(r.stdout.split("val NELBO ")[1].split()[0])
    assert math.isfinite(nelbo) and nelbo > 0, r.stdout
    record = json.loads(open(tmp_path / "e" / "log.jsonl").readlines()[-1])
    assert record["init_from"] == str(ckpt) and record["eval_full"]["val_nelbo"] == pytest.approx(nelbo, abs=1e-4)
    out = tmp_path / "ft"
    r = run_cli([f"{method}.py", "--train", f"--init_from={ckpt}", data, f"--out_dir={out}", "--max_iters=3", "--batch_size=2",
                 "--eval_interval=3", "--eval_iters=1", "--log_interval=1", "--device=cpu"], env=env())
    assert "iter     2/3" in r.stdout and os.path.isfile(out / "ckpt.pt")
    r = run_cli([f"{method}.py", "--sample", f"--out_dir={out}", "--steps=2", "--num_samples=1", "--device=cpu"], env=env())
    assert "=== sample 0" in r.stdout  # the fine-tuned checkpoint reloads in the published layout
    # the training command again with --resume: --init_from rebuilt the config from the published defaults and
    # the command line, and the run went on with another --lr, --batch_size and the default dataset's data
    run_cli([f"{method}.py", "--train", "--resume", f"--init_from={ckpt}", f"--out_dir={out}", "--max_iters=4",
             "--device=cpu", "--lr=5e-4"], env=env())
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["iter"] == 3 and saved["config"]["data_dir"] == gpt2_data and saved["config"]["batch_size"] == 2
    assert saved["config"]["lr"] == 5e-4
    # a flag the fine-tuned weights do not fit: the hint names ddit, not the spent --init_from (which would load the
    # published weights in place of the fine-tuned ones)
    r = run_cli([f"{method}.py", "--sample", f"--out_dir={out}", "--ddit=false", "--device=cpu"], env=env(), check=False)
    assert r.returncode == 1 and "ddit=True (here False)" in r.stderr and "init_from" not in r.stderr, r.stderr


def test_data_of_another_vocabulary_names_its_folder(gpt2_checkpoints, char_data, tmp_path):
    """With --data_dir, the message named the default --dataset and told the user to pass it, which changed nothing."""
    line = one_line_error(["mdlm.py", "--train", f"--init_from={gpt2_checkpoints['mdlm']}", f"--data_dir={char_data}",
                           f"--out_dir={tmp_path}", "--device=cpu"])
    assert f"the data in {char_data} has 65 (char); point --data_dir at GPT-2-token data, or drop it" in line


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1


def one_line_error(args):
    """main(args) in this process -> the one line it stops with (common.die: SystemExit, status 1)."""
    with pytest.raises(SystemExit) as e:
        {"sedd.py": sedd, "mdlm.py": mdlm}[args[0]].main(args[1:])
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line
    return line


def test_hub_id_without_network_or_copy_says_how_to_provide_one():
    """A fresh process (the hub client reads HF_HUB_OFFLINE when imported): it must stop at once."""
    r = run_cli(["sedd.py", "--sample", "--init_from=louaaron/sedd-small", "--device=cpu"], env=env(), check=False, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "louaaron/sedd-small" in lines[0] and "--init_from=DIR" in lines[0]


def test_a_hub_id_is_fetched_with_its_config_after_the_network_check(tmp_path, monkeypatch):
    """A hub id (the client faked here): the reachability check comes first (offline, the client retries each request
    for half a minute), config.json comes with the weights, and a repository without model.safetensors falls back to
    pytorch_model.bin (a first download of the config alone left no weights)."""
    import fnmatch
    import shutil
    import tempfile

    import huggingface_hub
    remote = {"owner/st": write_sedd(tmp_path / "st", tokens=20, **SMALL),
              "owner/bin": write_sedd(tmp_path / "bin", tokens=20, fmt="bin", **SMALL)}
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **_):
        calls.append(tuple(allow_patterns))
        d = tempfile.mkdtemp(dir=tmp_path)  # a fresh snapshot folder
        for f in os.listdir(remote[repo_id]):
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copy(os.path.join(remote[repo_id], f), d)
        return d
    monkeypatch.setattr(corpus, "hub_offline_unless_reachable", lambda: calls.append("network check"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for repo, weights in (("owner/st", ["model.safetensors"]), ("owner/bin", ["model.safetensors", "pytorch_model.bin"])):
        calls.clear()
        cfg, _ = load(repo, "sedd", 20)
        assert calls == ["network check"] + [("config.json", w) for w in weights] and cfg.n_embd == 16
        assert sorted(os.listdir(hub.locate(repo))) == ["config.json", weights[-1]]


@pytest.mark.parametrize("path", ["./my_ckpt", "../runs/sedd", "./a.b", "runs/sedd/small"])  # a hub id is owner/name, whole
def test_a_relative_path_that_does_not_exist_is_not_looked_up_on_the_hub(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(corpus, "hub_offline_unless_reachable", lambda: pytest.fail(f"{path} was looked up on the hub"))
    with pytest.raises(SystemExit, match=f"--init_from={re.escape(path)}: no such directory, and not a hub id"):
        hub.locate(path)


def test_weights_that_cannot_be_used_are_one_line(tmp_path):
    """A cut or foreign weights file was a SafetensorError, UnpicklingError or AttributeError traceback, and NaN
    weights sampled '!!!!' with exit status 0; a half-precision copy was refused for its rounded rotary table."""
    path = write_sedd(tmp_path / "a", tokens=20, **SMALL)
    good = {k: v.clone() for k, v in hub.read_weights(path).items()}  # not the file's mapped pages, rewritten below
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    raw = open(st, "rb").read()
    for write, message in ((lambda: open(st, "wb").write(raw[:100]), "cannot read the weights"),
                           (lambda: open(st, "wb").write(b""), "cannot read the weights"),
                           (lambda: save_file({**good, "blocks.0.mlp.0.bias": good["blocks.0.mlp.0.bias"] * math.nan}, st),
                            "blocks.0.mlp.0.bias holds NaN or inf values"),
                           (lambda: (os.remove(st), torch.save({"state_dict": good}, pt)), "not a state dict of tensors"),
                           (lambda: torch.save(torch.nn.Linear(2, 2), pt), "cannot read the weights")):
        write()
        with pytest.raises(SystemExit, match=message):
            hub.read_weights(path)
    os.remove(pt)
    _, a = hub.architecture(hub.read_config(path), path)
    for dtype in (torch.float16, torch.bfloat16):
        save_file({k: v.to(dtype) for k, v in good.items()}, st)
        hub.check_keys(hub.read_weights(path), a, 21, path)  # 20 tokens and the absorbing state


def test_missing_or_extra_keys_are_named(tmp_path):
    path = write_sedd(tmp_path / "a", tokens=20, hidden=16, cond=8, n_blocks=2, n_heads=2, length=8)
    state = hub.read_weights(path)
    state["blocks.7.norm1.weight"] = state.pop("blocks.1.mlp.0.bias")
    save_file(state, os.path.join(path, "model.safetensors"))
    line = one_line_error(["sedd.py", "--sample", f"--init_from={path}", "--device=cpu"])
    assert "missing blocks.1.mlp.0.bias" in line and "unexpected blocks.7.norm1.weight" in line


def test_a_missing_or_cut_config_json_is_one_line(tmp_path):
    """A folder with the weights but no config.json, or a cut one, was a FileNotFoundError or JSONDecodeError traceback."""
    s = write_sedd(tmp_path / "s", tokens=20, **SMALL)
    path = os.path.join(s, "config.json")
    text = open(path).read()
    for spoil in (lambda: os.remove(path), lambda: open(path, "w").write(text[:40])):
        spoil()
        assert f"cannot read {path} (" in one_line_error(["sedd.py", "--sample", f"--init_from={s}", "--device=cpu"])
    json.dump([1, 2], open(path, "w"))  # JSON, but not a config
    with pytest.raises(SystemExit, match=f"{re.escape(path)} holds no JSON object"):
        hub.read_config(s)
    with pytest.raises(SystemExit, match="config.json is neither a SEDD config .* nor an MDLM one"):  # e.g. GPT-2's
        hub.architecture({"n_embd": 768, "n_layer": 12, "vocab_size": 50257}, s)


def test_weights_read_are_the_safetensors_and_every_value_is_checked(tmp_path):
    """With both files in the folder, model.safetensors (never unpickled) is read, as locate prefers it; a non-tensor
    entry beside the tensors (an AttributeError traceback) and a single inf among finite values are refused."""
    path = write_sedd(tmp_path / "a", tokens=20, **SMALL)
    good = {k: v.clone() for k, v in hub.read_weights(path).items()}
    pt = os.path.join(path, "pytorch_model.bin")
    torch.save({k: v + 1 for k, v in good.items()}, pt)
    assert torch.equal(hub.read_weights(path)["blocks.0.mlp.0.bias"], good["blocks.0.mlp.0.bias"])
    os.remove(os.path.join(path, "model.safetensors"))
    one_inf = good["blocks.0.mlp.0.bias"].clone()
    one_inf[3] = math.inf
    for state, message in (({**good, "step": 3}, "not a state dict of tensors"),
                           ({**good, "blocks.0.mlp.0.bias": one_inf}, "blocks.0.mlp.0.bias holds NaN or inf values")):
        torch.save(state, pt)
        with pytest.raises(SystemExit, match=message):
            hub.read_weights(path)


def test_a_lone_missing_key_a_wrong_shape_or_another_rotary_table_is_one_line(tmp_path):
    """Alone (the test above has a missing and an extra key together), a missing or extra key or a shape other than
    config.json's was a load_state_dict traceback; a rotary table of another base loaded and misplaced every token."""
    path = write_sedd(tmp_path / "a", tokens=20, **SMALL)
    good = {k: v.clone() for k, v in hub.read_weights(path).items()}
    hd = 8
    for state, message in (({k: v for k, v in good.items() if k != "blocks.0.mlp.2.bias"}, "missing blocks.0.mlp.2.bias (1)"),
                           ({**good, "blocks.0.extra": torch.zeros(2)}, "unexpected blocks.0.extra (1)"),
                           ({**good, "blocks.0.mlp.2.bias": torch.zeros(17)}, "blocks.0.mlp.2.bias (17,) (config: (16,))"),
                           ({**good, "rotary_emb.inv_freq": 1.0 / 500000 ** (torch.arange(0, hd, 2).float() / hd)},
                            "rotary_emb.inv_freq is not the rotary table of head size 8")):
        save_file(state, os.path.join(path, "model.safetensors"))
        with pytest.raises(SystemExit, match=re.escape(message)):
            load(path, "sedd", 20)


def test_sedd_settings_difflm_cannot_follow_are_refused(tmp_path):
    """A log-linear SEDD checkpoint keeps the authors' eps; scale_by_sigma against its graph (the network would be
    read as the other parameterisation), an unknown noise type (read as log-linear) and graph are refused."""
    path = write_sedd(tmp_path / "a", tokens=20, **SMALL)
    cfg, _ = load(path, "sedd", 20)
    assert (cfg.graph, cfg.schedule, cfg.eps) == ("absorb", "loglinear", 1e-3)
    config = json.load(open(os.path.join(path, "config.json")))
    for change, message in (({"model": {**config["model"], "scale_by_sigma": False}}, "scale_by_sigma=False with graph absorb"),
                            ({"graph": {**config["graph"], "type": "uniform"}}, "scale_by_sigma=True with graph uniform"),
                            ({"noise": {"type": "cosine"}}, "unknown noise type 'cosine'"),
                            ({"graph": {"type": "roulette"}, "model": {**config["model"], "scale_by_sigma": False}},
                             "graph 'roulette' is not one difflm knows")):  # was a shape error: read as uniform
        json.dump({**config, **change}, open(os.path.join(path, "config.json"), "w"))
        with pytest.raises(SystemExit, match=message):
            load(path, "sedd", 20)


def test_a_time_conditioned_mdlm_checkpoint_is_fed_sigma(tmp_path):
    """time_conditioning: true in MDLM's config.json: the adaLN layers see sigma, as the checkpoint was trained (read
    as the default false, they saw 0 whatever the noise level)."""
    path = write_mdlm(tmp_path / "t", vocab_size=21, **SMALL)
    config = json.load(open(os.path.join(path, "config.json")))
    json.dump({**config, "time_conditioning": True}, open(os.path.join(path, "config.json"), "w"))
    cfg, model = load(path, "mdlm", 20)
    x, sigma = torch.randint(21, (2, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 4.0])
    with torch.no_grad():
        want = reference_logits(hub.read_weights(path), "backbone.", x, sigma, 2, False)
        assert cfg.time_cond and (model(x, sigma).double() - want).abs().max() < 1e-5


def test_command_line_settings_go_on_top_of_the_published_ones(tmp_path):
    """--block_size up to the published length and other settings (--eps) are the command line's; without --dataset,
    fine-tuning prepares GPT-2-token data (difflm's default corpus is character-level)."""
    path = write_sedd(tmp_path / "a", tokens=20, **SMALL)
    seen = []
    for overrides in ({"block_size": 4, "eps": 1e-4}, {"block_size": 8, "eps": 1e-4}):
        cfg, _, _ = hub.load_model(path, "sedd", sedd.Config, overrides, sedd.build_model,
                                   lambda cfg: seen.append(cfg.dataset) or {"tokenizer": "char", "vocab_size": 20})
        assert (cfg.block_size, cfg.eps) == (overrides["block_size"], 1e-4)
    assert seen == ["shakespeare", "shakespeare"]


def test_a_config_with_missing_noise_or_zero_sizes_is_one_line(tmp_path):
    """A geometric SEDD config without sigma_min (KeyError) and n_heads 0 (ZeroDivisionError) were tracebacks."""
    s = write_sedd(tmp_path / "s", tokens=20, **SMALL)
    config = json.load(open(os.path.join(s, "config.json")))
    for key, value, expect in (("noise", {"type": "geometric", "sigma_max": 20}, "lacks or misstates 'sigma_min'"),
                               ("model", {**config["model"], "n_heads": 0}, "n_head=0 must be at least 1")):
        json.dump({**config, key: value}, open(os.path.join(s, "config.json"), "w"))
        assert expect in one_line_error(["sedd.py", "--sample", f"--init_from={s}", "--device=cpu"])


@pytest.mark.parametrize("case", ["mdlm_into_sedd", "sedd_into_mdlm", "other_graph", "not_a_dir", "no_weights", "shape_flag",
                                  "head_flag", "own_checkpoint", "longer_blocks", "cond_flag", "ddit_flag", "time_cond_flag",
                                  "other_vocabulary"])
def test_wrong_checkpoint_is_one_line(case, tmp_path):
    m = write_mdlm(tmp_path / "m", vocab_size=21, **SMALL)
    s = write_sedd(tmp_path / "s", tokens=20, **SMALL)
    os.remove(os.path.join(s, "model.safetensors")) if case == "no_weights" else None
    args, expect = {"mdlm_into_sedd": (["sedd.py", f"--init_from={m}"], "MDLM checkpoint; load it with mdlm.py"),
                    "sedd_into_mdlm": (["mdlm.py", f"--init_from={s}"], "SEDD checkpoint; load it with sedd.py"),
                    "other_graph": (["sedd.py", f"--init_from={s}", "--graph=uniform"], "absorb graph, not uniform"),
                    "not_a_dir": (["sedd.py", f"--init_from={tmp_path}/nothing/here"], "no such directory, and not a hub id"),
                    "no_weights": (["sedd.py", f"--init_from={s}"], "holds neither model.safetensors nor pytorch_model.bin"),
                    "shape_flag": (["mdlm.py", f"--init_from={m}", "--n_layer=4"], "--n_layer is fixed by"),
                    # judged against the published config, not the defaults (n_embd=128 is no multiple of 3)
                    "head_flag": (["sedd.py", f"--init_from={s}", "--n_head=3"], "--n_head is fixed by"),
                    "own_checkpoint": (["mdlm.py", f"--init_from={tmp_path}/out/ckpt.pt"], "with --resume"),
                    "longer_blocks": (["mdlm.py", f"--init_from={m}", "--block_size=16"], "than the 8 positions"),
                    # weights' shapes (a load_state_dict traceback), and what the adaLN layers are fed (silently)
                    "cond_flag": (["mdlm.py", f"--init_from={m}", "--cond_dim=4"], "--cond_dim is fixed by"),
                    "ddit_flag": (["mdlm.py", f"--init_from={m}", "--ddit=false"], "--ddit is fixed by"),
                    "time_cond_flag": (["mdlm.py", f"--init_from={m}", "--time_cond=true"], "--time_cond is fixed by"),
                    # sampled with no data: the message said to pass GPT-2-token data, which changed nothing
                    "other_vocabulary": (["sedd.py", f"--init_from={s}"], "models 20 tokens, not GPT-2's 50257")}[case]
    assert expect in one_line_error(args + ["--sample", "--device=cpu"])
