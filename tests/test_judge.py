"""The transformers judge (hub.load_hf_judge, hub.hf_judge_nll) and samples as files
(--samples_out, --samples_in), on a tiny randomly initialised GPT-2 saved offline."""
import json
import math
import os
import re
import types

import pytest
import torch

import transformers  # the test extra installs it

import corpus
import hub
import trainer
from conftest import OFFLINE, run_cli, shared_data

CTX = 32
TINY = ["--max_iters=6", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_interval=6", "--eval_iters=1", "--log_interval=3", "--warmup_iters=2", "--device=cpu"]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny GPT-2 (context CTX) with the GPT-2 BPE tokenizer built from $DIFFLM_DATA/gpt2, saved."""
    d = str(tmp_path_factory.mktemp("judge"))
    bpe = os.path.join(shared_data(), "gpt2")
    vocab = json.load(open(os.path.join(bpe, "encoder.json")))
    merges = [tuple(x.split()) for x in open(os.path.join(bpe, "vocab.bpe"), encoding="utf-8").read().split("\n")[1:] if x]
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert tok("hello world")["input_ids"] == [31373, 995]  # GPT-2's own ids
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=CTX, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


def test_nll_equals_the_models_own_loss(judge_dir):
    model, tok = hub.load_hf_judge(judge_dir)
    total, count, chunks, ids = hub.hf_judge_nll(model, tok, TEXT)
    assert 2 <= len(ids) <= CTX and chunks == 1 and count == len(ids) - 1
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        loss = float(model(x, labels=x).loss)  # transformers' mean over the len - 1 predicted tokens
    assert abs(total / count - loss) < 1e-5


def test_long_text_is_scored_in_context_sized_chunks(judge_dir):
    model, tok = hub.load_hf_judge(judge_dir)
    text = " ".join([TEXT] * 4)
    total, count, chunks, ids = hub.hf_judge_nll(model, tok, text)
    assert len(ids) > 2 * CTX and chunks == math.ceil(len(ids) / CTX)
    expect, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), CTX):
            x = torch.tensor(ids[s:s + CTX])[None]
            if x.shape[1] > 1:
                expect += float(model(x, labels=x).loss) * (x.shape[1] - 1)
                n += x.shape[1] - 1
    assert count == n and abs(total - expect) < 1e-4 * n


def test_samples_file_roundtrip_and_bad_files(tmp_path):
    p = str(tmp_path / "s.jsonl")
    hub.write_samples(p, ["a b", "", "c\nd"], {"method": "mdlm", "steps": 4})  # an empty text among others is kept
    assert [json.loads(x)["index"] for x in open(p)] == [0, 1, 2]  # each record's index is its sample's
    texts, settings = hub.read_samples(p)
    assert texts == ["a b", "", "c\nd"] and settings == {"method": "mdlm", "steps": 4}
    assert not os.path.exists(p + ".tmp")
    with open(p, "a") as f:
        f.write("\n\n")  # blank lines (an editor's last newline) hold no sample and spoil nothing
    assert hub.read_samples(p)[0] == ["a b", "", "c\nd"]
    bad, odd, empty = tmp_path / "bad.jsonl", tmp_path / "odd.jsonl", tmp_path / "empty.jsonl"
    bad.write_text('{"text": "ok"}\n{"no_text": 1}\n')
    odd.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": 3}\n')
    empty.write_text('{"text": ""}\n{"text": " "}\n')  # scored, these gave a perfect NLL of 0
    binary = tmp_path / "samples.npy"
    binary.write_bytes(b'{"text": "ok"}\n\x93NUMPY')  # a traceback (UnicodeDecodeError)
    for path, expect in ((str(tmp_path / "missing.jsonl"), "no samples file"), (str(bad), "line 2"), (str(odd), "line 3"),
                         (str(empty), "only empty texts"), (str(binary), "byte 15 is not UTF-8")):
        with pytest.raises(SystemExit) as e:
            hub.read_samples(path)
        line = str(e.value.code)
        assert line.startswith("error: ") and "\n" not in line and expect in line


