"""lm.interop.hf and lm.data.hf_tokenizer against golden outputs of transformers (no torch needed).

The fixtures in tests/fixtures/hf/ (made by tests/fixtures/make_hf_fixtures.py) hold tiny Llama
(GQA, llama3 rope scaling, untied), Qwen2 (q/k/v biases, tied) and Mistral (head_dim ≠ hidden/heads,
one kv head) checkpoints and transformers' logits on a 600-token prompt. tests/test_hf_live.py
compares against live transformers models where torch is installed.
"""

import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import sampling
from lm.data.tokenizer import load_tokenizer
from lm.interop import hf, hf_run, safetensors_io

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("llama", "qwen2", "mistral")


def fixture_dir(name):
    return os.path.join(FIXTURES, name)


def lm_logits(model, tokens):
    graphdef, params = nnx.split(model)
    t = len(tokens)
    fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, jnp.arange(t)[None], jnp.ones((1, t), jnp.int32)))
    return np.asarray(fn(params, jnp.asarray(tokens, jnp.int32)[None])[0])


@pytest.fixture(scope="module", params=NAMES)
def imported(request):
    name = request.param
    return name, hf.load(fixture_dir(name)), dict(np.load(os.path.join(fixture_dir(name), "golden.npz")))


def test_logits_equal_transformers_on_a_600_token_prompt(imported):
    name, model, golden = imported
    assert len(golden["tokens"]) > 500
    got = lm_logits(model, golden["tokens"])[golden["positions"]]
    assert golden["logits"].std() > 1  # the logits are spread: a wrong rotary or layout cannot hide
    np.testing.assert_allclose(got, golden["logits"], atol=1e-4, rtol=0)


def test_imported_configs_carry_the_architecture_features():
    cfgs = {name: hf.load_params(fixture_dir(name))[0] for name in NAMES}
    assert cfgs["llama"].rope_scaling == "llama3" and cfgs["llama"].rope_original_max_position == 64
    assert not cfgs["llama"].tie_embeddings and cfgs["llama"].num_kv_heads == 2 and cfgs["llama"].norm_eps == 1e-5
    assert cfgs["qwen2"].qkv_bias and cfgs["qwen2"].tie_embeddings and cfgs["qwen2"].rope_theta == 1e6
    assert cfgs["mistral"].head_dim == 8 and cfgs["mistral"].num_kv_heads == 1


def test_greedy_generation_equals_transformers_generate(imported):
    name, model, golden = imported
    prompt = golden["tokens"][:24].tolist()
    settings = sampling.SamplingConfig(temperature=0.0, max_new_tokens=len(golden["greedy"]))
    out = sampling.generate_batch(model, None, [prompt], settings, seed=0)
    np.testing.assert_array_equal(out.tokens[0], golden["greedy"])


def test_import_export_import_is_bit_identical(imported, tmp_path):
    name, model, _ = imported
    original = safetensors_io.read_dir(fixture_dir(name))
    hf.save(model, str(tmp_path), hf.read_hf_config(fixture_dir(name))["architectures"][0])
    exported = safetensors_io.read_dir(str(tmp_path))
    assert sorted(exported) == sorted(original)
    for key in original:
        assert exported[key].dtype == original[key].dtype and np.array_equal(exported[key], original[key]), key
    cfg1, p1 = hf.load_params(fixture_dir(name))
    cfg2, p2 = hf.load_params(str(tmp_path))
    assert cfg1 == cfg2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p1, p2)


