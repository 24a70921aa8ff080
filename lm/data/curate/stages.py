"""The per-document stages as Beam transforms: normalize, language, quality, content.

Each is `PerDocument(stage, config)`, a ParDo with three outputs: the kept documents (main),
'removed' ((stage, reason, doc) for every document it drops) and 'stats' ((name, count) pairs
summed into the report). The CPU time each stage spends is a Beam counter 'curate:<stage>_usec'.
A document that makes a stage raise is removed with reason 'error_<ExceptionType>' and counted:
the pipeline never stops on one document.
"""

from __future__ import annotations

import time

import apache_beam as beam
import ml_collections
from apache_beam.metrics import Metrics

from lm.data.curate import normalize as norm
from lm.data.curate.config import resolve_blocklist


def stage_fn(stage: str, c: ml_collections.ConfigDict):
    """The pure function of `stage`: doc -> (reason or None, [(stat, count)]); it edits doc in place."""
    if stage == 'normalize':
        n = c.normalize

        def normalize(doc):
            stats = []
            if doc.get('bad_utf8'):
                if n.bad_utf8 == 'drop':
                    return 'invalid_utf8', stats
                doc['bad_utf8'] = False  # the reader repaired it already (Beam cannot carry lone surrogates)
                stats.append(('normalize/repaired_utf8', 1))
            text = norm.normalize_text(doc['text'], n.form)
            if text != doc['text']:
                stats.append(('normalize/changed', 1))
            doc['text'] = text
            return ('empty_after_normalize' if len(text) < max(n.min_chars, 1) else None), stats
        return normalize

    if stage == 'language':
        from lm.data.curate import language
        g = c.language
        keep = {s.strip() for s in g.keep.split(',') if s.strip()}
        language.load_model()

        def identify(doc):
            lang, score = language.identify(doc['text'], g.max_chars)
            doc['meta']['lang'], doc['meta']['lang_score'] = lang, score
            stats = [(f'language/label/{lang}', 1)]
            if keep and lang not in keep:
                return 'language_not_kept', stats
            if score < g.min_score:
                return 'language_low_score', stats
            return None, stats
        return identify

    if stage == 'quality':
        from lm.data.curate.quality import QualityRules
        rules = QualityRules(c.quality)
        return lambda doc: (rules.check(doc['text'], doc['meta'].get('lang')), [])

    if stage == 'content':
        from lm.data.curate.content import ContentRules
        rules = ContentRules(c.content, resolve_blocklist(c.content.domain_blocklist, 'domain_blocklist'),
                             resolve_blocklist(c.content.word_blocklist, 'word_blocklist'))
        url_field = c.input.url_field

        def content(doc):
            reason = rules.check(doc['text'], doc['record'].get(url_field))
            if reason:
                return reason, []
            doc['text'], counts = rules.mask(doc['text'])
            if counts:
                doc['meta']['pii'] = counts
                return None, [(f'content/pii/{k}', v) for k, v in counts.items()] + [('content/pii_documents', 1)]
            return None, []
        return content
    raise ValueError(f'no per-document stage {stage}')


class _StageDoFn(beam.DoFn):
    def __init__(self, stage: str, config: dict):
        self.stage, self.config = stage, config

    def setup(self):
        self.fn = stage_fn(self.stage, ml_collections.ConfigDict(self.config))
        self.usec = Metrics.counter('curate', f'{self.stage}_usec')

    def process(self, doc):
        start = time.perf_counter()
        try:
            reason, stats = self.fn(doc)
        except Exception as e:  # one bad document never stops the pipeline: counted and sampled
            reason, stats = f'error_{type(e).__name__}', []
            doc['meta']['error'] = str(e)[:500]
        self.usec.inc(int((time.perf_counter() - start) * 1e6))
        for s in stats:
            yield beam.pvalue.TaggedOutput('stats', s)
        if reason:
            yield beam.pvalue.TaggedOutput('removed', (self.stage, reason, doc))
        else:
            yield doc


class PerDocument(beam.PTransform):
    """docs -> {'kept', 'removed', 'stats'} PCollections."""

    def __init__(self, stage: str, config: ml_collections.ConfigDict):
        super().__init__(label=stage)
        self.stage, self.config = stage, config.to_dict()

    def expand(self, docs):
        out = docs | beam.ParDo(_StageDoFn(self.stage, self.config)).with_outputs('removed', 'stats', main='kept')
        return {'kept': out.kept, 'removed': out.removed, 'stats': out.stats}
