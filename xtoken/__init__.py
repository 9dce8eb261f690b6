"""xtoken: projection-guided cross-tokenizer knowledge distillation (X-Token, arXiv 2605.21699)."""
from .tokenizers import load_tokenizer, tokenizer_fingerprint, TokenizerNotFound, PAPER_TOKENIZERS

__version__ = "0.1.0"
