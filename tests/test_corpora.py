"""text8 and OpenWebText: the prepare scripts on synthetic files in each corpus's exact format.

text8: a slice of tiny Shakespeare lowercased to a-z and single spaces. OpenWebText: tiny
Shakespeare's paragraphs as documents, in jsonl and parquet with the openwebtext schema (a `text`
column). Each is prepared, checked token for token against the format, trained for a few
iterations with mdlm.py, sampled and evaluated. Interrupted runs are made with a real SIGKILL
midway through the script's own writing.
"""
import contextlib
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import common
import corpus
import mdlm
from conftest import OFFLINE, ROOT, run_cli, shared_data

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=3",
        "--eval_iters=1", "--eval_interval=3", "--log_interval=1", "--warmup_iters=1"]
EVAL = ["--eval_t_samples=1", "--num_samples=1", "--steps=2"]


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


text8 = load_script("data/text8/prepare.py", "text8_prepare")
owt = load_script("data/openwebtext/prepare.py", "owt_prepare")


def shakespeare():
    """tiny Shakespeare: the copy shipped in the repo when there is one, else the shared data folder."""
    shipped = os.path.join(ROOT, "data", "shakespeare_char", "input.txt.gz")
    if os.path.isfile(shipped):
        with gzip.open(shipped, "rt", encoding="utf-8") as f:
            return f.read()
    with open(os.path.join(shared_data(), "tinyshakespeare.txt"), encoding="utf-8") as f:
        return f.read()


def run_main(module, monkeypatch, args):
    """module.main() in this process with argv; returns the SystemExit message (None on success)."""
    monkeypatch.setattr(sys, "argv", ["prepare.py"] + args)
    try:
        module.main()
    except SystemExit as e:
        return e.code
    return None


def assert_one_line_error(msg, *words):
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def kill_midway(script, args, hook):
    """Run a prepare script in a subprocess that SIGKILLs itself where hook says; returns its returncode.

    hook is Python source run in the script's namespace `g` before main(); it may patch g or os.
    """
    code = (f"import os, runpy, signal, sys; sys.argv = ['prepare.py'] + {args!r}; "
            f"g = runpy.run_path({os.path.join(ROOT, script)!r}, run_name='prepare')['main'].__globals__; "
            "die = lambda: os.kill(os.getpid(), signal.SIGKILL)\n" + hook + "\ng['main']()")
    env = {**os.environ, "DIFFLM_DATA": shared_data()}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300).returncode  # (orphaned workers holding its pipes would hang it)


