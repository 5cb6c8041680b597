# latentgp: the only entry points users and CI need.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
SMOKE   ?= 1

.PHONY: install test demo bench notebooks lint clean

install: $(STAMP)

# Re-install only when the project metadata changes (the package itself is installed editable).
$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev,notebooks,neuro]'
	touch $(STAMP)

# pytest exit code 5 means "no tests collected": not a failure.
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

demo: install
	$(PY) -m latentgp demo

bench: install
	$(PY) benchmarks/run_all.py

# Re-execute every tutorial at full size and store the executed notebooks next to their sources.
notebooks: install
	LATENTGP_SMOKE=0 $(PY) -m latentgp.notebooks tutorials

lint: install
	.venv/bin/ruff check latentgp tests benchmarks

clean:
	rm -rf .venv demo_output bench_output
