"""Evaluations: long-context bits per byte, passkey retrieval, synthetic recall tasks."""
