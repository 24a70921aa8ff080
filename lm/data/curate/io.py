"""Reading JSONL (plain or .gz) and Parquet documents, and writing sharded JSONL, in Beam.

A document travels through the pipeline as a dict:
  key     int, (file rank << 40) | line: unique, and its order is the input order
  id      the record's id field, or '<file relative to the input root>:<line>'
  loc     '<file>:<line>' (Parquet: the row, from 1) for reports
  text    the text (the record's text field)
  record  the record as read, its text field set to None (kept in its place for the output)
  meta    what stages add: lang, lang_score, pii counts
  bad_utf8  True when the text held bytes that are not UTF-8 (escaped as lone surrogates)

Bad input never stops the pipeline: a malformed line, a missing or non-string text field, an empty
text, a blank line or an unreadable file becomes an element of the 'removed' output, tagged
('input', kind, stub), and is counted and sampled like any removal.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from lm.data.curate.normalize import has_invalid_utf8, repair_utf8

LINE_BITS = 40


def expand_inputs(globs: list[str]) -> list[str]:
    """Sorted, distinct files matched by `globs`; a glob matching nothing is an error."""
    paths = []
    for pattern in globs:
        metadata = FileSystems.match([pattern])[0].metadata_list
        if not metadata:
            raise ValueError(f"--input '{pattern}' matches no file")
        paths += [m.path for m in metadata]
    paths = sorted(set(paths))
    if len(paths) >= 1 << (63 - LINE_BITS):
        raise ValueError(f'{len(paths)} input files: at most {1 << (63 - LINE_BITS)}')
    return paths


def relative_names(paths: list[str]) -> list[str]:
    """Each path relative to the deepest directory holding them all (stable ids across machines)."""
    root = os.path.commonprefix(paths)
    root = root[:root.rfind('/') + 1]
    return [p[len(root):] for p in paths]


def _stub(key, loc, text, **extra):
    return dict(key=key, id=loc, loc=loc, text=repair_utf8(text), record={}, meta={}, **extra)


def repair_value(value):
    """`value` (a JSON value) with every string's lone surrogates repaired (normalize.repair_utf8)."""
    if isinstance(value, str):
        return repair_utf8(value)
    if isinstance(value, dict):
        return {repair_utf8(k): repair_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repair_value(v) for v in value]
    return value


class ReadFile(beam.DoFn):
    """(rank, path, name) -> documents; bad records -> TaggedOutput('removed', ('input', kind, stub)),
    documents with invalid UTF-8 also -> TaggedOutput('flagged', ('input', 'invalid_utf8', stub)),
    the file's document count -> TaggedOutput('stats', ('input/documents', n))."""

    def __init__(self, input_cfg: dict):
        self.cfg = input_cfg

    def process(self, element):
        rank, path, name = element
        fmt = self.cfg['format']
        if fmt == 'auto':
            fmt = 'parquet' if path.endswith('.parquet') else 'jsonl'
        line = documents = 0
        try:
            reader = self._parquet_rows if fmt == 'parquet' else self._jsonl_rows
            for line, item in reader(path):
                for out in self._document(rank, name, line, item):
                    documents += isinstance(out, dict)
                    yield out
        except Exception as e:  # an unreadable file (or the rest of it) is counted, never a crash
            loc = f'{name}:{line + 1}'
            yield beam.pvalue.TaggedOutput('removed', ('input', 'unreadable_file', _stub(
                (rank << LINE_BITS) | (line + 1), loc, f'{type(e).__name__}: {e}')))
        yield beam.pvalue.TaggedOutput('stats', ('input/documents', documents))

    def _jsonl_rows(self, path):
        f = FileSystems.open(path)  # compression from the extension (.gz, .bz2, ...)
        try:
            line = 0
            while True:
                raw = f.readline()
                if not raw:
                    return
                line += 1
                yield line, raw
        finally:
            f.close()

    def _parquet_rows(self, path):
        import pyarrow.parquet as pq

        with FileSystems.open(path, compression_type='uncompressed') as f:
            parquet = pq.ParquetFile(f)  # reads the footer, then one row group at a time
            row = 0
            for batch in parquet.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record

    def _document(self, rank, name, line, item):
        key = (rank << LINE_BITS) | line
        loc = f'{name}:{line}'
        bad_utf8 = False
        if isinstance(item, bytes):
            item = item.rstrip(b'\r\n')
            try:
                raw = item.decode('utf-8')
            except UnicodeDecodeError:
                raw, bad_utf8 = item.decode('utf-8', 'surrogateescape'), True
            if not raw.strip():
                yield beam.pvalue.TaggedOutput('removed', ('input', 'blank_line', _stub(key, loc, raw)))
                return
            try:
                record = json.loads(raw)
            except ValueError as e:
                yield beam.pvalue.TaggedOutput('removed', ('input', 'malformed_json', _stub(key, loc, raw[:2000], error=repair_utf8(str(e)))))
                return
        else:
            raw, record = None, item
        if not isinstance(record, dict):
            yield beam.pvalue.TaggedOutput('removed', ('input', 'not_an_object', _stub(key, loc, str(raw)[:2000])))
            return
        field = self.cfg['text_field']
        if field not in record:
            yield beam.pvalue.TaggedOutput('removed', ('input', 'missing_text_field', _stub(key, loc, str(raw or record)[:2000])))
            return
        text = record[field]
        if not isinstance(text, str):
            yield beam.pvalue.TaggedOutput('removed', ('input', 'text_not_a_string', _stub(key, loc, str(raw or record)[:2000])))
            return
        if not text.strip():
            yield beam.pvalue.TaggedOutput('removed', ('input', 'empty_document', _stub(key, loc, text)))
            return
        if bad_utf8 or has_invalid_utf8(raw or ''):
            # Beam cannot carry lone surrogates: every string is repaired here (escaped bytes
            # decoded as cp1252, others U+FFFD); the flag lets the normalize stage count or drop it
            bad_utf8 = has_invalid_utf8(text)
            record = repair_value(record)
            text = record[field]
        doc_id = record.get(self.cfg['id_field'])
        doc_id = str(doc_id) if isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool) else loc
        record[field] = None
        doc = dict(key=key, id=doc_id, loc=loc, text=text, record=record, meta={}, bad_utf8=bad_utf8)
        if bad_utf8:
            yield beam.pvalue.TaggedOutput('flagged', ('input', 'invalid_utf8', doc))
        yield doc


