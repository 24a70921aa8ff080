"""The chat template, its per-token role ids and its loss mask (chat sources and the SFT objective).

A conversation [(role_1, content_1), ..., (role_m, content_m)] renders to

    <|bos|> <|role_1|> content_1 <|end_of_turn|> ... <|role_m|> content_m <|end_of_turn|>

where <|role|> is one of the role markers <|system|>, <|user|>, <|assistant|>, and the
contents are tokenized as plain text (text never produces a special id).

Alongside the tokens come, per token i:

  role_ids[i]  int32: the role of the message token i belongs to (its marker, content and
               closing <|end_of_turn|>), as lm.masking's ROLE_SYSTEM / ROLE_USER /
               ROLE_ASSISTANT; <|bos|> has ROLE_PAD (0): it belongs to no message.
  weights[i]   float32: the loss weight for predicting token i from tokens[:i] (weights[0] is
               never used: nothing predicts the first token). After the pipeline shifts,
               loss_mask[t] = weights[t + 1].

Loss policies (`loss_policy`, config `data.chat_loss`):

  'assistant_only' (default): 1 on the content tokens of every assistant message and on the
      <|end_of_turn|> that closes it (the model must learn to stop); 0 on bos, every role
      marker, and every system/user token.
  'last_assistant': the same, for the last assistant message only (earlier answers are
      context, like the user's turns).
  'all': 1 on every token except bos (role markers and user/system text included).

Overflow (a rendered conversation longer than `max_tokens`, e.g. seq_len + 1 = one packed
row, so that a conversation that fits is never split across rows):

  'none': kept whole; the packer splits it across rows and the later pieces lose their
      context (the data pipeline's behaviour before these policies; not for SFT).

  'truncate_left': drop the oldest messages of the history (the leading system messages are
      kept) until it fits, never keeping an assistant message without the user message
      before it. `RenderedChat.dropped_messages` records how many were dropped.
  'drop': the conversation is a bad record (kind 'conversation_too_long').
  Under either policy, a conversation whose last scored exchange alone does not fit is a
  bad record 'conversation_too_long': an answer is never cut without a record.

A Hugging Face checkpoint's tokenizer (lm/data/hf_tokenizer.py: no lm role markers, a chat template)
renders through its own template instead (`uses_template`): the tokens are the template's (bos
as the template writes it; `add_bos` is not consulted), 'assistant_only' weighs the template's
assistant spans (its {% generation %} blocks, closing token included), 'last_assistant' only the
last one, 'all' every token after the first; role_ids are ROLE_ASSISTANT on the assistant spans
and ROLE_USER on the rest (the template's system and user text are not told apart); overflow
works as above, each shortened history rendered again.

Bad conversations raise `BadRecord` (the pipeline turns it into an error or a count, per
`data.on_error`): not a list / empty ('empty_document'), a message that is not an object or
lacks role/content, an unknown role ('unknown_role'), empty content ('empty_document'), and,
with `require_assistant=True`, no assistant message ('empty_document': nothing to score).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from lm.data.errors import BadRecord
from lm.data.tokenizer import ROLES, Tokenizer
from lm.masking import ROLE_NAMES, ROLE_PAD

LOSS_POLICIES = ('assistant_only', 'all', 'last_assistant')
OVERFLOW_POLICIES = ('none', 'truncate_left', 'drop')
ROLE_IDS = {role: ROLE_NAMES[role] for role in ROLES}  # per-token role ids (lm.masking ROLE_*)
TOO_LONG = 'conversation_too_long'  # BadRecord kind of a conversation that cannot fit


class RenderedChat(NamedTuple):
    """One rendered conversation: the three per-token arrays are [n]."""

    tokens: np.ndarray  # int32
    weights: np.ndarray  # float32, weights[i] weighs predicting tokens[i] (module docstring)
    role_ids: np.ndarray  # int32, lm.masking ROLE_* of the message token i belongs to
    dropped_messages: int = 0  # oldest history messages dropped to fit max_tokens


def validate_messages(messages: Any, where: str = '<messages>', *, require_assistant: bool = False,
                      allow_empty: bool = False) -> list[tuple[str, str]]:
    """JSON value -> [(role, content)], or BadRecord naming the first problem.

    Expected: a non-empty list of {'role': one of ROLES, 'content': non-empty str (empty
    allowed with `allow_empty`, as in a generation prompt)}; with `require_assistant`, at
    least one assistant message.
    """
    if not isinstance(messages, list):
        raise BadRecord('wrong_type', where, f'messages must be a list, got {type(messages).__name__}')
    if not messages:
        raise BadRecord('empty_document', where, 'conversation has no messages')
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord('wrong_type', where, f'message {i} must be an object, got {type(message).__name__}')
        for key in ('role', 'content'):
            if key not in message:
                raise BadRecord('missing_field', where, f'message {i} has no {key!r} field')
        role, content = message['role'], message['content']
        if role not in ROLES:
            raise BadRecord('unknown_role', where, f'message {i} has role {role!r}; expected one of {ROLES}')
        if not isinstance(content, str):
            raise BadRecord('wrong_type', where, f'message {i} content must be a string, got {type(content).__name__}')
        if not content and not allow_empty:
            raise BadRecord('empty_document', where, f'message {i} ({role}) has empty content')
        out.append((role, content))
    if require_assistant and not any(role == 'assistant' for role, _ in out):
        raise BadRecord('empty_document', where, 'conversation has no assistant message: '
                        'nothing to learn under assistant-only loss')
    return out


def _message_parts(pairs, tokenizer: Tokenizer, loss_policy: str):
    """Per message: (tokens [k], weights [k], role_ids [k]) = marker, content, end-of-turn."""
    eot, markers = tokenizer.end_of_turn_id, tokenizer.role_ids
    last_assistant = max((i for i, (role, _) in enumerate(pairs) if role == 'assistant'), default=-1)
    bodies = tokenizer.encode_batch([content for _, content in pairs])
    parts = []
    for i, ((role, _), body) in enumerate(zip(pairs, bodies)):
        tokens = np.concatenate([[markers[role]], body, [eot]]).astype(np.int32)
        if loss_policy == 'all':
            scored = True
        elif loss_policy == 'last_assistant':
            scored = i == last_assistant
        else:
            scored = role == 'assistant'
        weights = np.full(len(tokens), 1.0 if scored else 0.0, np.float32)
        weights[0] = 1.0 if loss_policy == 'all' else 0.0  # the role marker: scored only under 'all'
        parts.append((tokens, weights, np.full(len(tokens), ROLE_IDS[role], np.int32)))
    return parts


def _first_kept(pairs, parts, head: int, budget: int, need_assistant: bool) -> int | None:
    """Smallest index k >= head such that head messages + messages k.. fit `budget` tokens,
    message k is not an assistant answer cut off from its question, and (if `need_assistant`)
    an assistant message remains. None when no such k exists."""
    lengths = np.array([len(p[0]) for p in parts], np.int64)
    head_len = int(lengths[:head].sum())
    tail = np.concatenate([np.cumsum(lengths[::-1])[::-1], [0]])  # tail[k] = tokens of messages k..
    for k in range(head, len(pairs)):
        if pairs[k][0] == 'assistant' and k > head:
            continue  # would score an answer whose question was dropped
        if need_assistant and not any(role == 'assistant' for role, _ in pairs[k:]):
            return None
        if head_len + tail[k] <= budget:
            return k
    return None


def uses_template(tokenizer: Tokenizer) -> bool:
    """Whether conversations render through the tokenizer's own chat template (a Hugging Face
    checkpoint's tokenizer) rather than lm's role markers."""
    return callable(getattr(tokenizer, 'render_chat', None)) and callable(getattr(tokenizer, 'render_prompt', None))


def _render_template(pairs, tokenizer, loss_policy: str, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, weights, role_ids) of `pairs` through the tokenizer's chat template."""
    messages = [{'role': role, 'content': content} for role, content in pairs]
    if not getattr(tokenizer, 'chat_template', None):
        raise ValueError(f'{getattr(tokenizer, "directory", tokenizer)}: the tokenizer has no chat template '
                         '(tokenizer_config.json: chat_template) and no lm role markers: chat data cannot be rendered')
    try:
        tokens, assistant = tokenizer.render_chat(messages)
    except ValueError as e:  # the template cannot render this conversation (its own check)
        raise BadRecord('wrong_type', where, f'chat template: {e}') from None
    roles = np.where(assistant > 0, ROLE_NAMES['assistant'], ROLE_NAMES['user']).astype(np.int32)
    if loss_policy == 'all':
        weights = np.ones(len(tokens), np.float32)
        weights[:1] = 0.0  # nothing predicts the first token
    else:
        weights = assistant.astype(np.float32)
        answers = [i for i, (role, _) in enumerate(pairs) if role == 'assistant']
        if loss_policy == 'last_assistant' and answers and answers[-1] > 0:  # earlier answers: context
            weights[:len(tokenizer.render_prompt(messages[:answers[-1]]))] = 0.0
    return np.asarray(tokens, np.int32), weights, roles


