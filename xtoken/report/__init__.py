"""Tables and figures for the notebooks: W summaries, Table 8 beside the paper, the distillation grids, plots,
and results/REPORT.md.

Everything a notebook shows is computed here, so notebooks stay parameters + calls + narrative. Split by job,
every name importable from ``xtoken.report``:

  paper_numbers  the paper's numbers (Tables 1-2 and 8, the differences it headlines), in one place
  files          results/ file names (``results_prefix``: "03" / "03_<scale>"), JSON, figures, per-item scores
  tables         the tables beside the paper's
  figures        the plots (matplotlib figures; notebooks show them inline)
  findings       seed-paired comparisons and verdicts, the multi-teacher findings, the greedy-decoding diagnostic
  markdown       results/REPORT.md (`build_report`; notebook 06's section: `on_policy_lines`)
"""

from .figures import (
    plot_coverage,
    plot_generation_length,
    plot_grid,
    plot_multi_teacher,
    plot_numeral_mass,
    plot_row_lengths,
)
from .files import (
    ITEM_FILE_COLUMNS,
    load_items,
    load_run_results,
    read_items,
    results_prefix,
    save_figure,
    save_items,
    write_json,
)
from .findings import (
    KIND_ORDER,
    comparison_rows,
    diagnostic_prose,
    greedy_diagnostic,
    multi_teacher_comparisons,
    multi_teacher_findings,
    single_teacher_comparisons,
    verdict_lines,
)
from .markdown import build_report, on_policy_lines
from .paper_numbers import PAPER_DELTAS, PAPER_MULTI_TEACHER_GAIN, PAPER_TABLE1, PAPER_TABLE8, SINGLE_COMPARISONS
from .tables import (
    MINI_SKILLS,
    alignment_table,
    distillation_table,
    explain_rows,
    generation_table,
    headline_deltas,
    kind_table,
    learned_w_comparison,
    learned_w_rows,
    md_table,
    multi_teacher_table,
    short,
    skills_of,
    table8,
    too_long_examples,
    w_summary_table,
    with_average,
)

__all__ = [
    "ITEM_FILE_COLUMNS",
    "KIND_ORDER",
    "MINI_SKILLS",
    "PAPER_DELTAS",
    "PAPER_MULTI_TEACHER_GAIN",
    "PAPER_TABLE1",
    "PAPER_TABLE8",
    "SINGLE_COMPARISONS",
    "alignment_table",
    "build_report",
    "comparison_rows",
    "diagnostic_prose",
    "distillation_table",
    "explain_rows",
    "generation_table",
    "greedy_diagnostic",
    "headline_deltas",
    "kind_table",
    "learned_w_comparison",
    "learned_w_rows",
    "load_items",
    "load_run_results",
    "md_table",
    "multi_teacher_comparisons",
    "multi_teacher_findings",
    "multi_teacher_table",
    "on_policy_lines",
    "plot_coverage",
    "plot_generation_length",
    "plot_grid",
    "plot_multi_teacher",
    "plot_numeral_mass",
    "plot_row_lengths",
    "read_items",
    "results_prefix",
    "save_figure",
    "save_items",
    "short",
    "single_teacher_comparisons",
    "skills_of",
    "table8",
    "too_long_examples",
    "verdict_lines",
    "w_summary_table",
    "with_average",
    "write_json",
]
