"""labelstore: an offline soft-label dataset compiler for LLM knowledge distillation."""

__version__ = "0.1.0"