def test_samples_file_settings_are_what_made_them(tmp_path):
    """The settings read back are the first record's; they name the sampling flags of the run, the checkpoint and
    the method."""
    import mdlm
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "method": "mdlm", "steps": 4}\n{"text": "b", "method": "sedd", "steps": 8}\n')
    assert hub.read_samples(str(mixed))[1] == {"method": "mdlm", "steps": 4}
    cfg = mdlm.Config(sampler="confidence", steps=16, seed=3, temperature=0.8, top_p=0.9, out_dir=str(tmp_path / "m"))
    s = hub.sample_settings(cfg, "mdlm")
    assert s["method"] == "mdlm" and s["checkpoint"] == str(tmp_path / "m" / "ckpt.pt")
    assert (s["sampler"], s["steps"], s["seed"], s["temperature"], s["top_p"]) == ("confidence", 16, 3, 0.8, 0.9)


def test_samples_files_from_other_writers_read_back(tmp_path):
    """Raw UTF-8 (json.dumps(ensure_ascii=False), as other tools write it) with a line or paragraph separator inside a
    text, and Windows line ends with a blank line of spaces, read back as written, with or without a byte-order mark;
    a cut last line (a copy stopped short) is one line naming it, not a JSONDecodeError traceback."""
    raw, cut = tmp_path / "raw.jsonl", tmp_path / "cut.jsonl"
    texts = ["caf\u00e9\u2028na\u00efve", "a\u0085b\u2029c", "x"]
    raw.write_bytes(("\r\n".join(json.dumps({"text": t, "steps": 4}, ensure_ascii=False) for t in texts) + "\r\n \r\n").encode())
    assert hub.read_samples(str(raw)) == (texts, {"steps": 4})
    raw.write_bytes(b"\xef\xbb\xbf" + raw.read_bytes())  # a byte-order mark, as Windows editors save UTF-8
    assert hub.read_samples(str(raw)) == (texts, {"steps": 4})
    cut.write_text('{"text": "ok"}\n{"text": "hal')
    with pytest.raises(SystemExit, match=f"line 2 is not a JSON object .* --samples_out={re.escape(str(cut))}$"):
        hub.read_samples(str(cut))


def test_sample_settings_name_the_published_checkpoint_and_the_default_folder():
    """A sample set drawn from --init_from names that checkpoint (not out/<method>/ckpt.pt, which it never read); without
    --out_dir, the folder the method wrote; and the flags that shaped the text (length, prompt, graph)."""
    import mdlm
    import sedd
    hub_id = "kuleshov-group/mdlm-owt"
    assert hub.sample_settings(mdlm.Config(init_from=hub_id), "mdlm")["checkpoint"] == hub_id
    assert hub.sample_settings(sedd.Config(), "sedd")["checkpoint"] == os.path.join("out", "sedd", "ckpt.pt")
    s = hub.sample_settings(sedd.Config(seq_len=64, stride=16, prefix="ROMEO:", suffix=" end.", graph="uniform"), "sedd")
    assert (s["seq_len"], s["stride"], s["prefix"], s["suffix"], s["graph"]) == (64, 16, "ROMEO:", " end.", "uniform")


def test_a_transformers_judge_averages_over_every_scored_token_and_needs_a_context(judge_dir):
    """The figure is nats per scored token over all texts (a one-token text scores none), not per text; a context
    of one position leaves nothing to predict from and is refused."""
    model, tok = hub.load_hf_judge(judge_dir)
    total, count, _, _ = hub.hf_judge_nll(model, tok, TEXT)
    nll, _ = hub.hf_judge_texts(judge_dir, ["a", TEXT], "cpu")
    assert abs(nll - total / count) < 1e-5
    with pytest.raises(SystemExit, match="config gives no context length"):
        hub.judge_context(transformers.GPT2Config(n_positions=1))
    assert hub.judge_context(transformers.GPT2Config(n_positions=2)) == 2


def test_a_judge_with_max_position_embeddings_has_that_context():
    """OPT, Llama and GPT-NeoX (Pythia) configs state their context as max_position_embeddings, not n_positions."""
    for config in (transformers.OPTConfig(max_position_embeddings=64), transformers.LlamaConfig(max_position_embeddings=48)):
        assert hub.judge_context(config) == config.max_position_embeddings


