"""Zero-shot perplexity on the papers' sets (--eval --eval_data=NAME, corpus.py), offline.

The detokenizers are checked on strings whose expected output follows from the MDLM code base's
rules, the wrapping on counted token streams, each local file format on a small file written in
it, and the command line on tiny published-layout checkpoints (tests/test_published.py).
"""
import json
import math
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import corpus
from conftest import run_cli
from test_published import env, one_line_error, write_mdlm, write_sedd

# ----------------------------------------------------------------------------------------------
# Detokenizers


@pytest.mark.parametrize("fn, raw, clean", [
    (corpus.wikitext_detok, "a 1 @,@ 000 @-@ year span of 2 @.@ 5 m", "a 1,000-year span of 2.5 m"),
    (corpus.wikitext_detok, " = = Early life = = \n", " == Early life ==\n"),
    (corpus.wikitext_detok, 'he said " yes " ( twice ) , then left . Then', 'he said "yes" (twice), then left. Then'),
    (corpus.wikitext_detok, "the team 's players ' kit : blue ; red", "the team's players' kit: blue; red"),
    (corpus.wikitext_detok, " = = = Climate = = = \n The mean is 20 \u00b0 C ! Was it N [ sic ] ? Yes \n",
     " === Climate ===\nThe mean is 20\u00b0C! Was it 1 [sic]? Yes\n"),
    (corpus.ptb_detok, "he does n't know the <unk> 's N N N", "he doesn't know the ?'s 1 1 N"),
    (corpus.ptb_detok, "costs $ N a share and/or a\\/b", "costs $1 a share and/or a/b"),
    (corpus.lm1b_detok, 'He said " hi there " , ( ok ) end .', 'He said "hi there", (ok) end.'),
    (corpus.lm1b_detok, "see http : / / x.org / a ? Yes !", "see http://x.org/a? Yes!"),
    (corpus.lm1b_detok, "it cost \u00a3 5 , or $ 6 .", "it cost \u00a35, or $6."),
    (corpus.lambada_detok, "  \u201cNo,\u201d she said.  ", '\n"No," she said.'),
    (corpus.papers_detok, "the value @-@ based model ( VBM ) is new .", "the value-based model (VBM) is new."),
])
def test_detokenizers_follow_the_rules(fn, raw, clean):
    assert fn(raw) == clean


# ----------------------------------------------------------------------------------------------
# Wrapping into blocks


def test_mdlm_wrap_puts_bos_and_eos_around_each_block_and_eos_after_each_doc():
    docs = [[1, 2, 3], [], [4, 5, 6, 7, 8], [9]]  # stream with EOS=0: 1 2 3 0 0 4 5 6 7 8 0 9 0 (13 tokens)
    x = corpus.wrap_blocks(docs, 6, eos=0, bos=99)
    assert x.tolist() == [[99, 1, 2, 3, 0, 0], [99, 0, 4, 5, 6, 0], [99, 7, 8, 0, 9, 0]]  # 3 x 4 tokens, 1 dropped


def test_sedd_wrap_cuts_plain_blocks():
    x = corpus.wrap_blocks([[1, 2, 3], [], [4, 5, 6, 7, 8], [9]], 4, eos=0)
    assert x.tolist() == [[1, 2, 3, 0], [0, 4, 5, 6], [7, 8, 0, 9]]  # the last EOS dropped
    assert x.dtype == torch.int64


def test_a_stream_that_fills_its_last_block_keeps_it():
    assert corpus.wrap_blocks([[1, 2, 3], [4, 5, 6]], 4, eos=0).tolist() == [[1, 2, 3, 0], [4, 5, 6, 0]]
    assert corpus.wrap_blocks([[1, 2, 3, 4, 5]], 8, eos=0, bos=9).tolist() == [[9, 1, 2, 3, 4, 5, 0, 0]]


def test_wrap_of_too_little_text_is_one_line():
    with pytest.raises(SystemExit, match="fewer than one block"):
        corpus.wrap_blocks([[1, 2]], 8, eos=0, bos=0)
    for block_size in (1, 2):  # a ZeroDivisionError and a reshape ValueError
        with pytest.raises(SystemExit, match=f"--block_size={block_size} leaves no text in a block"):
            corpus.wrap_blocks([[1, 2, 3]], block_size, eos=0, bos=0)


# ----------------------------------------------------------------------------------------------
# Local files


