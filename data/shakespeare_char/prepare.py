"""
Tiny Shakespeare at character level (nanoGPT's shakespeare_char): 90/10 split by characters,
1,003,854 train / 111,540 val characters, a vocabulary of 65.

    python data/shakespeare_char/prepare.py                 # from input.txt.gz, shipped beside it
    python data/shakespeare_char/prepare.py --input FILE    # another copy of input.txt

input.txt.gz is the corpus itself (public domain; source and checksum in README.md here), so this
works offline; shakespeare/ and shakespeare_word/ read it through load_text too.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import corpus  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "input.txt.gz")
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def load_text(input_path):
    """The corpus text: --input, else the shipped input.txt.gz, else $DIFFLM_DATA, else the public URL."""
    if input_path:
        return corpus.read_utf8(input_path)
    data, source = corpus.find_local_copy("tinyshakespeare.txt", URL, SHA256, shipped=SHIPPED)
    if data is None:
        common.die(f"no copy of tiny Shakespeare: {source}; run `python data/shakespeare_char/prepare.py --input=path/to/input.txt` "
                   f"or set {common.SHARED_DATA_ENV} to a folder holding tinyshakespeare.txt")
    print(f"read {source}")
    return data.decode("utf-8")


def main():
    ap = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="")
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    text = load_text(args.input)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(0.9 * len(text))
    meta = corpus.write_split(args.out_dir, [stoi[c] for c in text[:n]], [stoi[c] for c in text[n:]],
                              {"tokenizer": "char", "chars": chars, "vocab_size": len(chars)})
    print(f"{args.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val characters, vocab {len(chars)}")


if __name__ == "__main__":
    main()
