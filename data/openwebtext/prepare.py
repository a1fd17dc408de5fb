"""
OpenWebText (Gokaslan & Cohen 2019) in the GPT-2 BPE, as the SEDD and MDLM papers train on it:
each document's tokens (tiktoken `encode_ordinary`) followed by <|endoftext|> (50256), all
concatenated into train.bin / val.bin (uint16), nanoGPT-style. The validation split is the MDLM
code base's: the last 100,000 documents of the dataset's single `train` split; the rest is train.

    pip install datasets tqdm
    python data/openwebtext/prepare.py                        # the hub's openwebtext (~54 GB download)
    python data/openwebtext/prepare.py --input=DIR            # offline: parquet and/or jsonl files
    python data/openwebtext/prepare.py --input=a.parquet,b.jsonl --num_proc=16

Offline input has the openwebtext schema: one document per row in a string column `text`
(parquet) or one JSON object with a `text` field per line (jsonl). A directory means every
*.parquet and *.jsonl under it; files are read in sorted path order, so the hub's parquet
shards (train-00000-of-000NN.parquet, ...) give the hub's document order and the same split.

Restartable: the token files are written under .tmp names and renamed when complete, and
meta.json, which marks the folder complete, comes last; a run that finds a complete folder stops
(--force redoes it), one that finds an interrupted run's leftovers redoes it.
"""
import argparse
import collections
import contextlib
import ctypes
import glob
import json
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import corpus  # noqa: E402

HF_DATASET = "Skylion007/openwebtext"
VAL_DOCS = 100_000  # MDLM: load_dataset('openwebtext', split='train[-100000:]') is validation
EOT = corpus.GPT2_VOCAB - 1  # <|endoftext|>, after each document
DOCS_PER_TASK = 256  # documents tokenised per worker call
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------------
# Sources: (number of documents, a function yielding lists of document texts in order)


def parquet_source(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        common.die("reading parquet needs pyarrow: pip install pyarrow (or give jsonl files)")
    try:
        f = pq.ParquetFile(path)
    except Exception as e:
        common.die(f"{path} is not a readable parquet file ({type(e).__name__})")
    names = f.schema_arrow.names
    if "text" not in names:
        common.die(f"{path} has no `text` column (it has {', '.join(names[:5])}); openwebtext rows hold the document in `text`")

    def batches():
        row = 0
        for b in f.iter_batches(batch_size=DOCS_PER_TASK, columns=["text"]):
            texts = b.column(0).to_pylist()
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    common.die(f"{path} row {row + i}: `text` is {type(t).__name__}, not a string")
            row += len(texts)
            yield texts
    return f.metadata.num_rows, batches


def jsonl_source(path):
    def texts():
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first line
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    common.die(f"{path} line {n} is not JSON; jsonl input holds one object with a `text` field per line")
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    common.die(f"{path} line {n} has no string field `text`; openwebtext rows hold the document in `text`")
                yield doc["text"]

    try:
        count = sum(1 for _ in texts())  # also checks every line before anything is written
    except UnicodeDecodeError as e:
        common.die(f"{path} is not UTF-8 (byte offset {e.start} of a line)")

    def batches():
        batch = []
        for t in texts():
            batch.append(t)
            if len(batch) == DOCS_PER_TASK:
                yield batch
                batch = []
        if batch:
            yield batch
    return count, batches


def hub_source(name, num_proc, offline):
    """The dataset from the hub through `datasets`; offline names the command for local files."""
    corpus.hub_offline_unless_reachable()
    try:
        import datasets
    except ImportError:
        common.die("downloading OpenWebText needs the datasets package: pip install datasets "
                   f"(or run `{offline}` on local parquet/jsonl files)")
    try:
        ds = datasets.load_dataset(name, split="train", num_proc=num_proc)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        common.die(f"could not load {name} through datasets ({type(e).__name__}: {first}); "
                   f"offline, run `{offline}` on local parquet/jsonl files")
    return dataset_source(ds)


def dataset_source(ds):
    """A `datasets` Dataset with a `text` column -> (documents, batches)."""
    if "text" not in ds.column_names:
        common.die(f"the dataset has no `text` column (it has {', '.join(ds.column_names[:5])})")

    def batches():
        for i in range(0, len(ds), DOCS_PER_TASK):
            yield ds[i:i + DOCS_PER_TASK]["text"]
    return len(ds), batches


def local_files(spec):
    """--input=PATH[,PATH...] -> sorted parquet/jsonl files (a directory: everything under it)."""
    files = []
    for p in spec.split(","):
        if os.path.isdir(p):
            found = [f for ext in ("parquet", "jsonl") for f in glob.glob(os.path.join(p, "**", f"*.{ext}"), recursive=True)]
            if not found:
                common.die(f"--input={p} is a folder without .parquet or .jsonl files")
            files += found
        elif os.path.isfile(p):
            if not p.endswith((".parquet", ".jsonl")):
                common.die(f"--input={p}: give .parquet or .jsonl files (the openwebtext schema: a `text` column)")
            files.append(p)
        else:
            common.die(f"--input={p} does not exist")
    return sorted({os.path.realpath(f): f for f in files}.values())  # a file named twice (a folder and a file in it) once


def split_tasks(sources, n_val):
    """Yield (split, texts) in document order; the last n_val documents are "val"."""
    total = sum(n for n, _ in sources)
    n_train, seen = total - n_val, 0
    for _, batches in sources:
        for texts in batches():
            cut = min(len(texts), max(0, n_train - seen))
            if cut:
                yield "train", texts[:cut]
            if cut < len(texts):
                yield "val", texts[cut:]
            seen += len(texts)


# ----------------------------------------------------------------------------------------------
# Tokenising (in worker processes) and writing


_ENC = []


def tokenize(texts):
    """Texts -> their GPT-2 ids, each document followed by <|endoftext|>, as one uint16 array."""
    if not _ENC:
        _ENC.append(corpus.gpt2_encoding())
    ids = _ENC[0].encode_ordinary_batch(texts, num_threads=1)
    return np.fromiter((i for doc in ids for i in (*doc, EOT)), dtype=np.uint16, count=sum(map(len, ids)) + len(ids))


def complete(out_dir):
    """True when meta.json is there and both token files have the sizes it records."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        return all(os.path.getsize(os.path.join(out_dir, f"{s}.bin")) == 2 * meta[f"{s}_tokens"] for s in SPLITS)
    except (OSError, ValueError, KeyError):
        return False


def die_with_parent():
    """A worker's initializer: on Linux it is sent SIGTERM when the main process ends, however that ends (a
    scheduler's SIGTERM, kill -9), where it ran on as an orphan holding its share of the corpus."""
    with contextlib.suppress(Exception):  # elsewhere (no prctl) a worker ends when its queue closes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def write(out_dir, sources, n_val, num_proc, what):
    """The token files under temporary names, then meta.json out, the files renamed, the new meta.json in. A bad
    document, a full disk or Ctrl-C on the way removes the temporary files and leaves the folder as it was."""
    from tqdm import tqdm
    total, tokens = sum(n for n, _ in sources), dict.fromkeys(SPLITS, 0)
    bar = tqdm(total=total, unit="doc", desc="tokenising", disable=None)
    # the files close before a failure removes them
    with corpus.temporary_files(out_dir, [f"{s}.bin" for s in SPLITS]) as tmp, contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(open(tmp[f"{s}.bin"], "wb")) for s in SPLITS}

        def save(split, ids, docs):
            ids.tofile(files[split])
            tokens[split] += len(ids)
            bar.update(docs)

        if num_proc == 1:
            for split, texts in split_tasks(sources, n_val):
                save(split, tokenize(texts), len(texts))
        else:
            # a bounded window of tasks in flight, written back in submission order
            with ProcessPoolExecutor(num_proc, initializer=die_with_parent) as pool:
                pending = collections.deque()
                for split, texts in split_tasks(sources, n_val):
                    pending.append((split, pool.submit(tokenize, texts), len(texts)))
                    if len(pending) >= 4 * num_proc:
                        split_, fut, docs = pending.popleft()
                        save(split_, fut.result(), docs)
                while pending:
                    split_, fut, docs = pending.popleft()
                    save(split_, fut.result(), docs)
    bar.close()
    corpus.mark_unprepared(out_dir)  # meta.json goes just before the files it describes are replaced
    for name, path in tmp.items():
        os.replace(path, os.path.join(out_dir, name))
    meta = {"tokenizer": "gpt2", "vocab_size": EOT + 1, "eot": EOT, "dtype": "uint16", "source": what,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"], "train_docs": total - n_val, "val_docs": n_val,
            "command": corpus.rerun_command(),
            "files": {f"{s}.bin": corpus.file_record(os.path.join(out_dir, f"{s}.bin")) for s in SPLITS}}
    common.write_file(os.path.join(out_dir, "meta.json"), [json.dumps(meta)], "free disk space and run it again")
    return meta


