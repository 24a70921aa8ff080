"""The curation pipeline: read -> stages in order -> sharded JSONL, samples/ and report.json.

`run(config, inputs, output, beam_args)` validates the config and the inputs first (a wrong
option or a glob matching nothing stops before anything runs), builds the Beam graph, runs it on
the runner the Beam options name (local by default) and writes DIR/report.json from the counts
the pipeline computed (exact, part of the data) and the runner's per-stage CPU-time counters.

Output (deterministic: the same input and config give the same files, byte for byte):
  DIR/part-0000i-of-0000n.jsonl[.gz]  kept documents, each shard sorted by input order
  DIR/samples/<stage>.<reason>.jsonl  the first few removed documents per reason (input order)
  DIR/removed/part-*.jsonl            with output.write_removed: every removed document's id, stage, reason
  DIR/report.json                     documents in / out / removed per stage and reason, first
                                      locations (file:line) per reason, duplicate-cluster size
                                      histograms, PII counts, CPU seconds per stage, wall time
"""

from __future__ import annotations

import json
import os
import time

import apache_beam as beam
import ml_collections
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, TypeOptions

from lm.data.curate import io as cio
from lm.data.curate.config import validate
from lm.data.curate.dedup import ExactDedup, NearDedup
from lm.data.curate.stages import PerDocument

STATS_FILE = '_curate_stats.json'


def stage_transform(stage: str, config):
    if stage == 'exact_dedup':
        return ExactDedup(config)
    if stage == 'near_dedup':
        return NearDedup(config)
    return PerDocument(stage, config)


def _removed_row(r):
    stage, reason, doc = r
    row = dict(key=doc['key'], id=doc['id'], loc=doc['loc'], stage=stage, reason=reason)
    if 'near_duplicate_of_key' in doc['meta']:
        row['duplicate_of_key'] = doc['meta']['near_duplicate_of_key']
    return row


def _sample_record(item):
    (stage, reason), docs = item
    return stage, reason, [dict(id=d['id'], loc=d['loc'], reason=reason, text=d['text'][:5000],
                                **({'meta': d['meta']} if d.get('meta') else {}),
                                **({'error': d['error']} if d.get('error') else {})) for d in docs]


class _WriteSamples(beam.DoFn):
    def __init__(self, output: str):
        self.output = output

    def process(self, item):
        stage, reason, records = _sample_record(item)
        cio.write_bytes(FileSystems.join(self.output, 'samples', f'{stage}.{reason}.jsonl'),
                        b''.join(cio.dumps(r) for r in records))
        yield f'{stage}/first/{reason}', [r['loc'] for r in records]


def _write_stats(items, path):
    cio.write_bytes(path, json.dumps(dict(sorted(items)), ensure_ascii=False).encode('utf-8'))


