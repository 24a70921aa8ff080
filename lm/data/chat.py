"""The chat template and its loss mask (used by chat sources and the SFT objective).

A conversation [(role_1, content_1), ..., (role_m, content_m)] renders to

    <|bos|> <|role_1|> content_1 <|end_of_turn|> ... <|role_m|> content_m <|end_of_turn|>

where <|role|> is one of the role markers <|system|>, <|user|>, <|assistant|>, and the
contents are tokenized as plain text (text never produces a special id).

Alongside the tokens comes `weights` [n] float32: weights[i] is the loss weight for
predicting token i from tokens[:i] (weights[0] is never used: nothing predicts the first
token). After the pipeline shifts, loss_mask[t] = weights[t + 1].

  loss_policy='assistant_only' (default): 1 on the content tokens of every assistant
      message and on the <|end_of_turn|> that closes it (the model must learn to stop);
      0 on bos, every role marker, and every system/user token.
  loss_policy='all': 1 on every token except bos.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lm.data.errors import BadRecord
from lm.data.tokenizer import ROLES, Tokenizer

LOSS_POLICIES = ('assistant_only', 'all')


def validate_messages(messages: Any, where: str = '<messages>') -> list[tuple[str, str]]:
    """JSON value -> [(role, content)], or BadRecord naming the first problem.

    Expected: a non-empty list of {'role': one of ROLES, 'content': str}.
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
        out.append((role, content))
    return out


def render_chat(messages: Sequence, tokenizer: Tokenizer, *, loss_policy: str = 'assistant_only',
                add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Conversation -> (tokens int32 [n], weights float32 [n]), per the module docstring.

    `messages` is a list of {'role', 'content'} dicts or (role, content) pairs.
    """
    if loss_policy not in LOSS_POLICIES:
        raise ValueError(f'chat loss policy must be one of {LOSS_POLICIES}, got {loss_policy!r}')
    pairs = [(m['role'], m['content']) if isinstance(m, dict) else tuple(m) for m in messages]
    role_ids, eot = tokenizer.role_ids, tokenizer.end_of_turn_id
    score_all = loss_policy == 'all'
    token_parts, weight_parts = [np.zeros(0, np.int32)], [np.zeros(0, np.float32)]
    if add_bos:
        token_parts.append(np.array([tokenizer.bos_id], np.int32))
        weight_parts.append(np.zeros(1, np.float32))
    for role, content in pairs:
        body = tokenizer.encode_array(content)
        scored = 1.0 if (score_all or role == 'assistant') else 0.0
        token_parts.append(np.concatenate([[role_ids[role]], body, [eot]]).astype(np.int32))
        weights = np.full(len(body) + 2, scored, np.float32)
        weights[0] = 1.0 if score_all else 0.0  # the role marker
        weight_parts.append(weights)
    return np.concatenate(token_parts), np.concatenate(weight_parts)


def render_prompt(messages: Sequence, tokenizer: Tokenizer, *, add_bos: bool = True) -> np.ndarray:
    """Generation prompt: the rendered conversation followed by the <|assistant|> marker.

    Sampling from here should produce the assistant content and then <|end_of_turn|>.
    Returns int32 [n].
    """
    tokens, _ = render_chat(messages, tokenizer, add_bos=add_bos)
    return np.concatenate([tokens, [tokenizer.role_ids['assistant']]]).astype(np.int32)
