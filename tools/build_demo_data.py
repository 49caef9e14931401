"""Build the bundled demo corpus (stdlib docstrings), its SentencePiece tokenizer and packed token files.

    python tools/build_demo_data.py [--out data/demo] [--vocab-size 4096] [--model-type bpe]

Re-running with the same settings is a no-op once the build has finished (manifest.json is written last).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Runnable as a plain script from a checkout: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.data.demo import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE, build_demo_data  # noqa: E402
from framework.data.tokenizer import DEFAULT_NUM_SENTINELS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokenizer vocabulary size"
    )
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece model")
    parser.add_argument("--sentinels", type=int, default=DEFAULT_NUM_SENTINELS, help="T5 <extra_id_N> pieces")
    parser.add_argument(
        "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="share of documents held out"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for tokenizer training and encoding")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    manifest = build_demo_data(
        args.out,
        args.vocab_size,
        model_type=args.model_type,
        num_sentinels=args.sentinels,
        val_fraction=args.val_fraction,
        num_threads=args.threads,
    )
    seconds = time.perf_counter() - start
    docs, tokens = manifest["documents"], manifest["tokens"]
    print(
        f"{args.out}: {manifest['text_bytes'] / 1e6:.2f} MB of text, vocab {manifest['params']['vocab_size']}, "
        f"train {docs['train']} docs / {tokens['train']} tokens, val {docs['val']} docs / {tokens['val']} tokens "
        f"({seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
