"""Evaluation: tasks, scorers, the runner and its outputs."""
