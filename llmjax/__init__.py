"""llmjax: GPT-2 pretraining in JAX and Flax NNX."""

__version__ = "0.1.0"
