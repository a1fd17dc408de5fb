"""
corpus.py: token data shared by the text methods.

  tokenizers   char, word and GPT-2 BPE, stored as JSON in meta.json (never pickled)
  token files  data/<name>/prepare.py -> train.bin / val.bin (uint16 or uint32) + meta.json, written
               atomically under a file lock (any number of torchrun ranks may prepare at once), with
               the byte size and sha256 of each file in meta.json, checked when a split is read
  batches      random windows of block_size tokens from a memmap, as in nanoGPT, and the
               validation windows of every evaluate()
  zero-shot    the papers' evaluation sets (--eval_data): detokenizers, download or local file,
               the wrapping into blocks as the MDLM and SEDD code bases do

Method files and data/*/prepare.py import this module; it imports only common.py.
"""

import contextlib
import dataclasses
import glob
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import torch

from common import ROOT, SHARED_DATA_ENV, die, progress



class CharTokenizer:
    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text, what="text"):
        bad = sorted({c for c in text if c not in self.stoi})
        if bad:
            die(f"{what} has characters outside the model's {self.vocab_size}-character vocabulary: "
                f"{''.join(bad)!r}; use only characters seen in training")
        return [self.stoi[c] for c in text]

    def decode(self, ids, mask_char="_"):
        return "".join(self.chars[i] if i < self.vocab_size else mask_char for i in ids)


class WordTokenizer:
    """Words and punctuation, the frequent ones kept; specials first (START, END, UNK, PAD)."""

    SPECIALS = ("<s>", "</s>", "<unk>", "<pad>")
    START, END, UNK, PAD = 0, 1, 2, 3
    PATTERN = re.compile(r"</?s>|<unk>|<pad>|\w+|[^\w\s]")  # a decoded special reads back as itself

    def __init__(self, words):
        self.words = list(words)
        self.stoi = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    @classmethod
    def split(cls, text):
        return cls.PATTERN.findall(text)

    @classmethod
    def build(cls, texts, min_count):
        counts = {}
        for text in texts:
            for w in cls.split(text):
                counts[w] = counts.get(w, 0) + 1
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in cls.SPECIALS), key=lambda w: (-counts[w], w))
        if not kept:  # every token would be <unk>: nothing a model could learn
            die(f"--min_count={min_count} keeps no word (the commonest is seen {max(counts.values(), default=0)} times "
                "in train); lower it")
        return cls(list(cls.SPECIALS) + kept)

    def encode(self, text, what="text"):
        return [self.stoi.get(w, self.UNK) for w in self.split(text)]

    def decode(self, ids, mask_char="_"):
        out = [self.words[i] if i < self.vocab_size else mask_char for i in ids]
        return " ".join(w for w in out if w not in ("<pad>",))


GPT2_VOCAB = 50257  # its BPE tokens, the last one <|endoftext|>


def gpt2_encoding():
    """tiktoken's GPT-2 BPE, from local files under $DIFFLM_DATA/gpt2 when present (offline)."""
    import tiktoken
    local = os.path.join(os.environ.get(SHARED_DATA_ENV, ""), "gpt2")
    if os.path.isfile(os.path.join(local, "vocab.bpe")) and os.path.isfile(os.path.join(local, "encoder.json")):
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(  # with their sha256: tiktoken's cache would serve a copy read before
                vocab_bpe_file=os.path.join(local, "vocab.bpe"), encoder_json_file=os.path.join(local, "encoder.json"),
                vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
            return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": GPT2_VOCAB - 1}, explicit_n_vocab=GPT2_VOCAB)
        except Exception as e:  # a copy cut short or edited: its parse or tiktoken's own checks fail
            die(f"the GPT-2 BPE files in {local} are damaged ({type(e).__name__}); copy gpt2/vocab.bpe and "
                f"gpt2/encoder.json there again")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no local files
        die(f"cannot load the GPT-2 BPE ({type(e).__name__}); set {SHARED_DATA_ENV} to a folder with gpt2/vocab.bpe and gpt2/encoder.json")


class GPT2Tokenizer:
    def __init__(self):
        self.enc = gpt2_encoding()
        self.vocab_size = self.enc.n_vocab

    def encode(self, text, what="text"):
        # "<|endoftext|>", as decode writes it, is the end-of-text id again: a samples file's document breaks
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids, mask_char="_"):
        # masked ids (>= vocab) are shown as a marker between the decoded runs
        out, run = [], []
        for i in ids:
            if i < self.vocab_size:
                run.append(i)
            else:
                out.append(self.enc.decode(run)), run.clear(), out.append(mask_char)
        out.append(self.enc.decode(run))
        return "".join(out)


