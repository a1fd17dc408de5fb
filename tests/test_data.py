"""Data: the shipped corpora, your own text (data/text/prepare.py), meta.json against the token
files, preparing from many processes at once, and bounded reads of a split."""
import dataclasses
import gzip
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from conftest import OFFLINE, ROOT, run_cli, shared_data

import common
import corpus
import diffuser
import diffusion_lm

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1",
        "--device=cpu"]
SHIPPED = {  # the uncompressed sha256 of each shipped file (data/*/README.md)
    "shakespeare_char/input.txt.gz": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "e2e/src1_train.txt.gz": "eae319082237310913d9f37f6a891d48fb3f821f29d86870d2cb4f92ddd72c5a",
    "e2e/src1_valid.txt.gz": "ba963113c8401d3d26216c0dc0a6dae1ea6ea927de3bf830e32c41f65401c80d",
    "e2e/src1_test.txt.gz": "81b1bcd40c4f12845ec4eb61a77bf43765d112483cd9b2f91ef10bfc1b3d8f13",
}


@dataclasses.dataclass
class Cfg(common.TextConfig, common.BaseConfig):
    """The keys a text method's data reading sees."""


def cfg_for(path, **kw):
    return Cfg(data_dir=str(path), **kw)


def fails(fn, *needles):
    """fn() must stop through common.die: one line, saying each needle."""
    with pytest.raises(SystemExit) as e:
        fn()
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ----------------------------------------------------------------------------------------------
# Shipped corpora


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_is_small_and_exact(name):
    path = os.path.join(ROOT, "data", name)
    assert os.path.getsize(path) < 1_500_000
    with gzip.open(path) as f:
        assert hashlib.sha256(f.read()).hexdigest() == SHIPPED[name]
    assert "Licen" in open(os.path.join(os.path.dirname(path), "README.md")).read()


def test_shipped_files_are_tracked_and_prepared_files_ignored():
    def ignored(p):
        return subprocess.run(["git", "check-ignore", "-q", p], cwd=ROOT).returncode == 0
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout (an unpacked archive): nothing to ask git")
    assert not any(ignored(os.path.join("data", n)) for n in SHIPPED)
    assert all(ignored(f"data/e2e/{n}") for n in ("train.bin", "meta.json", "train.jsonl", "train.bin.7.tmp",
                                                   "prepare.lock", "write.lock", "verified.json"))


def test_char_data_prepared_offline(char_data):
    meta = json.load(open(os.path.join(char_data, "meta.json")))
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (1_003_854, 111_540, 65)
    assert meta["files"]["train.bin"]["bytes"] == 2 * 1_003_854
    assert "data/shakespeare_char/prepare.py" in meta["command"]


