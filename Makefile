# The two commands of the README. Both install what they need first (scripts/install.sh).
.PHONY: install demo test test-all bench

install:
	bash scripts/install.sh

# The main job: SQuAD-open end to end on the embedded data (11–18 minutes from a clean clone on 2 CPU cores).
demo: install
	.venv/bin/realm-jax main --workdir workdirs/squad_minilm $(ARGS)

# The test suite CI runs (slow tests excluded; `make test-all` runs them too).
test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m pytest -m "not slow" $(ARGS)

test-all: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m pytest $(ARGS)

bench: install
	.venv/bin/python benchmarks/run_all.py $(ARGS)
