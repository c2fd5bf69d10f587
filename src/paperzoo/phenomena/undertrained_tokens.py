r"""Fishing for Magikarp: detecting under-trained tokens (Land & Bartolo, arXiv:2405.05417).

A token that (almost) never occurs in an LM's training data never gets a useful
gradient as an *input*, and as an *output* its only training signal is "predict
me less", the same push for every such token. Their unembedding rows therefore
drift together toward one common direction, separated from the rest of the
vocabulary. The paper reads that off the unembedding matrix $U \in \mathbb{R}^{V \times d}$:

1. Take the first principal component $c$ of $U$ ($\lVert c \rVert = 1$), an
   estimate of the constant component that softmax ignores, and remove it:
   $U' = U - (U c)\, c^\top$.
2. Average the rows of a reference set $S$ of tokens known to be unused
   (reserved special tokens, tokens that no text encodes to):
   $u_{\text{oov}} = \frac{1}{|S|} \sum_{i \in S} U'_i$.
3. Score every token by cosine distance $1 - \cos(U'_i, u_{\text{oov}})$; tokens
   below a low percentile of that score (the paper uses the 2nd) are candidates.
4. Verify candidates by prompting the model to repeat each one and reading the
   probability it gives that token (`verification_probability`); an
   under-trained token is one the model cannot produce even when asked to copy it.

Implementation notes:

- The principal component is computed on the mean-centred matrix (PCA), and then
  projected out of the *uncentred* $U$, as the paper's description of "the
  constant component" requires: the mean row is what the component captures.
- When input and output embeddings are tied, $U$ is the shared matrix; otherwise
  the output (unembedding) matrix is used, as in the paper.
- Deviation: the paper's verification prompts are chat templates asking an
  instruction-tuned model to repeat a string. A base model has no chat format, so
  `verification_probability` uses plain-text repeat prompts (``'x' -> 'x'``
  patterns); pass your own ``templates`` for a chat model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def unembedding_matrix(model) -> torch.Tensor:
    """The output embedding matrix U of a HF causal LM, [vocab, d], in fp32."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (unembedding) matrix")
    return head.weight.detach().float()


def first_principal_component(U: torch.Tensor) -> torch.Tensor:
    """Unit vector of U's first principal component (of the mean-centred rows)."""
    centred = U - U.mean(0, keepdim=True)
    _, _, Vh = torch.linalg.svd(centred.double(), full_matrices=False)
    return Vh[0].to(U.dtype)


def remove_component(U: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """U' = U - (U c) c^T for a unit vector c."""
    return U - torch.outer(U @ c, c)


def undertrained_indicator(U: torch.Tensor, reference_ids) -> torch.Tensor:
    """Cosine distance of every row of U' to the mean reference row (low = under-trained)."""
    reference_ids = torch.as_tensor(list(reference_ids), dtype=torch.long)
    if reference_ids.numel() == 0:
        raise ValueError("the indicator needs at least one reference (known unused) token")
    U_prime = remove_component(U, first_principal_component(U))
    u_oov = U_prime[reference_ids].mean(0)
    return 1.0 - torch.nn.functional.cosine_similarity(U_prime, u_oov[None, :], dim=-1)


def candidates_below_percentile(indicator: torch.Tensor, percentile: float, exclude=()) -> list[int]:
    """Token ids whose indicator is at or below the given percentile of all tokens, lowest first."""
    threshold = torch.quantile(indicator.double(), percentile / 100.0)
    excluded = set(int(i) for i in exclude)
    order = torch.argsort(indicator).tolist()
    return [i for i in order if indicator[i] <= threshold and i not in excluded]


def unreachable_tokens(tokenizer) -> list[int]:
    """Ordinary tokens that no text encodes to: decoding then re-encoding gives other ids."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if tokenizer.encode(text, add_special_tokens=False) != [i]:
            out.append(i)
    return out


def reference_unused_tokens(tokenizer) -> list[int]:
    """Known-unused tokens: added special tokens other than bos/eos/pad/unk, plus unreachable ones.

    Llama 3's ``<|reserved_special_token_*|>`` are the paper's example of the first kind.
    """
    used = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    reserved = [i for i in tokenizer.all_special_ids if i not in used]
    return sorted(set(reserved) | set(unreachable_tokens(tokenizer)))


REPEAT_TEMPLATES = (
    "'a' -> 'a'\n'the' -> 'the'\n'{token}' -> '",
    'Repeat the string exactly.\n"dog": "dog"\n"{token}": "',
)


@torch.no_grad()
def verification_probability(model, tokenizer, token_ids, templates=REPEAT_TEMPLATES) -> torch.Tensor:
    """For each token, the highest probability (over templates) of that token at the copy position."""
    model.eval()
    out = torch.zeros(len(token_ids))
    for t in templates:
        before, after = t.split("{token}")
        prefix = tokenizer.encode(before, add_special_tokens=False)
        suffix = tokenizer.encode(after, add_special_tokens=False)
        rows = torch.tensor([prefix + [int(i)] + suffix for i in token_ids], dtype=torch.long)
        for k in range(0, len(rows), 64):
            logits = model(input_ids=rows[k : k + 64]).logits[:, -1].float()
            probs = logits.softmax(-1)[torch.arange(len(rows[k : k + 64])), rows[k : k + 64, len(prefix)]]
            out[k : k + 64] = torch.maximum(out[k : k + 64], probs)
    return out


@dataclass
class UndertrainedTokenReport:
    indicator: torch.Tensor  # [vocab] cosine distance to the unused-token mean
    reference: list[int]  # the known-unused tokens the mean was taken over
    candidates: list[int]  # below the percentile, lowest indicator first
    verification: dict[int, float]  # candidate -> max repeat probability
    verified: list[int]  # candidates whose repeat probability is below the threshold


def find_undertrained_tokens(model, tokenizer, percentile: float = 2.0, max_probability: float = 0.01,
                             reference=None) -> UndertrainedTokenReport:
    """The paper's pipeline on any HF causal LM and its tokenizer."""
    reference = reference_unused_tokens(tokenizer) if reference is None else list(reference)
    U = unembedding_matrix(model)[: len(tokenizer)]
    indicator = undertrained_indicator(U, reference)
    found = candidates_below_percentile(indicator, percentile, exclude=reference)
    probs = verification_probability(model, tokenizer, found) if found else torch.zeros(0)
    verification = {i: float(p) for i, p in zip(found, probs)}
    verified = [i for i in found if verification[i] < max_probability]
    return UndertrainedTokenReport(indicator, reference, found, verification, verified)