def test_a_hub_judge_checks_the_network_first_and_a_folder_needs_none(judge_dir, monkeypatch):
    """--judge=owner/name: the reachability check comes before the client (offline, it retries each request for half a
    minute); a local folder is read without it."""
    def checked():
        raise SystemExit("error: checked the network")
    monkeypatch.setattr(corpus, "hub_offline_unless_reachable", checked)
    for k in ("HTTPS_PROXY", "https_proxy"):  # should the check be skipped, the client fails at once
        monkeypatch.setenv(k, "http://127.0.0.1:9")
    with pytest.raises(SystemExit, match="checked the network"):
        hub.hf_judge_tokenizer("no-such-owner/no-such-judge")
    assert len(hub.hf_judge_tokenizer(judge_dir)) > 50000


def judge_copy_error(judge_dir, d, keep):
    """The error of loading a copy of the judge folder that holds only the files keep(name) accepts: one line."""
    d.mkdir()
    for f in os.listdir(judge_dir):
        if keep(f):
            os.symlink(os.path.join(judge_dir, f), d / f)
    with pytest.raises(SystemExit) as e:
        hub.load_hf_judge(str(d))
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line
    return line


def test_judge_without_model_weights_is_one_line(judge_dir, tmp_path):
    """A folder with the tokenizer and config.json but no weights (a copy stopped short) was an OSError traceback."""
    line = judge_copy_error(judge_dir, tmp_path / "no_weights", lambda f: f not in ("model.safetensors", "pytorch_model.bin"))
    assert "cannot load the judge's model" in line


def test_judge_without_tokenizer_is_one_line(judge_dir, tmp_path):
    model = ("config.json", "model.safetensors", "pytorch_model.bin", "generation_config.json")
    assert "tokenizer" in judge_copy_error(judge_dir, tmp_path / "no_tok", lambda f: f in model)


def test_cli_sample_to_file_then_judge_it(judge_dir, char_data, tmp_path):
    out, f = str(tmp_path / "m"), str(tmp_path / "samples.jsonl")
    run_cli(["mdlm.py", "--train", f"--data_dir={char_data}", f"--out_dir={out}"] + TINY)
    run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--steps=4", "--num_samples=3", "--seed=7",
             f"--samples_out={f}", "--device=cpu"])
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--steps=4", f"--samples_out={tmp_path}", "--device=cpu"],
                check=False)  # a folder is refused before the sampling it would have thrown away
    assert r.returncode == 1 and "--samples_out" in r.stderr and "=== sample" not in r.stdout, r.stdout + r.stderr
    records = [json.loads(x) for x in open(f)]
    assert len(records) == 3 and all(r["method"] == "mdlm" and r["steps"] == 4 and r["seed"] == 7 for r in records)
    assert records[0]["checkpoint"] == os.path.join(out, "ckpt.pt") and all(r["text"] for r in records)
    r = run_cli(["mdlm.py", "--eval", "--gen", f"--out_dir={out}", f"--samples_in={f}", f"--judge={judge_dir}",
                 "--eval_t_samples=1", "--device=cpu"], env={**OFFLINE, "HF_HUB_OFFLINE": "1", "DIFFLM_DATA": shared_data()})
    line = [x for x in r.stdout.splitlines() if x.startswith("gen: NLL")]
    assert line and f"from {f}" in line[0] and "3 samples" in line[0], r.stdout[-2000:]
    assert f"generated words occur in the training text (from {f})" in r.stdout  # the judged samples, none drawn anew
    nll = float(line[0].split("gen: NLL ")[1].split()[0])
    ent = float(line[0].split("unigram entropy ")[1].split()[0])
    assert math.isfinite(nll) and nll > 0 and ent > 0
    log = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl")) for x in open(os.path.join(out, "log.jsonl"))]
    assert abs(log[-1]["eval_full"]["gen_nll"] - nll) < 1e-3
    assert (log[-1]["eval_full"]["gen_judge"], log[-1]["eval_full"]["gen_samples_in"]) == (judge_dir, f)  # what it scored
    assert "sec_per_sample" not in log[-1]["eval_full"] and "s/sample" not in line[0]  # read, not drawn: not timed
    r = run_cli(["mdlm.py", "--eval", "--gen", f"--out_dir={out}", f"--samples_in={f}.missing", f"--judge={judge_dir}",
                 "--device=cpu"], check=False)  # refused before the bound is computed
    assert r.returncode == 1 and "no samples file" in r.stderr and "NELBO" not in r.stdout, r.stdout + r.stderr
    r = run_cli(["mdlm.py", "--eval", "--gen", f"--out_dir={out}", f"--samples_in={f}", f"--judge={judge_dir}.missing",
                 "--device=cpu"], env={**OFFLINE, "HF_HUB_OFFLINE": "1"}, check=False)  # so is a judge that is not there
    assert r.returncode == 1 and "judge's tokenizer" in r.stderr and "NELBO" not in r.stdout, r.stdout + r.stderr


