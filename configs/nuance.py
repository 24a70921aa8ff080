"""The stages of experiments/rlhf_nuance.py: two correct phrasings, a hidden preference for one.

    python -m lm.cli.train --config=configs/nuance.py:sft --workdir=/tmp/nuance/sft
    python -m lm.cli.train --config=configs/nuance.py:reward --workdir=/tmp/nuance/reward \
        --config.train.init_from=/tmp/nuance/sft \
        --config.data.preference_jsonl.train_files=/tmp/nuance/pairs_train.jsonl \
        --config.data.preference_jsonl.valid_files=/tmp/nuance/pairs_valid.jsonl
    python -m lm.cli.train --config=configs/nuance.py:dpo ...      (the same flags as reward)
    python -m lm.cli.train --config=configs/nuance.py:grpo --workdir=/tmp/nuance/grpo \
        --config.train.init_from=/tmp/nuance/sft --config.rl.reward_model=/tmp/nuance/reward
    python -m lm.cli.train --config=configs/nuance.py:ppo ...      (the same flags as grpo)

The task is configs/sft.py's word chat (reverse / capitals / dashes of a 3..5-letter word), one
question per conversation, with every answer written bare ('cba') or as a sentence ('It is cba.')
with probability 1/2 each (data.word_chat.sentence_prob; lm/data/synthetic.py). Nothing in the
data says which phrasing is better; the experiment's labeller prefers the sentence
(lm/evals/nuance.py: PREFERRED). Every stage has configs/sft.py's model shape, so that
train.init_from carries the SFT parameters into the reward model, DPO and RL (whose frozen
reference is that same SFT run). The policies (sft, dpo, grpo, ppo) end with the `nuance`
evaluator: sampled correctness, preferred-phrasing rate and KL to the SFT model on the same
held-out prompts and draws (config.eval.nuance).

Args: 'sft' (the default), 'reward', 'dpo', 'grpo', 'ppo'.
"""

import ml_collections

from configs import base, grpo

ARGS = ("sft", "reward", "dpo", "grpo", "ppo")


def _task(c: ml_collections.ConfigDict) -> None:
    """The two-phrasing word chat task and configs/sft.py's model, shared by every stage."""
    w = c.data.word_chat
    w.tasks = "reverse,upper,dashes"  # as configs/sft.py
    w.alphabet = "abcdefghijklmnopqrstuvwxyz"  # as configs/sft.py
    w.min_letters = 3  # as configs/sft.py
    w.max_letters = 5  # as configs/sft.py
    w.max_turns = 1  # one question per conversation: every prompt is a fresh question
    w.system_prompt_prob = 0.3  # as configs/sft.py
    w.valid_fraction = 0.1  # held-out words (the evaluator's prompts)
    w.num_heldout_templates = 0  # as configs/sft.py
    w.sentence_prob = 0.5  # 'It is cba.' or 'cba', equally often: two correct phrasings
    c.data.chat_loss = "assistant_only"  # score assistant answers + their end-of-turn only

    c.model.d_model = 64  # as configs/sft.py
    c.model.num_layers = 2  # as configs/sft.py
    c.model.num_heads = 4  # as configs/sft.py
    c.model.num_kv_heads = 4  # as configs/sft.py
    c.model.mlp_dim = 256  # as configs/sft.py

    c.train.log_every = 25  # steps between metric lines
    c.train.checkpoint_every = 0  # only at the end
    c.train.progress_bar = False  # metric lines only
    c.sample.num_samples = 0  # no printed samples

    e = c.eval.nuance = ml_collections.ConfigDict()  # lm/evals/nuance.py
    e.examples = 500  # held-out prompts (the valid split's first ones)
    e.samples_per_prompt = 2  # replies sampled per prompt at temperature 1
    e.prompt_len = 100  # prompts left-padded to this many tokens (the same in every run)
    e.max_new_tokens = 24  # tokens per reply, <|end_of_turn|> included ('It is a-b-c-d-e.' is 16)
    e.batch_size = 250  # replies sampled together
    e.seed = 0  # sampling key (the same in every run: the same draws)
    e.print_examples = 3  # prompts printed with their sampled replies


