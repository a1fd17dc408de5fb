"""
hub.py: the published SEDD and MDLM checkpoints (--init_from), loaded into difflm's own model.

    python sedd.py --sample --init_from=louaaron/sedd-small    # or louaaron/sedd-medium
    python mdlm.py --sample --init_from=kuleshov-group/mdlm-owt
    python mdlm.py --eval --init_from=DIR                       # DIR holds config.json + the weights

A hub id is downloaded once through huggingface_hub (pip install -e ".[hub]") into its cache; a
local directory with the same files is used as it is (offline). Nothing from the hub runs: the
config is read as JSON and the weights as tensors (model.safetensors, or pytorch_model.bin through
torch.load(weights_only=True)).

Both papers' checkpoints use the "DDiT" layout of the SEDD code base: LayerNorms with a weight
and no bias, a fused qkv projection and an output projection without biases, rotary positions
(half-split), a 4x GELU(tanh) MLP with biases, adaLN-Zero modulation (shift, scale, gate) of each
sublayer from SiLU(MLP(sinusoids(sigma))) with cond_dim channels, a final LayerNorm with its own
shift and scale, and an output Linear with a bias. common.Transformer expresses it with
cond_dim > 0, norm_weight=True and mlp_bias=True; the output Linear is the method's head (with a
bias under --ddit). SEDD's config.json is the training config (tokens, graph, noise, model.*);
MDLM's is a transformers-style config (vocab_size, hidden_dim, cond_dim, ...) with every weight
under "backbone.".

Also here: a transformers causal LM as the judge of generative perplexity (--judge=gpt2-large or a
directory), and samples as .jsonl files (--samples_out, --samples_in).
"""

import contextlib
import dataclasses
import json
import os
import re

import torch

import corpus
from common import die, token_nll, write_file

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
GPT2_META = {"tokenizer": "gpt2", "vocab_size": corpus.GPT2_VOCAB, "eot": corpus.GPT2_VOCAB - 1}


@dataclasses.dataclass
class PublishedConfig:
    """The flags mdlm.py and sedd.py share for the papers' workflow: published checkpoints, the
    zero-shot sets and samples written to and judged from files."""

    eval_data: str = ""  # --eval on a paper's zero-shot set: wikitext2, wikitext103, ptb, lambada, lm1b, ag_news, pubmed, arxiv
    eval_file: str = ""  # a local copy of --eval_data's split (.jsonl, .parquet, .txt or .raw; docs/published.md)
    samples_out: str = ""  # --sample: also write the samples, with their settings, to this .jsonl file
    samples_in: str = ""  # --eval --gen: judge this .jsonl file of samples instead of sampling
    init_from: str = ""  # a published checkpoint: hub id (docs/published.md) or a directory with its files
    ddit: bool = False  # the published layout: LayerNorm weights, MLP and head biases (set by --init_from)
    cond_dim: int = 128  # width of the time embedding that drives adaLN

def locate(init_from):
    """--init_from -> a local directory holding config.json and the weights (downloaded if a hub id)."""
    if os.path.isdir(init_from):
        return init_from
    how = (f"download {CONFIG} and {WEIGHTS[0]} (or {WEIGHTS[1]}) from https://huggingface.co/{init_from} "
           f"into a directory and pass --init_from=DIR")
    if init_from.endswith(".pt"):  # a difflm checkpoint: --init_from takes the papers' published weights
        die(f"--init_from takes the papers' published weights; to go on training {init_from}, pass its folder as --out_dir "
            "with --resume")
    if not re.fullmatch(r"\w[\w.-]*/[\w.-]+", init_from):  # owner/name; ./dir and ../dir are paths
        die(f"--init_from={init_from}: no such directory, and not a hub id (owner/name); give the folder that holds "
            f"{CONFIG} and the weights, or a hub id")
    corpus.hub_offline_unless_reachable()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        die(f"--init_from={init_from} needs huggingface_hub to download it (pip install -e \".[hub]\"); or {how}")
    try:  # the safetensors file when the repository has one, else the pickled one
        d = snapshot_download(init_from, allow_patterns=[CONFIG, WEIGHTS[0]])
        if not os.path.isfile(os.path.join(d, WEIGHTS[0])):
            d = snapshot_download(init_from, allow_patterns=[CONFIG, WEIGHTS[1]])
    except Exception as e:  # offline, unknown repository, no permission: the hub's errors are many
        die(f"cannot fetch {init_from} from the Hugging Face hub ({type(e).__name__}); without network, {how}"
            + (f" (no directory {init_from} here either)" if os.path.isdir(init_from.split("/")[0]) else ""))
    return d


