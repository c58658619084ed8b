# The two commands that matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-all test-isa lint fresh-check clean plan-install plan-install-tpu

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Prepares the offline pydocs corpus, trains configs/quickstart.py on CPU (~3 min), samples, and
# draws the run (runs/demo/report.png).
demo: $(STAMP)
	$(PY) -m llmjax.prepare --source=builtin:pydocs --tokenizer=bytes --val_fraction=0.05 \
		--out=$(DEMO_DIR)/data
	$(PY) -m llmjax.main --config=configs/quickstart.py --workdir=$(DEMO_DIR) \
		--config.data.path=$(DEMO_DIR)/data
	$(PY) -m llmjax.sample --workdir=$(DEMO_DIR) --prompt="The built-in function" \
		--max_new_tokens=100 --temperature=0.8 --top_k=40 --seed=0
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)/tb"
	$(PY) -m llmjax.report --workdir=$(DEMO_DIR) --out=$(DEMO_DIR)/report.png

# Two pytest workers (pytest-xdist), a file each at a time so that a module's shared fixtures
# are built once: 18 min on 2 cores against 25 serially. More cores: `make test WORKERS=auto`.
WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

# The numerics tests again with XLA:CPU generating code for another instruction set than the
# host's (it sums in another order), as on a user's older CPU: `make test-isa ISA=SSE4_2`.
ISA ?= AVX2
NUMERICS := tests/test_golden.py tests/test_model.py tests/test_loss.py tests/test_optim.py
test-isa: $(STAMP)
	XLA_FLAGS="$$XLA_FLAGS --xla_cpu_max_isa=$(ISA)" $(PY) -m pytest -q $(NUMERICS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(PY) -m ruff check llmjax tests benchmarks configs
	$(PY) -m ruff format --check llmjax tests benchmarks configs

# llmjax.plan's own environment: jax[cuda12] (~3 GB of CUDA wheels) at .venv's jax version, so
# a CPU machine can compile for GPUs. Kept apart from .venv and out of `make test`.
PLAN_VENV := .venv-plan
plan-install: $(STAMP)
	test -x $(PLAN_VENV)/bin/python || $(PYTHON) -m venv $(PLAN_VENV)
	$(PLAN_VENV)/bin/python -m pip install -q --upgrade pip
	$(PLAN_VENV)/bin/python -m pip install -q "jax[cuda12]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	$(PLAN_VENV)/bin/python -m pip install -q -e ".[cuda12]" pytest  # pytest: tests/test_plan.py
	@echo "then: $(PLAN_VENV)/bin/python -m llmjax.plan --config=configs/gpt2_124m.py --gpu=h100"

# The same for TPUs: jax[tpu] (libtpu, ~1.5 GB) at .venv's jax version, so a CPU machine can
# compile for TPU slices (`plan --tpu=v5e-8`). Its own venv: libtpu and the CUDA plugin apart.
PLAN_TPU_VENV := .venv-plan-tpu
plan-install-tpu: $(STAMP)
	test -x $(PLAN_TPU_VENV)/bin/python || $(PYTHON) -m venv $(PLAN_TPU_VENV)
	$(PLAN_TPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(PLAN_TPU_VENV)/bin/python -m pip install -q "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	$(PLAN_TPU_VENV)/bin/python -m pip install -q -e . pytest  # pytest: tests/test_plan_tpu.py
	@echo "then: $(PLAN_TPU_VENV)/bin/python -m llmjax.plan --config=configs/gpt2_124m.py --tpu=v5e-8"

# What a user who clones the repository gets: the committed tree cloned into an empty temporary
# directory, nothing beside it, then `make test` and `make demo` there (what CI runs).
fresh-check:
	.ci/run

clean:
	rm -rf $(VENV) runs