def _pairs(c: ml_collections.ConfigDict) -> None:
    """Preference pairs sampled from the SFT model (experiments/rlhf_nuance.py writes them)."""
    c.data.source = "preference_jsonl"  # TRL-format pairs (lm/data/preference.py)
    p = c.data.preference_jsonl
    p.train_files = ""  # pairs of held-in prompts: set on the command line
    p.valid_files = ""  # pairs of held-out prompts: set on the command line
    c.data.num_valid_batches = 4  # validation-loss batches of pairs
    c.train.batch_size = 32  # pairs per step
    c.train.seq_len = 120  # prompt (<= 100 tokens) + the longest reply
    c.train.eval_every = 100  # steps between validation-loss passes
    c.optimizer.warmup_steps = 20  # linear warmup
    c.optimizer.weight_decay = 0.0  # no decay toward 0 (the start is the SFT model)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "sft"
    if arg not in ARGS:
        raise ValueError(f"configs/nuance.py takes one of {ARGS}, got {arg!r}")
    if arg in ("grpo", "ppo"):
        c = grpo.get_config()  # the rl block and its defaults (configs/grpo.py, every field documented)
    else:
        c = base.get_config()
    _task(c)

    if arg == "sft":
        c.objective = "sft"  # lm/objectives/sft.py
        c.data.source = "word_chat"  # the two-phrasing task
        c.data.chat_overflow = "truncate_left"  # as configs/sft.py
        c.data.packing = "first_fit"  # whole conversations, several per row
        c.data.num_valid_batches = 8  # validation-loss batches
        c.train.steps = 2000  # optimizer steps
        c.train.batch_size = 16  # rows per step
        c.train.seq_len = 160  # tokens per row: 1..3 conversations
        c.train.eval_every = 500  # steps between validation-loss passes
        c.optimizer.lr = 5e-3  # as configs/sft.py
        c.optimizer.warmup_steps = 100  # linear warmup
        c.optimizer.weight_decay = 0.1  # AdamW decay
        c.eval.evaluators = "nuance"  # the reference row of the table (KL 0: no starting model)
    elif arg == "reward":
        _pairs(c)
        c.objective = "reward"  # lm/objectives/reward.py: Bradley–Terry on a RewardModel
        r = c.reward = ml_collections.ConfigDict()
        r.margin = 0.0  # m in −log σ(r_c − r_r − m)
        r.center_rewards = 0.01  # c·Σ(r_c + r_r)²: keeps the scores near 0 (the RL reward's offset)
        c.train.steps = 300  # optimizer steps
        c.optimizer.lr = 1e-3  # peak learning rate
        c.eval.evaluators = "pairwise_accuracy"  # held-out pairs (lm/evals/pairwise_accuracy.py)
        c.eval.pairwise_accuracy = ml_collections.ConfigDict()
        c.eval.pairwise_accuracy.batch_size = 256  # pairs scored together
    elif arg == "dpo":
        _pairs(c)
        c.objective = "dpo"  # lm/objectives/dpo.py
        d = c.dpo = ml_collections.ConfigDict()
        d.beta = 1.0  # β: KL-regularization strength (0.1 with lr 3e-4, 300 steps: KL 6.5 nats, 58% correct)
        d.loss_type = "sigmoid"  # plain DPO (lm.losses.dpo_loss)
        d.label_smoothing = 0.0  # no label noise: the labeller is exact
        d.reference = "model"  # the frozen SFT model (train.init_from)
        c.train.steps = 200  # optimizer steps (~3 epochs of ~2,000 pairs)
        c.optimizer.lr = 1e-4  # peak learning rate
        c.eval.evaluators = "nuance"
    else:  # grpo, ppo: rewards from the frozen reward model of rl.reward_model
        rl = c.rl
        rl.reward = "reward_model"  # r = the reward model's score of prompt + reply
        rl.max_new_tokens = 24  # as eval.nuance.max_new_tokens
        rl.max_answer_tokens = 24  # the reference answers the prompt batches carry (unused by the reward model)
        rl.kl_penalty = "reward"  # the sampled KL to the SFT model subtracted from the reward: J = E[r] − β·KL
        rl.kl_coef = 0.3  # β (0.02 as a k3 loss term: GRPO reached KL 1.7 nats and 78% correct)
        c.train.seq_len = 124  # prompt (<= 100 tokens, left-padded) + rl.max_new_tokens
        c.train.steps = 100  # optimizer steps = rollouts
        c.train.batch_size = 64  # completions per step
        c.train.log_every = 10  # steps between metric lines
        c.optimizer.lr = 1e-4  # as configs/grpo.py
        c.eval.evaluators = "nuance"
        if arg == "ppo":  # configs/ppo.py's changes
            c.objective = "ppo"  # lm/objectives/ppo.py: value head, GAE, whitened advantages
            rl.group_size = 4  # completions per prompt
            rl.normalize = "token"  # policy and value loss: mean over generated tokens
            rl.lam = 0.95  # GAE λ
            rl.value_coef = 0.5  # weight of the value loss
            rl.value_clip_eps = 0.2  # value-loss clip
            rl.whiten_advantages = True  # whiten the GAE advantages
    return c
