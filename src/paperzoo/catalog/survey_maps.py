"""Surveys as maps: each survey's taxonomy, branch by branch, onto the catalogue papers that implement it.

A survey describes no single system to build. What paperzoo can give for one is a
map: the survey's branches in its own order, a one-line description of each (our
words for what the survey puts there), and the catalogue slugs whose method belongs
to that branch. A slug's status (built, reproduced, planned, ...) is read from the
catalogue when the map is shown, so the map shows what is built and what is only
planned; a branch with no slug says so.

The maps are data, checked by tests: every slug must be in the catalogue
(`missing_slugs`), and every surveyed slug must be a catalogue survey.
"""

from __future__ import annotations

from dataclasses import dataclass

from paperzoo import catalog


@dataclass(frozen=True)
class Branch:
    group: str  # the survey's top-level division the branch sits under
    name: str
    description: str  # what the survey files under this branch, in one line
    slugs: tuple[str, ...] = ()  # catalogue papers whose method belongs here; () = none in paperzoo
    note: str = ""  # where our placement needs a word of justification


EFFICIENT_INFERENCE_SURVEY = (
    # Zhou et al. 2024 (arXiv:2404.14294), sections 4-6: data-, model- and system-level optimisation.
    Branch("Data level", "Input compression",
           "Shorten the prompt: prompt pruning, prompt summary, soft-prompt compression, retrieval-augmented generation.",
           ("kg-rag-customer-service",),
           "RAG is filed under input compression by the survey; this paper's RAG aims at accuracy, not speed."),
    Branch("Data level", "Output organization",
           "Structure the answer so parts decode in parallel: Skeleton-of-Thought, DAG-organised generation."),
    Branch("Model level", "Efficient FFN design",
           "Mixture-of-Experts feed-forward layers that run a few experts per token, and their routing and serving.",
           ("lynx-expert-selection", "memory-layers", "time-moe"),
           "memory-layers replaces FFNs by a sparse key-value memory; time-moe is a sparse MoE for time series."),
    Branch("Model level", "Efficient attention design",
           "Multi-/grouped-query attention, and low-complexity attention (kernel, low-rank, sparse patterns).",
           ("small-lm-survey", "fftnet-attention", "efficient-attention-survey"),
           "small-lm-survey measures MHA against GQA and MQA; fftnet-attention replaces attention by an FFT."),
    Branch("Model level", "Transformer alternates",
           "Architectures that drop quadratic attention: state-space models, linear recurrences, long convolutions.",
           ("rnn-state-collapse", "illusion-of-state"),
           "Both study what recurrent / state-space models can and cannot keep in their state."),
    Branch("Model level", "Quantization",
           "Lower-precision weights and activations: post-training quantization and quantization-aware training.",
           ("super-weight", "efficient-qat", "l-mul-multiplication"),
           "l-mul-multiplication replaces the low-precision multiply itself and is compared against fp8."),
    Branch("Model level", "Sparsification",
           "Remove weights, heads or layers (unstructured and structured pruning) and sparsify attention.",
           ("lottery-ticket", "layer-pruning")),
    Branch("Model level", "Structure optimization",
           "Search or factorise a cheaper structure: neural architecture search, low-rank factorisation."),
    Branch("Model level", "Knowledge distillation",
           "Train a small student on a large teacher's outputs (white-box) or generated data (black-box).",
           ("jasper-stella-distillation",)),
    Branch("Model level", "Dynamic inference",
           "Spend less compute on easy inputs: sample-level early exiting and token-level layer or expert skipping.",
           ("mixture-of-recursions", "lynx-expert-selection"),
           "mixture-of-recursions picks each token's recursion depth; LYNX prunes experts per batch at run time."),
    Branch("System level", "Graph and operator optimization",
           "Faster kernels and fused operators for attention, linear layers and the rest of the graph."),
    Branch("System level", "Speculative decoding",
           "A cheap drafter proposes several tokens and the target model verifies them in one pass.",
           ("svip-draft-length", "mtp-gated-lora")),
    Branch("System level", "Offloading",
           "Keep weights or KV cache in CPU memory or on disk and stream them to the accelerator."),
    Branch("System level", "Serving system",
           "Memory management (paged KV cache), continuous batching, request scheduling, distributed serving."),
    Branch("Beyond the survey", "Reasoning length and test-time compute",
           "Stop or shorten long reasoning traces and budget sampled traces; post-dates the survey (April 2024).",
           ("overthinking-efficiency", "budget-forcing", "deepconf"),
           "Closest survey branch: output organization (data level), which also cuts what is decoded."),
)

