"""Known-answer benchmark of lm.data.curate, side by side with datatrove's MinHash dedup.

    PYTHONPATH=. python benchmarks/bench_curate.py [--sizes 10000,100000] [--rounds 2] [--workers 1]

A corpus from lm.data.curate.synthetic (planted exact duplicates; near duplicates at 5-gram
Jaccard 0.95 / 0.9 / 0.85 / 0.8; far variants at 0.3; quality, language and content plants) is
written as 8 JSONL files. On it, in the same process and alternating their order every round:
  ours-near   lm.data.curate with only the near_dedup stage (Beam local runner)
  datatrove   MinhashDedupSignature -> Buckets -> Cluster -> Filter (LocalPipelineExecutor),
              the same parameters: word 5-grams (same \\w+ words), 20 bands x 6 rows, 32-bit hashes
  ours-full   lm.data.curate with every stage (example blocklists)
Printed: per-stage precision / recall against the plants, near-duplicate recall by Jaccard level,
far variants removed, documents/s (best of the rounds). Needs the curate extra and datatrove
(pip install datatrove: benchmark only).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.data.curate import get_config  # noqa: E402
from lm.data.curate.synthetic import NEAR_TARGETS, make_corpus  # noqa: E402

_WORDS = re.compile(r'\w+')


def write_corpus(docs, path, files=8):
    os.makedirs(path, exist_ok=True)
    for f in range(files):
        with open(os.path.join(path, f'part-{f}.jsonl'), 'w', encoding='utf-8') as out:
            for d in docs[f::files]:
                out.write(json.dumps(d, ensure_ascii=False) + '\n')


def run_ours(corpus, out, stages, workers):
    from lm.data.curate.pipeline import run

    c = get_config()
    c.stages = stages
    c.output.write_removed = True
    c.content.word_blocklist = c.content.domain_blocklist = 'example'
    args = [] if workers <= 1 else [f'--direct_num_workers={workers}', '--direct_running_mode=multi_processing']
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = run(c, [os.path.join(corpus, '*.jsonl')], out, args)
    seconds = time.perf_counter() - start
    removed = {}
    for path in glob.glob(os.path.join(out, 'removed', '*.jsonl')):
        for line in open(path, encoding='utf-8'):
            r = json.loads(line)
            removed[r['id']] = r['stage']
    kept = {}
    for path in glob.glob(os.path.join(out, 'part-*.jsonl')):
        for line in open(path, encoding='utf-8'):
            r = json.loads(line)
            kept[r['id']] = r['text']
    return seconds, removed, kept, report


def run_datatrove(corpus, out, workers):
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):  # the same words as lm.data.curate.minhash (NLTK's punkt needs a download)
        def word_tokenize(self, text):
            return _WORDS.findall(text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    from loguru import logger
    logger.remove()
    shutil.rmtree(out, ignore_errors=True)
    cfg = MinhashConfig(n_grams=5, num_buckets=20, hashes_per_bucket=6, seed=1,
                        hash_config=HashConfig(precision=32, hash_fc='xxhash'))
    files = len(glob.glob(os.path.join(corpus, '*.jsonl')))
    reader = lambda: JsonlReader(corpus, glob_pattern='*.jsonl')  # noqa: E731
    logs = os.path.join(out, 'logs')
    steps = [
        ([reader(), MinhashDedupSignature(os.path.join(out, 'sigs'), config=cfg, language=Words())], files),
        ([MinhashDedupBuckets(os.path.join(out, 'sigs'), os.path.join(out, 'buckets'), config=cfg)], cfg.num_buckets),
        ([MinhashDedupCluster(os.path.join(out, 'buckets'), os.path.join(out, 'remove'), config=cfg)], 1),
        ([reader(), MinhashDedupFilter(os.path.join(out, 'remove'),
                                       exclusion_writer=JsonlWriter(os.path.join(out, 'removed'))),
          JsonlWriter(os.path.join(out, 'kept'))], files),
    ]
    start = time.perf_counter()
    with open(os.devnull, 'w') as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        for i, (pipeline, tasks) in enumerate(steps):
            LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                                  logging_dir=os.path.join(logs, str(i))).run()
    seconds = time.perf_counter() - start
    removed = {}
    for path in glob.glob(os.path.join(out, 'removed', '*.jsonl.gz')):
        for line in gzip.open(path, 'rt', encoding='utf-8'):
            removed[json.loads(line)['id']] = 'near_dedup'
    return seconds, removed


def pr(removed_ids: set, positives: set) -> tuple[float, float]:
    tp = len(removed_ids & positives)
    return (tp / len(removed_ids) if removed_ids else 1.0), (tp / len(positives) if positives else 1.0)


def dedup_scores(truth, removed: dict, stage: str) -> dict:
    """Near-dup scores of one tool: per Jaccard level, the share of pairs (base, variant) with
    exactly one removed; far pairs with any removed; precision over all removals by `stage`."""
    groups = {}
    for t in truth:
        if t['plant'] in ('near', 'far', 'exact'):
            groups.setdefault(t['group'], []).append(t)
    bases = {t['group']: t for t in truth if t['plant'] == 'base'}
    out = {}
    for level in NEAR_TARGETS + (0.3, 1.0):
        pairs = [(bases[t['group']]['id'], t['id']) for g in groups.values() for t in g if t['target_j'] == level]
        caught = [sum(i in removed for i in pair) == 1 for pair in pairs]
        hit_any = [any(i in removed for i in pair) for pair in pairs]
        out[level] = (sum(hit_any if level == 0.3 else caught) / len(pairs)) if pairs else float('nan')
    dup_members = {i for g in groups.values() for t in g if t['target_j'] and t['target_j'] >= 0.8
                   for i in (t['id'], bases[t['group']]['id'])}
    ours = {i for i, s in removed.items() if s == stage}
    out['precision'] = len(ours & dup_members) / len(ours) if ours else 1.0
    out['removed'] = len(ours)
    return out


def stage_scores(truth, removed: dict) -> dict:
    """Precision / recall of the language, quality and content stages against their plants."""
    out = {}
    for stage in ('language', 'quality', 'content'):
        positives = {t['id'] for t in truth if t['expect'] == stage}
        out[stage] = pr({i for i, s in removed.items() if s == stage}, positives)
    return out


def pii_scores(docs, truth, kept: dict) -> tuple[float, int]:
    """(share of planted PII strings masked in kept documents, masks in documents without a plant)."""
    planted = {t['id']: t['group'] for t in truth if t['plant'] == 'pii'}
    found = total = false = 0
    for i, text in kept.items():
        if i in planted:
            total += len(planted[i])
            found += sum(p not in text for p in planted[i])
        else:
            false += sum(text.count(m) for m in ('<EMAIL>', '<PHONE>', '<IP>'))
    return (found / total if total else float('nan')), false


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--sizes', default='10000,100000')
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--workers', type=int, default=1, help='local worker processes for both tools')
    ap.add_argument('--skip_full', action='store_true', help='only the near-dedup comparison')
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix='bench_curate_')
    try:
        for n in map(int, args.sizes.split(',')):
            t0 = time.perf_counter()
            docs, truth = make_corpus(n, seed=0)
            corpus = os.path.join(tmp, f'corpus{n}')
            write_corpus(docs, corpus)
            print(f'\n## {n} documents (corpus made in {time.perf_counter() - t0:.0f} s), '
                  f'{args.workers} worker(s), best of {args.rounds} alternating rounds')
            times = {'ours-near': [], 'datatrove': [], 'ours-full': []}
            results = {}
            for r in range(args.rounds):
                order = ['ours-near', 'datatrove'] if r % 2 == 0 else ['datatrove', 'ours-near']
                if not args.skip_full:
                    order.append('ours-full')
                for tool in order:
                    if tool == 'datatrove':
                        sec, removed = run_datatrove(corpus, os.path.join(tmp, 'dt'), args.workers)
                        results[tool] = (removed, None, None)
                    else:
                        stages = 'near_dedup' if tool == 'ours-near' else get_config().stages
                        sec, removed, kept, report = run_ours(corpus, os.path.join(tmp, tool), stages, args.workers)
                        results[tool] = (removed, kept, report)
                    times[tool].append(sec)
                    print(f'  round {r} {tool}: {sec:.1f} s', flush=True)
            print('\n| tool | near J=0.95 | 0.9 | 0.85 | 0.8 | exact | far J=0.3 removed | precision | removed | docs/s |')
            print('|---|---|---|---|---|---|---|---|---|---|')
            for tool in ('ours-near', 'datatrove', 'ours-full'):
                if tool not in results:
                    continue
                s = dedup_scores(truth, results[tool][0], 'near_dedup')
                exact = s[1.0]
                if tool == 'ours-full':  # exact copies go in exact_dedup there
                    exact = dedup_scores(truth, results[tool][0], 'exact_dedup')[1.0]
                print(f"| {tool} | {s[0.95]:.3f} | {s[0.9]:.3f} | {s[0.85]:.3f} | {s[0.8]:.3f} | {exact:.3f} | "
                      f"{s[0.3]:.3f} | {s['precision']:.3f} | {s['removed']} | {n / min(times[tool]):.0f} |")
            if 'ours-full' in results:
                removed, kept, report = results['ours-full']
                ex = dedup_scores(truth, removed, 'exact_dedup')
                print('\n| stage | precision | recall | cpu s |')
                print('|---|---|---|---|')
                cpu = {s['name']: s['cpu_seconds'] for s in report['stages']}
                print(f"| exact_dedup | {ex['precision']:.3f} | {ex[1.0]:.3f} | {cpu.get('exact_dedup')} |")
                nd = dedup_scores(truth, removed, 'near_dedup')
                print(f"| near_dedup (J>=0.85) | {nd['precision']:.3f} | {min(nd[0.85], nd[0.9], nd[0.95]):.3f} | "
                      f"{cpu.get('near_dedup')} |")
                for stage, (p, rc) in stage_scores(truth, removed).items():
                    print(f'| {stage} | {p:.3f} | {rc:.3f} | {cpu.get(stage)} |')
                masked, false = pii_scores(docs, truth, kept)
                print(f'| content: PII masked | | {masked:.3f} ({false} masks elsewhere) | |')
                ja = [t['id'] for t in truth if t['plant'] == 'japanese']
                print(f"\nJapanese documents kept: {sum(i in kept for i in ja)}/{len(ja)}; "
                      f"output {report['output']['documents']} of {n}; wall {report['wall_seconds']} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
