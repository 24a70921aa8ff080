"""A Hugging Face checkpoint's tokenizer: its tokenizer.json, its special tokens and EOS, and its
Jinja chat template rendered with assistant-only loss weights.

    tok = HFCheckpointTokenizer("path/to/hf_dir")     # or data.tokenizer = 'hf:path/to/hf_dir'
    tokens, weights = tok.render_chat(messages)        # the checkpoint's own chat format
    prompt = tok.render_prompt(messages)               # ... ending with the assistant header

Unlike `lm.data.tokenizer.HFTokenizer` (which appends lm's own <|bos|>, <|eos|>, ... markers for
training from scratch), this keeps the checkpoint's vocabulary unchanged: `special_ids` holds the
checkpoint's own tokens, read from tokenizer_config.json (bos_token, eos_token, pad_token;
strings or {"content": ...} objects), then special_tokens_map.json, and generation_config.json
(eos_token_id, an id or a list: every one of them stops generation, `stop_ids`):

  bos          bos_token (absent when the checkpoint has none, e.g. Qwen2: `has_bos` False)
  eos          eos_token (else the first of generation_config's eos_token_id)
  pad          pad_token, else eos
  end_of_turn  eos (the token that closes an assistant turn in the chat template)

lm's own role markers (<|user|>, ...) do not exist here: chat goes through `render_chat`.

Assistant-only weights (weights[i] weighs predicting token i, as in lm/data/chat.py): the tokens
of each assistant message as the template renders it, its closing token(s) included, get 1;
everything else 0. Which characters belong to an assistant message:
  * templates with `{% generation %}...{% endgeneration %}` blocks: the text inside them;
  * other templates: for each assistant message i, the text that rendering messages[:i+1] adds
    after render(messages[:i], add_generation_prompt=True) (the template must render a
    conversation's prefixes as prefixes of its text, which chat templates do; else an error).
The whole conversation is tokenized at once (as transformers' apply_chat_template does), and a
token is an assistant token when its first character lies inside such a span.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from lm.data.tokenizer import Tokenizer

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters marking {% generation %} spans while rendering


def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class HFCheckpointTokenizer(Tokenizer):
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json, generation_config.json) of a directory."""

    kind = 'hf_checkpoint'
    FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json')

    def __init__(self, directory: str):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        path = os.path.join(self.directory, 'tokenizer.json')
        if not os.path.exists(path):
            raise FileNotFoundError(f'{path} does not exist: a Hugging Face tokenizer directory needs tokenizer.json')
        digest = hashlib.sha256()
        for name in self.FILES:
            if os.path.exists(os.path.join(self.directory, name)):
                with open(os.path.join(self.directory, name), 'rb') as f:
                    digest.update(name.encode() + b'\0' + f.read())
        self.fingerprint = digest.hexdigest()
        self._build()

    def _build(self):
        from tokenizers import Tokenizer as _Tok

        d = self.directory
        with open(os.path.join(d, 'tokenizer.json')) as f:
            raw = f.read()
        self._plain, self._with_specials = _Tok.from_str(raw), _Tok.from_str(raw)
        self._plain.encode_special_tokens = True  # text is text: '<|im_end|>' typed by a user is not a marker
        config = _read_json(os.path.join(d, 'tokenizer_config.json'))
        special_map = _read_json(os.path.join(d, 'special_tokens_map.json'))
        generation = _read_json(os.path.join(d, 'generation_config.json'))
        self.chat_template = config.get('chat_template')
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t['name']: t['template'] for t in self.chat_template}.get('default')
        self.vocab_size = self._plain.get_vocab_size(with_added_tokens=True)
        self.token_strings = {}
        ids = {}
        for name in ('bos', 'eos', 'pad', 'unk'):
            text = _token_string(config.get(f'{name}_token', special_map.get(f'{name}_token')))
            if text is None:
                continue
            token_id = self._with_specials.token_to_id(text)
            if token_id is None:
                raise ValueError(f"{d}/tokenizer_config.json: {name}_token {text!r} is not in tokenizer.json's vocabulary")
            self.token_strings[name], ids[name] = text, token_id
        eos_ids = generation.get('eos_token_id')
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        if 'eos' not in ids:
            if not eos_ids:
                raise ValueError(f'{d}: no eos_token in tokenizer_config.json / special_tokens_map.json and no '
                                 'eos_token_id in generation_config.json: cannot tell where generation stops')
            ids['eos'] = eos_ids[0]
            self.token_strings['eos'] = self._with_specials.id_to_token(eos_ids[0])
        ids.setdefault('pad', ids['eos'])
        ids['end_of_turn'] = ids['eos']
        ids.pop('unk', None)
        self.special_ids = ids
        self.stop_ids = tuple(dict.fromkeys([ids['eos'], *eos_ids]))
        self._check_ids(np.asarray(list(ids.values()) + list(self.stop_ids), np.int64))

    def __getstate__(self):
        return {'directory': self.directory, 'fingerprint': self.fingerprint}

    def __setstate__(self, state):
        self.directory, self.fingerprint = state['directory'], state['fingerprint']
        self._build()

    @property
    def has_bos(self) -> bool:
        return 'bos' in self.special_ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._plain.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._plain.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(np.asarray(ids, np.int64))
        return self._plain.decode(ids, skip_special_tokens=skip_special)

    # -- the chat template ------------------------------------------------------------------------

    def apply_template(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The chat template rendered as text (special tokens as their strings), with
        {% generation %} blocks marked by private-use characters (see `render_chat`)."""
        if not self.chat_template:
            raise ValueError(f'{self.directory}/tokenizer_config.json has no chat_template')
        return _compile(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.token_strings.get('bos', ''), eos_token=self.token_strings.get('eos', ''),
            pad_token=self.token_strings.get('pad', ''), unk_token=self.token_strings.get('unk', ''), **kwargs)

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The chat template's text, exactly (transformers' apply_chat_template(tokenize=False))."""
        return self.apply_template(messages, add_generation_prompt, **kwargs).replace(_OPEN, '').replace(_CLOSE, '')

    def render_chat(self, messages: Sequence[dict], **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """Conversation → (tokens int32 [n], weights float32 [n]): 1 on assistant tokens (module docstring)."""
        for m in messages:
            if _OPEN in m.get('content', '') or _CLOSE in m.get('content', ''):
                raise ValueError('a message contains U+E000/U+E001, which lm uses to mark generation spans')
        marked = self.apply_template(messages, **kwargs)
        spans = []
        if _OPEN in marked:
            text, start = '', None
            for piece in _split_marks(marked):
                if piece == _OPEN:
                    start = len(text)
                elif piece == _CLOSE:
                    spans.append((start, len(text)))
                else:
                    text += piece
        else:
            text = marked
            for i, m in enumerate(messages):
                if m.get('role') != 'assistant':
                    continue
                before = self.render_text(messages[:i], add_generation_prompt=True, **kwargs) if i else ''
                through = self.render_text(messages[:i + 1], **kwargs)
                if not (through.startswith(before) and text.startswith(through)):
                    raise ValueError(f'chat template: rendering messages[:{i}] (with the generation prompt) is not '
                                     f'a prefix of rendering messages[:{i + 1}]; mark the assistant text with '
                                     '{% generation %} ... {% endgeneration %}')
                spans.append((len(before), len(through)))
        encoding = self._with_specials.encode(text, add_special_tokens=False)
        tokens = np.asarray(encoding.ids, np.int32)
        starts = np.asarray([s for s, _ in encoding.offsets], np.int64)
        weights = np.zeros(len(tokens), np.float32)
        for lo, hi in spans:
            weights[(starts >= lo) & (starts < hi)] = 1.0
        return tokens, weights

    def render_prompt(self, messages: Sequence[dict], **kwargs) -> np.ndarray:
        """The conversation followed by the template's generation prompt (the assistant header): int32 [n]."""
        text = self.render_text(messages, add_generation_prompt=True, **kwargs)
        return np.asarray(self._with_specials.encode(text, add_special_tokens=False).ids, np.int32)


def _split_marks(text: str) -> list[str]:
    out, current = [], ''
    for ch in text:
        if ch in (_OPEN, _CLOSE):
            out += [current, ch] if current else [ch]
            current = ''
        else:
            current += ch
    return out + ([current] if current else [])


_TEMPLATES: dict[str, Any] = {}


def _compile(source: str):
    """A chat template compiled in a sandbox, with the globals HF templates use and the
    {% generation %} tag (its body is marked for `render_chat`)."""
    if source in _TEMPLATES:
        return _TEMPLATES[source]
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {'generation'}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
            return nodes.CallBlock(self.call_method('_mark'), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _OPEN + caller() + _CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.filters['tojson'] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                  ensure_ascii=ensure_ascii)
    env.globals['raise_exception'] = raise_exception
    env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
    _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
