"""GRPO from rewards on the synthetic chat tasks (lm/objectives/grpo.py), starting from an SFT run.

    python -m lm.cli.train --config=configs/sft.py --config.train.steps=1000 --config.optimizer.decay_steps=1600 \
        --workdir=runs/sft_brief     # SFT stopped at step 1000 of its 1600-step schedule
    python -m lm.cli.train --config=configs/grpo.py --config.train.init_from=runs/sft_brief --workdir=runs/grpo
    python -m lm.cli.train --config=configs/grpo.py:tiny --workdir=/tmp/grpo     # seconds: tests, smoke runs

Each step samples rl.group_size completions of train.batch_size / rl.group_size held-in prompts
with the current policy (KV-cache decoding inside the loop), scores them with rl.reward
(lm/rewards.py: exact match against the task's answer by default) and takes one GRPO step with
a KL penalty to the frozen reference (the SFT parameters of train.init_from). A row of
train.seq_len tokens holds the left-padded prompt (seq_len − rl.max_new_tokens tokens) and the
completion. After training the rl_exact_match evaluator reports the held-out greedy exact match
of the policy (rl_exact_match) and of the reference (sft_exact_match).

Args: '' (word chat), 'arithmetic', 'markov' (the Markov known-optimum task, from a pretraining
run of configs/default.py on the same chain: see experiments/rl.md), 'tiny' (a random tiny model
learning a character-fraction reward: seconds).
"""

import ml_collections

from configs import base

ARGS = ("", "tiny", "arithmetic", "markov")


