"""The miniature: a seeded synthetic corpus, tiny models of the paper's families over restricted
vocabularies, and the experiment grid (see `xtoken.mini.experiment`). The core never imports this."""

from .config import MiniConfig, ModelSize

__all__ = ["MiniConfig", "ModelSize"]
