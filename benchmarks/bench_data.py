"""Data pipeline throughput (tokens/s into [B, T] batches), printed as a Markdown table.

    python benchmarks/bench_data.py [--batch_size 16 --seq_len 1024 --seconds 5]
                                    [--num_workers 0] [--train_tokens_per_s 250000]

Rows: the byte and a BPE tokenizer (trained here on generated text) on a JSONL source, each
with concat and first_fit packing; the same corpus pre-tokenized into ArrayRecord shards
(lm.data.prepare); the synthetic Markov and arithmetic-chat sources. `tokens/s` counts every [B, T] slot the
train step consumes; `real` is the fraction of slots holding a document (not padding).
With --train_tokens_per_s (what the train step consumes, from the trainer's benchmark) the
table adds the ratio pipeline / train step; the target is >= 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import lm.data as D  # noqa: E402
from configs.data import data_config  # noqa: E402
from lm.data import prepare, tokenizer  # noqa: E402


def generate_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """Zipf-distributed made-up words, some Japanese, documents of 50..3000 words."""
    rng = np.random.default_rng(seed)
    syllables = ['ka', 'to', 'ri', 'mo', 'sun', 'el', 'qua', 'an', 'de', 'ly', 'th', 'or']
    words = [''.join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(5000)]
    words += ['日本語', 'テキスト', '東京', 'データ']
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(50, 3000))
        docs.append(' '.join(rng.choice(words, size=n, p=p)) + '.')
    return docs


def measure(cfg, batch_size: int, seq_len: int, seconds: float) -> tuple[float, float]:
    """(slot tokens per second, fraction of non-padding slots), steady state: after one warm-up
    batch, batches are drawn for at least `seconds` (many document groups are read)."""
    it = D.build_iterator(cfg, split='train', batch_size=batch_size, seq_len=seq_len, seed=0)
    try:
        next(it)
        real, batches = 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or batches < 3:
            real += int((next(it)['segment_ids'] > 0).sum())
            batches += 1
        elapsed = time.perf_counter() - start
    finally:
        it.close()
    return batches * batch_size * seq_len / elapsed, real / (batches * batch_size * seq_len)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--seq_len', type=int, default=1024)
    p.add_argument('--seconds', type=float, default=5.0, help='measuring time per row')
    p.add_argument('--docs', type=int, default=1000, help='generated documents')
    p.add_argument('--bpe_vocab', type=int, default=4096)
    p.add_argument('--num_workers', type=int, default=0, help='data.num_workers for every row')
    p.add_argument('--read_threads', type=int, default=0, help='data.read_threads for every row')
    p.add_argument('--train_tokens_per_s', type=float, default=0.0,
                   help='tokens/s the train step consumes; adds the ratio column')
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        docs = generate_corpus(args.docs)
        corpus = os.path.join(tmp, 'corpus.jsonl')
        with open(corpus, 'w', encoding='utf-8') as f:
            for d in docs:
                f.write(json.dumps({'text': d}, ensure_ascii=False) + '\n')
        t0 = time.perf_counter()
        bpe_path = tokenizer.train_bpe(None, args.bpe_vocab, os.path.join(tmp, 'bpe'), texts=docs,
                                       show_progress=False)
        bpe_train_s = time.perf_counter() - t0
        bpe = tokenizer.load_tokenizer(bpe_path)
        sample = docs[0]
        compression = len(sample.encode()) / len(bpe.encode(sample))
        prepared = os.path.join(tmp, 'shards')
        prepare.prepare(corpus, prepared, fmt='jsonl', tokenizer=bpe_path, progress=False)

        def config(source, tok='byte', packing='concat'):
            cfg = data_config()
            cfg.source, cfg.tokenizer, cfg.packing = source, tok, packing
            cfg.num_workers, cfg.read_threads, cfg.valid_fraction = args.num_workers, args.read_threads, 0.0
            cfg.jsonl.train_files = corpus
            cfg.array_record.train_files = prepared
            return cfg

        rows = [
            ('jsonl', 'byte', 'concat', config('jsonl')),
            ('jsonl', 'byte', 'first_fit', config('jsonl', packing='first_fit')),
            ('jsonl', f'BPE {bpe.vocab_size}', 'concat', config('jsonl', bpe_path)),
            ('jsonl', f'BPE {bpe.vocab_size}', 'first_fit', config('jsonl', bpe_path, 'first_fit')),
            ('array_record (prepared)', f'BPE {bpe.vocab_size}', 'concat', config('array_record', bpe_path)),
            ('markov', 'byte', 'concat', config('markov')),
            ('arithmetic_chat', 'byte', 'first_fit', config('arithmetic_chat', packing='first_fit')),
        ]
        header = ['source', 'tokenizer', 'packing', 'tokens/s', 'real']
        if args.train_tokens_per_s:
            header.append('× train step')
        print(f'B={args.batch_size} T={args.seq_len}, {args.seconds:g} s per row, '
              f'num_workers={args.num_workers}, read_threads={args.read_threads}; '
              f'{args.docs} generated documents; BPE trained in {bpe_train_s:.1f} s, '
              f'{compression:.2f} bytes/token\n')
        print('| ' + ' | '.join(header) + ' |')
        print('|' + '|'.join('---' for _ in header) + '|')
        for source, tok_name, packing, cfg in rows:
            rate, real = measure(cfg, args.batch_size, args.seq_len, args.seconds)
            cells = [source, tok_name, packing, f'{rate:,.0f}', f'{real:.3f}']
            if args.train_tokens_per_s:
                cells.append(f'{rate / args.train_tokens_per_s:.1f}×')
            print('| ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
