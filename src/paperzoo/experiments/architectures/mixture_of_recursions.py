r"""Reproduction of 2507.10524 (Mixture-of-Recursions) at equal training FLOPs on the embedded corpus.

Four language models -- the claim's arms -- and one reported control are trained from
scratch on the same token blocks in the same batch order, at an equal training-FLOP budget:

- **vanilla**: a Llama of L layers;
- **fixed recursion**: Middle-Cycle sharing of the same config (unique first and last
  layer, a shared block of (L-2)/N_r layers applied N_r times to every token): the same
  FLOPs per token as vanilla, about 1/N_r of its unique parameters;
- **MoR, expert-choice** and **MoR, token-choice**: the same sharing with routers
  (`paperzoo.architectures.mixture_of_recursions`). They spend fewer FLOPs per token, so at
  the equal budget they take proportionally more steps (the paper's Table 3 trains MoR
  on more tokens for the same FLOPs).
- **fixed + gate** (reported, never checked): fixed recursion whose every recursion is
  scaled by MoR's expert-choice sigmoid gate, $H^{r+1} = H^r + \sigma(\theta_r^\top H^r) f(H^r)$
  (expert-choice with every capacity 1). MoR's gate halves each block update at
  initialisation and lets the model learn per-token update sizes; the paper's recursive
  baseline has no gate. The gap between fixed and fixed + gate, and between fixed + gate
  and MoR (`gate_effect`), shows how much of MoR's lead over fixed recursion the gate
  alone could explain and how much the routing adds.

The measure is the paper's: language-model validation loss (nats per token) on held-out
blocks of the embedded corpus (the standard-library docstrings), tokenized by paperzoo's
base-LM tokenizer at the smoke base model's 1,024 tokens -- at width 64 a 4,096-row head
would be most of every arm's FLOPs, and the claim is about the body. Expert-choice MoR is
evaluated on its causal inference path (the auxiliary router's per-token decision); its
loss under the training-time top-k (which looks at future tokens) is reported beside it.

Set-up choices, and how each was made:

- N_r = 4 and L = 14 (shared block of 3 layers): Middle-Cycle leaves 2 + (L-2)/N_r of the L
  layers unique, so the predicate's "under 40% of vanilla's unique parameters" needs
  L >= 23 at N_r = 3 but only L = 14 at N_r = 4 (5/14 = 36%; the paper's 360M model with
  N_r = 3 and 32 layers has 37.5%). The paper reports N_r = 2, 3 and 4. Capacities are the
  paper's (1, 3/4, 1/2, 1/4). Fixed before any run.
- width 64, 2 heads, vocabulary 1,024: fixed before any run.
- block length, batch, steps and learning rate at `small` were chosen by training the
  **vanilla arm alone** (seed 0; no MoR or fixed-recursion arm was built or trained while
  choosing, and no check was evaluated), against the precondition and the CPU budget. An
  earlier calibration of this experiment (64-token blocks, batch 8, lr 3e-3, 240 vanilla
  steps) had been seen, MoR's numbers included; it failed the precondition (vanilla 0.52
  nats below unigram), which is what prompted this re-choice, and its MoR numbers played
  no part in it. Vanilla's gap to the unigram cross-entropy (nats, seed 0) per set-up tried:
  64-token blocks, batch 8, 280 steps: lr 1.5e-3 0.47, 3e-3 0.64, 6e-3 0.68, 1e-2 0.52,
  2e-2 0.25; batch 16, 150 steps, lr 3e-3: 0.26; batch 4, 560 steps, lr 6e-3: 0.96;
  32-token blocks, batch 8, 560 steps: lr 4e-3 0.94, 6e-3 1.00, 8e-3 0.80, and 430 steps at
  lr 6e-3: 0.68. Vocabulary 512 (0.82 / 0.77) or 2,048 (0.68), tied embeddings (0.21) and a
  3x larger initialisation (0.70) did worse and were dropped. Steps, not tokens, limit this
  14-layer model, so the shortest sensible blocks (32 tokens: k_r = 32, 24, 16, 8) buy the
  most steps per CPU second; lr 6e-3 was the best of the grid; 640 vanilla steps (64 of
  warm-up, cosine decay) were read off the 430 -> 560-step curve as enough to clear the
  1-nat precondition with a margin (in the three-seed run they did on seeds 0 and 1,
  1.09 and 1.07 nats, not on seed 2, 0.92; left unchanged since, as MoR's results had
  then been seen). Cost: about 4 to 4.5 minutes of CPU per seed on one
  thread with all five arms (the fixed + gate arm is about a fifth of it), over the
  3-minute target: the 40%-unique configuration does not fit 3 minutes with a learning
  control here.
- gate scale alpha = 1, auxiliary BCE weight 0.1, balancing weight 0.1 (the token-choice
  default of the ports of the official code); the expert-choice causal predictor is the
  separate auxiliary router, trained on the detached state so its loss never touches the LM.
- token-choice takes expert-choice's step count: its balancing loss aims at the same
  average depth; its realised depths are reported.

Margins: the loss comparisons are paired percentile-bootstrap intervals over validation
blocks within a seed (`core.margins`); the parameter ratio is exact. The seed varies the
initialisation of all five models and the batch order (shared by the five arms).
`cpu_seconds` records each arm's and the whole seed's CPU time (`time.process_time`).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.architectures.mixture_of_recursions import (
    kv_cache_entries, middle_cycle_layers, mixture_of_recursions, unique_block_parameters)
from paperzoo.core.blocks import flops_per_token
from paperzoo.core.corpus import load_corpus
from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import bootstrap_mean, decided, paired_difference
from paperzoo.core.tokenizer import train_tokenizer
from paperzoo.core.training import TrainConfig, single_thread, token_blocks, train

MAX_UNIQUE = 0.40  # the predicate's share of vanilla's unique (non-embedding) parameters
MATCH = 0.05  # nats: "matches" = no more than this above vanilla
LEARNED = 1.0  # nats below the unigram cross-entropy: the vanilla control learned
ARMS = ("vanilla", "fixed", "expert", "token")  # the claim's arms: the checks read these
GATED = "fixed + gate"  # reported beside them, never checked: how much of MoR's lead its gate alone buys


def _arm(m: dict, name: str) -> np.ndarray:
    return np.asarray(m["sequence_loss"][name])


def preconditions(m: dict) -> dict[str, bool | None]:
    learned = bootstrap_mean(np.asarray(m["unigram_sequence_loss"]) - _arm(m, "vanilla"), seed=m["bootstrap_seed"])
    return {"vanilla learns: its validation loss lies well below the unigram cross-entropy": learned.low > LEARNED}


def checks(m: dict) -> dict[str, bool | None]:
    s = m["bootstrap_seed"]
    return {
        f"MoR (expert-choice) has under {MAX_UNIQUE:.0%} of vanilla's unique parameters": m["unique_ratio"]["expert"] < MAX_UNIQUE,
        "MoR (expert-choice, causal inference) matches vanilla's validation loss":
            decided(paired_difference(_arm(m, "vanilla") + MATCH, _arm(m, "expert"), seed=s)),
        "MoR (expert-choice, causal inference) beats fixed recursion at equal FLOPs":
            decided(paired_difference(_arm(m, "fixed"), _arm(m, "expert"), seed=s)),
    }


CLAIM = Claim(
    statement=(
        "Mixture-of-Recursions -- a Middle-Cycle recursive transformer whose routers give each token its own "
        "number of passes through the shared block, with attention at each recursion only among the tokens still "
        "active (recursion-wise KV caching) -- forms a new Pareto frontier from 135M to 1.7B parameters: at equal "
        "training FLOPs it reaches lower validation loss than the vanilla transformer and the fixed-depth "
        "recursive transformer with about a third of the vanilla model's unique parameters (e.g. 118M against "
        "315M at 360M scale, N_r = 3), expert-choice routing with recursion-wise caching being the best variant."
    ),
    predicate=(
        "Vanilla (14 layers), fixed recursion and MoR (N_r = 4, Middle-Cycle, expert- and token-choice) trained "
        "from scratch at equal training FLOPs on the embedded corpus: (1) expert-choice MoR has under 40% of "
        "vanilla's unique non-embedding parameters; (2) its validation loss on its causal inference path is no "
        "more than 0.05 nats above vanilla's (paired bootstrap over validation blocks: the interval of "
        "vanilla + 0.05 - MoR lies above 0; fails when it lies below); (3) it is lower than fixed recursion's "
        "(same margin). Token-choice is reported beside it. Precondition: vanilla's loss is over 1 nat below "
        "the unigram cross-entropy."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv:2507.10524 abstract; Sec. 3.1 and Table 3 (equal-FLOPs comparison with vanilla and recursive "
            "baselines, unique parameters); Fig. 3 (135M-1.7B); Sec. 2.2 (routing, KV caching)"),
)

INPUTS = ("corpus",)
SUBSTRATE = ()
SEED_VARIES = ("the initialisation of the four models and the order of training batches (the same for every arm); "
               "the validation blocks and the tokenizer are fixed")

SCALES = {
    "smoke": dict(hidden=32, layers=6, recursions=4, heads=2, vocab=1024, seq_len=32, batch=4, steps=6, lr=3e-3,
                  warmup=2, val_blocks=16),
    "small": dict(hidden=64, layers=14, recursions=4, heads=2, vocab=1024, seq_len=32, batch=8, steps=640, lr=6e-3,
                  warmup=64, val_blocks=256),
    "large": dict(hidden=128, layers=14, recursions=4, heads=4, vocab=4096, seq_len=128, batch=16, steps=2000,
                  lr=2e-3, warmup=100, val_blocks=512),
}


def _config(s: dict) -> LlamaConfig:
    return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=4 * s["hidden"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                       max_position_embeddings=s["seq_len"], tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build(name: str, s: dict):
    if name == "vanilla":
        return LlamaForCausalLM(_config(s))
    if name == GATED:  # expert-choice keeping every token at every recursion: fixed recursion with MoR's sigmoid gates
        return mixture_of_recursions(_config(s), num_recursions=s["recursions"], routing="expert",
                                     capacities=(1.0,) * s["recursions"])
    return mixture_of_recursions(_config(s), num_recursions=s["recursions"],
                                 routing={"fixed": "none", "expert": "expert", "token": "token"}[name])


@torch.no_grad()
def sequence_loss(model, blocks: torch.Tensor, train_mode: bool = False, chunk: int = 64):
    """Mean next-token loss of each block (nats), and each block's recursion depths when the model reports them."""
    model.train(train_mode)
    losses, depths, selected = [], [], []
    for i in range(0, len(blocks), chunk):
        x = blocks[i:i + chunk]
        out = model(input_ids=x)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
        losses.append(ce.view(len(x), -1).mean(1))
        if hasattr(out, "depths"):
            depths.append(out.depths)
            selected.append(torch.stack(out.selected))
    model.eval()
    return (torch.cat(losses).numpy(), torch.cat(depths) if depths else None,
            list(torch.cat(selected, 1)) if selected else None)