def test_each_local_format_gives_the_rows(tmp_path):
    rows = [" = Title = \n", "", " first line , here . \n"]
    (tmp_path / "w.txt").write_text(" = Title = \n \n first line , here . \n")
    assert corpus.read_eval_file(str(tmp_path / "w.txt"), "wikitext2") == rows  # blank lines empty, newlines kept
    (tmp_path / "p.raw").write_text(" a b \n c d\n")
    assert corpus.read_eval_file(str(tmp_path / "p.raw"), "ptb") == ["a b", "c d"]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)) + "\n")
    assert corpus.read_eval_file(str(tmp_path / "l.jsonl"), "lambada") == rows  # a blank last line is no row
    pq.write_table(pa.table({"article": rows, "abstract": ["x"] * 3}), tmp_path / "a.parquet")
    assert corpus.read_eval_file(str(tmp_path / "a.parquet"), "arxiv") == rows


@pytest.mark.parametrize("name, file, content, expect", [
    ("ptb", "p.jsonl", '{"text": "a b"}\n', "p.jsonl line 1 is not a JSON object with a 'sentence' field"),
    ("lambada", "l.jsonl", '{"text": "ok"}\nnot json\n', "l.jsonl line 2 is not a JSON object with a 'text' field"),
    ("arxiv", "a.parquet", "plain text", "a.parquet is not a parquet table with a 'article' column"),
    ("wikitext2", "w.csv", "a,b\n", "expected .jsonl: one JSON object per line"),
    ("lambada", "l.jsonl", '{"text": "ok"}\n{"text": null}\n', "l.jsonl line 2: 'text' is NoneType, not a string"),
    ("ptb", "p.parquet", ["a b", None], "p.parquet row 1: 'sentence' is NoneType, not a string"),
])
def test_a_file_in_the_wrong_format_is_one_line(name, file, content, expect, tmp_path):
    if isinstance(content, list):  # a parquet column
        pq.write_table(pa.table({"sentence": content}), tmp_path / file)
    else:
        (tmp_path / file).write_text(content)
    with pytest.raises(SystemExit) as e:
        corpus.read_eval_file(str(tmp_path / file), name)
    assert expect in str(e.value.code) and "\n" not in str(e.value.code)


# ----------------------------------------------------------------------------------------------
# The command line


WIKI = "".join(f" = Section {i} = \n \n The 1 @,@ 000 @-@ year river , number {i} , flows ( north ) . \n" for i in range(12))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("zeroshot")
    (d / "wiki.txt").write_text(WIKI)
    return {"sedd": write_sedd(d / "sedd", tokens=50257, hidden=16, cond=8, n_blocks=1, n_heads=2, length=32),
            "mdlm": write_mdlm(d / "mdlm", vocab_size=50258, hidden=16, cond=8, n_blocks=1, n_heads=2, length=32),
            "file": str(d / "wiki.txt")}


@pytest.mark.parametrize("method", ["sedd", "mdlm"])
def test_cli_eval_data_on_a_local_file_prints_the_bound(method, checkpoints, tmp_path):
    r = run_cli([f"{method}.py", "--eval", f"--init_from={checkpoints[method]}", "--eval_data=wikitext2",
                 f"--eval_file={checkpoints['file']}", "--eval_t_samples=1", f"--out_dir={tmp_path}", "--device=cpu"], env=env())
    line = r.stdout.split("wikitext2 NELBO ")[1].split("\n")[0]
    nats, bits, ppl = float(line.split()[0]), float(line.split("| ")[1].split()[0]), float(line.split("<= ")[1].split()[0])
    assert nats > 0 and math.isclose(bits, nats / math.log(2), rel_tol=1e-3) and math.isclose(ppl, math.exp(nats), rel_tol=1e-3)
    with open(tmp_path / "log.jsonl") as f:
        record = [json.loads(line) for line in f][-1]["eval_full"]
    assert record["data"] == "wikitext2" and math.isclose(record["val_nelbo"], nats, abs_tol=1e-4)