def test_gpt2_shakespeare_prepared_as_documented(tmp_path):
    """data/shakespeare/prepare.py (the GPT-2 BPE view of the shipped text) was run by no test: its 90/10 cut
    by characters and the counts its docstring states."""
    out = tmp_path / "shk"
    run_cli(["data/shakespeare/prepare.py", f"--out_dir={out}"], env={"DIFFLM_DATA": shared_data()})
    meta = json.load(open(out / "meta.json"))
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    with gzip.open(os.path.join(ROOT, "data", "shakespeare_char", "input.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read()
    n, tok = int(0.9 * len(text)), corpus.GPT2Tokenizer()
    head = tok.decode(np.fromfile(out / "val.bin", dtype=np.uint16)[:20].tolist())
    tail = tok.decode(np.fromfile(out / "train.bin", dtype=np.uint16)[-20:].tolist())
    assert text[n:].startswith(head) and text[:n].endswith(tail)  # the split is at the cut, nothing lost


def test_shakespeare_word_vocabulary_is_the_training_texts(tmp_path):
    """The vocabulary is the words of the first 90% (train): a word seen only in val is <unk> there."""
    src = tmp_path / "in.txt"
    src.write_text("the cat " * 45 + "dog " * 10)  # 360 + 40 characters: the cut falls before the first dog
    run_cli(["data/shakespeare_word/prepare.py", f"--input={src}", f"--out_dir={tmp_path / 'w'}", "--min_count=1"])
    meta = json.load(open(tmp_path / "w" / "meta.json"))
    assert meta["words"] == list(corpus.WordTokenizer.SPECIALS) + ["cat", "the"]
    val = np.fromfile(tmp_path / "w" / "val.bin", dtype=meta["dtype"])
    assert val.tolist() == [corpus.WordTokenizer.UNK] * 10


def test_first_command_offline_prepares_on_its_own(tmp_path):
    """--train on a fresh folder with no $DIFFLM_DATA and no network prepares from the shipped copy."""
    data, out = tmp_path / "fresh", tmp_path / "out"
    r = run_cli(["mdlm.py", "--train", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2",
                 "--eval_interval=2"] + TINY, env=OFFLINE)
    assert "preparing shakespeare_char" in r.stdout and "input.txt.gz" in r.stdout
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--num_samples=1", "--steps=4"], env=OFFLINE)
    assert "=== sample 0" in r.stdout


def test_no_copy_anywhere_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLM_DATA", str(tmp_path))
    data, why = corpus.find_local_copy("x.txt", "http://127.0.0.1:9/x.txt", shipped=str(tmp_path / "none.gz"))
    assert data is None and "could not download" in why
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    data, why = corpus.find_local_copy("x.txt", "http://127.0.0.1:9/x.txt", shipped=str(tmp_path / "bad.gz"))
    assert data is None and "is damaged" in why


def test_a_local_copy_is_taken_only_from_DIFFLM_DATA_and_with_its_sha256(tmp_path, monkeypatch):
    """A corpus file is the shipped copy or $DIFFLM_DATA/name, each only with the expected sha256 (another text of
    that name is named, not prepared); with $DIFFLM_DATA unset a file of that name in the working folder is no copy."""
    data = b"to be or not to be\n"
    sha, url = hashlib.sha256(data).hexdigest(), "http://127.0.0.1:9/x.txt"
    (tmp_path / "x.txt").write_bytes(data)
    monkeypatch.setenv("DIFFLM_DATA", str(tmp_path))
    assert corpus.find_local_copy("x.txt", url, sha) == (data, str(tmp_path / "x.txt"))
    assert corpus.find_local_copy("x.txt", url, "0" * 64) == (
        None, f"{tmp_path / 'x.txt'} does not have the expected sha256 {'0' * 64}")
    with gzip.open(tmp_path / "x.txt.gz", "wb") as f:
        f.write(data + b"edited")
    got, why = corpus.find_local_copy("x.txt", url, sha, shipped=str(tmp_path / "x.txt.gz"))
    assert got is None and why == f"{tmp_path / 'x.txt.gz'} does not have the expected sha256 {sha}"
    monkeypatch.setenv("DIFFLM_DATA", "")
    monkeypatch.chdir(tmp_path)
    got, why = corpus.find_local_copy("x.txt", url, sha)
    assert got is None and "could not download" in why


# ----------------------------------------------------------------------------------------------
# Your own text


def text_prepare(args, monkeypatch):
    """data/text/prepare.py's main() in this process (a subprocess would spend seconds importing torch)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("text_prepare", os.path.join(ROOT, "data", "text", "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["data/text/prepare.py"] + args)
    mod.main()


def test_word_specials_read_back_as_themselves():
    """Decoded samples (--samples_out) hold <unk>, <s> and </s>; encoding that text again (--samples_in) gives
    the same ids, where each special fell apart into three pieces, each one <unk>."""
    tok = corpus.WordTokenizer.build(["the cat sat . <unk> the <s> mat </s>"], 1)
    assert tok.words[:4] == list(corpus.WordTokenizer.SPECIALS) and len(set(tok.words)) == len(tok.words)
    ids = [tok.START] + tok.encode("the cat") + [tok.UNK] + tok.encode("sat .") + [tok.END]
    assert tok.encode(tok.decode(ids)) == ids
    gpt2 = corpus.GPT2Tokenizer()  # and GPT-2's end-of-text, which fell apart into 5 pieces ("<", "|", "endoft", ...)
    ids = [15496, 995, 13, 50256, 50256, 383, 886, 13]
    assert gpt2.encode(gpt2.decode(ids)) == ids


def test_masked_positions_decode_as_the_mask_character():
    """--show and the samples print a position still masked (the absorbing id, vocab_size, or above) as mask_char,
    where chars[vocab_size] raised an IndexError; a word <pad> is left out of the text."""
    char = corpus.CharTokenizer("ab")
    assert char.decode([0, 2, 1, 3]) == "a_b_" and char.decode([2, 0], mask_char="?") == "?a"
    word = corpus.WordTokenizer(list(corpus.WordTokenizer.SPECIALS) + ["the", "cat"])
    assert word.decode([0, 4, 6, 5, 1, 3, 3]) == "<s> the _ cat </s>"


def test_own_text_char_and_word(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    b.write_text("\ufeff" + "café au lait, s'il vous plaît! " * 100, encoding="utf-8")
    out = tmp_path / "mine"
    text_prepare([f"--input={a}", f"--input={b}", "--name=mine", f"--out_dir={out}", "--val_fraction=0.2"], monkeypatch)
    assert "--dataset=mine" in capsys.readouterr().out
    meta = json.load(open(out / "meta.json"))
    tok = corpus.CharTokenizer(meta["chars"])
    assert "é" in meta["chars"] and "\ufeff" not in meta["chars"]
    text_a, text_b = a.read_text(), b.read_text()[1:]
    cut = lambda t: t.index(" ", int(0.8 * len(t)))  # noqa: E731  (on to the next space: no word is split)
    assert int(0.8 * len(text_b)) < cut(text_b) and meta["train_tokens"] == cut(text_a) + cut(text_b)
    train = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    assert tok.decode(train[:10].tolist()) == "the quick "
    assert tok.decode(train[-8:].tolist()) == text_b[cut(text_b) - 8:cut(text_b)]  # ends with a whole word
    # refuses to overwrite; --force replaces; the recorded command re-prepares it
    fails(lambda: text_prepare([f"--input={a}", "--name=mine", f"--out_dir={out}"], monkeypatch),
          "already holds a dataset", "--force")
    text_prepare([f"--input={a}", "--name=mine", f"--out_dir={out}", "--tokenizer=word", "--force"], monkeypatch)
    meta = json.load(open(out / "meta.json"))
    # files it would replace or remove (test.jsonl went silently), and a dataset's own folder (data/shakespeare_char
    # took your text, and the default runs then trained on it), are refused too
    for name, message in (("test.jsonl", "already holds a dataset (test.jsonl)"), ("prepare.py", "folder of a dataset's prepare.py")):
        folder = tmp_path / f"holds_{name}"
        folder.mkdir()
        (folder / name).write_text("mine\n")
        fails(lambda: text_prepare([f"--input={a}", "--name=x", f"--out_dir={folder}"], monkeypatch), message)
        assert os.listdir(folder) == [name]
    assert meta["tokenizer"] == "word" and "fox" in meta["words"] and meta["command"].endswith("--force")
    # the text methods take it by name
    small = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=1"]
    run_cli(["ar.py", "--train", "--dataset=mine", f"--data_dir={out}", f"--out_dir={tmp_path}", "--max_iters=2",
             "--eval_interval=2"] + small)
    assert "=== sample 0" in run_cli(["ar.py", "--sample", f"--out_dir={tmp_path}", "--num_samples=1"]).stdout


def test_a_changed_text_file_is_noted(tmp_path, monkeypatch, capsys):
    """A folder prepared from your text, which then changed: the run notes it (it trained on the old tokens)."""
    src, out = tmp_path / "a.txt", tmp_path / "a"
    src.write_text("the quick brown fox\n" * 40)
    text_prepare([f"--input={src}", "--name=a", f"--out_dir={out}"], monkeypatch)
    cfg = types.SimpleNamespace(dataset="a", data_dir=str(out))
    corpus.prepare_data(cfg)
    assert "has changed" not in capsys.readouterr().err
    os.utime(src, (time.time() + 5, time.time() + 5))  # touched, the same text: no note
    corpus.prepare_data(cfg)
    assert "has changed" not in capsys.readouterr().err
    for text in ("the quick brown cat\n" * 40, "the quick brown fox\n" * 41):  # the same size; another size
        src.write_text(text)
        os.utime(src, (time.time() + 10, time.time() + 10))
        corpus.prepare_data(cfg)
        assert f"note: {src} has changed since {out} was prepared" in capsys.readouterr().err


def test_a_text_file_of_another_size_is_noted_even_when_it_is_older(tmp_path, monkeypatch, capsys):
    """The size alone says a text changed: an older copy put back (cp -p, an unpacked archive keeps its mtime) is
    not newer than the preparation, and is noted all the same."""
    src, out = tmp_path / "a.txt", tmp_path / "a"
    src.write_text("the quick brown fox\n" * 40)
    text_prepare([f"--input={src}", "--name=a", f"--out_dir={out}"], monkeypatch)
    src.write_text("the quick brown fox\n" * 30)
    os.utime(src, (time.time() - 3600, time.time() - 3600))
    corpus.prepare_data(types.SimpleNamespace(dataset="a", data_dir=str(out)))
    assert f"note: {src} has changed since {out} was prepared" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--name=x"], "is not UTF-8: byte 5 (0xff)"),
    (["--name=shakespeare_char"], "is a built-in dataset"),
    (["--name=../x"], "--name='../x'"),
    (["--name=x", "--val_fraction=1"], "--val_fraction=1.0 must be between 0 and 1"),
])
def test_own_text_bad_input_is_one_line(tmp_path, monkeypatch, args, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\xff world")
    good = tmp_path / "good.txt"
    good.write_text("hello world\n" * 50)
    src = bad if "UTF-8" in message else good
    msg = fails(lambda: text_prepare([f"--input={good}", f"--input={src}", f"--out_dir={tmp_path / 'o'}"] + args,
                                     monkeypatch), message)
    assert str(bad) in msg or "UTF-8" not in message


def test_a_utf16_file_is_named_as_one(tmp_path):
    """A UTF-16 file (Windows' "Unicode") got the hint iconv -f latin1, which turns it into text of NUL bytes."""
    (tmp_path / "u16.txt").write_bytes("h\u00e9llo world\n".encode("utf-16"))
    fails(lambda: corpus.read_utf8(str(tmp_path / "u16.txt"), "--input"), "is not UTF-8", "iconv -f utf-16 -t utf-8")
    (tmp_path / "latin1.txt").write_bytes("h\u00e9llo world\n".encode("latin-1"))
    fails(lambda: corpus.read_utf8(str(tmp_path / "latin1.txt"), "--input"), "iconv -f latin1 -t utf-8")


def test_word_vocabulary_keeps_words_seen_min_count_times():
    """--min_count=N keeps a word seen N times (not only more often); punctuation is one token per character."""
    assert corpus.WordTokenizer.split("Hi!! ok...") == ["Hi", "!", "!", "ok", ".", ".", "."]
    tok = corpus.WordTokenizer.build(["x x y y y z ..."], 2)
    assert tok.words == list(corpus.WordTokenizer.SPECIALS) + [".", "y", "x"]  # most frequent first, ties by word
    assert tok.encode("x z .") == [tok.stoi["x"], tok.UNK, tok.stoi["."]]


def test_own_text_word_vocabulary_is_trains_and_the_cut_is_at_the_first_space(tmp_path, monkeypatch):
    """The word vocabulary comes from the train part only (a word seen only in val is <unk>); a cut that falls
    on white space stays there rather than moving a word on."""
    src = tmp_path / "a.txt"
    src.write_text("ab cd" + " ab cd" * 9 + " zz" * 6)
    text = src.read_text()
    n = int(0.5 * len(text))
    assert text[n] == " " and "zz" not in text[:n]
    text_prepare([f"--input={src}", "--name=a", f"--out_dir={tmp_path / 'c'}", "--val_fraction=0.5"], monkeypatch)
    meta = json.load(open(tmp_path / "c" / "meta.json"))
    assert meta["train_tokens"] == n  # char level: one token a character, the cut exactly at the space
    text_prepare([f"--input={src}", "--name=a", f"--out_dir={tmp_path / 'w'}", "--val_fraction=0.5",
                  "--tokenizer=word"], monkeypatch)
    meta = json.load(open(tmp_path / "w" / "meta.json"))
    assert "zz" not in meta["words"] and set(meta["words"]) == set(corpus.WordTokenizer.SPECIALS) | {"ab", "cd"}
    val = np.fromfile(tmp_path / "w" / "val.bin", dtype=meta["dtype"]).tolist()
    assert val.count(corpus.WordTokenizer.UNK) == 6


def test_own_text_gpt2_puts_end_of_text_between_files(tmp_path, monkeypatch):
    """--tokenizer=gpt2: an end-of-text id between the files' parts in each split, none before the first."""
    monkeypatch.setenv("DIFFLM_DATA", shared_data())
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta gamma delta " * 10)
    b.write_text("one two three four " * 10)
    text_prepare([f"--input={a}", f"--input={b}", "--name=g", f"--out_dir={tmp_path / 'g'}", "--tokenizer=gpt2",
                  "--val_fraction=0.5"], monkeypatch)
    meta = json.load(open(tmp_path / "g" / "meta.json"))
    tok = corpus.GPT2Tokenizer()
    assert meta["eot"] == tok.enc.eot_token == 50256
    ta, tb = a.read_text(), b.read_text()
    ca, cb = ta.index(" ", len(ta) // 2), tb.index(" ", len(tb) // 2)
    for split, (pa, pb) in (("train", (ta[:ca], tb[:cb])), ("val", (ta[ca:], tb[cb:]))):
        ids = np.fromfile(tmp_path / "g" / f"{split}.bin", dtype=meta["dtype"]).tolist()
        assert ids == tok.encode(pa) + [50256] + tok.encode(pb), split


@pytest.mark.parametrize("script", ["data/text/prepare.py", "data/e2e/prepare.py", "data/shakespeare_word/prepare.py"])
def test_min_count_below_one_is_refused(tmp_path, script):
    extra = ["--input=x.txt", "--name=x"] if script == "data/text/prepare.py" else []
    r = run_cli([script, f"--out_dir={tmp_path / 'o'}", "--min_count=0"] + extra, check=False)
    assert r.returncode == 1 and "--min_count must be at least 1" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o" / "meta.json")


@pytest.mark.parametrize("script", ["data/text/prepare.py", "data/e2e/prepare.py", "data/shakespeare_word/prepare.py"])
def test_a_min_count_that_keeps_no_word_is_refused(tmp_path, script):
    """Every token would be <unk>; the refusal names how often the commonest word is seen, so the user can lower it."""
    src = tmp_path / "in.txt"
    src.write_text("a b a c a d a e\n" * 20)
    (tmp_path / "e2e").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "e2e" / f"src1_{split}.txt").write_text("name : A | food : French||A serves French food .\n" * 3)
    extra = {"data/text/prepare.py": [f"--input={src}", "--name=x", "--tokenizer=word"],
             "data/e2e/prepare.py": [f"--input_dir={tmp_path / 'e2e'}"],
             "data/shakespeare_word/prepare.py": [f"--input={src}"]}[script]
    r = run_cli([script, f"--out_dir={tmp_path / 'o'}", "--min_count=100000"] + extra, check=False)
    assert r.returncode == 1 and "--min_count=100000 keeps no word (the commonest is seen" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o")
    if script == "data/text/prepare.py":  # a kept vocabulary says what its --min_count turned into <unk>
        r = run_cli([script, f"--out_dir={tmp_path / 'o'}", "--min_count=50"] + extra)
        share = [np.mean(np.fromfile(tmp_path / "o" / f"{s}.bin", dtype=np.uint16) == corpus.WordTokenizer.UNK)
                 for s in ("train", "val")]
        assert 0.4 < share[0] < 0.6 and f"word vocabulary of 5 (<unk> is {share[0]:.1%} of train, {share[1]:.1%} of val)" \
            in r.stdout, r.stdout


@pytest.mark.parametrize("tokenizer", ["char", "word"])
def test_own_text_with_windows_or_old_mac_line_ends_prepares_as_with_newlines(tokenizer, tmp_path, monkeypatch):
    """A file saved with \\r\\n line ends gave characters a "\\r" token before every newline, which a sample printed
    without its \\n sends the terminal's cursor back over the line; its line ends are now \\n, as Python's text
    mode reads them, and the prepared tokens are those of the same text with \\n line ends."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
    prepared = {}
    for name, ends in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        (tmp_path / f"{name}.txt").write_bytes(text.replace("\n", ends).encode())
        text_prepare([f"--input={tmp_path / f'{name}.txt'}", f"--name={name}", f"--out_dir={tmp_path / name}",
                      f"--tokenizer={tokenizer}", "--min_count=1"], monkeypatch)
        meta = json.load(open(tmp_path / name / "meta.json"))
        prepared[name] = [meta.get("chars"), meta.get("words")] + [(tmp_path / name / f).read_bytes() for f in ("train.bin", "val.bin")]
    assert prepared["crlf"] == prepared["lf"] == prepared["cr"]
    assert tokenizer == "word" or "\r" not in prepared["crlf"][0]


def test_own_text_of_white_space_only_is_refused(tmp_path, monkeypatch):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n\n")
    fails(lambda: text_prepare([f"--input={blank}", "--name=b", f"--out_dir={tmp_path / 'b'}"], monkeypatch),
          f"{blank} holds no text")


@pytest.mark.parametrize("line, says", [("name : The Eagle serves French food .", "a line without '||'"),
                                         ("name : The Eagle | food=French||It serves French food .",
                                          "MR field 'food=French' is not `key : value`")])
def test_an_e2e_file_in_another_format_is_one_line_naming_its_line(line, says, tmp_path):
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    good = "name : The Eagle | food : French||The Eagle serves French food .\n"
    for split in ("train", "valid", "test"):
        (e2e / f"src1_{split}.txt").write_text(good * 3 + (line + "\n" if split == "valid" else ""), encoding="utf-8")
    r = run_cli(["data/e2e/prepare.py", f"--input_dir={e2e}", f"--out_dir={tmp_path / 'e'}"], check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: src1_valid.txt line 4: {says}" + (
        f" ({line[:60]!r}); expected Diffusion-LM's `MR||text` format" if "||" not in line else "")], r.stderr
    assert not (tmp_path / "e" / "meta.json").exists()


def test_e2e_lines_break_at_newlines_only(tmp_path):
    """A text holding U+2028 (or a form feed) was split there, as str.splitlines splits, and the prepare stopped
    with "a line without '||'" and a line number past the file's end; Diffusion-LM reads these files by line."""
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    line = "name : The Eagle | food : French||The Eagle serves French\u2028food \x0c.\r\n"
    for split in ("train", "valid", "test"):
        (e2e / f"src1_{split}.txt").write_text(line * 3, encoding="utf-8", newline="")
    run_cli(["data/e2e/prepare.py", f"--input_dir={e2e}", f"--out_dir={tmp_path / 'e'}", "--min_count=1"])
    rows = corpus.load_jsonl(cfg_for(tmp_path / "e"), "train", json.load(open(tmp_path / "e" / "meta.json")))
    assert len(rows) == 3 and rows[0]["ref"] == "The Eagle serves French food ."


def test_e2e_splits_go_to_their_own_files(tmp_path):
    """train/valid/test examples into train.bin/val.bin/test.bin (each <s> text </s>) and the jsonl files, a line of
    white space skipped as a blank one."""
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    lines = {"train": "name : A | food : French||A serves French food .\n" * 3,
             "valid": "name : B | food : Thai||B serves Thai food .\n   \nname : B | food : Thai||B is Thai .\n",
             "test": "name : C | food : Greek||C serves Greek food .\n"}
    for split, text in lines.items():
        (e2e / f"src1_{split}.txt").write_text(text)
    out = tmp_path / "e"
    run_cli(["data/e2e/prepare.py", f"--input_dir={e2e}", f"--out_dir={out}", "--min_count=1"])
    meta = json.load(open(out / "meta.json"))
    assert meta["examples"] == {"train": 3, "valid": 2, "test": 1}
    tok = corpus.WordTokenizer(meta["words"])

    def read(name):
        return tok.decode(np.fromfile(out / name, dtype=meta["dtype"]).tolist())
    assert read("train.bin") == "<s> A serves French food . </s> " * 2 + "<s> A serves French food . </s>"
    assert read("val.bin") == "<s> <unk> serves <unk> food . </s> <s> <unk> <unk> <unk> . </s>"
    assert read("test.bin") == "<s> <unk> serves <unk> food . </s>"
    rows = corpus.load_jsonl(cfg_for(out), "valid", meta)
    assert [r["ref"] for r in rows] == ["B serves Thai food .", "B is Thai ."] and rows[0]["mr"] == {"name": "B", "food": "Thai"}


def test_every_reader_of_a_text_file_refuses_bytes_that_are_not_utf8(tmp_path):
    """The file and the byte in one line, where three readers raised a UnicodeDecodeError; an E2E input that is
    refused leaves the folder prepared before as it was (it was unmarked before the input was read whole)."""
    bad = b"hello \xe9 world\n" * 3
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    line = "name : The Eagle | food : French||The Eagle serves French food .\n"
    for split in ("train", "valid", "test"):
        (e2e / f"src1_{split}.txt").write_text(line * 3)
    prepared = tmp_path / "e"
    run_cli(["data/e2e/prepare.py", f"--input_dir={e2e}", f"--out_dir={prepared}", "--min_count=1"])
    (tmp_path / "bad.txt").write_bytes(bad)
    (e2e / "src1_test.txt").write_bytes(bad)
    for args in (["data/shakespeare_char/prepare.py", f"--input={tmp_path / 'bad.txt'}", f"--out_dir={tmp_path / 'c'}"],
                 ["data/e2e/prepare.py", f"--input_dir={e2e}", f"--out_dir={prepared}"]):
        r = run_cli(args, check=False)
        assert r.returncode == 1 and "is not UTF-8: byte 6 (0xe9)" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (e2e / "src1_test.txt").write_text("")
    r = run_cli(["data/e2e/prepare.py", f"--input_dir={e2e}", f"--out_dir={prepared}"], check=False)
    assert r.returncode == 1 and "src1_test.txt holds no text" in r.stderr, r.stderr
    assert (prepared / "meta.json").is_file() and len(open(prepared / "test.jsonl").readlines()) == 3
    for name in ("bad.txt", "bad.jsonl"):
        (tmp_path / name).write_bytes(bad)
        fails(lambda: corpus.read_eval_file(str(tmp_path / name), "ptb"), "is not UTF-8: byte 6 (0xe9)")


def test_a_folder_of_your_own_files_is_never_filled_with_a_built_in_corpus(tmp_path):
    """--data_dir at a folder of one's own text (no meta.json): tiny Shakespeare was prepared among its files
    and trained on, and E2E's files replaced your own train.jsonl and test.jsonl; what a killed prepare leaves
    (token files beside its lock, .tmp) is still prepared over."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "novel.txt").write_text("my own words\n")
    cfg = types.SimpleNamespace(dataset="shakespeare_char", data_dir=str(mine))
    fails(lambda: corpus.prepare_data(cfg), "holds novel.txt but no prepared data",
          f"data/text/prepare.py --input=FILE --name=NAME --out_dir={mine}")
    assert sorted(os.listdir(mine)) == ["novel.txt"]
    (mine / "novel.txt").unlink()  # your own token files and examples (E2E's names: they were replaced by E2E's)
    for name in ("train.jsonl", "test.jsonl", "train.bin"):
        (mine / name).write_text("mine\n")
    fails(lambda: corpus.prepare_data(types.SimpleNamespace(dataset="e2e", data_dir=str(mine))), "holds test.jsonl but no")
    assert sorted(os.listdir(mine)) == ["test.jsonl", "train.bin", "train.jsonl"]
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("train.bin", "val.bin.123.tmp", "prepare.lock"):
        (killed / name).write_bytes(b"")
    meta = corpus.prepare_data(types.SimpleNamespace(dataset="shakespeare_char", data_dir=str(killed)))
    assert meta["vocab_size"] == 65


def test_an_unprepared_folder_of_your_own_names_the_command_that_replaces_it(tmp_path, monkeypatch):
    """A prepare killed before its meta.json leaves the folder: the suggested command needs --force to replace it."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.bin").write_bytes(b"")
    cfg = types.SimpleNamespace(dataset="mine", data_dir=str(tmp_path / "mine"))
    fails(lambda: corpus.prepare_data(cfg), "unknown dataset", f"--name=mine --out_dir={cfg.data_dir} --force")
    fails(lambda: text_prepare([f"--input={tmp_path}", "--name=y", f"--out_dir={tmp_path / 'y'}"], monkeypatch), "is a folder")
    fails(lambda: text_prepare(["--input=x", "--name=y", "--inptu=x"], monkeypatch),  # not usage + error
          "prepare.py: unrecognized arguments: --inptu=x")
    # data/text is the preparer, not a dataset: the command it suggests runs (--name=text would be refused)
    fails(lambda: corpus.prepare_data(types.SimpleNamespace(dataset="text", data_dir="")), "--dataset=text names no dataset",
          "--name=NAME, then pass --dataset=NAME")


# ----------------------------------------------------------------------------------------------
# meta.json against the token files


TEN_CHARS = {"tokenizer": "char", "chars": list("abcdefghij"), "vocab_size": 10}  # meta.json of a ten-character set


def toy(path, vocab=10, n=2000, seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab, n)
    return corpus.write_split(str(path), ids[:n * 9 // 10], ids[n * 9 // 10:],
                              {"tokenizer": "char", "chars": [chr(97 + i) for i in range(vocab)], "vocab_size": vocab})


def test_prepared_data_loads_and_is_verified_once(tmp_path, monkeypatch):
    meta = toy(tmp_path)
    assert corpus.prepare_data(cfg_for(tmp_path)) == meta
    stamp = json.load(open(tmp_path / "verified.json"))
    assert stamp["train.bin"][2] == meta["files"]["train.bin"]["sha256"]
    monkeypatch.setattr(np, "frombuffer", None)  # the stamp matches, so nothing is scanned again
    assert corpus.prepare_data(cfg_for(tmp_path)) == meta


def corrupt_bad_json(p):
    (p / "meta.json").write_text('{"vocab_size": 10, ')


def corrupt_old_meta(p):
    meta = json.load(open(p / "meta.json"))
    del meta["files"]
    (p / "meta.json").write_text(json.dumps(meta))


def corrupt_empty(p):
    open(p / "train.bin", "wb").close()


def corrupt_odd_size(p):
    with open(p / "val.bin", "ab") as f:
        f.write(b"\0")


def corrupt_truncated(p):
    data = (p / "train.bin").read_bytes()
    (p / "train.bin").write_bytes(data[:len(data) - 200])


def corrupt_flipped(p):
    data = bytearray((p / "train.bin").read_bytes())
    data[100] ^= 1
    (p / "train.bin").write_bytes(bytes(data))


def corrupt_reprepare_killed(p):
    """A re-prepare (here of other text of the same length) that replaced train.bin and was killed
    before it replaced meta.json: the new train.bin under the old meta.json."""
    old = (p / "meta.json").read_bytes()
    toy(p, seed=1)
    (p / "meta.json").write_bytes(old)


def corrupt_bad_dtype(p):
    """meta.json naming a dtype no prepare writes: the same bytes read as int16 would pass every other check."""
    meta = json.load(open(p / "meta.json"))
    (p / "meta.json").write_text(json.dumps({**meta, "dtype": "int16"}))


def corrupt_no_test_tokens(p):
    """meta.json listing test.bin without its token count (a KeyError traceback when the files were checked)."""
    meta = json.load(open(p / "meta.json"))
    (p / "meta.json").write_text(json.dumps({**meta, "files": {**meta["files"], "test.bin": meta["files"]["val.bin"]}}))


def corrupt_token_count(p):
    """A token count in meta.json that disagrees with the size and sha256 it records for the file."""
    meta = json.load(open(p / "meta.json"))
    (p / "meta.json").write_text(json.dumps({**meta, "val_tokens": meta["val_tokens"] + 1}))


@pytest.mark.parametrize("corrupt, message", [
    (corrupt_bad_json, "is not valid JSON"),
    (corrupt_old_meta, "lacks files"),
    (corrupt_empty, "has 0 bytes"),
    (corrupt_odd_size, "val.bin has 401 bytes"),
    (corrupt_truncated, "train.bin has 3,400 bytes but meta.json says 1,800 uint16 tokens"),
    (corrupt_flipped, "does not match the sha256"),
    (corrupt_reprepare_killed, "does not match the sha256"),
    (corrupt_bad_dtype, "lacks a valid dtype or files entry"),
    (corrupt_token_count, "val.bin has 400 bytes but meta.json says 201 uint16 tokens"),
    (corrupt_no_test_tokens, "lacks test_tokens"),
])
def test_each_corruption_is_one_line_naming_the_fix(tmp_path, corrupt, message):
    toy(tmp_path)
    corpus.prepare_data(cfg_for(tmp_path))  # verified once, so a later corruption meets the stamp
    corrupt(tmp_path)
    msg = fails(lambda: corpus.prepare_data(cfg_for(tmp_path)), message, "re-prepare: python ")
    assert f"--out_dir={tmp_path}" in msg


def test_a_folder_a_model_cannot_decode_is_refused_before_it_trains(tmp_path, monkeypatch):
    """A meta.json of your own with no tokenizer, an unknown one, or fewer symbols than vocab_size trained, and
    --sample then failed ('NoneType' has no attribute 'decode'; unknown tokenizer); a prepare.py of your own that
    wrote no meta.json (nanoGPT's write meta.pkl) gave a FileNotFoundError traceback."""
    meta = toy(tmp_path / "d")
    for bad, message in (({k: v for k, v in meta.items() if k != "tokenizer"}, "gives tokenizer None"),
                         ({**meta, "tokenizer": "spm"}, "gives tokenizer 'spm'"),
                         ({**meta, "chars": meta["chars"][:3]}, "gives vocab_size 10 for 3 char tokens")):
        (tmp_path / "d" / "meta.json").write_text(json.dumps(bad))
        fails(lambda: corpus.prepare_data(cfg_for(tmp_path / "d")), message, "corpus.write_split")
    (tmp_path / "data" / "ngpt").mkdir(parents=True)
    (tmp_path / "data" / "ngpt" / "prepare.py").write_text("print('wrote train.bin, val.bin and meta.pkl')\n")
    monkeypatch.setattr(corpus, "ROOT", str(tmp_path))
    fails(lambda: corpus.prepare_data(types.SimpleNamespace(dataset="ngpt", data_dir="")),
          f"{tmp_path / 'data' / 'ngpt'} has no meta.json after its prepare.py ran", "corpus.write_split")


@pytest.mark.parametrize("top", [11, 10])  # 10: an id equal to the vocabulary's size is outside it too
def test_ids_outside_the_vocabulary(tmp_path, top):
    ids = np.arange(300) % (top + 1)
    corpus.write_split(str(tmp_path), ids, ids, TEN_CHARS)
    fails(lambda: corpus.prepare_data(cfg_for(tmp_path)), f"holds token id {top}, not below the vocabulary of 10")


def test_an_id_outside_the_vocabulary_is_found_in_any_chunk(tmp_path, monkeypatch):
    """The scan reads a token file in chunks (memory stays bounded): an id past the vocabulary in an early chunk
    counts as much as one in the last."""
    monkeypatch.setattr(corpus, "CHECK_CHUNK", 64)
    ids = np.arange(1000) % 10
    ids[5] = 12
    corpus.write_split(str(tmp_path), ids, ids[::-1], TEN_CHARS)
    fails(lambda: corpus.prepare_data(cfg_for(tmp_path)), "train.bin holds token id 12, not below the vocabulary of 10")


def test_a_split_left_empty_is_refused(tmp_path):
    """Too little text for a split (a tiny file, a --val_fraction that rounds to nothing) stops with one line
    naming the split, before any file is written: an empty val.bin failed later, at every evaluation."""
    ids = np.arange(300) % 10
    fails(lambda: corpus.write_split(str(tmp_path), ids, ids[:0], TEN_CHARS), f"the val split of {tmp_path} would be empty")
    fails(lambda: corpus.write_split(str(tmp_path), [], ids, TEN_CHARS), "the train split")
    fails(lambda: corpus.write_split(str(tmp_path), ids, ids, TEN_CHARS, test_ids=[]), "the test split")
    fails(lambda: corpus.write_split(str(tmp_path / "new"), ids, [], TEN_CHARS), "the val split")
    assert os.listdir(tmp_path) == []  # no file, and no folder made for a prepare that was refused


def test_an_error_names_the_command_that_prepared_the_folder(tmp_path):
    """A damaged folder prepared from your own text is re-prepared by the command meta.json recorded (its --input
    files); one without a recorded command gets data/text/prepare.py with --force, as the folder exists."""
    command = f"python {ROOT}/data/text/prepare.py --input=/home/me/novel.txt --name=mine --out_dir={tmp_path} --force"
    ids = np.arange(300) % 10
    cfg = types.SimpleNamespace(dataset="mine", data_dir=str(tmp_path))
    for meta, fix in (({**TEN_CHARS, "command": command}, command),
                      (TEN_CHARS, f"python data/text/prepare.py --input=FILE --name=mine --out_dir={tmp_path} --force")):
        corpus.write_split(str(tmp_path), ids, ids, meta)
        corrupt_odd_size(tmp_path)
        assert fails(lambda: corpus.prepare_data(cfg), "val.bin has 601 bytes").endswith(f"re-prepare: {fix}")
    moved = tmp_path.parent / "moved"  # a copied folder: its command prepares the copy, not the original
    shutil.copytree(tmp_path, moved)
    cfg.data_dir = str(moved)
    corpus.write_split(str(moved), ids, ids, {**TEN_CHARS, "command": command})
    corrupt_odd_size(moved)
    assert fails(lambda: corpus.prepare_data(cfg), "val.bin").endswith(f"re-prepare: {command.replace(str(tmp_path), str(moved))}")


def test_a_prepare_that_fails_is_the_last_line_it_printed(tmp_path, monkeypatch):
    """prepare_data runs data/<dataset>/prepare.py: its failure is that script's last line (the one-line error, or
    a traceback's exception), not a warning printed before it."""
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="note: a warning first\nerror: the reason\n")
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: failed)
    cfg = types.SimpleNamespace(dataset="shakespeare_char", data_dir=str(tmp_path / "new"))
    with pytest.raises(SystemExit) as e:
        corpus.prepare_data(cfg)
    assert e.value.code == "error: the reason" and not os.path.exists(tmp_path / "new" / "meta.json")


def test_a_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    """Ids past 65535 do not fit uint16 (they would wrap around in silence)."""
    vocab = 70_000
    ids = np.arange(0, 2 * vocab, 7) % vocab
    words = list(corpus.WordTokenizer.SPECIALS) + [f"w{i}" for i in range(vocab - 4)]
    meta = corpus.write_split(str(tmp_path), ids, ids[::-1], {"tokenizer": "word", "words": words, "vocab_size": vocab})
    assert meta["dtype"] == "uint32" and meta["files"]["train.bin"]["bytes"] == 4 * len(ids)
    assert corpus.prepare_data(cfg_for(tmp_path)) == meta
    assert np.array_equal(np.fromfile(tmp_path / "train.bin", dtype=np.uint32), ids)
    x = next(iter(corpus.Batches(cfg_for(tmp_path, block_size=32), meta, 0).sequential("val", 4)))
    assert x.max().item() == ids.max() and x[0].tolist() == ids[::-1][:32].tolist()


def test_corruption_through_the_command_line(tmp_path):
    toy(tmp_path, n=4000)
    corrupt_truncated(tmp_path)
    r = run_cli(["mdlm.py", "--train", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}"] + TINY, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "re-prepare" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


def test_killed_prepare_leaves_the_folder_unprepared(tmp_path, monkeypatch):
    toy(tmp_path)
    real = os.replace

    def killed(src, dst):  # dies at the second rename (after train.bin, before val.bin and meta.json)
        if dst.endswith("val.bin"):
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        toy(tmp_path, seed=1)
    assert not os.path.exists(tmp_path / "meta.json")


def test_model_and_data_tokenizers_must_agree(tmp_path):
    meta = toy(tmp_path)
    cfg = cfg_for(tmp_path, block_size=8)
    corpus.Batches(cfg, meta, 0)
    words = {**meta, "tokenizer": "word", "words": ["<s>"] * 853, "vocab_size": 853}
    fails(lambda: corpus.Batches(cfg, words, 0), "has a char tokenizer with 10 tokens",
          "model was trained on a word tokenizer with 853 tokens")
    other = {**meta, "chars": list("zyxwvutsrq")}
    fails(lambda: corpus.Batches(cfg, other, 0), "the same size, other symbols")


def test_sequential_windows_cover_the_split(tmp_path):
    """--eval skipped the last full window of a split whose length is a multiple of block_size."""
    meta = toy(tmp_path, n=2000)  # val: 200 tokens = 25 windows of 8
    windows = torch.cat(list(corpus.Batches(cfg_for(tmp_path, block_size=8), meta, 0).sequential("val", 7)))  # (25, 8)
    val = np.fromfile(tmp_path / "val.bin", dtype=meta["dtype"])
    assert windows.flatten().tolist() == val.tolist()


def test_a_short_test_split_an_unknown_tokenizer_and_missing_files_are_one_line(tmp_path):
    """What the checks at a folder's load cannot see: a test split (read by --eval_split=test alone) shorter
    than a window, a meta.json naming a tokenizer difflm lacks, E2E rows or an --eval_file that are not there."""
    ids = np.random.default_rng(0).integers(0, 10, 2000)
    meta = corpus.write_split(str(tmp_path), ids[:1800], ids[1800:1900], TEN_CHARS, test_ids=ids[1900:1905])
    batches = corpus.Batches(cfg_for(tmp_path, block_size=8), meta, 0)
    assert len(batches.sequential("val", 4)) == 3  # 12 windows of 8, 4 a batch
    fails(lambda: batches.sequential("test", 4), "the test split has 5 tokens, fewer than block_size=8")
    fails(lambda: corpus.get_tokenizer({**meta, "tokenizer": "bytes"}), "unknown tokenizer 'bytes' in meta.json")
    fails(lambda: corpus.load_jsonl(cfg_for(tmp_path), "train", meta), f"missing {tmp_path / 'train.jsonl'}; re-prepare the folder: python")
    fails(lambda: corpus.read_eval_file(str(tmp_path), "wikitext2"), f"--eval_file={tmp_path} is a folder; name a file")
    fails(lambda: corpus.read_eval_file(str(tmp_path / "no.jsonl"), "wikitext2"), "no.jsonl does not exist")


def test_an_eval_pass_says_how_long_it_is(tmp_path, monkeypatch, capsys):
    """A batch job's log read "eval: 335 after 60 s": a full pass over a split had no length, so its line a
    minute said neither the total nor how far it had come. Each kind of --eval data (a split's windows, a
    zero-shot set's blocks, Diffusion-LM's rows) holds its number of batches, which the line gives; with
    Diffusion-LM's --eval_batches it gave the split's total, not the batches scored."""
    meta = toy(tmp_path, n=2000)  # val: 200 tokens = 25 windows of 8
    cfg = cfg_for(tmp_path, block_size=8, batch_size=7)
    rows = types.SimpleNamespace(rows={"val": torch.zeros(25, 8, dtype=torch.long)})
    for data in (corpus.Batches(cfg, meta, 0), corpus.Blocks(torch.zeros(25, 8, dtype=torch.long)), rows):
        passes = data.sequential("val", 7) if data is not rows else diffusion_lm.Rows.sequential(rows, "val", 7)
        assert len(passes) == 4 and [len(x) for x in passes] == [7, 7, 7, 4]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    clock = itertools.count(0, 61)  # each read of the clock a minute later: a line at every batch
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    assert len(list(corpus.val_batches(corpus.Batches(cfg, meta, 0), cfg, full=True))) == 4
    assert capsys.readouterr().err.splitlines()[-1].startswith("eval: 4 of 4 after ")
    for limit, n in ((2, 2), (9, 4)):  # Diffusion-LM's --eval_batches: the line counts the batches scored
        assert len(list(corpus.val_batches(corpus.Batches(cfg, meta, 0), cfg, full=True, limit=limit))) == n
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"eval: {n} of {n} after ")


def test_random_windows_reach_the_last_token_and_a_split_of_one_block_is_enough(tmp_path):
    """A window is block_size tokens (no shifted target), so its start runs to len - block_size inclusive:
    the last token of a split was never drawn, and a split of exactly block_size tokens was refused."""
    ids = np.arange(20) % 10  # train 18 tokens, val 2
    meta = corpus.write_split(str(tmp_path), ids[:18], ids[18:], TEN_CHARS)
    batches = corpus.Batches(cfg_for(tmp_path, block_size=2), meta, 0)
    starts = {int(x[0]) for x in batches.get("train", 400)}
    assert starts == set(range(10)) and {int(x[0]) for x in batches.get("val", 50)} == {8}  # val: its one window
    fails(lambda: corpus.Batches(cfg_for(tmp_path, block_size=3), meta, 0), "the val split has 2 tokens, fewer than block_size=3",
          "lower --block_size or give the split more text")  # a split of a token or two is the text's fault, not the block's


def test_a_test_split_of_an_earlier_prepare_is_not_read(tmp_path):
    """A folder prepared again without a test split kept the old test.bin, and --eval_split=test scored it
    (another text, maybe another tokenizer's ids)."""
    ids = np.random.default_rng(0).integers(0, 10, 300)
    corpus.write_split(str(tmp_path), ids[:200], ids[200:250], TEN_CHARS, test_ids=ids[250:])
    assert os.path.isfile(tmp_path / "test.bin")
    meta = corpus.write_split(str(tmp_path), ids[:200], ids[200:], TEN_CHARS)
    assert not os.path.exists(tmp_path / "test.bin") and corpus.prepare_data(cfg_for(tmp_path)) == meta
    np.arange(60, dtype=meta["dtype"]).tofile(tmp_path / "test.bin")  # a stray file of that name: still not a split
    batches = corpus.Batches(cfg_for(tmp_path, block_size=8), meta, 0)
    fails(lambda: batches.sequential("test", 4), "has no test split (test.bin); use --eval_split=val")


def test_examples_of_an_earlier_prepare_are_not_read(tmp_path):
    """A word corpus prepared into a folder that held E2E kept E2E's <split>.jsonl, and diffusion_lm.py and
    diffuser.py read those examples, ids of the old vocabulary, as the new corpus's rows (an IndexError, or
    silently wrong ids under a larger vocabulary). A prepare writes its examples with its token files, and
    removes those it does not write; the methods read rows only from a folder whose meta.json says seq2seq."""
    ids = np.random.default_rng(0).integers(0, 10, 300)
    words = {"tokenizer": "word", "words": ["<s>", "</s>", "<pad>", "<unk>"] + list("abcdef"), "vocab_size": 10}
    texts = {f"{s}.jsonl": ['{"src": [4], "text": [5, 6]}\n'] for s in ("train", "valid", "test")}
    corpus.write_split(str(tmp_path), ids[:200], ids[200:250], {**words, "seq2seq": True}, test_ids=ids[250:], texts=texts)
    assert corpus.load_jsonl(cfg_for(tmp_path), "valid", words) == [{"src": [4], "text": [5, 6]}]
    meta = corpus.write_split(str(tmp_path), ids[:200], ids[200:], words)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train.bin", "val.bin", "write.lock"]
    cfg = diffusion_lm.Config(data_dir=str(tmp_path), block_size=8)
    assert isinstance(diffusion_lm.make_batches(dataclasses.replace(cfg, rows=False), meta), corpus.Batches)
    (tmp_path / "train.jsonl").write_text('{"src": [4], "text": [55]}\n')  # a stray file of that name: still not rows
    fails(lambda: diffusion_lm.make_batches(cfg, meta), "has no train.jsonl (one text per row)")
    assert not diffuser.EditBatches(diffuser.Config(data_dir=str(tmp_path), bootstrap="null", seq_len=4), meta, 0).seq2seq


def test_a_prepare_that_cannot_write_stops_with_one_line_and_leaves_the_folder_as_it_was(tmp_path):
    """--out_dir naming a file, and a full disk while the token files are written, were tracebacks; the second
    left a partial .tmp file beside the earlier prepare's files."""
    ids = np.arange(300) % 10
    (tmp_path / "a_file").write_text("")
    fails(lambda: corpus.write_split(str(tmp_path / "a_file"), ids[:200], ids[200:], TEN_CHARS),
          f"--out_dir={tmp_path / 'a_file'} is a file; name a folder")
    meta = corpus.write_split(str(tmp_path / "d"), ids[:200], ids[200:], TEN_CHARS)
    before = {f: (tmp_path / "d" / f).read_bytes() for f in os.listdir(tmp_path / "d")}

    code = ("import resource, sys, numpy as np; import corpus; resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
            f"corpus.write_split({str(tmp_path / 'd')!r}, np.arange(3000) % 10, np.arange(300) % 10, {TEN_CHARS!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)  # files past 1000 bytes fail
    assert r.returncode == 1 and r.stderr.strip() == (f"error: cannot write {tmp_path / 'd'}: File too large; free disk space "
                                                       "or choose another --out_dir"), r.stderr
    assert {f: (tmp_path / "d" / f).read_bytes() for f in os.listdir(tmp_path / "d")} == before
    assert corpus.prepare_data(cfg_for(tmp_path / "d")) == meta


def test_slices_are_bounded(tmp_path):
    meta = toy(tmp_path, n=100_000)
    b = corpus.Batches(cfg_for(tmp_path, block_size=8), meta, 0)
    whole = b.slices("train", 1 << 20)
    assert len(whole) == 1 and len(whole[0]) == 90_000
    parts = b.slices("train", 6400, pieces=64)
    assert len(parts) == 64 and sum(map(len, parts)) == 6400
    train = np.fromfile(tmp_path / "train.bin", dtype=meta["dtype"])
    assert parts[0] == train[:100].tolist() and parts[-1] == train[-100:].tolist()


# ----------------------------------------------------------------------------------------------
# Many processes preparing one folder (torchrun's ranks)


WORKER = """
import sys; sys.path.insert(0, sys.argv[1])
import corpus, mdlm
meta = corpus.prepare_data(mdlm.Config(dataset=sys.argv[2], data_dir=sys.argv[3]))
print("tokens", meta["train_tokens"])
"""


def test_processes_prepare_one_fresh_folder_at_once(tmp_path):
    data = tmp_path / "char"
    env = {**os.environ, **OFFLINE}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, ROOT, "shakespeare_char", str(data)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("tokens 1003854" in o for o, _ in outs)
    assert sum("preparing shakespeare_char" in o for o, _ in outs) == 1  # one prepared, the others waited
    assert sorted(os.listdir(data)) == ["meta.json", "prepare.lock", "train.bin", "val.bin", "verified.json", "write.lock"]


SLOW_PREPARE = """
import runpy, sys, time; sys.path.insert(0, sys.argv[1])
import corpus
import diffuser
import diffusion_lm
real, pause = corpus.mark_unprepared, float(sys.argv[2])
corpus.mark_unprepared = lambda out_dir: (time.sleep(pause), real(out_dir))
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_prepare_runs_into_one_folder_both_finish(tmp_path):
    """data/text/prepare.py twice at once on one folder, the first slowed between writing its temporary files
    and renaming them: the second deleted them (and the live meta.json), so the first crashed and the folder
    was left without meta.json. Now the second waits for the first's write."""
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question.\n" * 200)
    procs = []
    for pause in (3, 0):
        procs.append(subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, ROOT, str(pause), "data/text/prepare.py",
                                       f"--input={text}", "--name=race", f"--out_dir={tmp_path / 'race'}", "--force"],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(1)
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(f for f in os.listdir(tmp_path / "race") if not f.endswith(".lock")) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, method", [("shakespeare_char", "mdlm"), ("e2e", "diffusion_lm")])
def test_torchrun_on_a_fresh_data_folder(tmp_path, dataset, method):
    data, out = tmp_path / dataset, tmp_path / "out"
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        f"{method}.py", "--train", f"--dataset={dataset}", f"--data_dir={data}", f"--out_dir={out}",
                        "--max_iters=2", "--eval_interval=2"] + TINY, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert os.path.isfile(out / "ckpt.pt")


def test_the_rerun_command_a_folder_keeps_works_from_any_folder(tmp_path, monkeypatch):
    """meta.json kept the command line as typed: `--out_dir=owt` from another folder named the wrong folder
    when an error message quoted it later, from the repository's root."""
    monkeypatch.chdir(tmp_path)
    command = corpus.rerun_command(["data/e2e/prepare.py", "--input_dir", "in", "--out_dir=o", "--input=a,b/c", "--min_count=3"])
    assert command == (f"python {tmp_path}/data/e2e/prepare.py --input_dir {tmp_path}/in --out_dir={tmp_path}/o "
                       f"--input={tmp_path}/a,{tmp_path}/b/c --min_count=3")