def get_tokenizer(meta):
    if "tokenizer" not in meta:
        return None  # continuous data (ddpm.py) has no tokenizer
    kind = meta["tokenizer"]
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "word":
        return WordTokenizer(meta["words"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    die(f"unknown tokenizer {kind!r} in meta.json")


# ----------------------------------------------------------------------------------------------
# Data: data/<name>/prepare.py writes train.bin, val.bin (uint16/uint32) and meta.json


SPLIT_FILES = ("train.bin", "val.bin")
CHECK_CHUNK = 1 << 24  # tokens per read when scanning a token file, so memory stays bounded


def data_path(cfg):
    return cfg.data_dir or os.path.join(ROOT, "data", cfg.dataset)


def mark_unprepared(out_dir):
    """Remove meta.json before replacing any file it describes: a prepare killed midway then
    leaves a folder that reads as unprepared rather than new files under an old meta.json. The
    .tmp files another (killed) process left go too: prepares of one folder run one at a time (data_lock)."""
    stale = [f for f in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp")) if not f.endswith(f".{os.getpid()}.tmp")]
    for f in [os.path.join(out_dir, "meta.json")] + stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(f)


def file_record(path):
    """{"bytes", "sha256"} of a file, read in chunks: what meta.json keeps per token file (and per text input)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def rerun_command(argv=None):
    """This prepare.py's command line with the script and the paths it names absolute, so that the command an
    error message quotes runs again from any folder (the methods run from the repository's root)."""
    argv = sys.argv if argv is None else argv
    args = map_path_flags(argv[1:], lambda flag, value: ",".join(os.path.abspath(p) for p in value.split(",")))
    return "python " + shlex.join([os.path.abspath(argv[0])] + args)


def map_path_flags(args, fn):
    """args with the value of each PATH_FLAGS flag, given as --flag=V or as --flag V, replaced by fn(flag, V)."""
    out, flag = [], None
    for a in args:
        name, eq, value = a.partition("=")
        if flag:  # the value of `--out_dir DIR`
            a = fn(flag, a)
        elif eq and name in PATH_FLAGS:
            a = name + "=" + fn(name, value)
        out, flag = out + [a], a if a in PATH_FLAGS else None
    return out


PATH_FLAGS = ("--input", "--input_dir", "--out_dir")  # what a prepare.py reads or writes
FOLDER_FILES = ("test.bin", "train.jsonl", "valid.jsonl", "test.jsonl")  # a prepare that writes none removes them


def write_split(out_dir, train_ids, val_ids, meta, test_ids=None, texts=None):
    """Used by every prepare.py: the token files (test.bin too for a set with a test split), the text files
    texts holds ({name: lines}: E2E's examples) and meta.json, each written atomically.

    meta.json records each token file's size and sha256 (check_data compares them) and, when run
    from a prepare.py, the command that re-prepares the folder. Temporary names carry the pid, so
    processes preparing one folder at once never write to the same file, and write.lock lets one finish first.
    An earlier prepare's files that this one does not write go, so no method reads them as this one's.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"--out_dir={out_dir} is a file; name a folder")
    dtype = np.uint16 if meta["vocab_size"] < 2**16 else np.uint32
    splits = (train_ids, val_ids) + (() if test_ids is None else (test_ids,))
    arrays = dict(zip(SPLIT_FILES + ("test.bin",), (np.ascontiguousarray(ids, dtype=dtype) for ids in splits)))
    for name, a in arrays.items():
        if a.size == 0:  # before the folder is made: a refused prepare leaves nothing behind
            die(f"the {name[:-4]} split of {out_dir} would be empty; give more text")
    os.makedirs(out_dir, exist_ok=True)
    if "command" not in meta and sys.argv and sys.argv[0].endswith("prepare.py"):
        meta = {**meta, "command": rerun_command()}
    meta = {**meta, "dtype": np.dtype(dtype).name, "train_tokens": arrays["train.bin"].size,
            "val_tokens": arrays["val.bin"].size, **({"test_tokens": arrays["test.bin"].size} if test_ids is not None else {}),
            "files": {name: {"bytes": a.nbytes, "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
                      for name, a in arrays.items()}}
    texts = texts or {}
    with data_lock(out_dir, "write.lock"):  # two prepare.py runs into one folder: one writes, then the other
        with temporary_files(out_dir, list(arrays) + list(texts) + ["meta.json"]) as tmp:
            for name, content in {**arrays, **texts}.items():
                with open(tmp[name], "wb") as f:  # f.write: a full disk's errno, not numpy's count
                    f.write("".join(content).encode("utf-8") if name in texts else content.data)
            with open(tmp["meta.json"], "w") as f:
                json.dump(meta, f)
        mark_unprepared(out_dir)
        for name in set(FOLDER_FILES) - set(arrays) - set(texts):  # e.g. E2E's examples under another corpus's ids
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))
        for name, path in tmp.items():  # meta.json last
            os.replace(path, os.path.join(out_dir, name))
    return meta


@contextlib.contextmanager
def temporary_files(out_dir, names):
    """{name: this process's temporary path for out_dir/name}, for the caller to write and then rename. A failure
    on the way (a bad document, a full disk, Ctrl-C) removes them, so the folder stays as it was; an OSError is
    one line."""
    tmp = {name: os.path.join(out_dir, f"{name}.{os.getpid()}.tmp") for name in names}
    try:
        yield tmp
    except BaseException as e:
        for path in tmp.values():
            with contextlib.suppress(OSError):
                os.remove(path)
        if isinstance(e, OSError):
            die(f"cannot write {out_dir}: {e.strerror or e}; free disk space or choose another --out_dir")
        raise


def read_utf8(path, flag="--input"):
    r"""The text of the file a flag names, every line end \n as a file read in text mode gives it (\r\n and \r are no
    characters of the text); a folder, a byte sequence that is not UTF-8 (with its offset) or a file without text
    stops with one line."""
    if not os.path.isfile(path):
        die(f"{flag}={path} {'is a folder; name its files' if os.path.isdir(path) else 'does not exist'}")
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")  # its byte-order mark
        die(f"{path} is not UTF-8: byte {e.start:,} (0x{raw[e.start]:02x}) {e.reason}; "
            f"convert it first, e.g. iconv -f {'utf-16' if utf16 else 'latin1'} -t utf-8")
    text = io.StringIO(text.removeprefix("\ufeff"), newline=None).read()  # nor is a byte-order mark
    if not text.strip():
        die(f"{path} holds no text")
    return text


def find_local_copy(name, url, sha256=None, shipped=None):
    """A corpus file's bytes and where they came from: the gzip copy shipped in the repository
    (shipped, a path), else $DIFFLM_DATA/name, else a download from url; (None, why) if none works."""
    import gzip
    import urllib.request
    local = os.path.join(os.environ.get(SHARED_DATA_ENV, ""), name)
    if shipped and os.path.isfile(shipped):
        try:
            with gzip.open(shipped) as f:
                data = f.read()
        except (OSError, EOFError) as e:
            return None, f"{shipped} is damaged ({e}); restore it with git checkout -- {shipped}"
        source = shipped
    elif os.environ.get(SHARED_DATA_ENV) and os.path.isfile(local):
        data = open(local, "rb").read()
        source = local
    else:
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                data = r.read()
            source = url
        except Exception as e:
            return None, f"could not download {url} ({type(e).__name__})"
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        return None, f"{source} does not have the expected sha256 {sha256}"
    return data, source


@contextlib.contextmanager
def data_lock(path, name="prepare.lock"):
    """Hold an exclusive lock on path/name: torchrun's ranks all call prepare_data, and one prepares
    while the others wait, then find the folder prepared (write_split holds write.lock the same way)."""
    try:
        import fcntl
        os.makedirs(path, exist_ok=True)
        f = open(os.path.join(path, name), "a")
    except (ImportError, OSError):  # no flock (Windows) or a read-only folder that nobody can prepare
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def reprepare_command(cfg, meta=None):
    """The command that rebuilds cfg's data folder, for error messages."""
    path = data_path(cfg)
    if meta and meta.get("command"):  # the command that prepared it, pointed at where the folder is now
        here = os.path.abspath(path)
        argv = map_path_flags(shlex.split(meta["command"]), lambda flag, value: here if flag == "--out_dir" else value)
        named = any(a.partition("=")[0] == "--out_dir" for a in argv)
        return shlex.join(argv + ([] if named else [f"--out_dir={here}"]))
    if os.path.isfile(os.path.join(ROOT, "data", cfg.dataset, "prepare.py")):
        return f"python data/{cfg.dataset}/prepare.py" + (f" --out_dir={path}" if cfg.data_dir else "")
    return f"python data/text/prepare.py --input=FILE --name={cfg.dataset}" + (f" --out_dir={path}" if cfg.data_dir else "") + " --force"


def load_meta(cfg):
    """meta.json of cfg's data folder, with the keys every loader relies on."""
    path = os.path.join(data_path(cfg), "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        die(f"{path} is not valid JSON ({e}); re-prepare: {reprepare_command(cfg)}")
    except FileNotFoundError:  # a prepare.py of your own that exited cleanly
        die(f"{data_path(cfg)} has no meta.json after its prepare.py ran; write the folder with corpus.write_split, "
            "as data/text/prepare.py does")
    need = ("vocab_size", "dtype", "train_tokens", "val_tokens", "files")
    missing = [k for k in need if k not in meta] if isinstance(meta, dict) else list(need)
    if not missing and "test.bin" in meta["files"] and "test_tokens" not in meta:
        missing = ["test_tokens"]
    if missing or meta["dtype"] not in ("uint16", "uint32") or set(meta["files"]) - {"test.bin"} != set(SPLIT_FILES):
        die(f"{path} lacks {', '.join(missing) or 'a valid dtype or files entry'} (written by an older "
            f"difflm or by hand); re-prepare: {reprepare_command(cfg, meta if isinstance(meta, dict) else None)}")
    kind = meta.get("tokenizer")  # what the samplers decode with: checked before a model trains on it
    size = {"char": len(meta.get("chars") or ()), "word": len(meta.get("words") or ()), "gpt2": GPT2_VOCAB}.get(kind)
    if meta["vocab_size"] != size:
        die(f"{path} gives " + (f"tokenizer {kind!r}" if size is None else f"vocab_size {meta['vocab_size']} for {size} "
            f"{kind} tokens") + "; meta.json needs tokenizer char (with its chars), word (with its words) or gpt2, and "
            "vocab_size their number; write it with corpus.write_split, as data/text/prepare.py does")
    return meta


def check_data(cfg, meta):
    """The token files against meta.json: their sizes every time (cheap); on the first use after a
    prepare also their sha256 and that every id is below vocab_size, recorded in verified.json so
    the scan is not repeated while the files stay the same."""
    path, dtype = data_path(cfg), np.dtype(meta["dtype"])
    stamp, files = os.path.join(path, "verified.json"), {}
    for name in meta["files"]:  # train.bin, val.bin and a test.bin where the set has one
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            die(f"{f} is missing; re-prepare: {reprepare_command(cfg, meta)}")
        st, want = os.stat(f), meta["files"][name]["bytes"]
        tokens = meta[name[:-4] + "_tokens"]
        if st.st_size != want or want != tokens * dtype.itemsize or st.st_size == 0:
            die(f"{f} has {st.st_size:,} bytes but meta.json says {tokens:,} {dtype.name} tokens "
                f"({want:,} bytes): truncated, empty or from another prepare; re-prepare: {reprepare_command(cfg, meta)}")
        files[name] = [st.st_size, st.st_mtime_ns, meta["files"][name]["sha256"]]
    with contextlib.suppress(OSError, ValueError):
        with open(stamp) as f:
            if json.load(f) == files:
                return
    for name in meta["files"]:
        h, top = hashlib.sha256(), 0
        with open(os.path.join(path, name), "rb") as f:  # read, not mapped: mapped pages would stay in RSS
            while chunk := f.read(CHECK_CHUNK * dtype.itemsize):
                h.update(chunk)
                top = max(top, int(np.frombuffer(chunk, dtype=dtype).max()))
        if h.hexdigest() != meta["files"][name]["sha256"]:
            die(f"{os.path.join(path, name)} does not match the sha256 in meta.json (another prepare's file "
                f"or a damaged one); re-prepare: {reprepare_command(cfg, meta)}")
        if top >= meta["vocab_size"]:
            die(f"{os.path.join(path, name)} holds token id {top}, not below the vocabulary of "
                f"{meta['vocab_size']} in meta.json; re-prepare: {reprepare_command(cfg, meta)}")
    with contextlib.suppress(OSError):  # a read-only folder is checked again next time
        tmp = f"{stamp}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(files, f)
        os.replace(tmp, stamp)


def load_jsonl(cfg, name, meta):
    """<name>.jsonl of cfg's data folder: one JSON record per line (the E2E examples data/e2e/prepare.py writes beside
    the token files), whose ids must mean what they meant to the model of meta."""
    path = os.path.join(data_path(cfg), f"{name}.jsonl")
    check_tokenizer(os.path.dirname(path), meta)
    if not os.path.isfile(path):
        die(f"missing {path}; re-prepare the folder: {reprepare_command(cfg, meta)}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


PREPARE_LEAVES = (".tmp", ".lock", "verified.json")  # what a prepare killed midway leaves; its .bin and .jsonl too, beside a lock


def prepare_data(cfg, model_meta=None):
    """Run data/<dataset>/prepare.py if the folder is not prepared, check its token files against
    meta.json and return the meta dict. Any number of processes may call it at once (data_lock).
    model_meta: a checkpoint's, whose data came from another command (your own text): that command is named."""
    path = data_path(cfg)
    script = os.path.join(ROOT, "data", cfg.dataset, "prepare.py")
    if not os.path.isfile(os.path.join(path, "meta.json")):
        command = (model_meta or {}).get("command", "")
        if command and f"data/{cfg.dataset}/prepare.py" not in command:
            die(f"{path} is not prepared; the model's data came from `{command}`: run it again, or point --data_dir "
                f"at that data")
        if cfg.dataset == "text":
            die("--dataset=text names no dataset: data/text/prepare.py prepares your own text; run "
                "python data/text/prepare.py --input=FILE --name=NAME, then pass --dataset=NAME")
        if not os.path.isfile(script):
            known = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, "data", "*", "prepare.py"))
                           if os.path.basename(os.path.dirname(p)) != "text")
            die(f"unknown dataset {cfg.dataset!r}: {path} is not prepared and there is no data/{cfg.dataset}/prepare.py "
                f"(known: {', '.join(known)}; for your own text: python data/text/prepare.py --input=FILE --name={cfg.dataset}"
                f"{f' --out_dir={path}' if cfg.data_dir else ''}{' --force' if os.path.isdir(path) else ''})")  # a folder a killed prepare left is replaced only with --force
        own = os.path.isdir(path) and os.path.abspath(path) != os.path.join(ROOT, "data", cfg.dataset)
        listing = os.listdir(path) if own else []
        began = any(f.endswith(".lock") for f in listing)  # a prepare's locks stay: no lock, the token files are yours
        theirs = sorted(f for f in listing if not f.endswith(PREPARE_LEAVES + ((".bin", ".jsonl") if began else ())))
        if theirs:  # a folder of the user's own files is never filled with a built-in corpus
            die(f"--data_dir={path} holds {theirs[0]} but no prepared data (meta.json); for your own text: python "
                f"data/text/prepare.py --input=FILE --name=NAME --out_dir={path}; for --dataset={cfg.dataset}, a new folder")
    with data_lock(path):
        if not os.path.isfile(os.path.join(path, "meta.json")):
            print(f"preparing {cfg.dataset} into {path} ...")
            r = subprocess.run([sys.executable, script, f"--out_dir={path}"], capture_output=True, text=True)
            if r.returncode != 0:
                lines = (r.stderr or r.stdout).strip().splitlines()
                raise SystemExit(lines[-1] if lines else f"error: {script} failed")
            print(r.stdout.strip())
        meta = load_meta(cfg)
        check_data(cfg, meta)
    check_sources(path, meta)
    return meta


def check_sources(path, meta):
    """A note when a text file the folder was prepared from (data/text/prepare.py) has changed since: the
    run goes on with the prepared tokens, which no longer are that text. Hashed only when its size is
    the same and it is newer than the preparation."""
    for f, rec in zip(meta.get("inputs", []), meta.get("sources", [])):
        if not os.path.isfile(f):
            continue  # moved or deleted: the prepared folder stands on its own
        st = os.stat(f)
        newer = st.st_mtime > os.path.getmtime(os.path.join(path, "meta.json"))
        if st.st_size != rec["bytes"] or (newer and file_record(f)["sha256"] != rec["sha256"]):
            print(f"note: {f} has changed since {path} was prepared from it; this run reads the prepared tokens "
                  f"(re-prepare: {meta.get('command', 'data/text/prepare.py --force')})", file=sys.stderr)


TOKENIZER_KEYS = ("tokenizer", "vocab_size", "chars", "words")  # what a model's token ids mean


def prepared_by(meta):
    """", which `COMMAND` prepared": the command a model's meta.json kept (a refusal names it: the folder may since
    hold another prepare's data), or nothing."""
    return f", which `{meta['command']}` prepared" if meta.get("command") else ""


def tokenizer_name(meta):
    return f"{meta.get('tokenizer', 'no')} tokenizer with {meta.get('vocab_size', '?')} tokens"


def check_tokenizer(path, meta):
    """The data folder's meta.json (meta where it has none), whose token ids must mean what they meant to
    the model of meta (the checkpoint's, or the prepare's) -> else one line."""
    here = meta
    if os.path.isfile(os.path.join(path, "meta.json")):
        with open(os.path.join(path, "meta.json")) as f:
            here = json.load(f)
    if any(here.get(k) != meta.get(k) for k in TOKENIZER_KEYS):
        same = " (the same size, other symbols)" if tokenizer_name(here) == tokenizer_name(meta) else ""
        die(f"{path} has a {tokenizer_name(here)} but the model was trained on a {tokenizer_name(meta)}{same}; use the "
            "dataset it was trained on" + prepared_by(meta))
    return here


class Lazy:
    """make(item) for each of items, made as the loop reaches it: a pass that reads one batch at a time and can
    say how many it holds (progress's "i of n")."""

    def __init__(self, items, make):
        self.items, self.make = items, make

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return map(self.make, self.items)


class Batches:
    """Random windows of block_size tokens from a memmapped split, as in nanoGPT.

    Each rank draws from its own generator, so data streams differ across ranks and the
    generator's state goes into the checkpoint for an exact resume. meta is the model's (from
    prepare_data, or the checkpoint's for --eval); the folder's own meta.json must agree with it.
    """

    def __init__(self, cfg, meta, seed):
        self.cfg, self.path, self.block = cfg, data_path(cfg), cfg.block_size
        here = check_tokenizer(self.path, meta)
        self.dtype = np.dtype(here["dtype"])
        self.gen = torch.Generator().manual_seed(seed)
        self.splits = [name[:-4] for name in here["files"]]  # what this prepare wrote, not any .bin lying there
        for split in ("train", "val"):
            n = here[f"{split}_tokens"]
            if n < self.block:
                die(f"the {split} split has {n} tokens, fewer than block_size={self.block}; lower --block_size or give the split more text")

    def data(self, split):
        # a fresh memmap per call avoids holding the file open (nanoGPT's leak workaround)
        return np.memmap(os.path.join(self.path, f"{split}.bin"), dtype=self.dtype, mode="r")

    def get(self, split, batch_size, gen=None):
        data = self.data(split)
        ix = torch.randint(len(data) - self.block + 1, (batch_size,), generator=gen or self.gen)  # the last window too
        x = np.stack([data[i:i + self.block].astype(np.int64) for i in ix.tolist()])
        return torch.from_numpy(x)  # (B, L)

    def sequential(self, split, batch_size):
        """Every non-overlapping window of the split once, in order (for --eval)."""
        if split not in self.splits or not os.path.isfile(os.path.join(self.path, f"{split}.bin")):
            die(f"{self.path} has no {split} split ({split}.bin); " + ("use --eval_split=val" if split != "val" else
                f"re-prepare: {reprepare_command(self.cfg)}"))
        data = self.data(split)
        n = len(data) // self.block  # a window is scored whole, from BOS: the last full one counts too
        if n == 0:
            die(f"the {split} split has {len(data)} tokens, fewer than block_size={self.block}; lower --block_size or give the split more text")
        windows = data[:n * self.block].reshape(n, self.block)  # (n, L), still on disk
        return Lazy(range(0, n, batch_size), lambda b: torch.from_numpy(windows[b:b + batch_size].astype(np.int64)))

    def slices(self, split, max_tokens, pieces=64):
        """At most max_tokens of a split as lists of ids: all of it when it fits, else `pieces` evenly
        spaced runs, so a statistic over the training text costs the same at any corpus size."""
        data = self.data(split)
        if len(data) <= max_tokens:
            return [data.tolist()]
        run = max_tokens // pieces
        return [data[s:s + run].tolist() for s in np.linspace(0, len(data) - run, pieces).astype(np.int64)]


def val_batches(batches, cfg, full=False, limit=0):
    """The validation batches of an evaluate(): every window of the --eval_split split once, in order
    (full, for --eval; the first `limit` batches if limit), else the same eval_iters random val batches
    at every call, so evaluations during training compare (and never see the test split)."""
    if full:
        if cfg.eval_split != "val":
            print(f"evaluating on the {cfg.eval_split} split")
        seq = batches.sequential(cfg.eval_split, cfg.batch_size)
        return progress(itertools.islice(seq, limit or None), "eval", total=min(limit or len(seq), len(seq)))
    gen = torch.Generator().manual_seed(cfg.seed)
    return (batches.get("val", cfg.batch_size, gen) for _ in range(cfg.eval_iters))


# ----------------------------------------------------------------------------------------------
# Text given on the command line


def encode_prompt(tokenizer, text, flag, allow_unk=False):
    """Text given on the command line -> ids; a literal \\n in it stands for a newline.
    A word outside a word vocabulary would silently become <unk>, so it stops the run unless --allow_unk
    (a character outside a char vocabulary always does)."""
    text = text.replace("\\n", "\n")
    unknown = [w for w in tokenizer.split(text) if w not in tokenizer.stoi] if isinstance(tokenizer, WordTokenizer) else []
    if unknown and not allow_unk:
        die(f"{flag} has words outside the model's vocabulary: {' '.join(unknown[:5])}; use known words or --allow_unk")
    return tokenizer.encode(text, flag)


def infill_template(tokenizer, cfg, length):
    """--infill=TEMPLATE -> (token ids or -1 at free positions) (n,): each --placeholder character
    is one free position (one token at word and BPE level too; the text between placeholders is
    encoded piece by piece), a literal \\n in the template is a newline. n is the template's
    length, or length when --seq_len is given (the positions after the template are free)."""
    if cfg.prefix or cfg.suffix:
        die("--infill replaces --prefix and --suffix; put the fixed text into the template instead")
    if len(cfg.placeholder) != 1:
        die(f"--placeholder={cfg.placeholder!r} must be one character")
    text = cfg.infill.replace("\\n", "\n")
    if cfg.placeholder not in text:
        die(f"--infill has no {cfg.placeholder!r} placeholder, so nothing is left to sample; mark each free position with {cfg.placeholder!r}")
    ids = []
    for i, piece in enumerate(text.split(cfg.placeholder)):
        ids += ([-1] if i else []) + (encode_prompt(tokenizer, piece, "--infill", cfg.allow_unk) if piece else [])
    if len(ids) > length:
        die(f"--infill takes {len(ids)} tokens, more than the {length}-token sequence; shorten it or raise --seq_len")
    n = length if cfg.seq_len else len(ids)
    return torch.tensor(ids + [-1] * (n - len(ids)), dtype=torch.long)


def conditioning(tokenizer, cfg, length, rows=False):
    """--prefix and --suffix, or --infill -> (token ids or -1 at free positions) (length,), or the
    template's length under --infill without --seq_len. rows: one text per row, <s> text </s> PAD ...
    (Diffusion-LM's layout): <s> before the prefix, and a suffix just before the </s> at --length."""
    if getattr(cfg, "infill", ""):
        return infill_template(tokenizer, cfg, length)
    pre = encode_prompt(tokenizer, cfg.prefix, "--prefix", cfg.allow_unk) if cfg.prefix else []
    suf = encode_prompt(tokenizer, cfg.suffix, "--suffix", cfg.allow_unk) if cfg.suffix else []
    start, end = (1, getattr(cfg, "length", 0) or length) if rows else (0, length)
    if rows and suf and end == length:
        die("--suffix needs --length=N, the position of the </s> it ends before (one text per row)")
    if len(pre) + len(suf) > end - start:
        die(f"--prefix and --suffix take {len(pre) + len(suf)} tokens, more than the {end - start}-token sequence; shorten them"
            + (" or raise --seq_len" if not rows else " or raise --length" if end < length else ""))  # rows: diffusion_lm.py
    fixed = torch.full((length,), -1, dtype=torch.long)
    fixed[start:start + len(pre)] = torch.tensor(pre, dtype=torch.long)
    if suf:
        fixed[end - len(suf):end] = torch.tensor(suf, dtype=torch.long)
    if rows:
        fixed[0] = WordTokenizer.START
        if suf:
            fixed[end], fixed[end + 1:] = WordTokenizer.END, WordTokenizer.PAD
    return fixed


# ----------------------------------------------------------------------------------------------
# Zero-shot evaluation sets (--eval --eval_data=NAME): the papers' test texts in GPT-2 tokens.
# Each raw row is detokenized (the corpora store text split into words), encoded, followed by
# <|endoftext|>, and the whole stream is cut into blocks of the model's block_size.


def wikitext_detok(s):
    s = s.replace("s '", "s'")
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    for o, c in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'")):  # no space just inside the pair
        s = re.sub(re.escape(o) + r"\s*([^" + re.escape(c) + r"]*?)\s*" + re.escape(c), o + r"\1" + c, s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
                 ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return s


def ptb_detok(s):
    for a, b in ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")):
        s = s.replace(a, b)
    for _ in range(10):  # " N N " needs one pass per overlapping match
        s = s.replace(" N ", " 1 ")
    return s.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def lm1b_detok(s):
    s = s.replace("http : / / ", "http://").replace("https : / / ", "https://")
    s = re.sub(r" '(\w+)", r"'\1", s)
    s = re.sub(r" (\w+) \. ", r" \1. ", s)
    s = re.sub(r" (\w+) \.$", r" \1.", s)
    s = re.sub(r" \?$", "?", s.replace(" ? ", "? "))
    s = re.sub(r" !$", "!", s.replace(" ! ", "! "))
    for a, b in ((" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/")):
        s = s.replace(a, b)
    for o, c in (('"', '"'), ("'", "'"), ("(", ")"), ("[", "]")):  # '( a b )' -> '(a b)'
        s = re.sub(re.escape(o) + " ([^" + re.escape(o + c) + "]+) " + re.escape(c), o + r"\1" + c, s)
    return s.replace("$ ", "$").replace("\u00a3 ", "\u00a3")


def lambada_detok(s):
    return "\n" + s.replace("\u201c", '"').replace("\u201d", '"').strip()


def papers_detok(s):
    return lm1b_detok(wikitext_detok(s))


LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
# NAME -> (datasets path, its config (lambada: the file's URL), split, text field, detokenizer)
EVAL_SETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "validation", "text", wikitext_detok),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "validation", "text", wikitext_detok),
    "ptb": ("ptb_text_only", None, "validation", "sentence", ptb_detok),
    "lambada": ("json", LAMBADA_URL, "train", "text", lambada_detok),
    "lm1b": ("lm1b", None, "test", "text", lm1b_detok),
    "ag_news": ("ag_news", None, "test", "text", None),
    "pubmed": ("scientific_papers", "pubmed", "validation", "article", papers_detok),
    "arxiv": ("scientific_papers", "arxiv", "validation", "article", papers_detok),
}
EVAL_FILE_FORMATS = (".jsonl: one JSON object per line with the set's text field; .parquet: a table with that "
                     "column; .txt or .raw: one row per line (wikitext keeps each line's newline)")


def read_eval_file(path, name):
    """A local copy of a set's split -> its raw text rows (EVAL_FILE_FORMATS)."""
    field, ext = EVAL_SETS[name][3], os.path.splitext(path)[1]
    if not os.path.isfile(path):
        die(f"--eval_file={path} {'is a folder; name a file' if os.path.isdir(path) else 'does not exist'}")
    text = read_utf8(path, "--eval_file") if ext in (".txt", ".raw", ".jsonl") else None
    if ext in (".txt", ".raw"):
        lines = io.StringIO(text).readlines()  # at \n alone, each kept: read_utf8 made every line end one
        if name.startswith("wikitext"):  # the hub's rows are the raw file's lines, blank ones empty
            return [line if line.strip() else "" for line in lines]
        return [line.strip() for line in lines]
    if ext == ".jsonl":
        rows = []
        for n, line in enumerate(io.StringIO(text), 1):
            if not line.strip():  # a blank line (an editor's last newline) is no row, as in load_jsonl
                continue
            try:
                rows.append(json.loads(line)[field])
            except (ValueError, TypeError, KeyError):
                die(f"{path} line {n} is not a JSON object with a {field!r} field (the --eval_data={name} format)")
            if not isinstance(rows[-1], str):
                die(f"{path} line {n}: {field!r} is {type(rows[-1]).__name__}, not a string (the --eval_data={name} format)")
        return rows
    if ext == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path, columns=[field]).column(field).to_pylist()
        except Exception as e:  # not parquet, or no such column
            die(f"{path} is not a parquet table with a {field!r} column ({type(e).__name__}; the --eval_data={name} format)")
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, str)), None)
        if bad is not None:
            die(f"{path} row {bad}: {field!r} is {type(rows[bad]).__name__}, not a string (the --eval_data={name} format)")
        return rows
    die(f"--eval_file={path}: expected {EVAL_FILE_FORMATS}")


