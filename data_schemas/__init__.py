"""Explicit pyarrow schemas for every table the stages exchange, with validation.

One module per table: ``prompts``, ``rollouts``, ``tokens``, ``selected`` and ``manifest``.
Each table module exposes ``NAME``, ``VERSION``, ``SCHEMA`` and ``validate(table, ...)``.
"""