def _render_conversation_template(pairs, tokenizer, loss_policy: str, max_tokens: int | None, overflow: str,
                                  where: str) -> RenderedChat:
    """render_conversation through the tokenizer's chat template (module docstring)."""
    tokens, weights, roles = _render_template(pairs, tokenizer, loss_policy, where)
    if overflow == 'none' or max_tokens is None or len(tokens) <= max_tokens:
        return RenderedChat(tokens, weights, roles, 0)
    if overflow == 'drop':
        raise BadRecord(TOO_LONG, where, f'{len(tokens)} tokens do not fit a row of {max_tokens} '
                        "(data.chat_overflow='drop')")
    head = 0
    while head < len(pairs) and pairs[head][0] == 'system':
        head += 1
    need_assistant = loss_policy != 'all' and any(role == 'assistant' for role, _ in pairs)
    for k in range(head + 1, len(pairs)):
        if pairs[k][0] == 'assistant':
            continue  # would score an answer whose question was dropped
        if need_assistant and not any(role == 'assistant' for role, _ in pairs[k:]):
            break
        tokens, weights, roles = _render_template(pairs[:head] + pairs[k:], tokenizer, loss_policy, where)
        if len(tokens) <= max_tokens:
            return RenderedChat(tokens, weights, roles, k - head)
    raise BadRecord(TOO_LONG, where, f'{len(tokens)} tokens do not fit a row of {max_tokens}, and dropping older '
                    'turns does not make the last exchange fit')


