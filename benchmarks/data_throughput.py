"""Data pipeline throughput: `prepare` vs sentencepiece's raw encode, and the training reader.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--copies 8] [--workers 2] [--seq-len 2048]
                                                          [--backend sentencepiece|hf-bpe]

Input: the bundled demo corpus (data/demo/corpus.jsonl, built by `loom data demo`) repeated --copies times.
`--backend hf-bpe` measures a byte-level BPE tokenizer.json (trained on the corpus by the `tokenizers` library,
4096 tokens) instead of the demo sentencepiece model: raw encode is then the library's own batch encode on
--workers threads (RAYON_NUM_THREADS), and the same prepare target applies.
1. raw encode: the tokenizer encodes every text of the input in one call on --workers threads (no reading, no
   packing, no writing): the ceiling for prepare on the same cores.
2. prepare: `loom data prepare` end to end (read, hash inputs, tokenize in --workers processes, pack, write
   shards, index, manifest). Target: prepare / raw encode >= 0.8.
3. reader: training batches (causal objective, micro-batch 8) of one rank from the prepared shards, with
   DataLoader workers 0 and 1. Target: >= 1M tokens/s per rank with one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.config.schema import DataConfig, ModelConfig  # noqa: E402
from framework.data.hf_tokenizer import train_bpe  # noqa: E402
from framework.data.prepare import prepare  # noqa: E402
from framework.data.source import build_data  # noqa: E402
from framework.data.tokenizer import Tokenizer  # noqa: E402

DEMO = Path("data/demo")


def raw_encode(texts: list[str], tokenizer: Tokenizer, threads: int) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = sum(map(len, tokenizer.encode_batch(texts, num_threads=threads)))
    return tokens, time.perf_counter() - start


def run_prepare(corpus: Path, out: Path, seq_len: int, workers: int, tokenizer: Path) -> tuple[int, float]:
    start = time.perf_counter()
    manifest = prepare([corpus], out, tokenizer, seq_len, workers=workers, progress=False)
    tokens = sum(split["tokens"] - split["documents"] for split in manifest["splits"].values())  # without eos
    return tokens, time.perf_counter() - start


def reader(out: Path, seq_len: int, num_workers: int, steps: int, tokenizer: Path) -> float:
    cfg = DataConfig(
        tokenizer=str(tokenizer),
        train=str(out),
        validation=None,
        seq_len=seq_len,
        num_workers=num_workers,
    )
    source = build_data(cfg, ModelConfig(vocab_size=4096))[0]
    stream = source.batches(8, 8)
    next(stream)  # workers started, first maps opened
    start = time.perf_counter()
    for _ in range(steps):
        next(stream)
    return steps * 8 * seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", choices=["sentencepiece", "hf-bpe"], default="sentencepiece")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(
        args.workers
    )  # the tokenizers library's thread pool, before first use
    lines = (DEMO / "corpus.jsonl").read_text(encoding="utf-8").splitlines() * args.copies
    texts = [json.loads(line)["text"] for line in lines]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tokenizer = DEMO / "tokenizer.model"
        if args.backend == "hf-bpe":
            tokenizer = Path(tmp) / "bpe"
            train_bpe(texts[: len(texts) // args.copies], tokenizer, 4096, 32)
        raw_tokens, raw_s = raw_encode(texts, Tokenizer(tokenizer), args.workers)
        prep_tokens, prep_s = run_prepare(corpus, Path(tmp) / "out", args.seq_len, args.workers, tokenizer)
        assert prep_tokens == raw_tokens, (prep_tokens, raw_tokens)
        mb = corpus.stat().st_size / 1e6
        print(f"input: {mb:.1f} MB, {raw_tokens:,} tokens; {args.workers} workers/threads")
        print(f"raw {args.backend} encode: {raw_tokens / raw_s / 1e6:.2f} M tokens/s ({raw_s:.1f} s)")
        print(f"prepare end to end:       {prep_tokens / prep_s / 1e6:.2f} M tokens/s ({prep_s:.1f} s)")
        print(f"ratio prepare / raw encode: {raw_s / prep_s:.2f} (target >= 0.8)")
        for workers in (0, 1):
            speed = reader(Path(tmp) / "out", args.seq_len, workers, args.steps, tokenizer)
            print(
                f"reader, num_workers={workers}, seq_len {args.seq_len}: {speed / 1e6:.2f} M tokens/s per rank"
            )


if __name__ == "__main__":
    main()
