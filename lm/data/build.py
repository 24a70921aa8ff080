"""build_tokenizer / build_source / build_iterator / source_info: config.data -> objects.

Imported lazily through `lm.data` (see lm/data/__init__.py).
"""

from __future__ import annotations

import functools

import ml_collections

from lm.data import chat
from lm.data.errors import check_policy
from lm.data.packing import PACKING_MODES
from lm.data.pipeline import DataIterator, EvalBatches, make_dataset
from lm.data.preference import MarkovPreference, PreferenceJsonl, empty_pair_batch, make_pair_dataset
from lm.data.preference import batch_kind as pair_batch_kind
from lm.data.sources import ArrayRecordSource, ChatJsonlSource, JsonlSource, TextSource
from lm.data.synthetic import ArithmeticChat, CopyDocs, MarkovDocs, WordChat
from lm.data.tokenizer import Tokenizer, load_tokenizer

SOURCES = {
    'markov': MarkovDocs,
    'copy': CopyDocs,
    'arithmetic_chat': ArithmeticChat,
    'word_chat': WordChat,
    'text': TextSource,
    'jsonl': JsonlSource,
    'chat_jsonl': ChatJsonlSource,
    'array_record': ArrayRecordSource,
    'markov_preference': MarkovPreference,
    'preference_jsonl': PreferenceJsonl,
}
PREFERENCE_SOURCES = ('markov_preference', 'preference_jsonl')  # one pair per row: batches of kind 'preference'
SPLITS = ('train', 'valid')


def _as_config(data_cfg) -> ml_collections.ConfigDict:
    if isinstance(data_cfg, dict):
        return ml_collections.ConfigDict(data_cfg)
    return data_cfg


CHAT_SOURCES = ('chat_jsonl', 'arithmetic_chat', 'word_chat')


def resolve_packing(data_cfg) -> str:
    """data.packing, with 'auto' = 'first_fit' for chat sources (a conversation stays whole in
    one row when it fits, so no answer is scored without its question) and 'concat' otherwise."""
    cfg = _as_config(data_cfg)
    if cfg.packing == 'auto':
        return 'first_fit' if cfg.source in CHAT_SOURCES else 'concat'
    if cfg.packing not in PACKING_MODES:
        raise ValueError(f"data.packing must be 'auto' or one of {PACKING_MODES}, got {cfg.packing!r}")
    return cfg.packing


def build_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer named by data.tokenizer: 'byte' or a path to tokenizer.json / .model."""
    return load_tokenizer(_as_config(data_cfg).tokenizer)


def build_source(data_cfg, *, split: str, seq_len: int, seed: int, tokenizer: Tokenizer | None = None):
    """The document source of data.source for `split` (see sources.py for the interface)."""
    cfg = _as_config(data_cfg)
    if cfg.source not in SOURCES:
        raise ValueError(f'data.source must be one of {sorted(SOURCES)}, got {cfg.source!r}')
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if cfg.chat_loss not in chat.LOSS_POLICIES:
        raise ValueError(f'data.chat_loss must be one of {chat.LOSS_POLICIES}, got {cfg.chat_loss!r}')
    if cfg.chat_overflow not in chat.OVERFLOW_POLICIES:
        raise ValueError(f'data.chat_overflow must be one of {chat.OVERFLOW_POLICIES}, got {cfg.chat_overflow!r}')
    tokenizer = tokenizer or build_tokenizer(cfg)
    extra = {'markov': cfg.markov} if cfg.source == 'markov_preference' else {}  # the chain it is built on
    return SOURCES[cfg.source](
        cfg[cfg.source], split, tokenizer, seed=seed, seq_len=seq_len, add_bos=cfg.add_bos,
        add_eos=cfg.add_eos, valid_fraction=cfg.valid_fraction, loss_policy=cfg.chat_loss,
        chat_overflow=cfg.chat_overflow, **extra)


def build_iterator(data_cfg, *, split: str, batch_size: int, seq_len: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   tokenizer: Tokenizer | None = None):
    """Batches of this process: dicts of numpy [batch_size, seq_len] (batch_size per process).

    split='train': a DataIterator, endless (finite sources: epoch e in the order of a
      permutation drawn from (seed, e)), checkpointable with get_state()/set_state().
    split='valid': an EvalBatches: exactly data.num_valid_batches batches, the same on every
      pass and independent of `seed`.
    Preference sources (PREFERENCE_SOURCES) give pair batches {'chosen', 'rejected'}, one pair
    per row (lm/data/preference.py).
    """
    cfg = _as_config(data_cfg)
    check_policy(cfg.on_error)
    if cfg.source in PREFERENCE_SOURCES:
        return _build_pair_iterator(cfg, split=split, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                    process_index=process_index, process_count=process_count, tokenizer=tokenizer)
    packing = resolve_packing(cfg)
    tokenizer, source = _checked_source(cfg, split, batch_size, seq_len, seed, process_index, process_count, tokenizer)
    kwargs = dict(split=split, batch_size=batch_size, seq_len=seq_len, seed=seed,
                  process_index=process_index, process_count=process_count, packing=packing,
                  on_error=cfg.on_error, pad_id=tokenizer.pad_id, group_size=cfg.group_size,
                  read_threads=cfg.read_threads)
    if split == 'train':
        return DataIterator(make_dataset(source, num_workers=cfg.num_workers,
                                         worker_buffer_size=cfg.worker_buffer_size, **kwargs))
    make_dataset(source, **kwargs)  # fail now, not at the first eval, on an empty split
    return EvalBatches(lambda: make_dataset(source, **kwargs), num_batches=cfg.num_valid_batches,
                       batch_size=batch_size, seq_len=seq_len, pad_id=tokenizer.pad_id)


def _checked_source(cfg, split, batch_size, seq_len, seed, process_index, process_count, tokenizer):
    """(tokenizer, source) after checking the batch shape and the process index."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f'batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}')
    if not 0 <= process_index < process_count:
        raise ValueError(f'need 0 <= process_index < process_count, got {process_index}, {process_count}')
    tokenizer = tokenizer or build_tokenizer(cfg)
    return tokenizer, build_source(cfg, split=split, seq_len=seq_len, seed=seed, tokenizer=tokenizer)


def _build_pair_iterator(cfg, *, split, batch_size, seq_len, seed, process_index, process_count, tokenizer):
    tokenizer, source = _checked_source(cfg, split, batch_size, seq_len, seed, process_index, process_count, tokenizer)
    kwargs = dict(split=split, batch_size=batch_size, seq_len=seq_len, seed=seed, process_index=process_index,
                  process_count=process_count, on_error=cfg.on_error, pad_id=tokenizer.pad_id)
    if split == 'train':
        return DataIterator(make_pair_dataset(source, **kwargs))
    return EvalBatches(lambda: make_pair_dataset(source, **kwargs), num_batches=cfg.num_valid_batches,
                       batch_size=batch_size, seq_len=seq_len, pad_id=tokenizer.pad_id,
                       empty=functools.partial(empty_pair_batch, kind=pair_batch_kind(source)))


def source_info(data_cfg, *, seq_len: int) -> dict:
    """Known facts about the source, per scored target: {'bayes_optimal_ce': nats} for
    'markov' and 'copy' (exactly the targets the pipeline scores), {} otherwise."""
    cfg = _as_config(data_cfg)
    if cfg.source == 'markov':
        return {'bayes_optimal_ce': MarkovDocs.bayes_optimal_ce(cfg.markov, seq_len)}
    if cfg.source == 'copy':
        return {'bayes_optimal_ce': CopyDocs.bayes_optimal_ce(cfg.copy, seq_len)}
    return {}
