"""The demo world: a tokenizer, a synthetic private-facts task and tiny Llama models trained from
scratch on the CPU (``world.py``). Built by ``scripts/make_demo.py``; the pipeline knows nothing of it."""