def test_ar_samples_are_decoded_for_a_transformers_judge(judge_dir, char_data, tmp_path):
    """A method file hands generative_eval its tokenizer: the judge re-tokenises the decoded text."""
    out = str(tmp_path / "ar")
    run_cli(["ar.py", "--train", f"--data_dir={char_data}", f"--out_dir={out}"] + TINY)
    r = run_cli(["ar.py", "--eval", "--gen", f"--out_dir={out}", f"--judge={judge_dir}", "--num_samples=2",
                 "--seq_len=24", "--device=cpu"], env={**OFFLINE, "HF_HUB_OFFLINE": "1", "DIFFLM_DATA": shared_data()})
    line = [x for x in r.stdout.splitlines() if x.startswith("gen: NLL")]
    assert line and f"judge {judge_dir}" in line[0] and "2 samples of 24 tokens" in line[0], r.stdout[-2000:]
    assert math.isfinite(float(line[0].split("gen: NLL ")[1].split()[0]))


def test_bench_methods_with_a_transformers_judge(judge_dir, char_data, tmp_path):
    """bench.py methods --judge=a transformers model: the real-data row is scored by it too (it took the judge for an
    ar.py checkpoint once ar had trained), and a judge that does not load stops the run before any training."""
    env = {**OFFLINE, "HF_HUB_OFFLINE": "1", "DIFFLM_DATA": shared_data()}
    train = " ".join([f"--data_dir={char_data}"] + TINY[:-1])
    run_cli(["bench.py", "methods", "--methods=ar", f"--out_root={tmp_path / 'runs'}", f"--judge={judge_dir}",
             f"--train_args={train}", "--num_samples=2"], env=env, timeout=600)
    rows = {r["method"]: r for r in json.load(open(tmp_path / "runs" / "methods.json"))["rows"]}
    assert math.isfinite(rows["data (val)"]["gen_nll"]) and math.isfinite(rows["ar"]["gen_nll"])
    for judge in (str(tmp_path / "no_such_judge"), str(tmp_path / "runs" / "ar" / "log.jsonl")):
        r = run_cli(["bench.py", "methods", "--methods=mdlm", f"--out_root={tmp_path / 'again'}", f"--judge={judge}"],
                    env=env, check=False)
        assert r.returncode == 1 and "judge" in r.stderr and not os.path.exists(tmp_path / "again"), r.stderr[-800:]


