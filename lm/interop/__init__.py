"""Interoperability with other ecosystems' checkpoints (Hugging Face: `lm.interop.hf`).

Imports point down: this package reads and writes files and builds `lm.model` Transformers and
run directories; nothing below it imports it.
"""
