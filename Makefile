# Two commands: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m lightning_meddpo fit --config configs/formulations/dpo.yaml --config configs/backbones/demo.yaml \
		--model.init_args.beta=0.5  # the demo's beta (configs/benchmark/demo.yaml); the formulation's is the paper's 0.1

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs data/demo
