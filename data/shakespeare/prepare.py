"""
Tiny Shakespeare with the GPT-2 BPE (tiktoken, `encode_ordinary`): 90/10 split by characters,
301,966 train / 36,059 val tokens. The text is shipped (data/shakespeare_char/input.txt.gz); the
BPE files are not: tiktoken downloads them, or offline $DIFFLM_DATA/gpt2/ must hold vocab.bpe and
encoder.json.

    python data/shakespeare/prepare.py [--input FILE]
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
    args = ap.parse_args()
    text = load_text(args.input)
    enc = corpus.gpt2_encoding()
    n = int(0.9 * len(text))
    meta = corpus.write_split(args.out_dir, enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:]),
                              {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot": enc.eot_token})
    print(f"{args.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {enc.n_vocab}")


if __name__ == "__main__":
    main()
