"""xtoken: projection-guided cross-tokenizer knowledge distillation (X-Token, arXiv 2605.21699).

The public API, importable from here (each name loads its module on first use, so ``import xtoken`` loads
neither torch nor transformers):

    tokenizers          load_tokenizer, tokenizer_fingerprint, TokenizerNotFound, PAPER_TOKENIZERS
    projection          Projection, build_projection, ProjectionMismatch, ProjectionFileError
    learned_projection  LearnableProjection
    align               Alignment, AlignmentMemo, align_batch   (and `xtoken.align.align` for one row)
    audit               coverage_audit, CoverageAudit, occurrence_audit, OccurrenceAudit
    losses              kl_loss, p_kl_loss, h_kl_loss, gold_loss, uld_loss, dynamic_kd_scale
    multi_teacher       teacher_weights, teacher_stats, aggregate
    chat                CHAT_TEMPLATES, with_chat_template, render_chat, RenderedChat, encode_chat, ChatEncoding,
                        chat_loss_mask, align_chat, check_end_of_turn, aligned_chat_table
    hf                  XTokenConfig, Teacher, DistillCollator, TeacherCache, XTokenTrainer

The paper reproduction (`xtoken.mini`, `xtoken.paper`, `xtoken.report`, `xtoken.pipeline`) is imported by module.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "tokenizers": ["load_tokenizer", "tokenizer_fingerprint", "TokenizerNotFound", "PAPER_TOKENIZERS"],
    "projection": ["Projection", "build_projection", "ProjectionMismatch", "ProjectionFileError"],
    "learned_projection": ["LearnableProjection"],
    "align": ["Alignment", "AlignmentMemo", "align_batch"],
    "audit": ["coverage_audit", "CoverageAudit", "occurrence_audit", "OccurrenceAudit"],
    "losses": ["kl_loss", "p_kl_loss", "h_kl_loss", "gold_loss", "uld_loss", "dynamic_kd_scale"],
    "multi_teacher": ["teacher_weights", "teacher_stats", "aggregate"],
    "chat": [
        "CHAT_TEMPLATES",
        "with_chat_template",
        "render_chat",
        "RenderedChat",
        "encode_chat",
        "ChatEncoding",
        "chat_loss_mask",
        "align_chat",
        "check_end_of_turn",
        "aligned_chat_table",
    ],
    "hf": ["XTokenConfig", "Teacher", "DistillCollator", "TeacherCache", "XTokenTrainer"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:  # not an exported name (a submodule, say: `from xtoken import paper` imports it)
        raise AttributeError(f"module 'xtoken' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
