"""Pretraining data curation on Apache Beam: normalize, language id, exact and near (MinHash-LSH)
dedup, Gopher / C4 / Japanese quality rules, blocklists and PII masking.

    python -m lm.data.curate --input 'raw/*.jsonl.gz' --output curated [--stages normalize,exact_dedup] \\
        [--config=lm/data/curate/config.py --config.near_dedup.threshold=0.75] [-- BEAM OPTIONS]

The same pipeline runs on Beam's local runner (the default) and on Dataflow, Flink or Spark
(docs/curation.md). Needs the 'curate' extra: pip install -e '.[curate]'.
"""

from lm.data.curate.config import STAGES, get_config, validate  # noqa: F401


def run(*args, **kwargs):
    """lm.data.curate.pipeline.run (imported on use: Beam is slow to import)."""
    from lm.data.curate.pipeline import run as _run

    return _run(*args, **kwargs)
