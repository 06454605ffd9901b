"""The demo world: a tokenizer, a synthetic private-facts task and tiny Llama models trained from
scratch on the CPU (``world.py``). Built by ``scripts/make_demo.py``; the pipeline knows nothing of it."""

# Before world.py imports torch: OpenMP's spin count for a shared machine (stages/lib/threads.py).
# Set here, not in world.py, whose source is part of the world's cache key.
from stages.lib import threads as _threads

_threads.setup()
