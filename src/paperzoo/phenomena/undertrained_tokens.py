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
   (reserved special tokens; byte tokens for bytes valid UTF-8 never contains):
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
- Candidates and their percentile are taken over "ordinary" tokens only: special,
  partial-UTF-8 and unreachable tokens are categorised from the tokenizer alone.
- Verification follows the official code's few-shot copy prompts in structure,
  with the token placed in token space. Deviations: 8 and 30 repeats instead of 20
  and 50, to fit a 256-token context, and the probability is read at the one
  position where the copy must start instead of the maximum over three greedily
  generated positions. A token is verified when that probability is below 0.01,
  the cut-off the paper reports (its code also labels 0.01-0.1 "weakly verified").
- The paper calls its indicators architecture-dependent (Sec. 2.2), and the official
  code (``magikarp/model.py``, ``calculate_unused_token_metric``) makes the L2 norm of
  the *input* embedding rows the default for models with *untied* embeddings: an input
  row that never receives a gradient only decays (`input_embedding_norm`; low =
  under-trained). `find_undertrained_tokens` therefore uses that indicator for untied
  models and the unembedding indicator above for tied ones (``indicator="auto"``);
  any of them can be asked for by name (`INDICATORS`). For tied models the official
  code's default is the plain cosine distance, without removing the first component;
  it is available as ``"unembedding_cosine"``.
- A model with fewer positions than a verification prompt gets the prompt's last
  positions (the copy position and the repeats before it); the report says how many
  leading tokens were cut. A tokenizer with more tokens than the model's vocabulary
  is refused.