SMALL_LM_SURVEY = (
    # Lu et al. 2024 (arXiv:2409.15790): architecture, data, training, capabilities, runtime cost, future directions.
    Branch("Architecture", "Attention type",
           "MHA gives way to grouped-query attention (GQA); MQA in a few models.",
           ("small-lm-survey", "efficient-attention-survey"),
           "small-lm-survey's measurement compares MHA, GQA and MQA latency and memory."),
    Branch("Architecture", "FFN type and ratio",
           "Gated FFNs replace standard ones; intermediate ratios spread from 2 to 8 times the hidden size.",
           ("small-lm-survey",),
           "Measured here for latency and memory at ratios 2, 4 and 8."),
    Branch("Architecture", "Activation function",
           "GELU and its variants give way to SiLU in 2024 models."),
    Branch("Architecture", "Normalization",
           "LayerNorm gives way to RMSNorm."),
    Branch("Architecture", "Vocabulary size",
           "Vocabularies grow past 50k tokens, at a cost in embedding memory and latency.",
           ("small-lm-survey", "tfree-hashed-trigrams", "undertrained-tokens"),
           "T-FREE shrinks the embedding matrix; under-trained tokens are a cost of large vocabularies."),
    Branch("Architecture", "Architecture innovations",
           "Parameter sharing across layers, layer-wise parameter scaling, nonlinearity compensation.",
           ("mixture-of-recursions",),
           "mixture-of-recursions shares one block across recursion steps."),
    Branch("Training datasets", "Pre-training data quality and mixture",
           "Model-filtered corpora (FineWeb-Edu, DCLM) over raw web text; training far past Chinchilla.",
           ("doremi-mixtures", "online-data-mixing", "utilimax-medu", "unimax-sampling")),
    Branch("Training algorithms", "Maximal update parameterization (muP)",
           "Initialisation and per-layer learning rates that transfer hyper-parameters from small to large models.",
           ("spectral-condition-mup",)),
    Branch("Training algorithms", "Knowledge distillation",
           "Small students trained on a larger teacher (LaMini-GPT, Gemma-2).",
           ("jasper-stella-distillation",)),
    Branch("Training algorithms", "Two-stage pre-training",
           "Coarse broad data first, then a short phase on high-quality data (MiniCPM)."),
    Branch("Capabilities", "Commonsense, problem solving and mathematics",
           "SLMs gain fast on commonsense and reasoning benchmarks but stay weak at mathematics.",
           ("small-llm-grpo", "rstar-math")),
    Branch("Capabilities", "In-context learning and long context",
           "Most SLMs gain from few-shot examples; long-context retrieval improves with size.",
           ("long-context-icl", "mixture-of-icl")),
    Branch("Runtime cost", "Latency and memory against architecture",
           "Prefill and decode latency and peak memory depend on the architecture, not on the parameter count alone.",
           ("small-lm-survey",)),
    Branch("Runtime cost", "Quantization and hardware",
           "4-bit (Q4_K_M) roughly halves latency; 3- and 6-bit formats run inefficiently; GPU against CPU.",
           ("super-weight", "efficient-qat")),
    Branch("Future directions", "Sparse SLMs",
           "Exploit weight and activation sparsity (pruning, MoE) on devices.",
           ("lottery-ticket", "layer-pruning", "lynx-expert-selection")),
    Branch("Future directions", "Co-design, synthetic data, on-device learning, device-cloud collaboration",
           "Architectures co-designed with device processors, synthetic pre-training data, personalisation on device."),
)

BROADER_ICL = (
    # Lampinen et al. 2024 (arXiv:2412.03782), a position paper: ICL is any drop in next-token loss that earlier
    # context in the same sequence buys (sec. 1), learned by pretraining as the inner loop of meta-learning.
    # Sec. 2: forms beyond supervised few-shot; sec. 3: ICL in the structure of natural language; sec. 4: the axes
    # of generalisation. Instructional, role-based and explanation forms need natural-language pretraining: nothing
    # trained from scratch here can show them.
    Branch("Forms of ICL", "Supervised few-shot ICL",
           "Input-output demonstrations, then a query: the narrow sense the paper widens.",
           ("long-context-icl", "mixture-of-icl", "demo-position-bias", "attention-intrinsic-dimension", "broader-icl"),
           "mixture-of-icl and attention-intrinsic-dimension run on models meta-trained here on synthetic episodes; "
           "broader-icl's own experiment measures key-value maps beside the other forms in one model."),
    Branch("Forms of ICL", "Instructional ICL",
           "A task described in words, not shown, and carried out; needs natural-language pretraining."),
    Branch("Forms of ICL", "Role-based ICL",
           "A persona in the prompt changes how the model answers; needs natural-language pretraining."),
    Branch("Forms of ICL", "Explanation-augmented ICL",
           "Explanations after the demonstrations, helping most on hard questions; needs natural-language pretraining."),
    Branch("Forms of ICL", "Unsupervised ICL",
           "Inputs without answers still help: the model recognises the task from the format."),
    Branch("Forms of ICL", "Time-series ICL",
           "Dynamics (cycles, trends, a process's transition kernel) inferred from the series itself.",
           ("icl-dynamical-systems", "broader-icl"), "broader-icl: periodic-plus-trend series, in its own experiment."),
    Branch("Forms of ICL", "Meta-ICL",
           "Several tasks in one sequence; later tasks need fewer examples: learning to learn in context.",
           ("broader-icl",), "Measured in this entry's own experiment: four key-value tasks in a row sharing a label set."),
    Branch("ICL in natural language", "Coreference, parallel structure, word sense, agreement",
           "Resolving who 'she' is, continuing a repeated frame, disambiguating 'bank', matching verb to subject.",
           ("broader-icl",), "Only its repeated-names analogue (names drawn per sequence among filler), in this entry's "
           "own experiment; the rest needs natural language."),
    Branch("ICL in natural language", "Topic modelling",
           "Vocabulary shifts with a topic the text never names, tracked across a long context.",
           ("broader-icl",), "A synthetic analogue (four fixed topic distributions) in this entry's own experiment."),
    Branch("Generalisation", "In what is learned",
           "Something new from the context (a novel rule, category or structure) rather than a retrieved one.",
           ("icl-representations", "universal-icl"),
           "icl-representations: a graph's structure inferred from a random walk; universal-icl: one model for any "
           "in-context map of the context measure, at any context size."),
    Branch("Generalisation", "Across formats",
           "The same task learned from examples, instructions, diagrams or code."),
    Branch("Generalisation", "In how it is used",
           "A rule learned in context applied to a new domain, explained, or written as code."),
)