def test_hub_judge_offline_is_one_line(tmp_path):
    """A hub id with no network and no cache: one line, exit status 1 (a fresh process reads HF_HUB_OFFLINE)."""
    r = run_cli(["-c", "import hub; hub.load_hf_judge('no-such-owner/no-such-judge')"], check=False, timeout=120,
                env={**OFFLINE, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "no-such-owner/no-such-judge" in lines[0] and "tokenizer" in lines[0]


def test_nothing_to_score_is_one_line_not_a_perfect_score(judge_dir, tmp_path):
    """Texts of one judge token (--seq_len=1) leave a transformers judge nothing to predict, and an ar.py judge
    nothing at all in empty texts: both reported NLL 0 and perplexity 1. A judge whose config states no context
    length (Bloom, Mamba; XLNet's -1) was a traceback, or NLL 0, after the bound had run."""
    with pytest.raises(SystemExit, match="no sample is long enough for the judge .* to score"):
        hub.hf_judge_texts(judge_dir, ["a", "b"], "cpu")
    nll, ids = hub.hf_judge_texts(judge_dir, ["a", TEXT], "cpu")
    assert nll > 0 and [len(x) for x in ids][0] == 1
    for config in (transformers.BloomConfig(), transformers.XLNetConfig()):
        with pytest.raises(SystemExit, match="config gives no context length"):
            hub.judge_context(config)
    assert hub.judge_context(transformers.GPT2Config(n_positions=CTX)) == CTX
    cfg = transformers.BloomConfig(vocab_size=50257, hidden_size=8, n_layer=1, n_head=2)
    bloom = tmp_path / "bloom"
    transformers.BloomForCausalLM(cfg).save_pretrained(bloom)
    transformers.AutoTokenizer.from_pretrained(judge_dir).save_pretrained(bloom)
    with pytest.raises(SystemExit, match="config gives no context length"):  # when the tokenizer is read: before any work
        hub.hf_judge_tokenizer(str(bloom))


def test_end_of_text_tokens_after_a_chunks_first_are_not_scored(judge_dir):
    """As the MDLM code's generative perplexity counts them: a run of end-of-text tokens (a sample's padding,
    easy to predict) flattered the figure when every one was scored."""
    model, tok = hub.load_hf_judge(judge_dir)
    text = "It is the east" + "<|endoftext|>" * 4 + " and Juliet"
    total, count, chunks, ids = hub.hf_judge_nll(model, tok, text)
    assert ids.count(tok.eos_token_id) == 4 and chunks == 1 and count == len(ids) - 1 - 3
    x = torch.tensor(ids)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(x[None]).logits[0, :-1], x[1:], reduction="none")
    keep = torch.ones(len(ids) - 1, dtype=torch.bool)
    keep[[i - 1 for i, t in enumerate(ids) if t == tok.eos_token_id][1:]] = False  # the 2nd, 3rd and 4th
    assert abs(total - float(nll[keep].sum())) < 1e-4


def test_an_ar_judge_of_texts_averages_over_tokens_not_texts(monkeypatch):
    """--samples_in with an ar.py judge: texts of every length re-encoded and scored; the figure is nats per token
    over all of them, so a long text weighs as its tokens do (a text of n tokens scores n nats a token here)."""
    tok = corpus.CharTokenizer("ab")
    monkeypatch.setattr(trainer, "load_judge", lambda path, meta=None, device=None: (None, meta))
    monkeypatch.setattr(trainer, "judge_nll", lambda judge, x: float(x.shape[1]))
    nll, ids = trainer.judge_texts("judge.pt", ["a", "abab", ""], tok, {}, "cpu")
    assert nll == pytest.approx((1 * 1 + 4 * 4) / 5) and [len(x) for x in ids] == [1, 4, 0]
    with pytest.raises(SystemExit, match="no sample holds a token for the judge to score"):  # not NLL 0, perplexity 1
        trainer.judge_texts("judge.pt", ["", ""], tok, {}, "cpu")


def test_samples_in_of_another_vocabulary_stop_before_the_work(tmp_path, monkeypatch):
    """--samples_in with an ar.py judge is encoded in the model's tokens before the bound is computed: a file of
    another model's samples stops at once with one line naming the file (it stopped after the bound, naming neither)."""
    f = str(tmp_path / "s.jsonl")
    hub.write_samples(f, ["ab", "a\u00e9b"], {})
    monkeypatch.setattr(trainer, "read_judge", lambda *a: None)
    cfg = types.SimpleNamespace(gen=True, judge="out/ar/ckpt.pt", samples_in=f, samples_out="")
    meta = {"tokenizer": "char", "chars": ["a", "b"]}
    with pytest.raises(SystemExit) as e:
        trainer.check_files(cfg, meta, "mdlm")
    assert str(e.value) == f"error: --samples_in={f} has characters outside the model's 2-character vocabulary: " \
        "'\u00e9'; use only characters seen in training"
    hub.write_samples(f, ["ab", "ba"], {})
    trainer.check_files(cfg, meta, "mdlm")
