# Two entry points, both self-contained on a fresh machine (see README.md):
#   make demo   the UltraLong recipe in miniature, on CPU
#   make test   the test suite (what CI runs)
#   make test-hf4   the HF-facing tests once more against transformers 4.57.x (.venv-hf4)
#   make test-slurm the Slurm templates end to end on a one-node Slurm it starts and stops (root on
#                   Debian/Ubuntu: installs slurm-wlm and munge when missing; tests/slurm/slurm_chain.py)
# Both create or refresh a local virtualenv (.venv) from requirements.lock first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

HF4_VENV  := .venv-hf4
HF4_STAMP := $(HF4_VENV)/.installed
# Tests that exercise transformers itself (configs both ways, RoPE, logits, generate, chat templates).
HF_TESTS := tests/test_sft_chat.py tests/test_sft_dataset.py tests/test_model_config.py tests/test_rope_config.py \
            tests/test_rope_frequencies.py tests/test_model_vs_hf.py tests/test_convert_cli_paths.py tests/test_eval_hf.py

.PHONY: venv demo test test-hf4 test-slurm bench clean

venv: $(STAMP)

# Re-installs whenever the pins or the package metadata change.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77"  # pyproject.toml: SPDX license (PEP 639)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

# A second venv holding only transformers 4.57.x and its tokenizers/hub; everything else (torch,
# megatron-core, this package) comes from .venv through a .pth that is read after its own packages.
$(HF4_STAMP): $(STAMP) requirements-hf4.lock
	@test -x $(HF4_VENV)/bin/python || $(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-hf4.lock
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	    > "$$($(HF4_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_main_venv.pth"
	@touch $(HF4_STAMP)

test-hf4: $(HF4_STAMP)
	$(HF4_VENV)/bin/python -c "import transformers; assert transformers.__version__.startswith('4.57'), transformers.__version__"
	$(HF4_VENV)/bin/python -m pytest -q $(HF_TESTS)

# Not part of `make test` (needs root, starts daemons): CI runs it after the suite.
test-slurm: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) tests/slurm/slurm_chain.py

clean:
	rm -rf $(VENV) $(HF4_VENV) demo_out *.egg-info build dist