def unigram_loss(train_blocks: torch.Tensor, val: torch.Tensor, vocab: int) -> np.ndarray:
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab).double() + 1  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return (-logp[val[:, 1:]]).mean(1).numpy()


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    corpus = load_corpus(ctx.corpus)
    tokenizer = train_tokenizer(corpus, s["vocab"])
    train_blocks = token_blocks(tokenizer, corpus.train, s["seq_len"])
    val = token_blocks(tokenizer, corpus.validation, s["seq_len"])[: s["val_blocks"]]
    config = _config(s)
    block_layers = middle_cycle_layers(s["layers"], s["recursions"])
    kv_bytes_per_entry = 2 * config.num_key_value_heads * (s["hidden"] // s["heads"]) * 2  # K and V, bf16
    metrics = {"bootstrap_seed": ctx.seed, "unigram_sequence_loss": unigram_loss(train_blocks, val, s["vocab"]).tolist(),
               "sequence_loss": {}, "loss": {}, "steps": {}, "flops_per_token": {}, "train_flops": {},
               "unique_parameters": {}, "unique_ratio": {}, "mean_depth": {}, "depth_histogram": {},
               "kv_bytes_per_sequence": {}, "seconds": {}, "cpu_seconds": {}, "final_train_loss": {}}
    start = time.process_time()
    with single_thread():
        vanilla_flops = None
        for name in (*ARMS, GATED):
            arm_start = time.process_time()
            torch.manual_seed(ctx.seed)
            model = build(name, s)
            flops = flops_per_token(model, s["seq_len"], s["vocab"])
            if name == "vanilla":
                vanilla_flops = flops
                unique = sum(p.numel() for m in (model.model.layers, model.model.norm) for p in m.parameters())
            else:
                unique = unique_block_parameters(model)
            # token-choice aims, through its balancing loss, at expert-choice's compute: same steps
            budget_flops = metrics["flops_per_token"].get("expert", flops) if name == "token" else flops
            steps = round(s["steps"] * vanilla_flops / budget_flops)
            history = train(model, train_blocks, TrainConfig(steps=steps, batch_size=s["batch"], seq_len=s["seq_len"],
                                                             lr=s["lr"], warmup_steps=s["warmup"]),
                            seed=ctx.seed, desc=f"mixture-of-recursions: {name}")
            loss, depths, selected = sequence_loss(model, val)
            metrics["sequence_loss"][name] = loss.tolist()
            metrics["loss"][name] = float(loss.mean())
            metrics["steps"][name] = steps
            metrics["flops_per_token"][name] = flops
            metrics["train_flops"][name] = budget_flops * steps * s["batch"] * s["seq_len"]
            metrics["unique_parameters"][name] = unique
            metrics["seconds"][name] = history["seconds"]
            metrics["final_train_loss"][name] = float(np.mean(history["train_loss"][-20:]))
            metrics["cpu_seconds"][name] = time.process_time() - arm_start
            if depths is None:  # vanilla: every token, every layer
                metrics["kv_bytes_per_sequence"][name] = s["layers"] * s["seq_len"] * kv_bytes_per_entry
                metrics["mean_depth"][name] = None
                continue
            metrics["mean_depth"][name] = float(depths.float().mean())
            metrics["depth_histogram"][name] = torch.bincount(depths.flatten(), minlength=s["recursions"] + 1).tolist()
            metrics["kv_bytes_per_sequence"][name] = float(kv_cache_entries(selected, block_layers).float().mean()
                                                           * kv_bytes_per_entry)
            if name in ("expert", "token"):
                metrics["kv_bytes_per_sequence"][name + " (recursive KV sharing)"] = float(
                    kv_cache_entries(selected, block_layers, sharing=True).float().mean() * kv_bytes_per_entry)
            if name == "expert":  # the training-time top-k at evaluation: looks at future tokens, not deployable
                topk, topk_depths, _ = sequence_loss(model, val, train_mode=True)
                metrics["loss"]["expert (top-k, non-causal)"] = float(topk.mean())
                metrics["mean_depth"]["expert (top-k, non-causal)"] = float(topk_depths.float().mean())
            metrics["cpu_seconds"][name] = time.process_time() - arm_start
    metrics["cpu_seconds"]["all arms"] = time.process_time() - start
    for name in (*ARMS, GATED):
        metrics["unique_ratio"][name] = metrics["unique_parameters"][name] / metrics["unique_parameters"]["vanilla"]
    metrics["unigram_loss"] = float(np.mean(metrics["unigram_sequence_loss"]))
    metrics["differences_vs_vanilla"] = {name: paired_difference(_arm(metrics, name), _arm(metrics, "vanilla"),
                                                                 seed=ctx.seed).as_dict() for name in (*ARMS[1:], GATED)}
    # the gate confound, reported only: loss(fixed) - loss(fixed + gate) is what the gate alone gives fixed recursion,
    # loss(fixed + gate) - loss(expert) what expert-choice routing adds on top of the same gate
    metrics["gate_effect"] = {
        "fixed minus fixed + gate": paired_difference(_arm(metrics, "fixed"), _arm(metrics, GATED), seed=ctx.seed).as_dict(),
        "fixed + gate minus expert": paired_difference(_arm(metrics, GATED), _arm(metrics, "expert"), seed=ctx.seed).as_dict()}
    metrics["uniform_loss"] = math.log(s["vocab"])
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    left, right = fig.subplots(1, 2)
    names = [*ARMS, GATED]
    means = [m["loss"][n] for n in names]
    errors = [[0.0] + [m["differences_vs_vanilla"][n]["mean"] - m["differences_vs_vanilla"][n]["low"] for n in names[1:]],
              [0.0] + [m["differences_vs_vanilla"][n]["high"] - m["differences_vs_vanilla"][n]["mean"] for n in names[1:]]]
    left.bar(names, means, yerr=errors, color=["tab:gray", "tab:blue", "tab:red", "tab:orange", "tab:cyan"], capsize=4)
    left.axhline(m["unigram_loss"], color="black", ls="--", lw=0.8, label="unigram")
    low = min(means) - 0.3
    left.set(ylim=(low, max(max(means), m["unigram_loss"]) + 0.1), ylabel="validation loss (nats/token)",
             title="equal training FLOPs (bars: 95% CI of the difference to vanilla)")
    left.legend(fontsize=7)
    for n in names:
        depth = "-" if m["mean_depth"][n] is None else f"{m['mean_depth'][n]:.2f}"
        right.scatter(m["unique_ratio"][n], m["loss"][n], s=40, label=f"{n}: {m['steps'][n]} steps, mean depth {depth}")
    right.axvline(MAX_UNIQUE, color="black", ls=":", lw=0.8)
    right.set(xlabel="unique non-embedding parameters / vanilla's", ylabel="validation loss (nats/token)",
              title="loss against unique parameters")
    right.legend(fontsize=6)