"""

from __future__ import annotations

import math
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


def unembedding_cosine_distance(U: torch.Tensor, reference_ids, remove: str | None = "first_pc") -> torch.Tensor:
    """Cosine distance of every row to the mean reference row, after removing the first principal
    component (``"first_pc"``, the paper's), the mean row (``"mean"``), or nothing (``None``)."""
    reference_ids = torch.as_tensor(list(reference_ids), dtype=torch.long)
    if reference_ids.numel() == 0:
        raise ValueError("the indicator needs at least one reference (known unused) token")
    if int(reference_ids.min()) < 0 or int(reference_ids.max()) >= U.shape[0]:
        raise ValueError(f"reference token ids must lie in 0 .. {U.shape[0] - 1}")
    if remove == "first_pc":
        U = remove_component(U, first_principal_component(U))
    elif remove == "mean":
        U = U - U.mean(0, keepdim=True)
    elif remove is not None:
        raise ValueError(f"remove must be 'first_pc', 'mean' or None, got {remove!r}")
    u_oov = U[reference_ids].mean(0)
    return 1.0 - torch.nn.functional.cosine_similarity(U, u_oov[None, :], dim=-1)


def undertrained_indicator(U: torch.Tensor, reference_ids) -> torch.Tensor:
    """The paper's unembedding indicator: cosine distance of every row of U' to the mean reference row
    (U' = U with its first principal component removed; low = under-trained)."""
    return unembedding_cosine_distance(U, reference_ids, remove="first_pc")


def input_embedding_norm(model) -> torch.Tensor:
    """L2 norm of each input-embedding row: small for tokens whose embeddings only decayed."""
    return model.get_input_embeddings().weight.detach().float().norm(dim=-1)


def embeddings_tied(model) -> bool:
    """Whether the input embedding and the unembedding are one matrix."""
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# Every indicator by name; low values mean under-trained for all of them.
INDICATORS = ("input_embedding_norm", "unembedding_cosine_first_pc_removed", "unembedding_cosine",
              "unembedding_cosine_centred")


def default_indicator(model) -> str:
    """The indicator the paper and its code use for this architecture: the input-embedding norm for
    untied embeddings (the official default), the paper's unembedding indicator for tied ones."""
    return "unembedding_cosine_first_pc_removed" if embeddings_tied(model) else "input_embedding_norm"


def indicator_values(model, name: str, reference=(), vocab: int | None = None) -> torch.Tensor:
    """The named indicator for the first `vocab` tokens (all rows by default)."""
    if name == "input_embedding_norm":
        values = input_embedding_norm(model)
    elif name.startswith("unembedding_cosine") and name in INDICATORS:
        remove = {"unembedding_cosine_first_pc_removed": "first_pc", "unembedding_cosine": None,
                  "unembedding_cosine_centred": "mean"}[name]
        values = unembedding_cosine_distance(unembedding_matrix(model)[:vocab], reference, remove)
    else:
        raise ValueError(f"indicator must be one of {', '.join(INDICATORS)} or 'auto', got {name!r}")
    return values[:vocab]


def candidates_below_percentile(indicator: torch.Tensor, percentile: float, exclude=()) -> list[int]:
    """Token ids whose indicator is at or below the given percentile of all tokens, lowest first."""
    threshold = torch.quantile(indicator.double(), percentile / 100.0)
    excluded = set(int(i) for i in exclude)
    order = torch.argsort(indicator).tolist()
    return [i for i in order if indicator[i] <= threshold and i not in excluded]


def ordinary_tokens(tokenizer) -> list[int]:
    """Tokens the detector scores: not special, decodable alone, and reachable by encoding.

    The paper (and its code) leaves out special tokens, partial UTF-8 byte tokens
    (they decode to U+FFFD on their own) and unreachable tokens (text that decodes
    from them encodes to other ids): those are categorised by the tokenizer alone.
    """
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if "\ufffd" not in text and tokenizer.encode(text, add_special_tokens=False) == [i]:
            out.append(i)
    return out


# Bytes that never occur in valid UTF-8 text: overlong-sequence leads and beyond U+10FFFF.
NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable Latin-1 bytes stand
    for themselves, the other 68 bytes for the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


def single_byte_tokens(tokenizer) -> dict[int, int]:
    """Token id -> the byte it stands for, for byte-level BPE and for <0xXX> byte fallback."""
    byte_level = '"ByteLevel"' in tokenizer.backend_tokenizer.to_str()
    alphabet = byte_level_alphabet()
    out = {}
    for token, i in tokenizer.get_vocab().items():
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[i] = int(token[3:5], 16)
        elif byte_level and token in alphabet:
            out[i] = alphabet[token]
    return out


def reference_unused_tokens(tokenizer) -> list[int]:
    """Tokens known to be unused without looking at the model, as the paper's code picks them:

    - added special tokens other than bos/eos/pad/unk (reserved tokens such as Llama 3's
      ``<|reserved_special_token_*|>`` or Gemma's ``<unused*>``);
    - single-byte tokens for bytes that valid UTF-8 never contains (0xC0, 0xC1, 0xF5-0xFF),
      the paper's reference set for GPT-2-style byte-level vocabularies.
    """
    used = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    reserved = [i for i in tokenizer.all_special_ids if i not in used]
    never_bytes = [i for i, b in single_byte_tokens(tokenizer).items() if b in NEVER_IN_UTF8]
    return sorted(set(reserved) | set(never_bytes))


# Few-shot copy prompts in the style of the paper's verification prompts; {token} is replaced
# in *token space* by the candidate id, so even tokens that text cannot produce are placed exactly.
REPEAT_TEMPLATES = (
    "This device repeats its input exactly, as these identical trials show.\n"
    + "Input: «{token}»\nOutput: «{token}»\n" * 8 + "Input: «{token}»\nOutput: «",
    "Here the same phrase is simply repeated over and over:\n" + "{token}" * 30,
)


def max_positions(model) -> int | None:
    """How many positions the model takes (None when its config does not say)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_length(tokenizer, template: str) -> int:
    """Tokens in a verification prompt: the template's text pieces plus one token per placeholder."""
    pieces = template.split("{token}")
    return sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in pieces) + len(pieces) - 1