def folder_bytes(path):
    """Each prepared file's bytes; meta.json without its "command" (the command line that made it)."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f in ("prepare.lock", "verified.json"):  # the lock and the integrity scan's note, not data
            continue
        out[f] = open(os.path.join(path, f), "rb").read()
        if f == "meta.json":
            out[f] = {k: v for k, v in json.loads(out[f]).items() if k != "command"}
    return out


# ----------------------------------------------------------------------------------------------
# text8


SPLIT = (50_000, 5_000, 5_000)


@pytest.fixture(scope="module")
def text8_file(tmp_path_factory):
    """(path, text, sha256) of a 60,000-character text8-format file: a-z and single spaces, no newline."""
    text = re.sub(r"[^a-z]+", " ", shakespeare().lower())[:sum(SPLIT)]
    path = tmp_path_factory.mktemp("text8_raw") / "text8"
    path.write_bytes(text.encode())
    return str(path), text, hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def text8_data(text8_file, tmp_path_factory):
    path, _, sha = text8_file
    out = tmp_path_factory.mktemp("text8")
    run_cli(["data/text8/prepare.py", f"--input={path}", f"--out_dir={out}", f"--sha256={sha}",
             "--split=" + ",".join(map(str, SPLIT))])
    return str(out)


def test_text8_defaults_are_the_papers_split():
    assert text8.SPLIT == "90000000,5000000,5000000"
    assert text8.CHARS == " " + "abcdefghijklmnopqrstuvwxyz"
    assert text8.URL == "http://mattmahoney.net/dc/text8.zip"


def test_text8_splits_have_the_stated_sizes_and_exact_contents(text8_file, text8_data):
    _, text, sha = text8_file
    meta = json.load(open(os.path.join(text8_data, "meta.json")))
    assert meta["vocab_size"] == 27 and meta["tokenizer"] == "char" and meta["source_sha256"] == sha
    tok = corpus.get_tokenizer(meta)
    start = 0
    for split, n in zip(("train", "val", "test"), SPLIT):
        ids = np.fromfile(os.path.join(text8_data, f"{split}.bin"), dtype=meta["dtype"])
        assert len(ids) == n == meta[f"{split}_tokens"]
        assert tok.decode(ids.tolist()) == text[start:start + n]  # contiguous, in order, nothing lost
        start += n


def test_text8_zip_input_gives_the_same_files(text8_file, text8_data, tmp_path, monkeypatch):
    path, text, sha = text8_file
    with zipfile.ZipFile(tmp_path / "text8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("text8", text)
    out = tmp_path / "out"
    assert run_main(text8, monkeypatch, [f"--input={tmp_path / 'text8.zip'}", f"--out_dir={out}", f"--sha256={sha}",
                                         "--split=" + ",".join(map(str, SPLIT))]) is None
    assert folder_bytes(out) == folder_bytes(text8_data)


def test_text8_eval_split_test_reads_the_test_windows_as_the_papers_chunk_them(text8_data):
    """--eval reads consecutive non-overlapping block_size windows (remainder dropped) of --eval_split."""
    meta = json.load(open(os.path.join(text8_data, "meta.json")))
    test_ids = np.fromfile(os.path.join(text8_data, "test.bin"), dtype=meta["dtype"])
    for split, expected in (("test", test_ids), ("val", np.fromfile(os.path.join(text8_data, "val.bin"), dtype=meta["dtype"]))):
        cfg = mdlm.Config(dataset="text8", data_dir=text8_data, block_size=256, batch_size=7, eval_split=split)
        windows = torch.cat(list(corpus.val_batches(corpus.Batches(cfg, meta, 0), cfg, full=True)))
        n = (len(expected) - 1) // 256
        assert windows.shape == (n, 256)
        assert torch.equal(windows.flatten(), torch.from_numpy(expected[:n * 256].astype(np.int64)))


def test_text8_test_split_is_checked_like_the_others(text8_data, tmp_path):
    """meta.json records test.bin's size and sha256: a damaged or missing one is one line, not a traceback
    from an id out of range, nor "no test split"."""
    meta = json.load(open(os.path.join(text8_data, "meta.json")))
    assert set(meta["files"]) == {"train.bin", "val.bin", "test.bin"} and meta["test_tokens"] > 0
    for damage, msg in (("flip", "does not match the sha256"), ("remove", "test.bin is missing")):
        folder = tmp_path / damage
        shutil.copytree(text8_data, folder)
        if damage == "flip":
            ids = np.fromfile(folder / "test.bin", dtype=meta["dtype"])
            ids[5] = 60000
            ids.tofile(folder / "test.bin")
        else:
            os.remove(folder / "test.bin")
        with pytest.raises(SystemExit, match=msg):
            corpus.check_data(mdlm.Config(dataset="text8", data_dir=str(folder)), meta)


def test_text8_train_sample_eval_with_mdlm(text8_data, tmp_path):
    out = str(tmp_path / "mdlm")
    run_cli(["mdlm.py", "--train", "--dataset=text8", f"--data_dir={text8_data}", f"--out_dir={out}"] + TINY,
            env={"DIFFLM_KERNELS": "0"})
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--num_samples=2", "--steps=4"], env={"DIFFLM_KERNELS": "0"})
    samples = re.findall(r"=== sample \d\n(.*)", r.stdout)
    assert len(samples) == 2 and all(len(s) == 32 and set(s) <= set(text8.CHARS) for s in samples)
    bits = {}
    for split in ("val", "test"):
        r = run_cli(["mdlm.py", "--eval", f"--out_dir={out}", f"--eval_split={split}"] + EVAL, env={"DIFFLM_KERNELS": "0"})
        bits[split] = float(re.search(r"([\d.]+) bits/token", r.stdout).group(1))
        assert ("evaluating on the test split" in r.stdout) == (split == "test") and f"{split} NELBO" in r.stdout
        assert json.loads(open(os.path.join(out, "log.jsonl")).readlines()[-1])["eval_full"]["data"] == split
    assert all(0 < b < 2 * np.log2(27) for b in bits.values())
    assert bits["val"] != bits["test"]  # two different 5,000-character splits


def test_text8_killed_midway_leaves_no_meta_and_is_redone(text8_file, text8_data, tmp_path, monkeypatch, capsys):
    path, _, sha = text8_file
    out = tmp_path / "out"
    args = [f"--input={path}", f"--out_dir={out}", f"--sha256={sha}", "--split=" + ",".join(map(str, SPLIT))]
    # killed right after train.bin lands: test.bin and train.bin are there, val.bin and meta.json are not
    hook = ("real = os.replace\n"
            "def replace(a, b):\n"
            "    real(a, b)\n"
            "    if b.endswith('train.bin'): die()\n"
            "os.replace = replace")
    assert kill_midway("data/text8/prepare.py", args, hook) == -9
    assert os.path.isfile(out / "train.bin") and not os.path.exists(out / "meta.json")
    capsys.readouterr()
    assert run_main(text8, monkeypatch, args) is None
    assert "incomplete preparation" in capsys.readouterr().out
    assert folder_bytes(out) == folder_bytes(text8_data)


def test_text8_rerun_over_a_complete_folder_removes_its_meta_first(text8_file, tmp_path, monkeypatch):
    """A re-preparation killed midway must not leave the old meta.json beside new token files."""
    path, _, sha = text8_file
    out = tmp_path / "out"
    args = [f"--input={path}", f"--out_dir={out}", f"--sha256={sha}", "--split=" + ",".join(map(str, SPLIT))]
    assert run_main(text8, monkeypatch, args) is None
    hook = ("real = os.replace\n"
            "def replace(a, b):\n"
            "    real(a, b)\n"
            "    if b.endswith('test.bin'): die()\n"
            "os.replace = replace")
    assert kill_midway("data/text8/prepare.py", args, hook) == -9
    assert not os.path.exists(out / "meta.json")


def test_text8_bad_inputs_one_line(text8_file, tmp_path, monkeypatch):
    path, text, sha = text8_file
    split = "--split=" + ",".join(map(str, SPLIT))
    out = f"--out_dir={tmp_path / 'out'}"
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={tmp_path / 'nope'}", out]), "does not exist")
    # the standard checksum on a file that is not the standard text8
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={path}", out, split]), "sha256", sha, "--sha256=")
    bad = tmp_path / "bad"
    bad.write_bytes((text[:100] + "A" + text[101:]).encode())
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={bad}", out, split]), "offset 100", "'A'")
    bad.write_bytes((text[:-1] + "\n").encode())
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={bad}", out, split]), f"offset {len(text) - 1}")
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={path}", out, f"--sha256={sha}", "--split=10,10,10"]),
                          "adds up to 30", f"{len(text):,}")
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={path}", out, f"--sha256={sha}", "--split=1,2"]),
                          "three positive")
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={path}", out, f"--sha256={sha}", "--split=1e3,2,3"]),
                          "--split=1e3,2,3 must be three positive character counts")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("enwik8", text)
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={tmp_path / 'other.zip'}", out]), "without a member named text8")
    with zipfile.ZipFile(tmp_path / "text8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("text8", text)
    whole = (tmp_path / "text8.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[:len(whole) // 2])  # a download cut short
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={tmp_path / 'cut.zip'}", out]), "cut.zip is a damaged zip")
    assert_one_line_error(run_main(text8, monkeypatch, [f"--input={tmp_path}", out]), "is a folder")
    monkeypatch.setenv("DIFFLM_DATA", str(tmp_path))  # a local copy, not the standard one: named, not the URL
    assert_one_line_error(run_main(text8, monkeypatch, [out]), f"{tmp_path / 'text8.zip'} has sha256")
    for k, v in OFFLINE.items():  # no copy anywhere and no network: the fix names the whole command
        monkeypatch.setenv(k, v)
    assert_one_line_error(run_main(text8, monkeypatch, [out]), "no copy of text8",
                          "`python data/text8/prepare.py --input=path/to/text8.zip`")
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_text8_bad_input_exit_status_and_stderr(tmp_path):
    r = run_cli(["data/text8/prepare.py", f"--input={tmp_path / 'nope'}", f"--out_dir={tmp_path}"], check=False)
    assert r.returncode == 1 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_eval_split_test_on_a_dataset_without_one(char_data, tmp_path):
    meta = json.load(open(os.path.join(char_data, "meta.json")))
    cfg = mdlm.Config(data_dir=char_data, eval_split="test")
    with pytest.raises(SystemExit, match="no test split.*--eval_split=val"):
        next(iter(corpus.val_batches(corpus.Batches(cfg, meta, 0), cfg, full=True)))


# ----------------------------------------------------------------------------------------------
# OpenWebText


@pytest.fixture(scope="module")
def documents():
    """tiny Shakespeare's speeches as 400 documents (some with non-ASCII text, one empty)."""
    docs = [d for d in shakespeare().split("\n\n") if d.strip()][:397]
    return docs + ["café naïve — “quoted” ✓", "", "the last document\n"]


