"""Sample from a trained run, streaming text to the terminal.

    python -m lm.cli.sample --run_dir=runs/x --prompt="Once upon a time" --temperature=0.8 --top_p=0.95 \\
        --num_samples=3 --max_new_tokens=200
    python -m lm.cli.sample --run_dir=runs/sft --chat              # interactive chat: one user turn per line
    python -m lm.cli.sample --run_dir=runs/sft --prompt="2+3=?"      # one chat turn (chat is on for SFT runs)

The run directory holds config.json and orbax checkpoints (lm/io/checkpoint.py: load_for_inference);
the tokenizer comes from its data config. Plain mode: the prompt is `<|bos|>` (when data.add_bos)
+ the encoded text, and a sample stops at `<|eos|>`. Chat mode (`--chat=auto`: on for the `sft`
objective or a chat data source) renders the conversation with the chat template
(lm/data/chat.py: render_prompt, ending with the `<|assistant|>` marker) and stops at
`<|end_of_turn|>` or `<|eos|>`; in interactive chat the history is kept across turns.

Streaming: the decode loop is jit-compiled, so tokens come back in chunks of `--chunk_size`
(one jitted while_loop call per chunk over the same cache, lm/sampling/decode.py); each chunk's text is
printed as soon as it arrives. Samples run one after another, sample i with seed `--seed + i`, so
each is reproducible alone (`--seed=S+i --num_samples=1` prints sample i again).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, Sequence, TextIO

from lm import sampling

CHAT_OBJECTIVES = ("sft",)
CHAT_SOURCES = ("chat_jsonl", "arithmetic_chat")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lm.cli.sample", description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="a training run directory (config.json + checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--prompt", default=None, help="text to continue (chat: the user message); "
                   "omitted in chat mode: read user turns from stdin")
    p.add_argument("--system", default=None, help="chat mode: an optional system message")
    p.add_argument("--chat", default="auto", nargs="?", const="on", choices=("auto", "on", "off"),
                   help="chat template on/off; auto: on for SFT runs and chat data sources")
    p.add_argument("--temperature", type=float, default=1.0, help=">= 0; 0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help=">= 0; 0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--min_p", type=float, default=0.0, help="in [0, 1]; 0 = off")
    p.add_argument("--num_samples", type=int, default=1, help="samples of the prompt, one after another")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens per sample, stop token included")
    p.add_argument("--max_len", type=int, default=None,
                   help="cache length; default: prompt + max_new_tokens (rounded up)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--chunk_size", type=int, default=16, help="tokens decoded between two prints")
    return p.parse_args(argv)


def _stable(text: str) -> str:
    """`text` without a trailing partial character (an unfinished UTF-8 sequence decodes to lone
    surrogates with the byte tokenizer, or to U+FFFD with others); those wait for the next chunk."""
    end = len(text)
    while end and ("\udc80" <= text[end - 1] <= "\udcff" or text[end - 1] == "\ufffd"):
        end -= 1
    return text[:end]


def _printable(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def stream_sample(graphdef, params, prompt: list[int], settings: sampling.SamplingConfig, *, seed: int,
                  max_len: int | None, chunk_size: int, decode: Callable[[list[int]], str],
                  out: TextIO) -> list[int]:
    """Generate one continuation of `prompt`, writing its text to `out` chunk by chunk; returns its ids."""
    ids: list[int] = []
    shown = 0

    def on_chunk(new: list[list[int]]) -> None:
        nonlocal shown
        ids.extend(new[0])
        text = _stable(decode(ids))
        out.write(_printable(text[shown:]))
        out.flush()
        shown = len(text)

    sampling.generate_batch(graphdef, params, [prompt], settings, seed=seed, max_len=max_len,
                            chunk_size=chunk_size, on_chunk=on_chunk)
    out.write(_printable(decode(ids)[shown:]) + "\n")
    out.flush()
    return ids


def _use_chat(flag: str, config) -> bool:
    if flag != "auto":
        return flag == "on"
    return config.get("objective") in CHAT_OBJECTIVES or config.data.get("source") in CHAT_SOURCES


def main(argv: Sequence[str] | None = None, *, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    try:
        settings = sampling.SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                           min_p=args.min_p, max_new_tokens=args.max_new_tokens)
        if args.num_samples < 1 or args.chunk_size < 1:
            raise ValueError(f"--num_samples and --chunk_size must be >= 1, got {args.num_samples}, "
                             f"{args.chunk_size}")
    except ValueError as e:
        print(f"lm.cli.sample: error: {e}", file=sys.stderr)
        return 2

    from lm.io.checkpoint import load_for_inference
    from lm.data import build_tokenizer
    from lm.data.chat import render_prompt

    model_cfg, graphdef, params, config = load_for_inference(args.run_dir, args.step)
    tokenizer = build_tokenizer(config.data)
    chat = _use_chat(args.chat, config)
    stop_ids = (tokenizer.end_of_turn_id, tokenizer.eos_id) if chat else (tokenizer.eos_id,)
    settings = dataclasses.replace(settings, stop_ids=stop_ids)
    decode = (lambda ids: tokenizer.decode(ids, skip_special=True)) if chat else tokenizer.decode
    train_len = config.get("train", {}).get("seq_len")
    kwargs = dict(max_len=args.max_len, chunk_size=args.chunk_size, decode=decode, out=out)
    print(f"[{args.run_dir}: {model_cfg.num_layers} layers, d_model {model_cfg.d_model}, vocab "
          f"{model_cfg.vocab_size}; {'chat' if chat else 'plain'} mode; {settings}]", file=sys.stderr)

    def run(prompt: list[int], samples: int, echo: str = "") -> list[int] | None:
        if train_len and len(prompt) + settings.max_new_tokens > train_len:
            print(f"[note: {len(prompt)} prompt + {settings.max_new_tokens} new tokens exceed the training "
                  f"length {train_len}]", file=sys.stderr)
        ids = None
        for i in range(samples):
            if samples > 1:
                out.write(f"--- sample {i + 1}/{samples} (seed {args.seed + i}) ---\n")
            out.write(echo)
            ids = stream_sample(graphdef, params, prompt, settings, seed=args.seed + i, **kwargs)
        return ids

    messages = [{"role": "system", "content": args.system}] if args.system else []
    try:
        if not chat:
            if args.system:
                raise ValueError("--system needs chat mode (--chat)")
            bos = [tokenizer.bos_id] if config.data.get("add_bos", True) else []
            prompt = bos + tokenizer.encode(args.prompt or "")
            if not prompt:
                raise ValueError("the prompt is empty (and data.add_bos is off): pass --prompt")
            run(prompt, args.num_samples, echo=args.prompt or "")
        elif args.prompt is not None:
            run(render_prompt(messages + [{"role": "user", "content": args.prompt}], tokenizer).tolist(),
                args.num_samples)
        else:
            print("[chat: one user message per line; an empty line or end of input quits]", file=sys.stderr)
            for line in stdin:
                if not line.strip():
                    break
                messages.append({"role": "user", "content": line.rstrip("\n")})
                out.write("assistant: ")
                ids = run(render_prompt(messages, tokenizer).tolist(), 1)
                reply = [t for t in ids if t not in stop_ids]
                messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special=True)})
    except ValueError as e:
        print(f"lm.cli.sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from lm.cli import errors

    errors.install("lm.cli.sample")
    sys.exit(main())
