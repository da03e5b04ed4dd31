"""Interfaces: a model family (family.py), its task (task.py), a noise process (noise.py)."""