def test_damaged_gpt2_files_are_one_line(tmp_path, monkeypatch):
    """The offline GPT-2 BPE files cut short: one line naming the folder, not a JSONDecodeError traceback."""
    src = os.path.join(shared_data(), "gpt2")
    (tmp_path / "gpt2").mkdir()
    shutil.copy(os.path.join(src, "vocab.bpe"), tmp_path / "gpt2" / "vocab.bpe")
    (tmp_path / "gpt2" / "encoder.json").write_bytes(open(os.path.join(src, "encoder.json"), "rb").read()[:1000])
    monkeypatch.setenv("DIFFLM_DATA", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))  # tiktoken keeps what it read there
    with pytest.raises(SystemExit, match="GPT-2 BPE files in .* are damaged"):
        corpus.gpt2_encoding()
    shutil.copy(os.path.join(src, "encoder.json"), tmp_path / "gpt2" / "encoder.json")  # as the message advises
    assert corpus.gpt2_encoding().n_vocab == 50257  # the repaired file, not the damaged copy cached before


def expected_ids(docs):
    enc = corpus.gpt2_encoding()
    return np.array([i for d in docs for i in enc.encode_ordinary(d) + [enc.eot_token]], dtype=np.uint16)


def write_jsonl(path, docs, extra=None):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": "x", "text": d, **(extra or {})}) + "\n")
    return str(path)


