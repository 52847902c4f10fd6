# The two commands of the README:  `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CORES  ?= all

.PHONY: demo test lint venv report clean

$(BIN)/activate: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly pinned: an unpinned torch pulls several GB of CUDA packages.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(BIN)/activate

venv: $(BIN)/activate

demo: venv
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores 1 --report results/report.html
	@echo ""
	@echo "Done. Report: $(CURDIR)/results/report.html"
	@echo "      Plots:  $(CURDIR)/results/plots/"
	@echo "      Table:  $(CURDIR)/results/table.parquet"
	@echo "      Verdicts: $(CURDIR)/results/verdicts.json (the report's first page)"
	@echo ""
	$(BIN)/python -m saepipe.verdicts results/verdicts.json

report: venv
	$(BIN)/snakemake --cores 1 --report results/report.html

test: venv
	$(BIN)/python -m pytest -q

# Static gates (CI runs them before the tests; configuration in pyproject.toml).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/snakefmt --check Snakefile rules/
	@out="$$($(BIN)/snakemake --lint 2>&1)"; echo "$$out"; \
	  echo "$$out" | grep -q "your workflow is in a good condition" || { echo "snakemake --lint found lints (above)"; exit 1; }

clean:
	rm -rf results .snakemake