def read_config(d):
    path = os.path.join(d, CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        die(f"cannot read {path} ({type(e).__name__}); a published checkpoint directory holds {CONFIG} beside its weights")
    if not isinstance(config, dict):
        die(f"{path} holds no JSON object")
    return config


def read_weights(d):
    """The state dict in the directory: tensors only (never code), each finite."""
    st, pt = (os.path.join(d, w) for w in WEIGHTS)
    if not os.path.isfile(st) and not os.path.isfile(pt):
        die(f"{d} holds neither {WEIGHTS[0]} nor {WEIGHTS[1]}")
    f = st if os.path.isfile(st) else pt
    try:
        if f == st:
            try:
                from safetensors.torch import load_file
            except ImportError:
                die(f"{st} needs safetensors (pip install -e \".[hub]\")")
            state = load_file(st)
        else:
            state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # cut short, or another format: safetensors' and the unpickler's own errors
        die(f"cannot read the weights in {d} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
            "download them again")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        die(f"{f} holds a {type(state).__name__}, not a state dict of tensors")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        die(f"{f}: {bad} holds NaN or inf values; download it again")
    return state


def architecture(config, path):
    """config.json -> (method, dims): SEDD's training config or MDLM's transformers-style config."""
    try:
        if "graph" in config and "tokens" in config:  # SEDD: the hydra config the run was trained with
            m, noise = config["model"], dict(config["noise"])
            if noise.get("type") == "geometric":
                noise.update(sigma_min=float(noise["sigma_min"]), sigma_max=float(noise["sigma_max"]))
            found = "sedd", dict(vocab_size=int(config["tokens"]), n_embd=int(m["hidden_size"]), cond_dim=int(m["cond_dim"]),
                                 n_layer=int(m["n_blocks"]), n_head=int(m["n_heads"]), block_size=int(m["length"]),
                                 graph=config["graph"]["type"], scale_by_sigma=bool(m["scale_by_sigma"]), noise=noise, prefix="")
        elif "hidden_dim" in config and "n_blocks" in config:  # MDLM: [MASK] is the last of vocab_size ids
            found = "mdlm", dict(vocab_size=int(config["vocab_size"]) - 1, n_embd=int(config["hidden_dim"]),
                                 cond_dim=int(config["cond_dim"]), n_layer=int(config["n_blocks"]),
                                 n_head=int(config["n_heads"]), block_size=int(config["model_length"]),
                                 time_cond=bool(config.get("time_conditioning", False)), prefix="backbone.")
        else:
            die(f"{path}/{CONFIG} is neither a SEDD config (tokens, graph, model) nor an MDLM one (hidden_dim, n_blocks)")
    except (KeyError, TypeError, ValueError) as e:
        die(f"{path}/{CONFIG} lacks or misstates {e}; it is not a SEDD or MDLM checkpoint config")
    small = [k for k in ("vocab_size", "n_embd", "cond_dim", "n_layer", "n_head", "block_size") if found[1][k] < 1]
    if small:
        die(f"{path}/{CONFIG}: {', '.join(f'{k}={found[1][k]}' for k in small)} must be at least 1")
    if found[0] == "sedd" and found[1]["graph"] not in ("absorb", "uniform"):  # else its head's size is misread
        die(f"{path}/{CONFIG}: graph {found[1]['graph']!r} is not one difflm knows; use an absorb or uniform checkpoint")
    return found


def published_shapes(a, n_out):
    """Every key the authors' model writes (their names) -> its shape; n_out outputs (with [MASK])."""
    d, c, p = a["n_embd"], a["cond_dim"], a["prefix"]
    shapes = {"vocab_embed.embedding": (n_out, d), "sigma_map.mlp.0.weight": (c, 256), "sigma_map.mlp.0.bias": (c,),
              "sigma_map.mlp.2.weight": (c, c), "sigma_map.mlp.2.bias": (c,),
              "output_layer.norm_final.weight": (d,), "output_layer.linear.weight": (n_out, d),
              "output_layer.linear.bias": (n_out,), "output_layer.adaLN_modulation.weight": (2 * d, c),
              "output_layer.adaLN_modulation.bias": (2 * d,)}
    for i in range(a["n_layer"]):
        shapes.update({f"blocks.{i}.{k}": s for k, s in (
            ("norm1.weight", (d,)), ("attn_qkv.weight", (3 * d, d)), ("attn_out.weight", (d, d)), ("norm2.weight", (d,)),
            ("mlp.0.weight", (4 * d, d)), ("mlp.0.bias", (4 * d,)), ("mlp.2.weight", (d, 4 * d)), ("mlp.2.bias", (d,)),
            ("adaLN_modulation.weight", (6 * d, c)), ("adaLN_modulation.bias", (6 * d,)))})
    return {p + k: s for k, s in shapes.items()}


# the authors' module names -> common.Transformer's (under "backbone.") and the method's head
RENAMES = [(r"vocab_embed\.embedding", "backbone.wte.weight"), (r"sigma_map\.mlp\.", "backbone.time_mlp."),
           (r"blocks\.(\d+)\.norm1\.", r"backbone.blocks.\1.ln1."), (r"blocks\.(\d+)\.norm2\.", r"backbone.blocks.\1.ln2."),
           (r"blocks\.(\d+)\.attn_qkv\.", r"backbone.blocks.\1.attn.qkv."),
           (r"blocks\.(\d+)\.attn_out\.", r"backbone.blocks.\1.attn.proj."),
           (r"blocks\.(\d+)\.mlp\.", r"backbone.blocks.\1.mlp."), (r"blocks\.(\d+)\.adaLN_modulation\.", r"backbone.blocks.\1.ada."),
           (r"output_layer\.norm_final\.", "backbone.ln_f."), (r"output_layer\.adaLN_modulation\.", "backbone.ada_f."),
           (r"output_layer\.linear\.", "head.")]


def rename(key):
    for pattern, new in RENAMES:
        out, n = re.subn("^" + pattern, new, key)
        if n:
            return out
    return key


def check_keys(state, a, n_out, path):
    """No key missing, none extra, every shape as config.json says -> else one line naming the first few."""
    want = published_shapes(a, n_out)
    rotary = a["prefix"] + "rotary_emb.inv_freq"  # a buffer the authors' model saves; difflm recomputes it
    have = {k: tuple(v.shape) for k, v in state.items() if k != rotary}
    missing, extra = [k for k in want if k not in have], [k for k in have if k not in want]
    if missing or extra:
        die(f"{path} does not hold the checkpoint its {CONFIG} describes: "
            + "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                        for what, keys in (("missing", missing), ("unexpected", extra)) if keys))
    wrong = [f"{k} {have[k]} (config: {want[k]})" for k in want if have[k] != want[k]]
    if wrong:
        die(f"{path}: shapes differ from its {CONFIG}: {', '.join(wrong[:3])}")
    if rotary in state:
        hd = a["n_embd"] // a["n_head"]
        expect = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
        stored = expect.to(state[rotary].dtype).float()  # as a half-precision copy rounds it
        if state[rotary].shape != expect.shape or not torch.allclose(state[rotary].float(), stored):
            die(f"{path}: {rotary} is not the rotary table of head size {hd} (base 10000)")


def settings(method, a, path):
    """The published architecture as this method's Config values."""
    s = dict(n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"], block_size=a["block_size"],
             cond_dim=a["cond_dim"], ddit=True, dataset="shakespeare")  # GPT-2 tokens: the checkpoints' own
    if method == "mdlm":
        return {**s, "time_cond": a["time_cond"], "schedule": "loglinear"}
    noise = a["noise"]
    if a["graph"] == "absorb" and not a["scale_by_sigma"] or a["graph"] == "uniform" and a["scale_by_sigma"]:
        die(f"{path}: scale_by_sigma={a['scale_by_sigma']} with graph {a['graph']}; difflm scales by sigma exactly "
            "with the absorbing graph, as the authors' code does")
    if noise.get("type") == "geometric":
        return {**s, "graph": a["graph"], "schedule": "geometric", "sigma_min": float(noise["sigma_min"]),
                "sigma_max": float(noise["sigma_max"])}
    if noise.get("type") != "loglinear":
        die(f"{path}: unknown noise type {noise.get('type')!r}; use a loglinear or geometric checkpoint")
    return {**s, "graph": a["graph"], "schedule": "loglinear", "eps": 1e-3}  # the authors' log-linear eps


FIXED_KEYS = ("n_layer", "n_head", "n_embd", "cond_dim", "ddit", "time_cond")  # the weights' shapes and meaning


def load_model(init_from, method, config_cls, overrides, build_model, prepare=None):
    """--init_from -> (cfg, model with the published weights on the CPU, meta).

    cfg is the published architecture with the command line's overrides on top (those that change
    a weight's shape are refused). prepare(cfg) -> meta of the data to train on (--train), whose
    vocabulary must be the checkpoint's; None: GPT-2's meta. The model holds every published
    weight: none missing, none extra.
    """
    path = locate(init_from)
    found, a = architecture(read_config(path), path)
    if found != method:
        die(f"{init_from} is a{'n MDLM' if found == 'mdlm' else ' SEDD'} checkpoint; load it with {found}.py")
    if method == "sedd" and overrides.get("graph", a["graph"]) != a["graph"]:
        die(f"{init_from} was trained with the {a['graph']} graph, not {overrides['graph']}; drop --graph")
    s = settings(method, a, path)
    for k in FIXED_KEYS:
        if k in overrides and k in s and overrides[k] != s[k]:
            die(f"--{k} is fixed by {init_from} ({s[k]}); drop it")
    if overrides.get("block_size", 0) > a["block_size"]:  # positions it never saw (a shorter --block_size is fine)
        die(f"--block_size={overrides['block_size']} is longer than the {a['block_size']} positions {init_from} was "
            f"trained on; use at most {a['block_size']}")
    cfg = config_cls(**{**s, **overrides})
    state = read_weights(path)
    n_out = a["vocab_size"] + (1 if method == "mdlm" or a["graph"] == "absorb" else 0)
    check_keys(state, a, n_out, path)
    if prepare is None and a["vocab_size"] != GPT2_META["vocab_size"]:
        die(f"{init_from} models {a['vocab_size']} tokens, not GPT-2's {GPT2_META['vocab_size']}, the one tokenizer "
            "difflm knows for a published checkpoint; fine-tune it on your data with --train --dataset=...")
    meta = prepare(cfg) if prepare else dict(GPT2_META)
    if meta.get("vocab_size") != a["vocab_size"]:
        fix = "point --data_dir at GPT-2-token data, or drop it" if cfg.data_dir else "use --dataset=shakespeare or other GPT-2-token data"
        die(f"{init_from} models {a['vocab_size']} tokens, the data in {corpus.data_path(cfg)} has {meta.get('vocab_size')} "
            f"({meta.get('tokenizer')}); {fix}")
    model = build_model(cfg, meta)
    drop = a["prefix"] + "rotary_emb.inv_freq"
    model.load_state_dict({rename(k[len(a["prefix"]):]): v.float() for k, v in state.items() if k != drop})
    return cfg, model, meta


# ----------------------------------------------------------------------------------------------
# A transformers causal LM as the judge of generative perplexity (--eval --gen --judge=gpt2-large)


def load_hf_judge(name, device="cpu"):
    """A hub id or a local directory -> (transformers causal LM in eval mode, its tokenizer)."""
    tok = hf_judge_tokenizer(name)
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(name)
    except Exception as e:
        die(f"cannot load the judge's model from {name} ({type(e).__name__}); it must be a transformers causal LM")
    return model.to(device).eval(), tok


def hf_judge_tokenizer(name):
    """A transformers judge's tokenizer: what --eval --gen reads first, so a wrong --judge stops before the bound."""
    if os.path.isfile(os.path.join(name, "ckpt.pt")):  # an ar.py run's folder, not a transformers one
        die(f"--judge={name} is a run folder; pass its checkpoint, --judge={os.path.join(name, 'ckpt.pt')}")
    if not os.path.isdir(name):  # a hub id
        corpus.hub_offline_unless_reachable()
    try:
        from transformers import AutoConfig, AutoTokenizer
    except ImportError:
        die(f"--judge={name} is a transformers model and needs transformers (pip install -e \".[hub]\"); "
            f"or pass an ar.py checkpoint (--judge=out/ar/ckpt.pt)")
    try:  # no trust_remote_code: only architectures transformers itself implements
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        die(f"cannot load the judge's tokenizer from {name} ({type(e).__name__}); pass a hub id while online "
            f"or a directory saved with save_pretrained holding the model and its tokenizer files")
    if len(tok) < 2 or not tok("a b")["input_ids"]:  # transformers builds an empty one from a bare config
        die(f"the judge {name} has no tokenizer files (tokenizer.json, or vocab and merges); "
            f"save the tokenizer beside the model (tokenizer.save_pretrained) or pass a hub id while online")
    with contextlib.suppress(Exception):  # a config that does not load: the model's load says why, later
        judge_context(AutoConfig.from_pretrained(name), name)
    return tok


def judge_context(config, name="the judge"):
    """The judge's context length, from its transformers config; one that states none (or -1) stops with one line."""
    try:
        n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    except NotImplementedError:  # XLNet's config raises it: "no sequence length limit"
        n = None
    if not isinstance(n, int) or n < 2:
        die(f"{name}'s config gives no context length (n_positions or max_position_embeddings: {n}); "
            "use a judge with a fixed context (gpt2-large, as the MDLM paper)")
    return n


def hf_judge_texts(name, texts, device):
    """Texts -> (nats per scored token, the judge's ids of each) under a transformers judge."""
    model, tok = load_hf_judge(name, device)
    scored = [hf_judge_nll(model, tok, t) for t in texts]
    total, count = sum(s[0] for s in scored), sum(s[1] for s in scored)
    if count == 0:  # it reported NLL 0, perplexity 1
        die(f"no sample is long enough for the judge {name} to score (it scores from a text's second token); "
            "draw longer samples")
    return total / count, [torch.tensor(s[3], dtype=torch.long) for s in scored]


@torch.no_grad()
def hf_judge_nll(model, tok, text):
    """-log p_judge (nats, summed) of text re-tokenised by the judge's tokenizer, in chunks no longer
    than the judge's context, as in the MDLM paper's generative perplexity: the first token of each chunk
    is context only, and an end-of-text token after the chunk's first is not scored (a run of them is
    easy to predict). Returns (total nats, tokens scored, chunks, the judge's ids)."""
    ids = tok(text)["input_ids"]
    ctx, device = judge_context(model.config), next(model.parameters()).device
    total, count, chunks = 0.0, 0, 0
    for s in range(0, len(ids), ctx):
        x = torch.tensor(ids[s:s + ctx], device=device)  # (T,)
        chunks += 1
        if len(x) < 2:
            continue
        eos = x == (tok.eos_token_id if tok.eos_token_id is not None else -1)
        keep = (~eos | (eos.cumsum(0) == 1))[1:]  # (T - 1,) the targets scored
        nll = token_nll(model(x[None]).logits[0, :-1], x[1:])  # (T - 1,)
        total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    return total, count, chunks, ids


# ----------------------------------------------------------------------------------------------
# Samples as files (--samples_out, --samples_in): sampling and judging on different machines


def write_samples(path, texts, settings):
    """Samples as a file: one JSON object per line, {"text", "index", **settings}, written atomically."""
    write_file(path, [json.dumps({"text": t, "index": i, **settings}) + "\n" for i, t in enumerate(texts)],
                "free disk space or choose another --samples_out")
    print(f"wrote {len(texts)} samples to {path}")


def replaceable_samples(path):
    """Whether --samples_out may write over the file at path: it is empty or starts as write_samples's files do,
    so a mistyped name never replaces a checkpoint, a log or any other file."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first.strip():
        return True
    try:
        r = json.loads(first)
    except ValueError:
        return False
    return isinstance(r, dict) and "text" in r and "index" in r


def read_samples(path):
    """--samples_in=FILE.jsonl -> (texts, the settings of its first record)."""
    if not os.path.isfile(path):
        die(f"no samples file at {path}; write one with --sample --samples_out={path}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # as write_samples wrote it, or with a BOM (Windows editors)
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        die(f"{path} is not a samples file: byte {e.start:,} is not UTF-8; write it with --sample --samples_out={path}")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # a blank line (an editor's last newline) holds no sample
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not (isinstance(r, dict) and isinstance(r.get("text"), str)):  # (an assert would vanish under -O)
            die(f"{path} line {n} is not a JSON object with a \"text\" string; write it with --sample --samples_out={path}")
        records.append(r)
    if not any(r["text"].strip() for r in records):  # empty texts would score a perfect NLL of 0
        die(f"{path} holds no samples (or only empty texts); write it with --sample --samples_out={path}")
    return [r["text"] for r in records], {k: v for k, v in records[0].items() if k not in ("text", "index")}


def sample_settings(cfg, method):
    """What made a sample set: the method, the checkpoint and the sampling flags, for its file."""
    keep = ("sampler", "steps", "seed", "seq_len", "temperature", "top_p", "stride", "prefix", "suffix", "infill", "graph")
    ckpt = cfg.init_from or os.path.join(cfg.out_dir or os.path.join("out", method), "ckpt.pt")
    return {"method": method, "checkpoint": ckpt, **{k: getattr(cfg, k) for k in keep if hasattr(cfg, k)}}