EFFICIENT_ATTENTION_SURVEY = (
    # Sun et al. 2025 (arXiv:2507.19595): linear attention (sec. 2) and sparse attention (sec. 3), then how
    # pretrained LLMs use them (sec. 4); hardware is discussed within each. The review reads four families (fixed
    # sparsity, low rank, kernels, learned sparsity); the survey's two categories have no low-rank branch, so
    # Linformer-style projection along the sequence is not mapped.
    Branch("Linear attention", "Kernelised linear attention",
           "A feature map replaces the softmax kernel so keys and values are summed first: linear in length "
           "(Linear Transformer, Performer, cosFormer).",
           ("efficient-attention-survey",),
           "paperzoo.architectures.efficient_attention_survey: elu+1 linear attention and Performer (FAVOR+)."),
    Branch("Linear attention", "Linear attention with forgetting",
           "A decay, fixed or input-dependent, on the running state: RetNet, GLA, Mamba and Mamba-2, xLSTM.",
           ("rnn-state-collapse", "illusion-of-state"),
           "rnn-state-collapse builds a Mamba-2-style mixer; illusion-of-state a diagonal selective SSM."),
    Branch("Linear attention", "Linear attention as in-context learner",
           "The state as fast weights updated by a learning rule at test time: DeltaNet, TTT, Titans."),
    Branch("Sparse attention", "Fixed-pattern sparse attention",
           "Each query sees a fixed set of keys: sliding windows, strides, global and sink tokens (Longformer, "
           "StreamingLLM).",
           ("efficient-attention-survey",),
           "paperzoo.architectures.efficient_attention_survey: sliding-window attention, checked against Mistral's."),
    Branch("Sparse attention", "Block-sparse and routed attention",
           "A query picks the blocks of keys it attends to, by a learned or estimated score: MoBA, NSA, Quest.",
           ("mixture-of-recursions", "memory-layers", "lynx-expert-selection"),
           "None of these routes attention itself: they route tokens through depth (mixture-of-recursions), a query "
           "to a few of a million memory keys (memory-layers) and tokens to experts (lynx); the same learned sparsity."),
    Branch("Sparse attention", "Clustering-based sparse attention",
           "Queries attend within clusters of similar keys: Reformer's hashing, Routing Transformer's k-means."),
    Branch("Efficient attention in pretrained LLMs", "Uniform efficient models",
           "Every layer uses the efficient mixer: RWKV, Mamba, RetNet-style models at scale.",
           ("fftnet-attention",),
           "fftnet-attention replaces every attention layer by FFT mixing, a mixer the survey does not classify."),
    Branch("Efficient attention in pretrained LLMs", "Hybrid local-global models",
           "A few full-attention layers among windowed or linear ones: Jamba, Gemma's local-global layers."),
)

SURVEY_MAPS: dict[str, tuple[Branch, ...]] = {
    "broader-icl": BROADER_ICL,
    "efficient-attention-survey": EFFICIENT_ATTENTION_SURVEY,
    "efficient-inference-survey": EFFICIENT_INFERENCE_SURVEY,
    "small-lm-survey": SMALL_LM_SURVEY,
}


def survey_map(slug: str) -> tuple[Branch, ...] | None:
    """The map of the survey `slug`, or None when the paper has none."""
    return SURVEY_MAPS.get(slug)


def surveys_covering(slug: str) -> list[tuple[str, Branch]]:
    """(survey slug, branch) for every branch, in every map, that lists `slug`."""
    return [(survey, b) for survey, branches in SURVEY_MAPS.items() for b in branches if slug in b.slugs]


def missing_slugs(maps: dict[str, tuple[Branch, ...]] | None = None) -> dict[str, list[str]]:
    """Slugs a map names that are not in the catalogue, by survey (map keys included); empty when all are known."""
    known = {p.slug for p in catalog.papers()}
    out: dict[str, list[str]] = {}
    for survey, branches in (SURVEY_MAPS if maps is None else maps).items():
        bad = ([survey] if survey not in known else []) + sorted({s for b in branches for s in b.slugs} - known)
        if bad:
            out[survey] = bad
    return out
