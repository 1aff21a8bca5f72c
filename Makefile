.PHONY: lint format typecheck test test-fast test-slow test-gpu

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

typecheck:   ## mypy over lit_saferlhf/ (settings in pyproject.toml)
	mypy

test:        ## what CI runs
	python -m pytest -m "not gpu" -q

test-fast:   ## the inner loop
	python -m pytest -m "not slow and not gpu" -q

test-slow:
	python -m pytest -m "slow and not gpu" -q

test-gpu:    ## on a machine with a CUDA GPU
	python -m pytest -m gpu -q
