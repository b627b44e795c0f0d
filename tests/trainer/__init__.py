"""Trainer tests: tiny models and data on CPU, nothing downloaded."""
