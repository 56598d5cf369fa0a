"""Compression techniques, one file each. A technique is `(model, cfg, ctx) -> (model, info)`: it works
on a copy of its input, never trains by itself, and returns what it did (DESIGN.md, habit 1).
"""