def check_owt(out, docs, val_docs):
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert (meta["train_docs"], meta["val_docs"]) == (len(docs) - val_docs, val_docs)
    for split, part in (("train", docs[:-val_docs]), ("val", docs[-val_docs:])):
        ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16)
        assert len(ids) == meta[f"{split}_tokens"]
        assert np.array_equal(ids, expected_ids(part))  # every document, then <|endoftext|>, in order
        assert (ids == 50256).sum() == len(part)


@pytest.fixture(scope="module")
def owt_data(documents, tmp_path_factory):
    src = tmp_path_factory.mktemp("owt_src")
    write_jsonl(src / "a.jsonl", documents[:250])
    write_jsonl(src / "b.jsonl", documents[250:])
    out = tmp_path_factory.mktemp("owt")
    run_cli(["data/openwebtext/prepare.py", f"--input={src}", f"--out_dir={out}", "--val_docs=40", "--num_proc=2"])
    return str(out)


def test_owt_default_validation_split_is_mdlms():
    assert owt.VAL_DOCS == 100_000 and owt.EOT == 50256


def test_owt_jsonl_split_sizes_and_exact_tokens(owt_data, documents):
    check_owt(owt_data, documents, 40)


def test_owt_jsonl_blank_lines_are_no_documents(documents, tmp_path, monkeypatch):
    """A blank line (an editor's last newline, a gap between parts) is skipped, as in every other jsonl reader."""
    docs = documents[:20]
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs[:10]) + "\n\n  \n" +
                    "\n".join(json.dumps({"text": d}) for d in docs[10:]) + "\n\n", encoding="utf-8")
    assert run_main(owt, monkeypatch, [f"--input={path}", f"--out_dir={tmp_path / 'out'}", "--val_docs=5", "--num_proc=1"]) is None
    check_owt(tmp_path / "out", docs, 5)


def test_owt_one_process_writes_the_same_files(owt_data, documents, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "all.jsonl", documents)
    assert run_main(owt, monkeypatch, [f"--input={path}", f"--out_dir={tmp_path / 'out'}", "--val_docs=40", "--num_proc=1"]) is None
    assert folder_bytes(tmp_path / "out")["train.bin"] == folder_bytes(owt_data)["train.bin"]
    assert folder_bytes(tmp_path / "out")["val.bin"] == folder_bytes(owt_data)["val.bin"]