def to_record(doc: dict, input_cfg: dict, metadata_field: str) -> dict:
    """The output record: the input record with its text, id and the stages' metadata."""
    record = dict(doc['record'])
    id_field = input_cfg['id_field']
    if id_field not in record:
        record = {id_field: doc['id'], **record}
    record[input_cfg['text_field']] = doc['text']
    if metadata_field and doc['meta']:
        record[metadata_field] = doc['meta']
    return record


def dumps(record: dict) -> bytes:
    """One JSON line, UTF-8; text that still holds lone surrogates (invalid UTF-8 kept as read)
    is written with \\u escapes instead of failing."""
    line = json.dumps(record, ensure_ascii=False, default=str)
    try:
        return line.encode('utf-8') + b'\n'
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True, default=str).encode('ascii') + b'\n'


def shard_of(key: int, num_shards: int) -> int:
    return zlib.crc32(key.to_bytes(8, 'little')) % num_shards


def shard_path(output: str, shard: int, num_shards: int, compression: str) -> str:
    ext = '.jsonl.gz' if compression == 'gzip' else '.jsonl'
    return FileSystems.join(output, f'part-{shard:05d}-of-{num_shards:05d}{ext}')


def write_bytes(path: str, data: bytes, compression: str = 'none'):
    """Writes `data` to `path` (any Beam filesystem); gzip without a timestamp (reruns are identical)."""
    if compression == 'gzip':
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode='wb', mtime=0, filename='') as gz:
            gz.write(data)
        data = buf.getvalue()
    with FileSystems.create(path, mime_type='application/octet-stream', compression_type='uncompressed') as f:
        f.write(data)


class WriteShard(beam.DoFn):
    """(shard, [doc or None]) -> one file of the shard's documents sorted by key; yields its count."""

    def __init__(self, output: str, num_shards: int, compression: str, input_cfg: dict, metadata_field: str):
        self.args = (output, num_shards, compression)
        self.input_cfg, self.metadata_field = input_cfg, metadata_field

    def process(self, element):
        shard, docs = element
        output, num_shards, compression = self.args
        docs = sorted((d for d in docs if d is not None), key=lambda d: d['key'])
        data = b''.join(dumps(to_record(d, self.input_cfg, self.metadata_field)) for d in docs)
        write_bytes(shard_path(output, shard, num_shards, compression), data, compression)
        yield ('output/documents', len(docs))


class WriteRows(beam.DoFn):
    """(shard, [row dict with 'key' or None]) -> one JSONL file of the rows sorted by key."""

    def __init__(self, output: str, num_shards: int, compression: str):
        self.args = (output, num_shards, compression)

    def process(self, element):
        shard, rows = element
        output, num_shards, compression = self.args
        rows = sorted((r for r in rows if r is not None), key=lambda r: r['key'])
        write_bytes(shard_path(output, shard, num_shards, compression), b''.join(dumps(r) for r in rows), compression)
