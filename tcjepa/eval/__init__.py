"""Evaluation harnesses that work on any frozen checkpoint."""
