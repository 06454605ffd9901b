"""One backend resolution for rollout and score (stages/lib/vllm_backend.py ``resolve_backend``)."""

from __future__ import annotations

import pytest

from stages.lib import vllm_backend as vb
from stages.lib.errors import UserError

KEYS = ["rollout.backend", "score.backend"]


@pytest.mark.parametrize("key", KEYS)
def test_auto_is_hf_without_cuda_and_hf_is_hf(key):
    if vb.cuda_available():
        pytest.skip("CUDA is present")
    assert vb.resolve_backend("auto", key) == "hf"
    assert vb.resolve_backend("hf", key) == "hf"


@pytest.mark.parametrize("key", KEYS)
def test_vllm_where_vllm_cannot_run_is_one_error_naming_the_key(key, monkeypatch):
    # vLLM's presence is a property of the machine: the check itself is replaced, nothing else
    monkeypatch.setattr(vb, "vllm_available", lambda: (False, "vllm is not installed"))
    with pytest.raises(UserError) as e:
        vb.resolve_backend("vllm", key)
    line = e.value.line()
    assert line.startswith(f"{key}=vllm but vLLM cannot run here: vllm is not installed")
    assert f"use {key}=hf" in line


@pytest.mark.parametrize("key", KEYS)
def test_auto_with_cuda_but_no_vllm_says_why_and_uses_hf(key, monkeypatch, capsys):
    monkeypatch.setattr(vb, "cuda_available", lambda: True)
    monkeypatch.setattr(vb, "vllm_available", lambda: (False, "vllm is not installed"))
    assert vb.resolve_backend("auto", key) == "hf"
    assert (
        f"[{key}] auto: CUDA present but vllm is not installed; using hf" in capsys.readouterr().out
    )