def rl_config() -> ml_collections.ConfigDict:
    """The rl block (lm/objectives/_rl.py, grpo.py, ppo.py), every field commented."""
    rl = ml_collections.ConfigDict()
    rl.group_size = 8  # G: completions sampled per prompt (train.batch_size / G prompts per step)
    rl.max_new_tokens = 12  # N: tokens generated per completion, stop token included
    rl.max_answer_tokens = 16  # longest reference answer a prompt batch carries (tokens)
    rl.stop = "stop_ids"  # 'stop_ids': a completion ends at any stop id of the tokenizer (end_of_turn, eos, an
    #   imported model's generation_config eos list; 'end_of_turn' is the old name of the same); 'none': N tokens
    rl.temperature = 1.0  # > 0: sampling temperature of the rollouts; every policy log-prob (old, current) is of
    #   the distribution sampled (temperature and the filters below, lm.sampling.behaviour_logprobs)
    rl.top_k = 0  # rollout top-k; 0: off
    rl.top_p = 1.0  # rollout top-p; 1: off
    rl.min_p = 0.0  # rollout min-p; 0: off
    rl.decode_layout = True  # decode with lm.model.cpu.for_decoding's fused copy, built inside the jit
    rl.reward = "exact_match"  # lm/rewards.py: 'name' or 'name:weight,name:weight'; or 'reward_model'
    rl.on_reward_error = "raise"  # a reward that raises / is not finite: 'raise', or 'skip' (masked, counted)
    ro = rl.reward_options = ml_collections.ConfigDict()  # knobs of some rules (lm/rewards.py)
    ro.chars = "abcdefghijklmnopqrstuvwxyz"  # char_fraction: the characters that count
    ro.alphabet = "abcdefghijklmnop"  # markov: the chain's alphabet (data.markov.alphabet)
    ro.markov_seed = 0  # markov: seed of the per-character gains g
    ro.markov_scale = 1.0  # markov: their scale (1/τ of the Bradley–Terry labels)
    rl.reward_model = ml_collections.FieldReference(None, field_type=str)  # rl.reward='reward_model': its run
    rl.updates_per_rollout = 1  # optimizer steps per rollout (k > 1: PPO epochs; the clip acts)
    rl.advantage_scale = "group"  # GRPO: divide centred rewards by the group's std, the batch's, or 'none'
    rl.advantage_ddof = 0  # that std's ddof: 0 population std (published GRPO); 1 sample std (TRL's torch.std)
    rl.clip_eps = 0.2  # ε of the clipped ratio
    rl.clip_eps_high = 0.0  # ε_high (DAPO clip-higher); 0: = clip_eps
    rl.kl_coef = 0.02  # β: weight of the per-token KL to the reference
    rl.kl_estimator = "k2"  # penalty in the loss (lm.losses.kl_penalty): 'k2' ½(log π − log π_ref)², expected
    #   gradient ∇KL(π‖π_ref); 'k3' (TRL's) gives ∇KL(π_ref‖π), the forward KL; 'k1' gives 0 in expectation
    rl.kl_penalty = "loss"  # 'loss': β·KL_t in the policy loss; 'reward': β·(sampled k1) subtracted from the reward
    rl.normalize = "sequence"  # policy-loss normalization: 'sequence' (GRPO), 'token' (DAPO), 'constant'
    rl.loss_type = ""  # '' (clipped surrogate, rl.normalize) or the GRPO family of lm.losses.policy_loss: 'grpo',
    #   'bnpo', 'dapo', 'dr_grpo', 'cispo', 'sapo' (each with its own normalization; rl.normalize then unused)
    rl.importance_sampling_level = "token"  # 'token': per-token ratio; 'sequence': GSPO's length-normalized one
    rl.sapo_temperature_pos = 1.0  # SAPO's gate temperature τ for positive advantages
    rl.sapo_temperature_neg = 1.05  # SAPO's τ for negative advantages
    rl.dynamic_sampling = False  # DAPO: drop groups whose rewards are all equal (counted), resample to refill
    rl.dynamic_sampling_max_rounds = 4  # extra rollouts of the step's prompts to refill; then masked, counted
    rl.overlong_cache = 0  # DAPO soft overlong penalty: L_cache tokens before rl.max_new_tokens; 0: off
    # PPO only (lm/objectives/ppo.py)
    rl.gamma = 1.0  # discount of GAE
    rl.lam = 0.95  # λ of GAE
    rl.value_coef = 0.5  # weight of the value loss in the objective
    rl.value_clip_eps = 0.2  # clip of the value loss; 0: off
    rl.whiten_advantages = True  # normalize the GAE advantages over the batch's scored tokens
    return rl


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if (arg or "") not in ARGS:
        raise ValueError(f"configs/grpo.py takes one of {ARGS}, got {arg!r}")
    c = base.get_config()
    c.objective = "grpo"  # lm/objectives/grpo.py
    c.rl = rl_config()

    # the SFT task (configs/sft.py), one exchange per prompt; the prompts come from the train split
    c.data.source = "word_chat"  # prompts + answers (lm/data/synthetic.py: WordChat)
    w = c.data.word_chat
    w.tasks = "reverse,upper,dashes"  # as configs/sft.py
    w.alphabet = "abcdefghijklmnopqrstuvwxyz"  # as configs/sft.py
    w.min_letters = 3  # as configs/sft.py
    w.max_letters = 5  # as configs/sft.py
    w.max_turns = 1  # one question per prompt: what the reward scores
    w.system_prompt_prob = 0.3  # as configs/sft.py
    w.valid_fraction = 0.1  # as configs/sft.py: the same held-out words
    w.num_heldout_templates = 0  # as configs/sft.py
    a = c.data.arithmetic_chat  # the 'arithmetic' variant
    a.operations = "+-"  # as configs/sft.py
    a.max_digits = 2  # as configs/sft.py
    a.max_turns = 1  # one question per prompt

    c.model.d_model = 64  # as configs/sft.py (the shape of the init_from run)
    c.model.num_layers = 2  # as configs/sft.py
    c.model.num_heads = 4  # as configs/sft.py
    c.model.num_kv_heads = 4  # as configs/sft.py
    c.model.mlp_dim = 256  # as configs/sft.py

    c.train.steps = 400  # optimizer steps = rollouts
    c.train.batch_size = 128  # completions per step: 16 prompts × rl.group_size
    c.train.seq_len = 112  # prompt (≤ 100 tokens, left-padded) + rl.max_new_tokens
    c.train.log_every = 10  # steps between metric lines
    c.train.eval_every = 0  # RL has no validation loss
    c.train.checkpoint_every = 0  # only at the end
    c.optimizer.lr = 5e-4  # peak (cosine decay over train.steps); 1e-3 collapsed the reward (experiments/rl.md)
    c.optimizer.warmup_steps = 5  # linear warmup
    c.optimizer.weight_decay = 0.0  # no decay toward 0 (the KL term keeps it near the reference)

    c.eval.evaluators = "rl_exact_match"  # held-out greedy exact match of policy and reference (lm/evals/rl.py)
    c.eval.exact_match.examples = 500  # held-out prompts
    c.eval.exact_match.continue_tokens = 0  # only the answer is generated
    c.eval.exact_match.print_examples = 2  # examples printed

    if arg == "arithmetic":
        c.data.source = "arithmetic_chat"
        c.eval.exact_match.max_answer_tokens = 8
    elif arg == "markov":  # lm/data/markov_reward.py: r(x) = Σ g(x_t), known KL-regularized optimum
        c.data.source = "markov"  # prompts: a start state's characters (lm/data/prompts.py: MarkovPrompts)
        c.data.markov.alphabet = "abcdefgh"  # 8 characters
        c.data.markov.order = 1  # 8 states
        c.model.num_kv_heads = 2  # configs/default.py's shape (the pretraining run of init_from)
        c.model.scan_layers = False  # as configs/default.py
        c.rl.stop = "none"  # every completion is N characters
        c.rl.max_new_tokens = 8  # N, the horizon
        c.rl.max_answer_tokens = 1  # no answers
        c.rl.reward = "markov"
        c.rl.on_reward_error = "skip"  # a character outside the alphabet (rare): masked and counted, as markov_gain does
        c.rl.reward_options.alphabet = "abcdefgh"  # = data.markov.alphabet
        c.rl.kl_coef = 0.5  # β of J = E[r] − β·KL(π‖π_ref)
        c.rl.kl_penalty = "reward"  # the sampled KL in the reward: the gradient of J itself
        c.train.seq_len = 16  # prompt (1 character, left-padded) + 8
        c.train.steps = 150
        c.optimizer.lr = 3e-4
        c.eval.evaluators = "markov_gain"  # fraction of the optimal gain (lm/evals/rl.py)
        c.eval.exact_match.examples = 2000  # samples per Monte Carlo estimate of J
    elif arg == "tiny":  # a random tiny model learns to write letters (char_fraction): seconds
        c.model.d_model = 32
        c.model.num_layers = 1
        c.model.num_heads = 2
        c.model.num_kv_heads = 1
        c.model.mlp_dim = 64
        c.rl.group_size = 4
        c.rl.max_new_tokens = 8
        c.rl.reward = "char_fraction"
        c.rl.kl_coef = 0.0
        c.train.steps = 8
        c.train.batch_size = 32
        c.train.log_every = 1
        c.train.progress_bar = False
        c.optimizer.lr = 3e-2
        c.optimizer.warmup_steps = 0
        c.eval.evaluators = ""
    return c