def render_conversation(messages: Sequence, tokenizer: Tokenizer, *, loss_policy: str = 'assistant_only',
                        add_bos: bool = True, max_tokens: int | None = None,
                        overflow: str = 'none', require_assistant: bool = False,
                        allow_empty: bool = False, where: str = '<conversation>') -> RenderedChat:
    """Conversation -> RenderedChat (tokens, weights, role_ids [n], dropped_messages).

    `messages`: a list of {'role', 'content'} dicts or (role, content) pairs; checked as in
    `validate_messages`. `max_tokens`: the most tokens the result may have (None: no limit);
    a longer conversation follows `overflow` (module docstring). Raises BadRecord.
    """
    if loss_policy not in LOSS_POLICIES:
        raise ValueError(f'chat loss policy must be one of {LOSS_POLICIES}, got {loss_policy!r}')
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f'chat overflow policy must be one of {OVERFLOW_POLICIES}, got {overflow!r}')
    if isinstance(messages, (list, tuple)):  # (role, content) pairs -> dicts; anything else is checked
        messages = [{'role': m[0], 'content': m[1]} if isinstance(m, tuple) and len(m) == 2 else m
                    for m in messages]
    pairs = validate_messages(messages, where,
                              require_assistant=require_assistant, allow_empty=allow_empty)
    if uses_template(tokenizer):
        return _render_conversation_template(pairs, tokenizer, loss_policy, max_tokens, overflow, where)
    parts = _message_parts(pairs, tokenizer, loss_policy)
    prefix = 1 if add_bos else 0
    total = prefix + sum(len(p[0]) for p in parts)
    first = 0
    if overflow != 'none' and max_tokens is not None and total > max_tokens:
        if overflow == 'drop':
            raise BadRecord(TOO_LONG, where, f'{total} tokens do not fit a row of {max_tokens} '
                            "(data.chat_overflow='drop')")
        head = 0
        while head < len(pairs) and pairs[head][0] == 'system':
            head += 1
        first = _first_kept(pairs, parts, head, max_tokens - prefix,
                            need_assistant=loss_policy != 'all' and any(r == 'assistant' for r, _ in pairs))
        if first is None:
            raise BadRecord(TOO_LONG, where, f'{total} tokens do not fit a row of {max_tokens}, and '
                            'dropping older turns does not make the last exchange fit')
        parts = parts[:head] + parts[first:]  # the last assistant message is always kept
        first -= head
    tokens, weights, roles = [np.zeros(0, np.int32)], [np.zeros(0, np.float32)], [np.zeros(0, np.int32)]
    if add_bos:
        tokens.append(np.array([tokenizer.bos_id], np.int32))
        weights.append(np.zeros(1, np.float32))
        roles.append(np.full(1, ROLE_PAD, np.int32))
    for t, w, r in parts:
        tokens.append(t)
        weights.append(w)
        roles.append(r)
    return RenderedChat(np.concatenate(tokens), np.concatenate(weights), np.concatenate(roles), first)


def render_chat(messages: Sequence, tokenizer: Tokenizer, *, loss_policy: str = 'assistant_only',
                add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Conversation -> (tokens int32 [n], weights float32 [n]), per the module docstring."""
    out = render_conversation(messages, tokenizer, loss_policy=loss_policy, add_bos=add_bos)
    return out.tokens, out.weights


def render_prompt(messages: Sequence, tokenizer: Tokenizer, *, add_bos: bool = True) -> np.ndarray:
    """Generation prompt: the rendered conversation followed by the <|assistant|> marker.

    Sampling from here should produce the assistant content and then <|end_of_turn|>.
    Returns int32 [n]. Empty contents are allowed here (a reply may have been empty).
    """
    if uses_template(tokenizer):  # the checkpoint's template: its generation prompt (assistant header)
        pairs = validate_messages(list(messages), '<prompt>', allow_empty=True)
        return np.asarray(tokenizer.render_prompt([{'role': r, 'content': c} for r, c in pairs]), np.int32)
    tokens = render_conversation(messages, tokenizer, add_bos=add_bos, allow_empty=True).tokens
    return np.concatenate([tokens, [tokenizer.role_ids['assistant']]]).astype(np.int32)