@torch.no_grad()
def verification_probability(model, tokenizer, token_ids, templates=REPEAT_TEMPLATES) -> torch.Tensor:
    """For each token, the highest probability (over templates) the model gives it where it must be copied.

    A prompt longer than the model's positions keeps its last positions (see `max_positions`).
    """
    model.eval()
    limit = max_positions(model)
    out = torch.zeros(len(token_ids))
    for template in templates:
        pieces = [tokenizer.encode(p, add_special_tokens=False) for p in template.split("{token}")]
        for k in range(0, len(token_ids), 32):
            chunk = [int(i) for i in token_ids[k : k + 32]]
            rows = []
            for i in chunk:
                row = list(pieces[0])
                for piece in pieces[1:]:
                    row += [i] + piece
                rows.append(row[-limit:] if limit else row)
            logits = model(input_ids=torch.tensor(rows)).logits[:, -1].float()
            probs = logits.softmax(-1)[torch.arange(len(chunk)), torch.tensor(chunk)]
            out[k : k + len(chunk)] = torch.maximum(out[k : k + len(chunk)], probs)
    return out


@dataclass
class UndertrainedTokenReport:
    indicator: torch.Tensor  # [vocab] the indicator's value per token (low = under-trained)
    reference: list[int]  # the known-unused tokens (the unembedding indicators average them)
    candidates: list[int]  # below the percentile, lowest indicator first
    verification: dict[int, float]  # candidate -> max repeat probability
    verified: list[int]  # candidates whose repeat probability is below the threshold
    indicator_name: str = "unembedding_cosine_first_pc_removed"  # which of INDICATORS
    prompt_tokens_clipped: int = 0  # leading verification-prompt tokens cut to fit the model's positions


def find_undertrained_tokens(model, tokenizer, percentile: float = 2.0, max_probability: float = 0.01,
                             reference=None, indicator: str = "auto",
                             templates=REPEAT_TEMPLATES) -> UndertrainedTokenReport:
    """The paper's pipeline on any HF causal LM and its tokenizer.

    ``indicator="auto"`` picks the one the paper and its code use for the architecture
    (`default_indicator`). The percentile is taken over the ordinary tokens only, as in
    the paper's code. A candidate is verified when its repeat probability stays below
    `max_probability`.
    """
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
    if isinstance(max_probability, bool) or not isinstance(max_probability, (int, float)) \
            or not 0 < max_probability <= 1:
        raise ValueError(f"max_probability must be a number in (0, 1], got {max_probability!r}")
    name = default_indicator(model) if indicator == "auto" else indicator
    if name not in INDICATORS:
        raise ValueError(f"indicator must be one of {', '.join(INDICATORS)} or 'auto', got {indicator!r}")
    V, rows = len(tokenizer), model.get_input_embeddings().num_embeddings
    if V > rows:
        raise ValueError(f"the tokenizer has {V} tokens but {type(model).__name__} embeds only {rows}: "
                         "pass the model's own tokenizer")
    reference = reference_unused_tokens(tokenizer) if reference is None else [int(i) for i in reference]
    if not reference and name != "input_embedding_norm":
        raise ValueError("no known-unused reference tokens found; pass `reference` token ids explicitly")
    values = indicator_values(model, name, reference, vocab=V)
    scored = torch.tensor(ordinary_tokens(tokenizer))
    found = scored[candidates_below_percentile(values[scored], percentile)].tolist()
    probs = verification_probability(model, tokenizer, found, templates) if found else torch.zeros(0)
    verification = {i: float(p) for i, p in zip(found, probs)}
    verified = [i for i in found if verification[i] < max_probability]
    limit = max_positions(model) or math.inf
    clipped = max([0] + [prompt_length(tokenizer, t) - limit for t in templates])
    return UndertrainedTokenReport(values, reference, found, verification, verified, name, int(clipped))