def hub_offline_unless_reachable():
    """Without network the hub's clients (datasets, transformers, huggingface_hub) retry each request for about half
    a minute, printing every retry, before they fail. Where the hub cannot be reached directly (no proxy set, and its
    name does not resolve or no connection opens in 3 s), they are put in offline mode before their first import: a
    cached copy is used, a missing one fails at once."""
    if any(os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


def download_rows(name):
    """A set's split through `datasets` (the hub names of the MDLM code base); one line if that fails."""
    path, config, split, field, _ = EVAL_SETS[name]
    how = f"without network, save the {split} split locally and pass --eval_file=PATH ({EVAL_FILE_FORMATS})"
    hub_offline_unless_reachable()
    try:
        import datasets
    except ImportError:
        die(f"--eval_data={name} downloads through the datasets package (pip install datasets); {how}")
    try:
        if path == "json":
            data = datasets.load_dataset("json", data_files=config, split=split)
        else:
            data = datasets.load_dataset(path, config, split=split)
        return data[field]
    except Exception as e:  # offline, removed dataset, script-based dataset: the errors are many
        die(f"cannot load {path}{'/' + config if config and path != 'json' else ''} through datasets "
            f"({type(e).__name__}); {how}")


def wrap_blocks(docs, block_size, eos, bos=None):
    """docs (lists of ids) -> (N, block_size): each doc followed by eos, all concatenated and cut into
    blocks, the remainder dropped. With bos (MDLM's protocol) a block is bos + block_size - 2 tokens
    + eos; without (SEDD's) block_size tokens."""
    n = block_size - 2 if bos is not None else block_size
    if n < 1:
        die(f"--block_size={block_size} leaves no text in a block between its BOS and EOS; use at least 3")
    stream = np.fromiter((t for d in docs for t in [*d, eos]), dtype=np.int64)
    if len(stream) < n:
        die(f"the evaluation text has {len(stream)} tokens, fewer than one block of {n}")
    x = torch.from_numpy(stream[:len(stream) // n * n].reshape(-1, n))
    if bos is None:
        return x
    return torch.cat([torch.full((len(x), 1), bos), x, torch.full((len(x), 1), eos)], 1)


class Blocks:
    """Fixed evaluation blocks behind the interface evaluate() reads from Batches (sequential)."""

    def __init__(self, x):
        self.x = x  # (N, L)

    def sequential(self, split, batch_size):
        return self.x.split(batch_size)


def eval_batches(cfg, meta, bos):
    """--eval's data -> (cfg, batches, name): a paper's zero-shot set (--eval_data, wrapped with a BOS
    or without, as each code base does) or the run's own validation split."""
    if getattr(cfg, "eval_data", "") or getattr(cfg, "eval_file", ""):  # hub.PublishedConfig's keys
        return cfg, zero_shot(cfg, meta, bos=bos), cfg.eval_data
    cfg = dataclasses.replace(cfg, data_dir=cfg.data_dir or data_path(cfg))
    prepare_data(cfg, meta)
    return cfg, Batches(cfg, meta, cfg.seed), cfg.eval_split


def zero_shot(cfg, meta, bos):
    """--eval_data (and --eval_file) -> Blocks of the set's text; bos: wrap as MDLM (else as SEDD)."""
    if cfg.eval_data not in EVAL_SETS:
        what = "--eval_file needs --eval_data=NAME (the set it holds)" if not cfg.eval_data else f"unknown --eval_data={cfg.eval_data!r}"
        die(f"{what}; use one of {', '.join(EVAL_SETS)}")
    if meta.get("tokenizer") != "gpt2":
        die(f"--eval_data needs a model with the GPT-2 tokenizer; this one uses {meta.get('tokenizer')!r}")
    rows = read_eval_file(cfg.eval_file, cfg.eval_data) if cfg.eval_file else download_rows(cfg.eval_data)
    detok, enc = EVAL_SETS[cfg.eval_data][4] or (lambda s: s), gpt2_encoding()
    docs = enc.encode_ordinary_batch([detok(r) for r in rows])  # threaded: arxiv is ~40M tokens
    eot = enc.eot_token
    return Blocks(wrap_blocks(docs, cfg.block_size, eot, eot if bos else None))
