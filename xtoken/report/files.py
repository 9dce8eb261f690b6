"""What the notebooks write to and read from results/ and the work dir: file names, JSON, figures, the runs'
result.json and per-item scores."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return path


def save_figure(fig, path) -> Path:
    """PNG with fixed metadata, so the same figure gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def load_run_results(work_dir, settings=None) -> list[dict]:
    """Every runs/<setting>/seed*/result.json under a miniature's work dir (optionally some settings)."""
    out = []
    for f in sorted(Path(work_dir).glob("runs/*/seed*/result.json")):
        r = json.loads(f.read_text())
        if settings is None or r["setting"] in settings:
            out.append(r)
    return out


ITEM_FILE_COLUMNS = [
    "setting",
    "seed",
    "skill",
    "item",
    "kind",
    "gold",
    "pred",
    "exact_match",
    "solution_match",
    "logp_solution",
    "logp_answer",
]


def load_items(work_dir, settings=None) -> pd.DataFrame:
    """The per-item scores of every run (``runs/<setting>/seed<k>/items.csv``) under a miniature's work dir, with
    setting and seed columns (empty when the runs have none, e.g. at paper scale)."""
    frames = []
    for f in sorted(Path(work_dir).glob("runs/*/seed*/items.csv")):
        setting, seed = f.parent.parent.name, int(f.parent.name[len("seed") :])
        if settings is None or setting in settings:
            frames.append(
                pd.read_csv(
                    f,
                    dtype={"gold": str, "pred": str},
                    keep_default_na=False,
                    na_values={"logp_solution": [""], "logp_answer": [""]},
                ).assign(setting=setting, seed=seed)
            )
    if not frames:
        return pd.DataFrame(columns=ITEM_FILE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[ITEM_FILE_COLUMNS]


def save_items(items: pd.DataFrame, path) -> Path:
    """The per-item scores as a gzip CSV with fixed bytes for the same content (results/0x_items.csv.gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = items[ITEM_FILE_COLUMNS].round({"logp_solution": 4, "logp_answer": 4})
    items.to_csv(path, index=False, compression={"method": "gzip", "mtime": 0})
    return path


def read_items(path) -> pd.DataFrame:
    return pd.read_csv(
        path,
        dtype={"gold": str, "pred": str},
        keep_default_na=False,
        na_values={"logp_solution": [""], "logp_answer": [""]},
    )


def results_prefix(notebook: str, scale: str = "mini") -> str:
    """The prefix of a notebook's files in results/: ``"03"`` at mini scale, ``"03_<scale>"`` otherwise
    (``03_runs.csv``, ``03_paper_runs.csv``)."""
    return notebook if scale == "mini" else f"{notebook}_{scale}"
