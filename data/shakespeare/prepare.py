"""
Tiny Shakespeare with the GPT-2 BPE (tiktoken, `encode_ordinary`): 90/10 split by characters,
301,966 train / 36,059 val tokens. Works offline when $DIFFLM_DATA has gpt2/vocab.bpe and
gpt2/encoder.json (and tinyshakespeare.txt, unless --input is given).

    python data/shakespeare/prepare.py [--input FILE]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shakespeare_char"))
import common  # noqa: E402
from prepare import load_text  # noqa: E402  (the shared downloader of the char dataset)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="")
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    text = load_text(args.input)
    enc = common.gpt2_encoding()
    n = int(0.9 * len(text))
    meta = common.write_split(args.out_dir, enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:]),
                              {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot": enc.eot_token})
    print(f"{args.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {enc.n_vocab}")


if __name__ == "__main__":
    main()
