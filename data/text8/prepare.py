"""
text8 (Mahoney 2006): the first 100,000,000 characters of a cleaned English Wikipedia dump, 27
symbols (a-z and space). The split of the D3PM, SEDD and MDLM papers: the first 90M characters
train, the next 5M validation, the last 5M test, written as train.bin / val.bin / test.bin.

    python data/text8/prepare.py                     # $DIFFLM_DATA/text8.zip, else download it from
                                                     # http://mattmahoney.net/dc/text8.zip
    python data/text8/prepare.py --input=text8.zip   # offline: the zip, or the extracted text8 file

Evaluation as in those papers: --block_size=256 and --eval, which reads the split as consecutive
non-overlapping 256-character windows (the remainder is dropped), on the test split with
--eval_split=test; a char token is a character, so bits per token are bits per character.

Your own file in text8's format: --sha256=<its sha256> --split=TRAIN,VAL,TEST (characters).
"""
import argparse
import hashlib
import io
import os
import sys
import zipfile
import zlib

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import corpus  # noqa: E402

URL = "http://mattmahoney.net/dc/text8.zip"
SHA256 = "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"  # of the extracted 100M bytes
SPLIT = "90000000,5000000,5000000"
CHARS = " abcdefghijklmnopqrstuvwxyz"  # id = position: space 0, a 1, ..., z 26


def read_input(path):
    """(the raw text8 bytes, where they came from): --input (a zip holding `text8`, or the file itself),
    else a local copy or a download."""
    if not path:
        data, source = corpus.find_local_copy("text8.zip", URL)
        if data is None:
            common.die(f"no copy of text8: {source}; download {URL} elsewhere and run "
                       "`python data/text8/prepare.py --input=path/to/text8.zip`")
        print(f"read {source}")
    else:
        if not os.path.isfile(path):
            common.die(f"--input={path} {'is a folder' if os.path.isdir(path) else 'does not exist'}; "
                       "pass text8.zip or the extracted text8 file")
        with open(path, "rb") as f:
            data = f.read()
        source = path
    if data[:4] == b"PK\x03\x04":  # a zip archive
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                if "text8" not in z.namelist():
                    common.die(f"{source} is a zip without a member named text8 (it holds {z.namelist()[:3]})")
                data = z.read("text8")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:  # cut short, or damaged inside
            common.die(f"{source} is a damaged zip archive ({e}); download {URL} again")
    return data, source


def encode(data, source):
    """bytes -> ids (N,) uint8; dies at the first byte that is not a-z or space."""
    lut = np.full(256, 255, dtype=np.uint8)
    for i, c in enumerate(CHARS):
        lut[ord(c)] = i
    ids = lut[np.frombuffer(data, dtype=np.uint8)]
    bad = np.flatnonzero(ids == 255)
    if bad.size:
        at = int(bad[0])
        common.die(f"{source} is not in text8 format: byte {data[at:at + 1]!r} at offset {at} is not a-z or space "
                   f"({bad.size:,} such bytes)")
    return ids


def parse_split(split, n, source):
    try:
        sizes = [int(s) for s in split.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) <= 0:
        common.die(f"--split={split} must be three positive character counts TRAIN,VAL,TEST")
    if sum(sizes) != n:
        common.die(f"--split={split} adds up to {sum(sizes):,} characters but {source} has {n:,}; "
                   f"give sizes that add up to its length")
    return sizes


def main():
    ap = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="", help="text8.zip or the extracted text8 (default: download)")
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--sha256", default=SHA256, help="expected sha256 of the extracted text")
    ap.add_argument("--split", default=SPLIT, help="train,val,test sizes in characters")
    args = ap.parse_args()
    data, source = read_input(args.input)
    ids = encode(data, source)
    digest = hashlib.sha256(data).hexdigest()
    if digest != args.sha256:
        common.die(f"{source} has sha256 {digest}, not the standard text8's {args.sha256}; "
                   f"for your own text8-format file pass --sha256={digest} and --split")
    n_train, n_val, n_test = parse_split(args.split, len(ids), source)

    meta_path = os.path.join(args.out_dir, "meta.json")
    leftovers = [f for f in ("train.bin", "val.bin", "test.bin") if os.path.exists(os.path.join(args.out_dir, f))]
    if leftovers and not os.path.exists(meta_path):
        print(f"{args.out_dir} holds an incomplete preparation ({', '.join(leftovers)}, no meta.json): redoing it")
    meta = corpus.write_split(args.out_dir, ids[:n_train], ids[n_train:n_train + n_val],
                              {"tokenizer": "char", "chars": list(CHARS), "vocab_size": len(CHARS), "source_sha256": digest},
                              test_ids=ids[n_train + n_val:])
    print(f"{args.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val / {n_test:,} test characters, "
          f"vocab {len(CHARS)}")


if __name__ == "__main__":
    main()