def build(p: beam.Pipeline, config: ml_collections.ConfigDict, files: list[str], output: str):
    """Adds the whole pipeline to `p`."""
    stages = validate(config)
    input_cfg = config.input.to_dict()
    names = cio.relative_names(files)
    read = (p | 'files' >> beam.Create([(rank, path, name) for rank, (path, name) in enumerate(zip(files, names))])
            | 'spread_files' >> beam.Reshuffle()
            | 'read' >> beam.ParDo(cio.ReadFile(input_cfg)).with_outputs('removed', 'flagged', 'stats', main='docs'))
    docs = read.docs
    removed, stats = [read.removed], [read.stats]
    for stage in stages:  # a stage's output count is its input less its removals (checked at the end)
        out = docs | stage >> stage_transform(stage, config)
        removed.append(out['removed'])
        stats.append(out['stats'])
        docs = out['kept']

    n = config.output.num_shards
    shards = (p | 'all_shards' >> beam.Create([(i, None) for i in range(n)]),
              docs | 'shard' >> beam.Map(lambda d: (cio.shard_of(d['key'], n), d)))
    stats.append(shards | 'with_empty' >> beam.Flatten() | 'group_shards' >> beam.GroupByKey()
                 | 'write' >> beam.ParDo(cio.WriteShard(output, n, config.output.compression, input_cfg,
                                                        config.output.metadata_field)))

    removed = removed | 'removed' >> beam.Flatten()
    if config.output.write_removed:
        removed_shards = (p | 'all_removed_shards' >> beam.Create([(i, None) for i in range(n)]),
                          removed | 'removed_shard' >> beam.Map(lambda r: (cio.shard_of(r[2]['key'], n), _removed_row(r))))
        (removed_shards | 'removed_with_empty' >> beam.Flatten() | 'group_removed' >> beam.GroupByKey()
         | 'write_removed' >> beam.ParDo(cio.WriteRows(FileSystems.join(output, 'removed'), n, config.output.compression)))
    stats.append(removed | 'count_removed' >> beam.Map(lambda r: (f'{r[0]}/removed/{r[1]}', 1)))
    flagged = read.flagged
    stats.append(flagged | 'count_flagged' >> beam.Map(lambda r: (f'{r[0]}/flagged/{r[1]}', 1)))
    counts = stats | 'all_stats' >> beam.Flatten() | 'sum' >> beam.CombinePerKey(sum)
    k = max(config.output.samples_per_reason, 1)
    firsts = [
        removed | 'by_reason' >> beam.Map(lambda r: ((r[0], r[1]), r[2]))
        | 'first_removed' >> beam.combiners.Top.SmallestPerKey(k, key=lambda d: d['key'])
        | 'samples' >> beam.ParDo(_WriteSamples(output)),
        flagged | 'flag_reason' >> beam.Map(lambda r: ((r[0], r[1]), r[2]))
        | 'first_flagged' >> beam.combiners.Top.SmallestPerKey(k, key=lambda d: d['key'])
        | 'flag_locs' >> beam.Map(lambda kv: (f'{kv[0][0]}/flagged_first/{kv[0][1]}', [d['loc'] for d in kv[1]])),
    ]
    stats_path = FileSystems.join(output, STATS_FILE)
    ((counts, *firsts) | 'report_items' >> beam.Flatten() | 'collect' >> beam.combiners.ToList()
     | 'write_stats' >> beam.Map(_write_stats, stats_path))
    return stages


def _prepare_output(output: str):
    """Creates DIR; clears what an earlier curate run wrote there; refuses a directory of other files."""
    os.makedirs(output, exist_ok=True) if '://' not in output else None
    existing = [m.path.rstrip('/') for m in FileSystems.match([FileSystems.join(output, '*')])[0].metadata_list]
    ours = [p for p in existing if os.path.basename(p).startswith(('part-', 'report.json', STATS_FILE))
            or os.path.basename(p) in ('samples', 'removed')]
    others = [p for p in existing if p not in ours]
    if others:
        raise ValueError(f'--output {output} holds files that curate did not write ({others[0]}, ...): '
                         'give an empty or new directory')
    for sub in ('samples', 'removed'):  # object stores list no directories: their files one by one
        ours += [m.path for m in FileSystems.match([FileSystems.join(output, sub, '*')])[0].metadata_list
                 if m.path.rstrip('/') not in ours]
    for path in ours:
        if FileSystems.exists(path):
            FileSystems.delete([path])


def _cpu_seconds(result) -> dict:
    from apache_beam.metrics.metric import MetricsFilter
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace('curate'))['counters']
    except Exception:  # a runner without metrics: the report says so
        return {}
    out = {}
    for c in counters:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name.removesuffix('_usec')] = out.get(c.key.metric.name.removesuffix('_usec'), 0) + value
    return {k: round(v / 1e6, 3) for k, v in out.items()}


