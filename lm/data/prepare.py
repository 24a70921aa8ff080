"""Tokenize a corpus once into ArrayRecord shards that training reads (source 'array_record').

    python -m lm.data.prepare --files 'corpus/*.txt' --output_dir data/train \\
        [--format text|jsonl] [--document file|block|line] [--text_field text] \\
        [--tokenizer byte|path] [--records_per_shard 100000] [--on_error raise|skip] \\
        [--no_bos] [--no_eos] [--num_workers N]

Writes output_dir/shard-00000.array_record, ... (one record = one document's token ids,
little-endian uint16 when the vocabulary fits, else int32) and output_dir/metadata.json:
{format, dtype, tokenizer (its metadata record, checked against data.tokenizer at training
time), num_records, num_tokens, shards, skipped (counts by kind), files, add_bos, add_eos}.
Records keep the order of the input, so the output is deterministic.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from typing import Sequence

import ml_collections
import numpy as np
from tqdm import tqdm

from lm.data.errors import BadRecord, DataError, ERROR_INDEX, check_policy, counts_to_dict, zero_counts
from lm.data.sources import TOKENS_METADATA, JsonlSource, TextSource
from lm.data.tokenizer import load_tokenizer

FORMAT = 'lm.tokens.v1'
_worker_state = {}


def _encode(source, dtype, on_error: str, index: int):
    """-> record bytes, or (kind, message) for a skipped record."""
    try:
        return source.document(index)['tokens'].astype(dtype).tobytes()
    except BadRecord as e:
        if on_error == 'raise':
            raise DataError(f"{e} (pass --on_error skip to skip and count such records)") from None
        return (e.kind, str(e))


def _init_worker(source, dtype, on_error):
    _worker_state.update(source=source, dtype=dtype, on_error=on_error)


def _encode_in_worker(index: int):
    s = _worker_state
    return _encode(s['source'], s['dtype'], s['on_error'], index)


def build_text_source(files, *, fmt: str, document: str, text_field: str, tokenizer,
                      add_bos: bool, add_eos: bool):
    """A TextSource / JsonlSource over all records of `files` (no valid hold-out)."""
    cfg = ml_collections.ConfigDict(dict(train_files=files, valid_files='', document=document,
                                         text_field=text_field))
    cls = {'text': TextSource, 'jsonl': JsonlSource}[fmt]
    return cls(cfg, 'train', tokenizer, add_bos=add_bos, add_eos=add_eos, valid_fraction=0.0)


def prepare(files, output_dir: str, *, fmt: str = 'text', document: str = 'file',
            text_field: str = 'text', tokenizer: str = 'byte', records_per_shard: int = 100_000,
            on_error: str = 'raise', add_bos: bool = True, add_eos: bool = True,
            num_workers: int = 0, progress: bool = True) -> dict:
    """Tokenizes `files` into shards under `output_dir`; returns the metadata written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    check_policy(on_error)
    tok = load_tokenizer(tokenizer)
    source = build_text_source(files, fmt=fmt, document=document, text_field=text_field,
                               tokenizer=tok, add_bos=add_bos, add_eos=add_eos)
    dtype = np.dtype('<u2') if tok.vocab_size <= 1 << 16 else np.dtype('<i4')
    os.makedirs(output_dir, exist_ok=True)
    indices = range(len(source))
    if num_workers > 0:
        pool = multiprocessing.get_context('spawn').Pool(
            num_workers, initializer=_init_worker, initargs=(source, dtype, on_error))
        results = pool.imap(_encode_in_worker, indices, chunksize=256)
    else:
        pool = None
        results = (_encode(source, dtype, on_error, i) for i in indices)
    shards, writer, in_shard, num_records, num_tokens = [], None, 0, 0, 0
    skipped = zero_counts()
    try:
        for result in tqdm(results, total=len(source), desc='tokenizing', unit='doc',
                           disable=not progress):
            if isinstance(result, tuple):
                skipped[ERROR_INDEX[result[0]]] += 1
                tqdm.write(f'skipped: {result[1]}')
                continue
            if writer is None or in_shard == records_per_shard:
                if writer is not None:
                    writer.close()
                shards.append(f'shard-{len(shards):05d}.array_record')
                writer = ArrayRecordWriter(os.path.join(output_dir, shards[-1]), 'group_size:1')
                in_shard = 0
            writer.write(result)
            in_shard += 1
            num_records += 1
            num_tokens += len(result) // dtype.itemsize
    finally:
        if writer is not None:
            writer.close()
        if pool is not None:
            pool.terminate()
    metadata = {
        'format': FORMAT, 'dtype': dtype.str, 'tokenizer': tok.metadata(),
        'num_records': num_records, 'num_tokens': num_tokens, 'shards': shards,
        'skipped': counts_to_dict(skipped), 'files': list(source.paths),
        'add_bos': add_bos, 'add_eos': add_eos,
    }
    with open(os.path.join(output_dir, TOKENS_METADATA), 'w') as f:
        json.dump(metadata, f, indent=2)
    return metadata


def main(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(prog='python -m lm.data.prepare', description=__doc__.split('\n')[0])
    p.add_argument('--files', required=True, nargs='+', help='globs of input files')
    p.add_argument('--output_dir', required=True)
    p.add_argument('--format', default='text', choices=('text', 'jsonl'))
    p.add_argument('--document', default='file', choices=('file', 'block', 'line'),
                   help='text format: a document per file, blank-line block, or line')
    p.add_argument('--text_field', default='text', help='jsonl format: key of the text')
    p.add_argument('--tokenizer', default='byte', help="'byte', tokenizer.json or .model")
    p.add_argument('--records_per_shard', type=int, default=100_000)
    p.add_argument('--on_error', default='raise', choices=('raise', 'skip'))
    p.add_argument('--no_bos', action='store_true', help='do not put <|bos|> before documents')
    p.add_argument('--no_eos', action='store_true', help='do not put <|eos|> after documents')
    p.add_argument('--num_workers', type=int, default=0, help='tokenizer processes')
    args = p.parse_args(argv)
    meta = prepare(','.join(args.files), args.output_dir, fmt=args.format, document=args.document,
                   text_field=args.text_field, tokenizer=args.tokenizer,
                   records_per_shard=args.records_per_shard, on_error=args.on_error,
                   add_bos=not args.no_bos, add_eos=not args.no_eos, num_workers=args.num_workers)
    skipped = sum(meta['skipped'].values())
    print(f"wrote {meta['num_records']} documents, {meta['num_tokens']} tokens in "
          f"{len(meta['shards'])} shard(s) to {args.output_dir}; skipped {skipped} "
          f"{meta['skipped'] if skipped else ''}")


if __name__ == '__main__':
    main()
