"""lm against live transformers models (the `hf` extra: torch, transformers); skipped without them.

Each architecture's tiny model is built by tests/fixtures/make_hf_fixtures.py's `make_model` with
another seed than the committed fixtures, saved by transformers, imported by lm, and compared.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

for module in ("torch", "transformers"):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[hf]'); tests/test_hf.py checks the golden "
                    "fixtures without it", allow_module_level=True)

import torch  # noqa: E402
import transformers  # noqa: E402

from lm import sampling  # noqa: E402
from lm.data.tokenizer import load_tokenizer  # noqa: E402
from lm.interop import hf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import make_hf_fixtures as fx  # noqa: E402

from test_hf import CHAT, lm_logits  # noqa: E402

NAMES = tuple(fx.CONFIGS)


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tmp_path_factory):
    """(name, transformers model, its directory, the lm import)."""
    name = request.param
    out = str(tmp_path_factory.mktemp(f"live_{name}"))
    model = fx.make_model(name, seed=7)
    model.save_pretrained(out, safe_serialization=True)
    return name, model, out, hf.load(out)


@pytest.fixture(scope="module")
def tokens():
    return fx.prompt_tokens(seed=3)


def test_logits_equal_transformers_at_every_position(pair, tokens):
    _, model, _, lm_model = pair
    want = fx.hf_logits(model, tokens)
    np.testing.assert_allclose(lm_logits(lm_model, tokens), want, atol=1e-4, rtol=0)


def test_an_exported_model_loads_in_transformers_with_the_same_logits(pair, tokens, tmp_path):
    name, model, _, lm_model = pair
    hf.save(lm_model, str(tmp_path), model.config.architectures[0])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(reloaded) is type(model)
    want, got = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # every weight back bit for bit (tied: one tensor)
    # (the reloaded model uses transformers' default sdpa attention, the original eager: float rounding)
    np.testing.assert_allclose(fx.hf_logits(reloaded, tokens), fx.hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_greedy_generation_equals_generate_token_for_token(pair, tokens):
    _, model, _, lm_model = pair
    prompt = tokens[:40].tolist()
    want = fx.hf_greedy(model, prompt, new=32)
    out = sampling.generate_batch(lm_model, None, [prompt], sampling.SamplingConfig(temperature=0.0, max_new_tokens=32),
                                  seed=0)
    np.testing.assert_array_equal(out.tokens[0], want)


def test_transformers_shards_load(tmp_path, tokens):
    model = fx.make_model("llama", seed=8)
    model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="150KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) >= 2
    np.testing.assert_allclose(lm_logits(hf.load(str(tmp_path)), tokens), fx.hf_logits(model, tokens),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_chat_templates_render_like_apply_chat_template(name):
    directory = os.path.join(os.path.dirname(__file__), "fixtures", "hf", name)
    ours, theirs = load_tokenizer("hf:" + directory), transformers.AutoTokenizer.from_pretrained(directory)
    chat = CHAT if name != "mistral" else [m for m in CHAT if m["role"] != "system"]
    assert ours.render_text(chat) == theirs.apply_chat_template(chat, tokenize=False)
    want = theirs.apply_chat_template(chat, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=name == "llama")
    tokens, weights = ours.render_chat(chat)
    assert tokens.tolist() == list(want["input_ids"])
    if name == "llama":  # the template with {% generation %}: transformers' own assistant mask
        assert weights.astype(int).tolist() == list(want["assistant_masks"])
    prompt = theirs.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ours.render_prompt(chat[:-1]).tolist() == list(prompt["input_ids"])
    assert ours.encode("Hello, world!") == theirs.encode("Hello, world!", add_special_tokens=False)
