# Two entry points (see README): `make reproduce` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# notebooks whose committed outputs are re-executed and compared by nbval in `make test` (with
# tests/nbval_smoke/*.ipynb: notebooks 03-06 executed with the smoke parameters, collected under tests/)
NBVAL_NOTEBOOKS := notebooks/01_projection_matrix.ipynb notebooks/02_numeral_audit.ipynb notebooks/05_evaluation_tables.ipynb

# the paper-scale stand-ins that tests/nbval_paper_smoke/*.ipynb read (built by `make test`, deterministic)
PAPER_SMOKE := runs/nbval-paper-smoke

.PHONY: setup reproduce on-policy smoke paper-smoke test nbval-refs bench gpu-check lab lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## the embedded default reproduction: notebooks 01-05 at mini scale, results/ regenerated
reproduce: $(STAMP)
	$(BIN)/python -m xtoken reproduce --scale mini

## beyond the paper: notebook 06 (on-policy distillation, ~8 min) on the workspace `make reproduce` left; it adds
## its section to results/REPORT.md
on-policy: $(STAMP)
	$(BIN)/python -m xtoken reproduce --scale mini --on-policy --start 06

smoke: $(STAMP)
	$(BIN)/python -m xtoken reproduce --scale smoke --on-policy

## the paper-scale path on offline stand-ins: notebooks 03-05 at scale="paper" + a 2-process torchrun run
paper-smoke: $(STAMP)
	$(BIN)/python -m xtoken paper-smoke --root runs/paper-smoke

## lint, unit tests + notebook regression (nbval on the committed notebooks)
test: $(STAMP)
	$(BIN)/ruff check xtoken tests benchmarks && $(BIN)/ruff format --check xtoken tests benchmarks
	rm -rf $(PAPER_SMOKE)/work && $(BIN)/python -m xtoken.standins $(PAPER_SMOKE)/standins
	$(BIN)/python -m pytest -q tests $(NBVAL_NOTEBOOKS) --nbval --nbval-sanitize-with notebooks/nbval_sanitize.cfg

## regenerate the nbval references of notebooks 03-05 at smoke scale and at paper scale on the stand-ins
nbval-refs: $(STAMP)
	rm -rf runs/nbval-smoke
	$(BIN)/python -m xtoken reproduce --scale smoke --start 03 --on-policy --out tests/nbval_smoke \
		--work runs/nbval-smoke/work --results runs/nbval-smoke/results
	rm -rf $(PAPER_SMOKE)
	$(BIN)/python -m xtoken paper-smoke --root $(PAPER_SMOKE) --out tests/nbval_paper_smoke --nproc 1

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

## the notebooks in JupyterLab
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

## ruff: lint and formatting check
lint: $(STAMP)
	$(BIN)/ruff check xtoken tests benchmarks
	$(BIN)/ruff format --check xtoken tests benchmarks

clean:
	rm -rf $(VENV) runs
