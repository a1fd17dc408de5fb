"""
E2E NLG restaurant data (Novikova, Dusek and Rieser 2017; CC BY-SA 4.0) in Diffusion-LM's split
files src1_{train,valid,test}.txt, one `MR||text` per line. Word level (corpus.WordTokenizer),
words seen at least --min_count times in the training texts and MRs; the rest become <unk>.

Writes, into --out_dir (default data/e2e):
  train.bin, val.bin, test.bin,   every text as <s> w ... </s>, packed end to end (the language
  meta.json                       modelling view: Diffusion-LM cuts it into 64-token blocks)
  {train,valid,test}.jsonl        one example per line for sequence-to-sequence and control:
                                  {"mr": {field: value}, "src": ids of the MR, "text": ids,
                                   "ref": the text as space-separated words}

    python data/e2e/prepare.py                       # from the src1_*.txt.gz shipped beside it
    python data/e2e/prepare.py --input_dir DIR       # a folder holding src1_*.txt

The shipped src1_*.txt.gz are the three split files themselves (CC BY-SA 4.0; source, licence and
checksums in README.md here), so this works offline.
"""
import argparse
import io
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import corpus  # noqa: E402

URL = "https://raw.githubusercontent.com/XiangLi1999/Diffusion-LM/759889d58ef38e2eed41a8c34db8032e072826f4/datasets/e2e_data/{}"
SPLITS = ("train", "valid", "test")
HERE = os.path.dirname(os.path.abspath(__file__))
SHA256 = {"train": "eae319082237310913d9f37f6a891d48fb3f821f29d86870d2cb4f92ddd72c5a",
          "valid": "ba963113c8401d3d26216c0dc0a6dae1ea6ea927de3bf830e32c41f65401c80d",
          "test": "81b1bcd40c4f12845ec4eb61a77bf43765d112483cd9b2f91ef10bfc1b3d8f13"}


def read_split(input_dir, split):
    """The lines of src1_<split>.txt: --input_dir, else the shipped .gz, else $DIFFLM_DATA/e2e, else
    Diffusion-LM's copy."""
    name = f"src1_{split}.txt"
    if input_dir:
        path = os.path.join(input_dir, name)
        if not os.path.isfile(path):
            common.die(f"--input_dir {input_dir} has no {name}; point it at a folder with src1_train/valid/test.txt")
        return lines(corpus.read_utf8(path))
    data, source = corpus.find_local_copy(os.path.join("e2e", name), URL.format(name), SHA256[split],
                                          shipped=os.path.join(HERE, name + ".gz"))
    if data is None:
        common.die(f"no copy of the E2E data: {source}; run `python data/e2e/prepare.py --input_dir=DIR` (a folder with src1_*.txt) "
                   f"or set {common.SHARED_DATA_ENV} to a folder holding e2e/{name}")
    print(f"read {source}")
    return lines(data.decode("utf-8"))


def lines(text):
    r"""Split at \n, \r\n or \r only, as Diffusion-LM reads these files (str.splitlines also splits at U+2028)."""
    return io.StringIO(text, newline=None).read().split("\n")


def parse_line(line, where):
    """`k : v | k : v||text` -> ({k: v}, MR string, text)."""
    mr_text, sep, text = line.partition("||")
    if not sep:
        common.die(f"{where}: a line without '||' ({line[:60]!r}); expected Diffusion-LM's `MR||text` format")
    fields = {}
    for field in mr_text.split(" | "):
        key, colon, value = field.partition(" : ")
        if not colon:
            common.die(f"{where}: MR field {field!r} is not `key : value`")
        fields[key.strip()] = value.strip()
    return fields, mr_text.strip(), text.strip()


def main():
    ap = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input_dir", default="")
    ap.add_argument("--out_dir", default=HERE)
    ap.add_argument("--min_count", type=int, default=10)
    args = ap.parse_args()
    if args.min_count < 1:
        common.die("--min_count must be at least 1")
    rows = {s: [parse_line(l, f"src1_{s}.txt line {i + 1}") for i, l in enumerate(read_split(args.input_dir, s)) if l.strip()]
            for s in SPLITS}
    # MR words join the vocabulary so a source can be fed to the model (DiffusER's source bootstrap)
    tok = corpus.WordTokenizer.build([t for _, _, t in rows["train"]] + [m for _, m, _ in rows["train"]], args.min_count)
    streams, texts = {}, {}
    for split in SPLITS:
        stream, lines = [], []
        for fields, mr, text in rows[split]:
            ids = tok.encode(text)
            stream += [tok.START] + ids + [tok.END]
            lines.append(json.dumps({"mr": fields, "src": tok.encode(mr), "text": ids,
                                     "ref": " ".join(tok.split(text))}, ensure_ascii=False) + "\n")
        streams[split], texts[f"{split}.jsonl"] = stream, lines
    meta = corpus.write_split(args.out_dir, streams["train"], streams["valid"],
                              {"tokenizer": "word", "words": tok.words, "vocab_size": tok.vocab_size,
                               "min_count": args.min_count, "seq2seq": True,
                               "examples": {s: len(rows[s]) for s in SPLITS}},
                              test_ids=streams["test"], texts=texts)  # test.bin: --eval_split=test of the token files
    unk = sum(i == tok.UNK for i in streams["train"]) / len(streams["train"])
    print(f"{args.out_dir}: {len(rows['train']):,} / {len(rows['valid']):,} / {len(rows['test']):,} examples, "
          f"{meta['train_tokens']:,} train tokens, vocab {tok.vocab_size} (<unk> {unk:.2%} of train)")


if __name__ == "__main__":
    main()
