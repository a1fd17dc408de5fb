r"""
Your own text as a dataset: one or more UTF-8 files -> data/NAME/ (train.bin, val.bin, meta.json),
after which mdlm.py, sedd.py and ar.py take --dataset=NAME (diffusion_lm.py words, with --rows=false).

    python data/text/prepare.py --input=FILE [--input=FILE2 ...] --name=NAME
                                [--tokenizer=char|word|gpt2] [--val_fraction=0.1] [--force]

Each file is split on its own: its first 1 - val_fraction characters go to train, the rest to val,
so every file is represented in both; the cut moves on to the next white space, so no word is split.
Line ends are newlines whatever the file uses (\r\n or \r read as \n, as Python's text mode reads them).
Tokenizers:
  char  every character that occurs in the files (as shakespeare_char)
  word  words and punctuation seen at least --min_count times in train; the rest become <unk> (the
        summary line gives their share of each split)
  gpt2  GPT-2 BPE (tiktoken); an end-of-text token separates the files (and "<|endoftext|>" written
        in a text is that token)
An existing dataset folder is replaced only with --force. The whole text is held in memory (as
Python ints while encoding), which suits texts up to about 100 MB; larger corpora want a streaming
prepare.py of their own (see data/openwebtext).
"""
import argparse
import os
import re
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import common  # noqa: E402
import corpus  # noqa: E402

DATA = os.path.dirname(HERE)


def out_dir_for(args):
    """data/NAME (or --out_dir), refused when it would overwrite a dataset without --force."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        common.die(f"--name={args.name!r}: use letters, digits, '_', '.' and '-' (it becomes data/NAME and --dataset=NAME)")
    if os.path.isfile(os.path.join(DATA, args.name, "prepare.py")):
        common.die(f"--name={args.name} is a built-in dataset (data/{args.name}/prepare.py); choose another name")
    out = args.out_dir or os.path.join(DATA, args.name)
    if os.path.isfile(os.path.join(out, "prepare.py")):  # data/shakespeare_char: the default runs would train on this text
        common.die(f"--out_dir={out} is the folder of a dataset's prepare.py; choose another --out_dir")
    written = ("meta.json",) + corpus.SPLIT_FILES + corpus.FOLDER_FILES  # what the prepare writes, or removes
    taken = [f for f in written if os.path.exists(os.path.join(out, f))]
    if taken and not args.force:
        common.die(f"{out} already holds a dataset ({', '.join(taken)}); pass --force to replace it or pick another --name")
    return out


def main():
    ap = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True, help="a UTF-8 text file (repeat for several)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--tokenizer", choices=("char", "word", "gpt2"), default="char")
    ap.add_argument("--val_fraction", type=float, default=0.1)
    ap.add_argument("--min_count", type=int, default=1, help="word tokenizer: keep words seen this often")
    ap.add_argument("--out_dir", default="", help="default data/NAME")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if not 0 < args.val_fraction < 1:
        common.die(f"--val_fraction={args.val_fraction} must be between 0 and 1")
    if args.min_count < 1:
        common.die("--min_count must be at least 1")
    out = out_dir_for(args)
    texts = [corpus.read_utf8(p) for p in args.input]
    cuts = [int((1 - args.val_fraction) * len(t)) for t in texts]
    cuts = [m.start() if (m := re.compile(r"\s").search(t, n)) else n for t, n in zip(texts, cuts)]  # not inside a word
    train, val = [t[:n] for t, n in zip(texts, cuts)], [t[n:] for t, n in zip(texts, cuts)]
    if args.tokenizer == "char":
        tok = corpus.CharTokenizer(sorted(set("".join(texts))))
        meta = {"tokenizer": "char", "chars": tok.chars}
        encode = lambda parts: [i for p in parts for i in tok.encode(p)]  # noqa: E731
    elif args.tokenizer == "word":
        tok = corpus.WordTokenizer.build(train, args.min_count)
        meta = {"tokenizer": "word", "words": tok.words, "min_count": args.min_count}
        encode = lambda parts: [i for p in parts for i in tok.encode(p)]  # noqa: E731
    else:
        tok = corpus.GPT2Tokenizer()
        meta = {"tokenizer": "gpt2", "eot": tok.enc.eot_token}
        encode = lambda parts: [i for k, p in enumerate(parts) for i in [tok.enc.eot_token] * (k > 0) + tok.encode(p)]  # noqa: E731
    inputs = [os.path.abspath(p) for p in args.input]
    again = [os.path.abspath(__file__)] + [f"--input={p}" for p in inputs] + [
        f"--name={args.name}", f"--tokenizer={args.tokenizer}", f"--val_fraction={args.val_fraction}",
        f"--min_count={args.min_count}", f"--out_dir={os.path.abspath(out)}", "--force"]
    sources = [corpus.file_record(p) for p in inputs]  # what check_sources compares the inputs with later
    meta.update(vocab_size=tok.vocab_size, inputs=inputs, sources=sources, command="python " + shlex.join(again))
    ids = encode(train), encode(val)
    meta = corpus.write_split(out, *ids, meta)
    unk = "" if args.tokenizer != "word" else " (<unk> is {:.1%} of train, {:.1%} of val)".format(
        *(i.count(tok.UNK) / len(i) for i in ids))  # what --min_count costs
    print(f"{out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, {args.tokenizer} vocabulary "
          f"of {tok.vocab_size:,}{unk}; train with --dataset={args.name}" + (f" --data_dir={out}" if args.out_dir else ""))


if __name__ == "__main__":
    main()
