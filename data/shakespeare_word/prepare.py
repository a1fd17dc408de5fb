"""
Tiny Shakespeare at word level (corpus.WordTokenizer: words and punctuation), for the methods
that work on words (DiffusER's unconditional generation). 90/10 split by characters as in
shakespeare_char; the vocabulary is the words seen at least --min_count times in train.

    python data/shakespeare_word/prepare.py [--input FILE] [--min_count N]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shakespeare_char"))
import common  # noqa: E402
import corpus  # noqa: E402
from prepare import load_text  # noqa: E402  (reads the shipped corpus)


def main():
    ap = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="")
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--min_count", type=int, default=5)
    args = ap.parse_args()
    if args.min_count < 1:
        common.die("--min_count must be at least 1")
    text = load_text(args.input)
    n = int(0.9 * len(text))
    tok = corpus.WordTokenizer.build([text[:n]], args.min_count)
    train, val = tok.encode(text[:n]), tok.encode(text[n:])
    meta = corpus.write_split(args.out_dir, train, val, {"tokenizer": "word", "words": tok.words,
                                                         "vocab_size": tok.vocab_size, "min_count": args.min_count})
    unk = sum(i == tok.UNK for i in train) / len(train)
    print(f"{args.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val words, vocab {tok.vocab_size} (<unk> {unk:.2%})")


if __name__ == "__main__":
    main()