def test_owt_parquet_and_jsonl_mixed(documents, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow", reason="parquet input needs pyarrow (pip install pyarrow); jsonl is tested without it")
    import pyarrow as pa
    import pyarrow.parquet as pq
    # the hub's layout: parquet shards whose sorted names give the document order
    pq.write_table(pa.table({"text": documents[:150]}), tmp_path / "train-00000-of-00002.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": documents[150:300]}), tmp_path / "train-00001-of-00002.parquet")
    write_jsonl(tmp_path / "z_tail.jsonl", documents[300:])
    out = tmp_path / "out"
    assert run_main(owt, monkeypatch, [f"--input={tmp_path}", f"--out_dir={out}", "--val_docs=130", "--num_proc=1"]) is None
    check_owt(str(out), documents, 130)  # the validation split spans two files
    pq.write_table(pa.table({"content": documents[:3]}), tmp_path / "wrong.parquet")
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={tmp_path / 'wrong.parquet'}", f"--out_dir={tmp_path / 'o2'}"]),
                          "no `text` column", "content")
    pq.write_table(pa.table({"text": ["a document", None]}), tmp_path / "null.parquet")  # a row without its text
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={tmp_path / 'null.parquet'}", f"--out_dir={tmp_path / 'o2'}",
                                                               "--val_docs=1", "--num_proc=1"]),
                          "null.parquet row 1: `text` is NoneType, not a string")


def test_owt_datasets_source_matches_the_files(documents, owt_data, tmp_path):
    """The hub path's reader on a `datasets` Dataset built in memory (the download itself needs the network)."""
    datasets = pytest.importorskip("datasets", reason="the hub path needs `datasets` (pip install datasets)")
    n, batches = owt.dataset_source(datasets.Dataset.from_dict({"text": documents}))
    assert n == len(documents) and [t for b in batches() for t in b] == documents
    with pytest.raises(SystemExit, match=r"the dataset has no `text` column \(it has body, id\)"):
        owt.dataset_source(datasets.Dataset.from_dict({"body": documents, "id": list(range(len(documents)))}))


def test_owt_train_sample_eval_with_mdlm(owt_data, tmp_path):
    out = str(tmp_path / "mdlm")
    run_cli(["mdlm.py", "--train", "--dataset=openwebtext", f"--data_dir={owt_data}", f"--out_dir={out}"] + TINY,
            env={"DIFFLM_KERNELS": "0"})
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--num_samples=1", "--steps=4"], env={"DIFFLM_KERNELS": "0"})
    assert "=== sample 0" in r.stdout
    r = run_cli(["mdlm.py", "--eval", f"--out_dir={out}"] + EVAL, env={"DIFFLM_KERNELS": "0"})
    assert float(re.search(r"([\d.]+) nats/token", r.stdout).group(1)) > 0


def test_owt_killed_midway_is_detected_and_redone(owt_data, documents, tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "all.jsonl", documents)
    out = tmp_path / "out"
    args = [f"--input={src}", f"--out_dir={out}", "--val_docs=40", "--num_proc=1"]
    # killed during tokenising, after two batches were written to the .tmp files
    hook = ("g['DOCS_PER_TASK'] = 50\n"
            "real, calls = g['tokenize'], []\n"
            "def tokenize(texts):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 3: die()\n"
            "    return real(texts)\n"
            "g['tokenize'] = tokenize")
    assert kill_midway("data/openwebtext/prepare.py", args, hook) == -9
    assert os.path.getsize(glob.glob(str(out / "train.bin.*.tmp"))[0]) > 0
    assert not any(os.path.exists(out / f) for f in ("train.bin", "val.bin", "meta.json"))
    assert not owt.complete(str(out))
    capsys.readouterr()
    assert run_main(owt, monkeypatch, args) is None
    assert "incomplete preparation" in capsys.readouterr().out
    check_owt(str(out), documents, 40)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin", "write.lock"]  # the killed run's .tmp gone
    # a complete folder is kept; a token file that no longer matches meta.json is redone
    assert run_main(owt, monkeypatch, args) is None
    assert "already prepared" in capsys.readouterr().out
    with open(out / "train.bin", "r+b") as f:
        f.truncate(100)
    assert run_main(owt, monkeypatch, args) is None
    assert "incomplete preparation" in capsys.readouterr().out
    check_owt(str(out), documents, 40)


