"""Hugging Face Nemotron-H interoperability: import-hf / export-hf (stage.py), mapping (pure)."""
