"""The `config.data` block: where tokens come from and how they become [B, T] batches.

Used as `config.data = data.data_config()` in configs/base.py. Batch size, sequence
length and seed are not here: the trainer passes them to lm.data.build_iterator.
Files fields take a comma-separated list of globs ('a/*.txt,b/*.txt').
"""

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    """Defaults: the known-entropy Markov source with the byte tokenizer."""
    c = ml_collections.ConfigDict()
    c.source = 'markov'        # 'markov' | 'copy' | 'arithmetic_chat' | 'word_chat' | 'text' | 'jsonl' | 'chat_jsonl' | 'array_record' | 'markov_preference' | 'preference_jsonl' (pairs: lm/data/preference.py)
    c.tokenizer = 'byte'       # 'byte' (UTF-8 bytes + 7 specials, vocab 263) | path to tokenizer.json | path to SentencePiece .model
    c.on_error = 'raise'       # bad record: 'raise' (error naming file:line) | 'skip' (drop it and count it in error_counts())
    c.packing = 'auto'         # 'concat' (fill rows in order, split across rows) | 'first_fit' (whole chunks, first row with room) | 'auto' (first_fit for chat sources, else concat)
    c.add_bos = True           # text/jsonl/chat: put <|bos|> before each document (synthetic markov/copy never add one)
    c.add_eos = True           # text/jsonl: put <|eos|> after each document (chat ends turns with <|end_of_turn|>)
    c.chat_overflow = 'truncate_left'  # chat longer than a row: 'truncate_left' (oldest turns cut, counted) | 'drop' (bad record) | 'none' (split across rows)
    c.chat_loss = 'assistant_only'  # chat sources: 'assistant_only' (assistant content + its end-of-turn) | 'all'
    c.num_workers = 0          # grain worker processes for the train split (0 = in the main process); resume needs the same value
    c.worker_buffer_size = 2   # batches each worker prepares ahead
    c.group_size = 256         # documents read and tokenized together (bulk tokenizer calls, vectorized Markov)
    c.read_threads = 0         # threads reading/tokenizing documents in each process (0 = inline)
    c.num_valid_batches = 8    # batches in the valid split, the same on every eval and every process (padding past the end)
    c.valid_fraction = 0.01    # file sources without valid_files: fraction of records held out (hashed, seed-independent)

    c.markov = ml_collections.ConfigDict()
    c.markov.alphabet = 'abcdefghijklmnop'  # ASCII characters of the chain (one byte token each)
    c.markov.order = 2                      # the next character depends on the previous `order` characters
    c.markov.concentration = 0.5            # Dirichlet concentration of each transition row (smaller = lower entropy)
    c.markov.seed = 0                       # seed of the transition table (the chain itself, not the sampled documents)

    c.copy = ml_collections.ConfigDict()
    c.copy.alphabet = 'abcdefghijklmnopqrstuvwxyz'  # characters of the random prefix
    c.copy.separator = '|'                          # one character, not in the alphabet, between prefix and copy
    c.copy.score = 'all'                            # 'all' targets | 'copy' (only the copied half: Bayes CE 0)

    c.arithmetic_chat = ml_collections.ConfigDict()
    c.arithmetic_chat.max_digits = 3             # operands have 1..max_digits digits
    c.arithmetic_chat.operations = '+-*'         # subset of '+-*'
    c.arithmetic_chat.valid_fraction = 0.1       # fraction of (op, a, b) problems held out for the valid split
    c.arithmetic_chat.num_heldout_templates = 2  # question phrasings seen only in the valid split
    c.arithmetic_chat.system_prompt_prob = 0.3   # probability of a system message before the question

    c.word_chat = ml_collections.ConfigDict()
    c.word_chat.tasks = 'reverse,upper,dashes'       # transformations asked for (comma-separated)
    c.word_chat.alphabet = 'abcdefghijklmnopqrstuvwxyz'  # letters of the random words (each used once per word)
    c.word_chat.min_letters = 3                      # shortest word
    c.word_chat.max_letters = 5                      # longest word
    c.word_chat.max_turns = 2                        # exchanges per conversation, uniform in 1..max_turns
    c.word_chat.system_prompt_prob = 0.3             # probability of a system message before the first question
    c.word_chat.valid_fraction = 0.1                 # words held out for the valid split (hashed, seed-independent)
    c.word_chat.num_heldout_templates = 0            # phrasings per task seen only in the valid split
    c.word_chat.sentence_prob = 0.0                  # answers written 'It is cba.' with this probability, else 'cba' (0.5: two equally frequent phrasings)

    c.text = ml_collections.ConfigDict()
    c.text.train_files = ''    # globs of UTF-8 text files
    c.text.valid_files = ''    # globs for the valid split ('' = hold out valid_fraction of train_files)
    c.text.document = 'file'   # one document per 'file' | 'block' (blank-line separated) | 'line'

    c.jsonl = ml_collections.ConfigDict()
    c.jsonl.train_files = ''   # globs of JSONL files, one object per line (blank lines ignored)
    c.jsonl.valid_files = ''   # globs for the valid split ('' = hold out valid_fraction of train_files)
    c.jsonl.text_field = 'text'  # key holding the document text

    c.chat_jsonl = ml_collections.ConfigDict()
    c.chat_jsonl.train_files = ''  # globs of JSONL files: {"messages": [{"role": ..., "content": ...}, ...]}
    c.chat_jsonl.valid_files = ''  # globs for the valid split ('' = hold out valid_fraction of train_files)
    c.chat_jsonl.messages_field = 'messages'  # key holding the list of messages

    c.array_record = ml_collections.ConfigDict()
    c.array_record.train_files = ''  # globs of shards written by `python -m lm.data.prepare` (metadata.json beside them)
    c.array_record.valid_files = ''  # globs for the valid split ('' = hold out valid_fraction of train records)

    # preference pairs (lm/data/preference.py): one pair per row, batches {'chosen', 'rejected'}
    c.markov_preference = ml_collections.ConfigDict()  # the known-optimum benchmark on the chain of data.markov
    c.markov_preference.prompt_len = 4       # prompt characters (a window of the stationary chain; >= markov.order)
    c.markov_preference.horizon = 8          # characters per answer, N (both answers drawn from the chain itself)
    c.markov_preference.reward_scale = 1.0   # r(x) = Σ_t g(x_t), g = reward_scale · standard normal per character
    c.markov_preference.reward_seed = 0      # seed of g
    c.markov_preference.num_pairs = 20000    # train pairs (a fixed set, reshuffled every epoch)
    c.markov_preference.num_valid_pairs = 4096  # valid pairs (disjoint seed; the evaluators read them all)
    c.markov_preference.pair_seed = 0        # seed of the prompts, answers and Bradley–Terry labels
    c.markov_preference.end_with_eos = False  # end each answer with a scored <|eos|> (reward models: the score then reads the last character)
    c.markov_preference.ref_logprobs = False  # batches carry the chain's own log P of each answer token (DPO's dpo.reference='data')

    c.preference_jsonl = ml_collections.ConfigDict()
    c.preference_jsonl.train_files = ''      # globs of JSONL files, one pair per line (TRL's fields)
    c.preference_jsonl.valid_files = ''      # globs for the valid split ('' = hold out valid_fraction of train_files)
    c.preference_jsonl.prompt_field = 'prompt'      # text or list of messages (absent: implicit prompt, chat only)
    c.preference_jsonl.chosen_field = 'chosen'      # text or list of assistant messages (or a whole conversation)
    c.preference_jsonl.rejected_field = 'rejected'  # the same, the answer not preferred
    c.preference_jsonl.text_format = 'chat'  # text pairs: 'chat' (user turn + assistant turn, chat template) | 'plain' (bos prompt answer eos)
    return c


def get_config(arg=None):
    """Lets `--config=configs/data.py` load this block on its own (for inspection)."""
    del arg
    return data_config()