def test_a_checkpoint_in_two_shards_loads_like_one_file(tmp_path):
    tensors = safetensors_io.read_dir(fixture_dir("llama"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        safetensors_io.write_file(str(tmp_path / shard), {k: tensors[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / safetensors_io.INDEX_FILE).write_text(json.dumps(index))
    shutil.copy(os.path.join(fixture_dir("llama"), "config.json"), tmp_path)
    _, sharded = hf.load_params(str(tmp_path))
    _, single = hf.load_params(fixture_dir("llama"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sharded, single)


def _broken_copy(tmp_path, edit_config=None, edit_tensors=None):
    shutil.copy(os.path.join(fixture_dir("qwen2"), "config.json"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = dict(safetensors_io.read_dir(fixture_dir("qwen2")))
    if edit_tensors:
        edit_tensors(tensors)
    safetensors_io.write_file(str(tmp_path / "model.safetensors"), tensors)
    return str(tmp_path)


@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), None, r"architectures=\['GPT2LMHeadModel'\] is not supported"),
    (lambda c: c.update(hidden_act="gelu"), None, "hidden_act='gelu'"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), None,
     "rope scaling 'yarn' is not supported"),
    (None, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), "missing tensor 'model.layers.1.self_attn.k_proj.bias'"),
    (lambda c: c.update(tie_word_embeddings=False), None, "missing tensor 'lm_head.weight'"),
    (None, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}),
     r"'model.layers.0.mlp.up_proj.weight' has shape \(95, 64\), config.json implies \(96, 64\)"),
    (None, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
     "tensor 'model.layers.0.self_attn.o_proj.bias' has no place"),
], ids=["architecture", "activation", "rope-type", "missing", "untied-without-head", "shape", "extra"])
def test_unsupported_checkpoints_are_named(tmp_path, edit_config, edit_tensors, message):
    with pytest.raises(hf.UnsupportedCheckpointError, match=message):
        hf.load(_broken_copy(tmp_path, edit_config, edit_tensors))


# -- run directories --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("imported"))
    assert hf_run.main(["import", "--hf_dir", fixture_dir("llama"), "--workdir", workdir]) == 0
    return workdir


def test_an_imported_run_restores_its_params_and_samples(run_dir):
    from lm.io import checkpoint
    from lm.cli import sample
    from lm.data.tokenizer import load_metadata

    model_cfg, _, params, config = checkpoint.load_for_inference(run_dir)
    cfg, want = hf.load_params(fixture_dir("llama"))
    assert model_cfg == cfg and config.data.tokenizer == "hf:" + os.path.join(run_dir, "hf")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device), want)
    restored = checkpoint.restore_params(run_dir, abstract)  # what train.restore_from + restore_params_only read
    assert restored.step == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored.tree, want)
    assert load_metadata(run_dir)["kind"] == "hf_checkpoint"
    out = io.StringIO()
    assert sample.main(["--run_dir", run_dir, "--prompt", "Hello", "--temperature", "0", "--max_new_tokens", "8"],
                       out=out) == 0
    assert out.getvalue().startswith("Hello")


def test_export_of_an_imported_run_gives_back_the_checkpoint(run_dir, tmp_path):
    assert hf_run.main(["export", "--run_dir", run_dir, "--hf_dir", str(tmp_path)]) == 0
    original, exported = safetensors_io.read_dir(fixture_dir("llama")), safetensors_io.read_dir(str(tmp_path))
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    assert hf.read_hf_config(str(tmp_path))["architectures"] == ["LlamaForCausalLM"]
    assert os.path.exists(tmp_path / "tokenizer_config.json")


def test_import_into_a_run_with_checkpoints_is_refused(run_dir, capsys):
    assert hf_run.main(["import", "--hf_dir", fixture_dir("llama"), "--workdir", run_dir]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


# -- tokenizers and chat templates ------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"},
        {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "How are you today?"},
        {"role": "assistant", "content": "The quick brown fox."}]


def test_special_tokens_and_eos_come_from_the_checkpoint():
    llama, qwen = load_tokenizer("hf:" + fixture_dir("llama")), load_tokenizer("hf:" + fixture_dir("qwen2"))
    assert llama.decode([llama.bos_id]) == "<|begin_of_text|>" and llama.decode([llama.eos_id]) == "<|eot_id|>"
    assert not qwen.has_bos and qwen.decode([qwen.eos_id]) == "<|im_end|>"
    assert qwen.decode([qwen.pad_id]) == "<|endoftext|>" and qwen.stop_ids == (qwen.eos_id,)
    assert llama.vocab_size == 292  # the checkpoint's vocabulary, nothing appended
    assert qwen.eos_id not in qwen.encode("text <|im_end|> typed by a user")  # text is text


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # {% generation %} tags / prefix rendering
def test_chat_template_weights_only_the_assistant_turns(name):
    tok = load_tokenizer("hf:" + fixture_dir(name))
    tokens, weights = tok.render_chat(CHAT)
    end = tok.decode([tok.eos_id])
    scored = tok.decode(tokens[weights > 0])
    assert scored.replace("\n", "") == f"I am fine.{end}The quick brown fox.{end}"
    assert tok.decode(tokens) == tok.render_text(CHAT)
    prompt = tok.render_prompt(CHAT[:-1])
    assert np.array_equal(prompt, tokens[:len(prompt)])  # the prompt is the conversation's prefix
    assert tok.decode(tokens[len(prompt):]).startswith("The quick brown fox.")


