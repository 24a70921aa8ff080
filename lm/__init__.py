"""lm: language models trained by maximum likelihood, in JAX."""
