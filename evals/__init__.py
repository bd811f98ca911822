"""Hallucination evals: POPE and CHAIR data and metrics, the batched resumable runner, and reports.

Each stage is a function with plain inputs and outputs (data -> items -> runner -> parsed answers -> metrics ->
report), so each can be tested alone and reused from Python.
"""
