"""Exact and near (MinHash-LSH) deduplication as Beam transforms.

Both keep one document per duplicate cluster, the one first in input order (smallest key), so
the choice does not depend on the runner, the workers or the order elements arrive in.

exact_dedup: clusters are documents with the same BLAKE2b-128 hash of the (normalized) text.
near_dedup:  MinHash signature per document -> one (band, band hashes) key per LSH band ->
             GroupByKey: documents sharing a bucket are candidates, paired with the bucket's
             smallest key -> Distinct -> both sides' signatures joined by key -> pairs whose
             estimated Jaccard >= threshold are edges -> connected components in Beam
             (components.py) -> every node whose component's smallest key is not itself is removed.
Nothing is ever collected onto one worker: every step is keyed.
"""

from __future__ import annotations

import hashlib
import time

import apache_beam as beam
import ml_collections
from apache_beam.metrics import Metrics

from lm.data.curate import minhash
from lm.data.curate.components import ConnectedComponents
from lm.data.curate.quality import looks_japanese


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=16).digest()


def _keep_first(kv, stage: str):
    """(group key, {'doc': docs, 'min': [smallest key]}) -> the smallest-key doc kept, the rest removed."""
    _, groups = kv
    first = min(groups['min'])
    size = 0
    for doc in groups['doc']:
        size += 1
        if doc['key'] == first:
            yield doc
        else:
            yield beam.pvalue.TaggedOutput('removed', (stage, 'exact_duplicate' if stage == 'exact_dedup'
                                                       else 'near_duplicate', doc))
    if stage == 'exact_dedup' and size > 1:
        yield beam.pvalue.TaggedOutput('stats', (f'exact_dedup/cluster_size/{size}', 1))


class ExactDedup(beam.PTransform):
    """docs -> {'kept', 'removed', 'stats'} PCollections."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(label='exact_dedup')

    def expand(self, docs):
        keyed = docs | 'hash' >> beam.Map(_timed_hash)
        first = keyed | 'key' >> beam.Map(lambda kv: (kv[0], kv[1]['key'])) | 'first' >> beam.CombinePerKey(min)
        out = ({'doc': keyed, 'min': first} | 'join' >> beam.CoGroupByKey()
               | 'keep' >> beam.FlatMap(_keep_first, 'exact_dedup').with_outputs('removed', 'stats', main='kept'))
        return {'kept': out.kept, 'removed': out.removed, 'stats': out.stats}


_HASH_USEC = Metrics.counter('curate', 'exact_dedup_usec')


def _timed_hash(doc):
    start = time.perf_counter()
    h = text_hash(doc['text'])
    _HASH_USEC.inc(int((time.perf_counter() - start) * 1e6))
    return h, doc


class _Signature(beam.DoFn):
    def __init__(self, nd: dict):
        self.nd = nd

    def setup(self):
        self.unspaced = {s.strip() for s in self.nd['unspaced_languages'].split(',') if s.strip()}
        self.usec = Metrics.counter('curate', 'near_dedup_usec')

    def process(self, doc):
        start = time.perf_counter()
        nd = self.nd
        lang = doc['meta'].get('lang')
        unspaced = lang in self.unspaced if lang else looks_japanese(doc['text'])
        sig = minhash.signature(minhash.shingle_hashes(doc['text'], nd['ngram'], nd['char_ngram'], unspaced),
                                nd['num_perm'], nd['seed'])
        self.usec.inc(int((time.perf_counter() - start) * 1e6))
        yield doc['key'], sig


def _bucket_pairs(kv):
    """(band key, doc keys) -> (smallest, other) for every other member of the bucket."""
    _, keys = kv
    keys = sorted(set(keys))
    return [(keys[0], k) for k in keys[1:]]


def _send_left(kv):
    """(a, {'sig': [sig_a], 'pair': [b, ...]}) -> (b, (a, sig_a)) once per distinct b (a pair found
    in several bands is verified once)."""
    a, groups = kv
    sigs = list(groups['sig'])
    if sigs:
        for b in sorted(set(groups['pair'])):
            yield b, (a, sigs[0])


class _Verify(beam.DoFn):
    def __init__(self, threshold: float):
        self.threshold = threshold

    def setup(self):
        self.usec = Metrics.counter('curate', 'near_dedup_usec')

    def process(self, kv):
        start = time.perf_counter()
        b, groups = kv
        sigs = list(groups['sig'])
        if sigs:
            for a, sig_a in groups['cand']:
                yield beam.pvalue.TaggedOutput('stats', ('near_dedup/candidate_pairs', 1))
                if minhash.estimated_jaccard(sig_a, sigs[0]) >= self.threshold:
                    yield beam.pvalue.TaggedOutput('stats', ('near_dedup/similar_pairs', 1))
                    yield a, b
        self.usec.inc(int((time.perf_counter() - start) * 1e6))


def _mark_near(kv):
    """(key, {'doc': [doc], 'label': [smallest key of its cluster]}) -> kept doc / removed (the
    removed one's meta names the kept key: samples/ show which document it duplicates)."""
    key, groups = kv
    labels = list(groups['label'])
    for doc in groups['doc']:
        if labels and labels[0] != key:
            doc['meta']['near_duplicate_of_key'] = labels[0]
            yield beam.pvalue.TaggedOutput('removed', ('near_dedup', 'near_duplicate', doc))
        else:
            yield doc


class NearDedup(beam.PTransform):
    """docs -> {'kept', 'removed', 'stats'} PCollections."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(label='near_dedup')
        self.nd = config.near_dedup.to_dict()

    def expand(self, docs):
        nd = self.nd
        sigs = docs | 'signature' >> beam.ParDo(_Signature(nd))
        pairs = (sigs
                 | 'bands' >> beam.FlatMap(lambda ks: [(b, ks[0]) for b in minhash.band_keys(ks[1], nd['bands'], nd['rows'])])
                 | 'buckets' >> beam.GroupByKey()
                 | 'pairs' >> beam.FlatMap(_bucket_pairs))
        to_right = {'sig': sigs, 'pair': pairs} | 'join_left' >> beam.CoGroupByKey() | 'send' >> beam.FlatMap(_send_left)
        verified = ({'sig': sigs, 'cand': to_right} | 'join_right' >> beam.CoGroupByKey()
                    | 'verify' >> beam.ParDo(_Verify(nd['threshold'])).with_outputs('stats', main='edges'))
        cc = verified.edges | 'components' >> ConnectedComponents(nd['max_rounds'])
        removed_labels = cc['labels'] | 'non_roots' >> beam.Filter(lambda nl: nl[1] != nl[0])
        sizes = (cc['labels'] | 'by_label' >> beam.Map(lambda nl: (nl[1], 1)) | 'size' >> beam.CombinePerKey(sum)
                 | 'hist' >> beam.Map(lambda ls: (f'near_dedup/cluster_size/{ls[1]}', 1)))
        unconverged = cc['unconverged'] | 'unconverged_stat' >> beam.Map(lambda n: ('near_dedup/unconverged_nodes', n))
        keyed = docs | 'by_key' >> beam.Map(lambda d: (d['key'], d))
        marked = ({'doc': keyed, 'label': removed_labels} | 'join_docs' >> beam.CoGroupByKey()
                  | 'mark' >> beam.FlatMap(_mark_near).with_outputs('removed', main='kept'))
        stats = (verified.stats, sizes, unconverged) | 'stats' >> beam.Flatten()
        return {'kept': marked.kept, 'removed': marked.removed, 'stats': stats}