def test_qkv_biases_get_no_weight_decay_unless_asked():
    from lm.train.optim import weight_decay_mask

    _, params = hf.load_params(fixture_dir("qwen2"))
    mask = weight_decay_mask(params, decay_norms_and_biases=False)
    assert not mask["blocks"]["attn"]["bq"] and not mask["blocks"]["attn"]["bk"] and mask["blocks"]["attn"]["wq"]
    assert weight_decay_mask(params, decay_norms_and_biases=True)["blocks"]["attn"]["bv"]


def test_fine_tuning_starts_from_the_imported_parameters(run_dir, tmp_path):
    """configs/hf_finetune.py:<run> trains from the import (train.init_from): with a vanishing learning rate
    its final parameters are the checkpoint's, bit for bit, and the run reports a finite loss."""
    import importlib

    from lm.cli.train import train_and_report
    from lm.io import checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(40)))
    config = importlib.import_module("configs.hf_finetune").get_config(run_dir)
    config.data.source, config.data.text.train_files, config.data.text.valid_files = "text", str(corpus), str(corpus)
    config.train.update(steps=2, batch_size=8, seq_len=32, log_every=1, eval_every=0, progress_bar=False)
    config.optimizer.lr, config.data.num_valid_batches, config.eval.evaluators = 1e-30, 1, ""  # below every ulp
    summary = train_and_report(config, str(tmp_path / "ft"))
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["valid_loss"])
    _, _, params, _ = checkpoint.load_for_inference(str(tmp_path / "ft"))
    _, want = hf.load_params(fixture_dir("llama"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)


def test_chat_sources_render_through_an_imported_tokenizers_template():
    """lm's chat data (word_chat, chat_jsonl) with a checkpoint's tokenizer (no lm role markers) renders
    through its chat template: assistant-only weights on the answers and their <|eot_id|>, the last
    answer only, or every token; truncate_left drops the oldest exchange and keeps the system turn;
    the generation prompt is the conversation's prefix; an SFT batch scores exactly the answers."""
    from configs import lora as lora_config
    from lm.data import build_iterator, chat

    tok = load_tokenizer("hf:" + fixture_dir("llama"))
    assert chat.uses_template(tok) and not chat.uses_template(load_tokenizer("byte"))
    end = tok.decode([tok.eos_id])
    scored = lambda out: tok.decode(out.tokens[out.weights > 0])  # noqa: E731
    full = chat.render_conversation(CHAT, tok)
    assert scored(full) == f"I am fine.{end}The quick brown fox.{end}" and tok.decode(full.tokens) == tok.render_text(CHAT)
    assert np.array_equal(full.role_ids == 3, full.weights > 0)  # ROLE_ASSISTANT on the scored spans
    assert scored(chat.render_conversation(CHAT, tok, loss_policy="last_assistant")) == f"The quick brown fox.{end}"
    everything = chat.render_conversation(CHAT, tok, loss_policy="all")
    assert everything.weights[0] == 0 and everything.weights[1:].all()
    cut = chat.render_conversation(CHAT, tok, max_tokens=len(full.tokens) - 1, overflow="truncate_left")
    assert cut.dropped_messages == 2 and tok.decode(cut.tokens) == tok.render_text(CHAT[:1] + CHAT[3:])
    with pytest.raises(Exception, match="conversation_too_long"):
        chat.render_conversation(CHAT, tok, max_tokens=len(full.tokens) - 1, overflow="drop")
    prompt = chat.render_prompt(CHAT[:-1], tok)
    assert np.array_equal(prompt, full.tokens[:len(prompt)]) and tok.decode(full.tokens[len(prompt):]).startswith("The")
    config = lora_config.get_config()
    config.data.tokenizer = "hf:" + fixture_dir("llama")
    batch = next(iter(build_iterator(config.data, split="train", batch_size=2, seq_len=256, seed=0, tokenizer=tok)))
    for row in range(2):  # the scored targets: answers, each closed by <|eot_id|>; no header, no question
        answers = tok.decode(batch["targets"][row][batch["loss_mask"][row] > 0])
        assert answers.endswith(end) and "<|start_header_id|>" not in answers and "?" not in answers, answers