def make_report(stats: dict, stages: list[str], cpu: dict, files: list[str], config, wall: float) -> dict:
    def section(prefix):
        removed = {k.split('/', 2)[2]: v for k, v in stats.items() if k.startswith(f'{prefix}/removed/')}
        first = {k.split('/', 2)[2]: v for k, v in stats.items() if k.startswith(f'{prefix}/first/')}
        extra = {k[len(prefix) + 1:]: v for k, v in stats.items() if k.startswith(f'{prefix}/')
                 and k.split('/')[1] not in ('removed', 'first', 'out', 'flagged', 'flagged_first', 'cluster_size')}
        return removed, first, extra

    def histogram(prefix):
        h = {int(k.rsplit('/', 1)[1]): v for k, v in stats.items() if k.startswith(f'{prefix}/cluster_size/')}
        return {str(size): h[size] for size in sorted(h)}

    bad, bad_first, _ = section('input')
    docs_in = stats.get('input/documents', 0)
    report = {'input': {
        'files': len(files), 'records': docs_in + sum(bad.values()), 'documents': docs_in,
        'bad': {kind: {'count': bad[kind], 'first': bad_first.get(kind, [])} for kind in sorted(bad)},
        'flagged': {k.split('/', 2)[2]: {'count': v, 'first': stats.get(f"input/flagged_first/{k.split('/', 2)[2]}", [])}
                    for k, v in stats.items() if k.startswith('input/flagged/')}}, 'stages': []}
    prev = docs_in
    for stage in stages:
        removed, first, extra = section(stage)
        out = prev - sum(removed.values())
        entry = {'name': stage, 'in': prev, 'out': out, 'removed': dict(sorted(removed.items())),
                 'removed_total': sum(removed.values()), 'first_removed': dict(sorted(first.items())),
                 'cpu_seconds': cpu.get(stage)}
        if extra:
            entry['stats'] = dict(sorted(extra.items()))
        if stage in ('exact_dedup', 'near_dedup'):
            entry['cluster_size_histogram'] = histogram(stage)
        report['stages'].append(entry)
        prev = out
    written = stats.get('output/documents', 0)
    if written != prev:  # the writer counts what it wrote: every document is accounted for
        raise RuntimeError(f'curate: {written} documents written but {prev} = {docs_in} read - removals')
    report['output'] = {'documents': written, 'shards': config.output.num_shards}
    report['wall_seconds'] = round(wall, 2)
    report['config'] = config.to_dict()
    return report


def local_runner(options: PipelineOptions):
    """Without --runner: Beam's in-process FnApiRunner (what DirectRunner falls back to after trying
    to download the Prism binary, which a machine without internet access cannot)."""
    from apache_beam.options.pipeline_options import StandardOptions

    if options.view_as(StandardOptions).runner:
        return None
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    return fn_runner.FnApiRunner()


def run(config: ml_collections.ConfigDict, inputs: list[str], output: str, beam_args: list[str] | None = None) -> dict:
    """Curates `inputs` (globs) into `output`; returns the report (also in output/report.json)."""
    stages = validate(config)
    files = cio.expand_inputs(inputs)
    _prepare_output(output)
    start = time.perf_counter()
    options = PipelineOptions(beam_args or [])
    if '--pipeline_type_check' not in ' '.join(beam_args or []):  # construction-time type inference: ~1 s, no use here
        options.view_as(TypeOptions).pipeline_type_check = False
    p = beam.Pipeline(runner=local_runner(options), options=options)
    build(p, config, files, output)
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - start
    stats_path = FileSystems.join(output, STATS_FILE)
    with FileSystems.open(stats_path, compression_type='uncompressed') as f:
        stats = json.loads(f.read().decode('utf-8'))
    FileSystems.delete([stats_path])
    report = make_report(stats, stages, _cpu_seconds(result), files, config, wall)
    cio.write_bytes(FileSystems.join(output, 'report.json'),
                    json.dumps(report, indent=1, ensure_ascii=False).encode('utf-8'))
    return report
