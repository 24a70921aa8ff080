"""Chat SFT on a built-in synthetic chat task: train from scratch, then report exact match.

    python -m lm.cli.train --config=configs/sft.py                  # the main job (minutes on a CPU)
    python -m lm.cli.train --config=configs/sft.py:tiny             # seconds, for tests and smoke runs
    python -m lm.cli.train --config=configs/sft.py:arithmetic       # the arithmetic task instead
    python -m lm.cli.train --config=configs/sft.py --config.data.chat_loss=all     # score every token

The main task (lm/data/synthetic.py: WordChat): conversations of 1..max_turns exchanges, each
a user asking for a transformation of a random word of 3..5 distinct lowercase letters
(reverse it, write it in capitals, spell it with dashes; 9 phrasings per task, sometimes a
system prompt) and the assistant answering exactly. Every word of the valid split is held
out of training, so every held-out prompt is new. After training,
the exact_match evaluator decodes the final answer of `eval.exact_match.examples` valid conversations greedily
and reports the exact-match accuracy (summary.json: exact_match). Harder variants, measured
in experiments/sft_masking.md: held-out phrasings too
(--config.data.word_chat.num_heldout_templates=2), and the arithmetic task (:arithmetic),
both far from 95% in this budget.

From a pretrained model instead of from scratch: --config.train.restore_from=<pretraining run>
--config.train.restore_params_only=True. The tokenizer and special-token ids must match that
run's tokenizer_metadata.json, or the run stops with a TokenizerMismatchError (same model
shape too: configs/default.py:tiny matches configs/sft.py:tiny).
"""

import ml_collections

from configs import base

ARGS = ("", "tiny", "arithmetic")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if (arg or "") not in ARGS:
        raise ValueError(f"configs/sft.py takes one of {ARGS}, got {arg!r}")
    c = base.get_config()
    c.objective = "sft"  # lm/objectives/sft.py: pretraining's loss under the chat loss mask

    c.data.source = "word_chat"  # synthetic chat with exact answers (lm/data/synthetic.py: WordChat)
    c.data.chat_loss = "assistant_only"  # score assistant answers + their end-of-turn only
    c.data.chat_overflow = "truncate_left"  # a conversation longer than a row loses its oldest turns (counted)
    c.data.packing = "first_fit"  # whole conversations, several per row (segment ids keep them apart)
    c.data.num_valid_batches = 8  # validation-loss batches (the same every eval)
    w = c.data.word_chat
    w.tasks = "reverse,upper,dashes"  # transformations asked for (comma-separated)
    w.alphabet = "abcdefghijklmnopqrstuvwxyz"  # letters of the random words
    w.min_letters = 3  # shortest word
    w.max_letters = 5  # longest word
    w.max_turns = 2  # exchanges per conversation, uniform in 1..max_turns
    w.system_prompt_prob = 0.3  # a system message before the first question
    w.valid_fraction = 0.1  # words held out for the valid split (hashed, seed-independent)
    w.num_heldout_templates = 0  # phrasings per task seen only in the valid split (0: held-out words only)
    a = c.data.arithmetic_chat  # used by the 'arithmetic' variant
    a.operations = "+-"  # addition and subtraction (negative answers included)
    a.max_digits = 2  # operands 0..99
    a.max_turns = 2  # exchanges per conversation, uniform in 1..max_turns

    c.model.d_model = 64  # residual width
    c.model.num_layers = 2  # blocks
    c.model.num_heads = 4  # query heads
    c.model.num_kv_heads = 4  # key/value heads
    c.model.mlp_dim = 256  # SwiGLU width

    c.train.steps = 3000  # optimizer steps
    c.train.batch_size = 16  # rows per step
    c.train.seq_len = 160  # tokens per row: 1..3 conversations (at most 157 tokens each)
    c.train.log_every = 50  # steps between metric lines
    c.train.eval_every = 500  # steps between validation-loss passes
    c.train.checkpoint_every = 0  # only at the end
    c.optimizer.lr = 5e-3  # peak learning rate
    c.optimizer.warmup_steps = 100  # linear warmup
    c.optimizer.weight_decay = 0.1  # AdamW decay

    c.eval.evaluators = "exact_match"  # held-out exact match, with example conversations (lm/evals/exact_match.py)
    e = c.eval.exact_match  # its knobs: configs/base.py

    if arg == "arithmetic":
        c.data.source = "arithmetic_chat"
        c.train.steps = 2000
        e.max_answer_tokens = 8
    elif arg == "tiny":  # seconds, for tests and smoke runs
        c.model.d_model = 32
        c.model.num_layers = 1
        c.model.num_heads = 2
        c.model.num_kv_heads = 1
        c.model.mlp_dim = 64
        c.train.steps = 4
        c.train.batch_size = 4
        c.train.log_every = 2
        c.train.eval_every = 0
        c.train.progress_bar = False
        c.optimizer.warmup_steps = 2
        c.data.num_valid_batches = 1
        e.examples = 8
        e.batch_size = 8
        e.continue_tokens = 4
        e.print_examples = 2
    return c
