# The two commands of the README. Both install what they need first (scripts/install.sh EXTRAS,
# at the tested versions of constraints.txt): the demo the package with ScaNN, the tests also the
# ssm, gcs and test extras.
.PHONY: install demo test test-all bench

# Everything: every extra of pyproject.toml.
install:
	bash scripts/install.sh scann,ssm,gcs,test,bench

# The main job: SQuAD-open end to end on the embedded data (10–13 minutes on 2 CPU cores, plus the install).
demo:
	bash scripts/install.sh scann
	.venv/bin/realm-jax main --workdir workdirs/squad_minilm $(ARGS)

# The test suite CI runs (slow tests excluded; `make test-all` runs them too). With the test
# extras installed, REALM_JAX_REQUIRE_TEST_DEPS=1 makes a skip for a missing test dependency a
# failure (tests/conftest.py; tests/test_test_dependencies.py checks each dependency).
test:
	bash scripts/install.sh scann,ssm,gcs,test
	REALM_JAX_REQUIRE_TEST_DEPS=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m pytest -m "not slow" $(ARGS)

test-all:
	bash scripts/install.sh scann,ssm,gcs,test
	REALM_JAX_REQUIRE_TEST_DEPS=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m pytest $(ARGS)

bench:
	bash scripts/install.sh scann,ssm,bench
	.venv/bin/python benchmarks/run_all.py $(ARGS)
