"""The base config: every field `lm` reads, each with its meaning and default.

Other configs start from `get_config()` here and change what they need. Any field can
be overridden on the command line:

    python -m lm.cli.train --config=configs/default.py --config.optimizer.lr=1e-3 --workdir=runs/x

The returned ConfigDict is locked: a misspelt key is an error that names close matches.
"""

import ml_collections

from configs import data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds parameter init, data order and dropout-free rng streams
    c.objective = "pretrain"  # which lm/objectives/<name>.py builds the loss

    # -- model (lm/model/: ModelConfig) ----------------------------------------------------------
    m = c.model = ml_collections.ConfigDict()
    m.vocab_size = ml_collections.FieldReference(None, field_type=int)  # None: the tokenizer's size
    m.d_model = 256  # residual stream width
    m.num_layers = 4  # Transformer blocks
    m.num_heads = 4  # query heads
    m.num_kv_heads = 4  # key/value heads (grouped-query attention when < num_heads)
    m.head_dim = ml_collections.FieldReference(None, field_type=int)  # None: d_model // num_heads
    m.mlp_dim = 768  # SwiGLU hidden width
    m.rope_theta = 10_000.0  # rotary embedding base
    m.norm_eps = 1e-6  # RMSNorm epsilon
    m.tie_embeddings = True  # output projection = token embedding transposed
    m.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
    m.remat = "none"  # what each block keeps for its backward pass (lm/model/remat.py): 'none' (everything),
    # 'full' (its input only: recompute the block), 'save_qkv_proj', 'save_out_proj', 'save_dots', 'offload' (host)
    m.scan_layers = True  # lax.scan over the stacked blocks; False unrolls them (longer compile, faster on CPU)
    m.attention_block = 64  # causal attention in blocks of this many queries, skipping masked key blocks; 0: off
    m.attention_impl = "auto"  # auto | dense | blockwise | splash | cudnn | pallas_gpu (lm/model/attention_ops.py);
    # auto picks by the platform compiled for: TPU splash; GPU cudnn (bfloat16), else pallas_gpu; CPU dense
    # below 512 tokens per row, blockwise (flash-style XLA in blocks of attention_block, memory O(T·block)) from there
    m.decode_block = 0  # cached decoding attends to all slots; b > 0: the filled ones rounded up to a multiple of b
    m.init_scale = 1.0  # multiplies every initial standard deviation
    m.qkv_bias = False  # biases on the q, k, v projections (Qwen2): params blocks.attn.bq [L, H, hd], bk, bv [L, K, hd]
    m.rope_scaling = "none"  # rotary frequencies: 'none' (theta^(-2i/d)) or 'llama3' (Llama 3.1's low-frequency rescaling)
    m.rope_factor = 8.0  # llama3: frequencies of wavelengths > rope_original_max_position / rope_low_freq_factor are divided by this
    m.rope_low_freq_factor = 1.0  # llama3: lower end of the interpolated band (in units of 1/wavelength · original_max_position)
    m.rope_high_freq_factor = 4.0  # llama3: wavelengths < rope_original_max_position / this keep their frequency
    m.rope_original_max_position = 8192  # llama3: the context length the unscaled frequencies were trained for

    # -- loss (lm/losses/) --------------------------------------------------------------------------
    loss = c.loss = ml_collections.ConfigDict()
    loss.kind = "explicit"  # 'explicit': logits then cross_entropy; 'fused': fused_cross_entropy
    loss.chunk_size = 1024  # tokens per chunk of the fused loss
    loss.z_loss = 0.0  # coefficient of logsumexp² added per token
    loss.label_smoothing = 0.0  # mass moved to the uniform distribution

    # -- optimizer (lm/train/optim.py) -------------------------------------------------------------------
    o = c.optimizer = ml_collections.ConfigDict()
    o.lr = 3e-3  # peak learning rate after warmup
    o.warmup_steps = 50  # linear warmup from 0
    o.decay_steps = ml_collections.FieldReference(None, field_type=int)  # cosine length; None: train.steps
    o.min_lr_ratio = 0.1  # final lr = min_lr_ratio · lr
    o.b1 = 0.9  # Adam β1
    o.b2 = 0.95  # Adam β2
    o.eps = 1e-8  # Adam ε
    o.weight_decay = 0.1  # decoupled (AdamW) weight decay
    o.decay_norms_and_biases = False  # apply weight decay to 1-D parameters (norm scales) too
    o.grad_clip = 1.0  # global-norm clipping threshold; 0 turns it off

    # -- training loop (lm/train/step.py) ---------------------------------------------------------------
    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000  # optimizer steps
    t.batch_size = 32  # global batch, rows of seq_len tokens, summed over all devices
    t.seq_len = 128  # tokens per row (T)
    t.micro_batches = 1  # gradient accumulation: the batch is split into this many pieces
    t.log_every = 10  # steps between metrics lines
    t.eval_every = 200  # steps between validation passes; 0: only at the end
    t.checkpoint_every = 500  # steps between checkpoints; 0: only at the end
    t.keep_checkpoints = 2  # how many recent checkpoints to keep
    t.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: a known accelerator's spec, else a matmul measured at start
    t.progress_bar = True  # tqdm bar with step, loss, tokens/s and ETA
    t.max_bad_steps = 10  # consecutive non-finite steps (skipped) before the run stops
    t.async_checkpointing = True  # write checkpoints in a background thread while training goes on
    # Start from another run (lm/io/checkpoint.py: find_checkpoints): its run directory, its checkpoints/
    # directory or one checkpoints/<step>/ directory. Ignored once the workdir holds a checkpoint of
    # its own (the run then resumes from that).
    t.restore_from = ml_collections.FieldReference(None, field_type=str)  # None: a fresh start
    t.restore_params_only = False  # with restore_from: parameters only (fine-tuning: step 0, new optimizer and data)
    # Start a new run (step 0, fresh optimizer and data order) from another run's parameters: every parameter
    # whose path and shape match is taken from its newest checkpoint, the rest (a new reward or value head)
    # freshly initialized (lm/train/init.py). A run directory, its checkpoints/ or one checkpoints/<step>/.
    t.init_from = ml_collections.FieldReference(None, field_type=str)  # None: no
    # fault injection for tests of lm/train/loop.py; all off by default
    t.inject = ml_collections.ConfigDict()
    t.inject.nan_steps = ""  # comma-separated steps (1-based) whose batch gets a NaN loss mask, e.g. "5,6"
    t.inject.step_delay_s = 0.0  # sleep after every step, so that a test can kill the run mid-way
    t.inject.save_delay_s = 0.0  # hold every checkpoint save open this long before it commits

    # -- low-rank adapters: LoRA / QLoRA for every objective (lm/model/lora.py, lm/train/lora.py) --------
    lo = c.lora = ml_collections.ConfigDict()
    lo.rank = 0  # adapter rank r; 0: off (the model, its parameters and its step are exactly the plain ones)
    lo.alpha = 16.0  # α: the adapter term is scaled by α/r (α/√r with rslora)
    lo.rslora = False  # rank-stabilized scaling α/√r instead of α/r
    lo.dropout = 0.0  # adapter dropout (PEFT's lora_dropout): zeroes each adapter input in training with this probability
    lo.targets = "all"  # projections that get adapters: names from q, k, v, o, gate, up, down (or q_proj,
    # …), 'attention', 'mlp', 'all', or regexes over the names; comma-separated
    lo.base_dtype = "bfloat16"  # how the frozen base is held: 'float32', 'bfloat16', or the projections in
    # 'int8' / 'nf4' (QLoRA: NF4 codes, absmax per block, the block scales double-quantized), the rest bfloat16
    lo.block_size = 64  # int8 / nf4: weights per absmax block along a projection's input axis

    # -- device mesh (lm/parallel/sharding.py) --------------------------------------------------------------
    mesh = c.mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data-parallel axis size; -1: the devices left over
    mesh.fsdp = 1  # parameter/optimizer-state sharding axis (ZeRO-3 style)
    mesh.tensor = 1  # tensor-parallel axis (heads, MLP width, vocabulary)
    # several slices (multi-slice TPU over DCN, GPU hosts): each axis's size across slices; the mesh axis
    # is then data × dcn_data etc. (lm/parallel/sharding.py: make_mesh). 1: one slice
    mesh.dcn_data = 1  # data parallelism across slices (the usual choice: one gradient all-reduce per step)
    mesh.dcn_fsdp = 1  # parameter sharding across slices (all-gathers over DCN every layer: rarely worth it)
    mesh.dcn_tensor = 1  # tensor parallelism across slices (never worth it; kept for completeness)
    mesh.slice = ""  # the Cloud TPU slice the config is for ('v5p-128'): `lm.train.memory --target=tpu` compiles
    # for its topology and takes its HBM from lm/parallel/devices.py; '' none
    # logical parameter axis -> mesh axis (or None: replicated). See lm/parallel/sharding.py.
    mesh.rules = ml_collections.ConfigDict({
        "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
        "head_dim": None, "mlp": "tensor", "layers": None})
    mesh.device_memory_gib = 0.0  # per-device memory the fit check assumes; 0: ask the device (none on CPU)
    mesh.memory_fraction = 0.9  # fail before training if the step needs more than this share of it

    # -- multi-process start-up (lm/parallel/distributed.py) -------------------------------------------------
    dc = c.distributed = ml_collections.ConfigDict()
    dc.auto = False  # Cloud TPU: let jax.distributed.initialize() find everything itself
    dc.coordinator_address = ml_collections.FieldReference(None, field_type=str)  # 'host:port' of process 0
    dc.num_processes = ml_collections.FieldReference(None, field_type=int)  # processes in the job
    dc.process_id = ml_collections.FieldReference(None, field_type=int)  # this process's index
    dc.heartbeat_timeout_s = 60  # a peer silent this long ends the job with an error
    dc.initialization_timeout_s = 300  # give up if not every process has joined within this time
    dc.cpu_collectives = "gloo"  # cross-process collectives on CPU: 'gloo' or 'mpi' (TPU/GPU ignore it)
    dc.supervisor = True  # fork: a parent turns the runtime's abort (coordinator lost) into a clear exit 75

    # -- data (lm/data; every field documented in configs/data.py) ------------------------------------
    c.data = data.data_config()  # the data block, documented field by field in configs/data.py

    # -- metrics sinks -----------------------------------------------------------------------------
    w = c.wandb = ml_collections.ConfigDict()
    w.mode = "disabled"  # 'disabled', 'offline' or 'online'
    w.project = "lm"  # wandb project
    w.name = ml_collections.FieldReference(None, field_type=str)  # run name; None: the workdir's name

    # -- evaluations after training (lm/evals/) ----------------------------------------------------
    ev = c.eval = ml_collections.ConfigDict()
    ev.evaluators = "samples"  # comma-separated: 'samples', 'exact_match' (lm/evals/__init__.py); '' for none
    em = ev.exact_match = ml_collections.ConfigDict()  # lm/evals/exact_match.py (synthetic chat sources)
    em.examples = 500  # held-out conversations whose final answer is decoded greedily
    em.batch_size = 250  # prompts decoded together
    em.max_answer_tokens = 12  # longest answer accepted (tokens before <|end_of_turn|>)
    em.continue_tokens = 16  # tokens generated past the answer's <|end_of_turn|> (writes a user turn?)
    em.print_examples = 3  # example conversations printed

    # -- samples printed at the end of a run (the 'samples' evaluator) ---------------------------------------------------------
    s = c.sample = ml_collections.ConfigDict()
    s.num_samples = 3  # how many; 0 turns sampling off
    s.max_new_tokens = 96  # tokens generated per sample
    s.prompt = ""  # text every sample starts from ("" : a one-token prompt, see lm/cli/train.py)
    s.temperature = 0.0  # 0: greedy
    s.top_k = 0  # 0: off
    s.top_p = 1.0  # 1: off

    # -- the run's stated goal, checked and printed at the end (lm/io/report.py: target_verdict) ---------------
    g = c.target = ml_collections.ConfigDict()
    g.metric = ""  # a summary.json key, e.g. 'relative_gap'; "" states no target
    g.max = ml_collections.FieldReference(None, field_type=float)  # met when summary[metric] <= max
    g.min = ml_collections.FieldReference(None, field_type=float)  # met when summary[metric] >= min

    return c
