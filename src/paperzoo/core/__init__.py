"""The shared substrate every paper's method and experiment builds on.

- `store`: where paperzoo keeps things, and atomic writes.
- `corpus`: the embedded default corpus (standard-library docstrings) and user corpora.
- `tokenizer`: a byte-level BPE trained on a corpus, cached.
- `models`: tiny Llama-style LMs, loading any HF causal LM, and the cached base models.
- `training`: the one training loop.
- `evaluation`: perplexity and next-token accuracy.
- `experiment`: claims as data, scales, the harness that runs an experiment to a verdict.
- `reasoning`: verifiable reasoning tasks, thinking traces, the cached tiny reasoner and draft LMs.
- `sampling`: sampling with per-token log-probabilities and entropies, and exact token counts.
"""
