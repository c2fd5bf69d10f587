"""Reproductions of the architectures papers: one `compare_blocks` call at equal parameters or FLOPs, plus the paper's probe."""