def main():
    ap = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="", help="local parquet/jsonl files or folders, comma-separated (default: the hub)")
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--val_docs", type=int, default=VAL_DOCS, help="the last this many documents are validation")
    ap.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1), help="tokenising processes")
    ap.add_argument("--hf_dataset", default=HF_DATASET)
    ap.add_argument("--force", action="store_true", help="redo a complete preparation")
    args = ap.parse_args()
    if args.num_proc < 1:
        common.die(f"--num_proc={args.num_proc} must be at least 1")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        common.die(f"--out_dir={args.out_dir} is a file; name a folder")
    with corpus.data_lock(args.out_dir, "write.lock"):  # two runs into one folder: one prepares, then the other looks
        if complete(args.out_dir) and not args.force:
            print(f"{args.out_dir} is already prepared (meta.json and token files agree); --force redoes it")
            return
        leftovers = [f for f in os.listdir(args.out_dir) if f.endswith((".bin", ".tmp"))]
        if leftovers and not complete(args.out_dir):  # --force over a complete one just redoes it
            print(f"{args.out_dir} holds an incomplete preparation ({', '.join(sorted(leftovers))}): redoing it")
        if args.input:
            files = local_files(args.input)
            sources = [parquet_source(f) if f.endswith(".parquet") else jsonl_source(f) for f in files]
            what = f"{len(files)} local file(s)"
        else:
            default = os.path.abspath(args.out_dir) == os.path.dirname(os.path.abspath(__file__))
            offline = "python data/openwebtext/prepare.py --input=FILES" + ("" if default else f" --out_dir={args.out_dir}")
            sources, what = [hub_source(args.hf_dataset, args.num_proc, offline)], args.hf_dataset
        total = sum(n for n, _ in sources)
        if not 0 < args.val_docs < total:  # before anything in the folder is touched
            common.die(f"--val_docs={args.val_docs} must be between 1 and the {total:,} documents of {what} less one")
        corpus.gpt2_encoding()  # fail here, once, rather than in every worker
        meta = write(args.out_dir, sources, args.val_docs, args.num_proc, what)
    print(f"{args.out_dir}: {meta['train_tokens']:,} train tokens ({meta['train_docs']:,} documents) / "
          f"{meta['val_tokens']:,} val tokens ({meta['val_docs']:,} documents) from {what}")


if __name__ == "__main__":
    main()
