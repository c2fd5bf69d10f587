"""Architectures: blocks that slot into an unmodified HF decoder (`paperzoo.core.blocks`), and whole models with the same forward."""
