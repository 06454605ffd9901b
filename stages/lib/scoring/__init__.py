"""The score stage's machinery: the pass plan (``plan``), the HF backend (``hf``), the shard scorer
over HF/vLLM (``scorer``), the tokens table (``tokens``), model and SFT-teacher provenance
(``provenance``) and the cross-tokenizer teacher (``cross_tokenizer``). ``stages/score.py`` wires
them into the stage."""