def test_owt_sigterm_stops_the_workers_too(documents, tmp_path):
    """A SIGTERM to the preparing process (a scheduler's stop) ends its tokenizer workers with it: they ran on
    as orphans, each holding its share of the corpus."""
    src = write_jsonl(tmp_path / "all.jsonl", documents * 50)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "data/openwebtext/prepare.py", f"--input={src}", f"--out_dir={out}",
                          "--val_docs=40", "--num_proc=2"], cwd=ROOT, env={**os.environ, "DIFFLM_DATA": shared_data()},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not any(os.path.getsize(f) > 0 for f in glob.glob(str(out / "train.bin.*.tmp"))):
        assert p.poll() is None and time.time() - t0 < 120, "it ended before it wrote a batch"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == -signal.SIGTERM
    time.sleep(1)
    left = []
    for f in glob.glob("/proc/[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # a process that ended while we looked
            if str(out).encode() in open(f, "rb").read():
                left.append(f)
    assert not left, left


def test_owt_bad_inputs_one_line(documents, tmp_path, monkeypatch):
    out = f"--out_dir={tmp_path / 'out'}"
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={tmp_path / 'nope.jsonl'}", out]), "does not exist")
    (tmp_path / "a.txt").write_text("hello")
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={tmp_path / 'a.txt'}", out]), ".parquet or .jsonl")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={tmp_path / 'empty'}", out]), "without .parquet or .jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={bad}", out]), "line 2", "`text`")
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={bad}", out]), "line 2 is not JSON")
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={bad}", out]), "not UTF-8")
    good = write_jsonl(tmp_path / "good.jsonl", documents[:10])
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={good}", out, "--val_docs=10"]), "--val_docs=10", "10 documents")
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={good}", out, "--num_proc=0"]), "--num_proc=0")
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={good}", f"--out_dir={good}"]), f"--out_dir={good} is a file")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    if importlib.util.find_spec("pyarrow"):
        assert_one_line_error(run_main(owt, monkeypatch, [f"--input={tmp_path / 'junk.parquet'}", out]), "not a readable parquet")
    else:
        assert_one_line_error(run_main(owt, monkeypatch, [f"--input={tmp_path / 'junk.parquet'}", out]), "pip install pyarrow")
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_owt_a_failed_redo_keeps_the_prepared_folder(owt_data, documents, tmp_path, monkeypatch):
    """--force with a bad document found while writing, or too many --val_docs, removed meta.json first: the complete
    folder read as unprepared and kept partial .tmp files. A file named twice (a folder and a file in it) was read
    twice, its documents in train and val both; a byte-order mark made the first line "not JSON"."""
    out = tmp_path / "out"
    shutil.copytree(owt_data, out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f != "write.lock"}
    src = write_jsonl(tmp_path / "all.jsonl", documents)
    real, calls = owt.tokenize, []

    def bad_second_batch(texts):
        calls.append(1)
        return common.die("a bad document") if len(calls) == 2 else real(texts)
    monkeypatch.setattr(owt, "tokenize", bad_second_batch)
    monkeypatch.setattr(owt, "DOCS_PER_TASK", 50)
    args = [f"--input={src}", f"--out_dir={out}", "--val_docs=40", "--num_proc=1", "--force"]
    assert_one_line_error(run_main(owt, monkeypatch, args), "a bad document")
    few = write_jsonl(tmp_path / "few.jsonl", documents[:10])
    assert_one_line_error(run_main(owt, monkeypatch, [f"--input={few}", f"--out_dir={out}", "--force"]), "--val_docs=100000")
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f != "write.lock"} == before
    monkeypatch.setattr(owt, "tokenize", real)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "a.jsonl", documents[:250])
    (parts / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + open(write_jsonl(tmp_path / "b", documents[250:]), "rb").read())
    again = tmp_path / "again"
    assert run_main(owt, monkeypatch, [f"--input={parts},{parts / 'b.jsonl'}", f"--out_dir={again}", "--val_docs=40",
                                       "--num_proc=1"]) is None
    check_owt(str(again), documents, 40)


def test_an_unreachable_hub_puts_its_clients_offline(monkeypatch):
    """Offline, datasets and transformers retried each request for half a minute (ten lines of retries) before the
    one-line error; a hub that cannot be reached sets HF_HUB_OFFLINE first, which fails at once or reads the cache."""
    for k in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    tried = []

    def unreachable(address, timeout):
        tried.append(address)
        raise OSError("Name or service not known")
    monkeypatch.setattr(corpus.socket, "create_connection", unreachable)
    corpus.hub_offline_unless_reachable()
    assert tried == [("huggingface.co", 443)] and os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a direct connection says nothing behind a proxy
    corpus.hub_offline_unless_reachable()
    assert len(tried) == 1 and "HF_HUB_OFFLINE" not in os.environ


def test_owt_hub_without_network_or_datasets_is_one_line(tmp_path):
    """No --input: `datasets` missing -> 'pip install datasets'; present but offline -> 'could not load'."""
    r = run_cli(["data/openwebtext/prepare.py", f"--out_dir={tmp_path}"], check=False,
                env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error:")
    assert ("pip install datasets" if importlib.util.find_spec("datasets") is None else "could not load") in last
    assert "--input" in last