def test_the_blocks_are_the_wrapped_file(checkpoints):
    class Cfg:
        eval_data, eval_file, block_size = "wikitext2", checkpoints["file"], 32
    x = corpus.zero_shot(Cfg, {"tokenizer": "gpt2"}, bos=True).x
    enc = corpus.gpt2_encoding()
    n = sum(len(enc.encode_ordinary(corpus.wikitext_detok(r))) + 1 for r in corpus.read_eval_file(Cfg.eval_file, "wikitext2"))
    assert x.shape == (n // 30, 32) and (x[:, 0] == enc.eot_token).all() and (x[:, -1] == enc.eot_token).all()
    assert enc.decode(x[0, 1:-1].tolist()).startswith(" = Section 0 =\n")


def test_sedd_blocks_are_the_plain_stream_and_each_is_read_once(tmp_path):
    """Without a BOS (SEDD's protocol) the blocks are the stream itself, block_size tokens each, nothing added
    around them; evaluate() reads every block once, in order, whatever the batch size."""
    (tmp_path / "wiki.txt").write_text(WIKI)
    cfg = types.SimpleNamespace(eval_data="wikitext2", eval_file=str(tmp_path / "wiki.txt"), block_size=32)
    enc = corpus.gpt2_encoding()
    stream = [t for r in corpus.read_eval_file(cfg.eval_file, "wikitext2")
              for t in enc.encode_ordinary(corpus.wikitext_detok(r)) + [enc.eot_token]]
    blocks = corpus.zero_shot(cfg, {"tokenizer": "gpt2"}, bos=False)
    assert blocks.x.flatten().tolist() == stream[:len(stream) // 32 * 32] and len(blocks.x) == len(stream) // 32 > 4
    for batch_size in (1, 2, 4, len(blocks.x), len(blocks.x) + 1):
        assert torch.equal(torch.cat(list(blocks.sequential("val", batch_size))), blocks.x)


@pytest.mark.parametrize("method", ["sedd", "mdlm"])
def test_each_method_scores_the_blocks_of_its_own_protocol(method, checkpoints, monkeypatch, tmp_path):
    """--eval --eval_data: MDLM's blocks carry a BOS and an EOS around their text, SEDD's are plain (the bound is
    over other windows, and other counts, under the other protocol)."""
    import importlib
    M = importlib.import_module(method)
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    seen = {}

    def scored(model, batches, cfg, full=False):
        seen["x"] = batches.x
        raise SystemExit("scored")
    monkeypatch.setattr(M, "evaluate", scored)
    with pytest.raises(SystemExit, match="scored"):
        M.main(["--eval", f"--init_from={checkpoints[method]}", "--eval_data=wikitext2", f"--eval_file={checkpoints['file']}",
                "--eval_t_samples=1", f"--out_dir={tmp_path}", "--device=cpu"])
    cfg = types.SimpleNamespace(eval_data="wikitext2", eval_file=checkpoints["file"], block_size=32)
    assert torch.equal(seen["x"], corpus.zero_shot(cfg, {"tokenizer": "gpt2"}, bos=method == "mdlm").x)


def test_bad_eval_data_is_one_line(checkpoints):
    ckpt = checkpoints["mdlm"]
    line = one_line_error(["mdlm.py", "--eval", f"--init_from={ckpt}", "--eval_data=wikitext", "--device=cpu"])
    assert "unknown --eval_data='wikitext'" in line and "wikitext2, wikitext103, ptb, lambada, lm1b, ag_news, pubmed, arxiv" in line
    line = one_line_error(["mdlm.py", "--eval", f"--init_from={ckpt}", f"--eval_file={checkpoints['file']}", "--device=cpu"])
    assert "--eval_file needs --eval_data=NAME" in line and "wikitext2, wikitext103" in line
    with pytest.raises(SystemExit, match="needs a model with the GPT-2 tokenizer"):
        corpus.zero_shot(type("Cfg", (), {"eval_data": "ptb", "eval_file": "", "block_size": 8}), {"tokenizer": "char"}, bos=True)


def test_no_network_and_no_file_says_how_to_provide_one(checkpoints):
    r = run_cli(["sedd.py", "--eval", f"--init_from={checkpoints['sedd']}", "--eval_data=ptb", "--device=cpu"],
                env={**env(), "HF_DATASETS_OFFLINE": "1"}, check=False, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "ptb_text_only" in lines[0] and "--eval_file=PATH" in lines[0]


def test_each_set_is_asked_of_datasets_by_its_hub_names(monkeypatch):
    """The download goes through `datasets` with the MDLM code base's names: LAMBADA is OpenAI's jsonl file, given
    as data_files (as a config name it is no dataset), the others a path, config and split; the rows are the set's
    text field."""
    calls = []

    def load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        return {"text": ["a text"], "sentence": ["a sentence"]}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(corpus, "hub_offline_unless_reachable", lambda: None)
    rows = [corpus.download_rows(n) for n in ("lambada", "ptb", "wikitext103")]
    assert rows == [["a text"], ["a sentence"], ["a text"]]
    assert calls == [("json", None, "train", corpus.LAMBADA_URL), ("ptb_text_only", None, "validation", None),
                     ("wikitext", "wikitext-103-raw-v1", "validation", None)]
