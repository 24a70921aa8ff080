"""Chat SFT on the built-in arithmetic chat task: train from scratch, then report exact match.

    python -m lm.main --config=configs/sft.py                 # the main job (minutes on a CPU)
    python -m lm.main --config=configs/sft.py:tiny            # seconds, for tests and smoke runs
    python -m lm.main --config=configs/sft.py --config.data.chat_loss=all    # score every token

The task (lm/data/synthetic.py: ArithmeticChat): conversations of 1..max_turns exchanges,
each a user asking for a + b or a − b (operands of 1..2 digits, 12 phrasings, sometimes a
system prompt) and the assistant answering the exact number. Every problem of the valid
split is held out of training, and so are 2 of the phrasings. After training,
lm/objectives/sft.py: after_training decodes the final answer of `sft.eval_examples` valid
conversations greedily and reports the exact-match accuracy (summary.json: exact_match).

From a pretrained model instead of from scratch: point train.restore_from at a pretraining
run directory (params only; lm/checkpoint.py). The tokenizer and special-token ids must
match that run's tokenizer_metadata.json, or the run stops with a TokenizerMismatchError.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.objective = "sft"  # lm/objectives/sft.py: pretraining's loss under the chat loss mask

    c.data.source = "arithmetic_chat"  # the synthetic chat task with exact answers
    c.data.chat_loss = "assistant_only"  # score assistant answers + their end-of-turn only
    c.data.packing = "first_fit"  # whole conversations per row, several per row (segment ids)
    c.data.num_valid_batches = 8  # validation loss batches (the same every eval)
    a = c.data.arithmetic_chat
    a.operations = "+-"  # addition and subtraction (negative answers included)
    a.max_digits = 2  # operands 0..99
    a.max_turns = 3  # exchanges per conversation, uniform in 1..max_turns (multi-turn history)
    a.system_prompt_prob = 0.3  # a system message before the first question
    a.valid_fraction = 0.1  # problems held out for the valid split
    a.num_heldout_templates = 2  # phrasings seen only in the valid split

    c.model.d_model = 128  # residual width
    c.model.num_layers = 3  # blocks
    c.model.num_heads = 4  # query heads
    c.model.num_kv_heads = 4  # key/value heads
    c.model.mlp_dim = 512  # SwiGLU width

    c.train.steps = 1500  # optimizer steps
    c.train.batch_size = 32  # rows per step
    c.train.seq_len = 192  # tokens per row: 1..3 conversations (at most 163 tokens each)
    c.train.log_every = 50  # steps between metric lines
    c.train.eval_every = 500  # steps between validation-loss passes
    c.train.checkpoint_every = 0  # only at the end
    c.optimizer.lr = 3e-3  # peak learning rate
    c.optimizer.warmup_steps = 100  # linear warmup
    c.optimizer.weight_decay = 0.1  # AdamW decay

    c.sample.num_samples = 0  # after_training prints example conversations instead

    # -- evaluation after training (lm/objectives/sft.py: after_training) --------------------------
    e = c.sft = ml_collections.ConfigDict()
    e.eval_examples = 500  # held-out conversations whose final answer is decoded greedily
    e.eval_batch_size = 250  # prompts decoded together
    e.max_answer_tokens = 8  # longest answer accepted (tokens before <|end_of_turn|>)
    e.continue_tokens = 16  # tokens generated past the answer's <|end_of_turn|> (writes a user turn?)
    e.print_examples = 3  # example conversations printed

    if arg == "tiny":  # seconds, for tests and smoke runs
        c.model.d_model = 32
        c.model.num_layers = 1
        c.model.num_heads = 2
        c.model.num_kv_heads = 1
        c.model.mlp_dim = 64
        c.train.steps = 4
        c.train.batch_size = 4
        c.train.seq_len = 192
        c.train.log_every = 2
        c.train.eval_every = 0
        c.train.progress_bar = False
        c.optimizer.warmup_steps = 2
        c.data.num_valid_batches = 1
        e.eval_examples = 8
        e.eval_batch_size = 8
        e.continue_tokens = 4
        e.print_examples = 2
    elif arg:
        raise ValueError(f"configs/sft.py takes '' or 'tiny', got {arg!r}")
    return c
