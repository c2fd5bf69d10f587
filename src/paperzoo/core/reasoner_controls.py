r"""The reasoner's fine-tuning controls (issue 10, A.7): does a plain fine-tune keep it working?

Papers about RL, preference optimisation and fine-tuning compare a treatment with an
ordinary fine-tune. If an ordinary fine-tune at a sensible learning rate already breaks
the reasoner, every such comparison measures the substrate's fragility, not the paper.
So the two plain fine-tunes are measured once per cached reasoner and kept with it, as
the controls later experiments compare against:

- **SFT**: the whole model trained further on fresh traces of its own training mix (new
  problems, same styles, reflection and masking of the wrong line; `core.training.train`),
  ``sft_steps`` steps at ``sft_lr``, a tenth of the pre-training peak, with its warm-up.
- **RLOO** (REINFORCE leave-one-out; Ahmadian et al., arXiv 2402.14740, §3.3): per step,
  ``problems_per_step`` training problems, ``k`` samples each at temperature 1, reward
  $r_i = 1$ when the exact verifier accepts the answer, else 0; the advantage is the
  reward minus the mean of the *other* samples of the same problem,
  $A_i = r_i - \frac{1}{k-1}\sum_{j\ne i} r_j$, and the loss is
  $-\frac{1}{Gk}\sum_i A_i \log\pi(y_i\mid x)$ with the sequence log-probability of the
  completion. Trained through a LoRA adapter (peft; rank 8, alpha 16, on the attention
  and MLP projections), Adam at ``rl_lr``. Deviation: no KL penalty to a reference
  model (the paper's reward includes one; for a short control run on an exact reward
  the adapter's small rank is the only regulariser).

Measured on ``problems`` held-out problems (every tier in turn): greedy accuracy and
pass@1 at temperature 1 (``samples`` per problem) before and after each fine-tune, and
the paired bootstrap interval over problems of after - before. A fine-tune *keeps or
raises* accuracy when that interval's upper end is at or above zero (not clearly below
the base). The learning rates were set before any measurement and are not tuned here.
"""

from __future__ import annotations

import copy
import math
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from paperzoo.core import store
from paperzoo.core.margins import paired_difference
from paperzoo.core.reasoning import is_correct
from paperzoo.core.sampling import sample, weighted_finetune_step
from paperzoo.core.training import TrainConfig, progress, single_thread, train


@dataclass(frozen=True)
class ControlSpec:
    problems: int  # held-out problems, every tier in turn
    samples: int  # temperature-1 samples per held-out problem (pass@1)
    sft_steps: int
    sft_batch: int
    sft_lr: float
    rl_steps: int
    problems_per_step: int
    k: int  # samples per problem and step; the leave-one-out baseline needs k >= 2
    rl_lr: float
    lora_rank: int = 8
    lora_alpha: int = 16
    max_new_tokens: int | None = None  # None: the card's budget for these problems


CONTROLS = {
    "smoke": ControlSpec(problems=4, samples=2, sft_steps=2, sft_batch=2, sft_lr=3e-4, rl_steps=2,
                         problems_per_step=2, k=2, rl_lr=1e-3, max_new_tokens=16),
    "small": ControlSpec(problems=200, samples=4, sft_steps=100, sft_batch=16, sft_lr=2e-4, rl_steps=16,
                         problems_per_step=8, k=8, rl_lr=1e-3),
}


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[G, k] rewards -> [G, k] advantages: each reward minus the mean of the other k - 1 of its problem."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per problem")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def rloo_step(model, optimizer, tokenizer, problems, k: int, max_new_tokens: int, seed: int) -> dict:
    """One RLOO update of `model` (its trainable parameters) on k samples of each problem."""
    model.eval()
    drawn = sample(model, tokenizer, [q.prompt for q in problems], num_samples=k, temperature=1.0,
                   max_new_tokens=max_new_tokens, seed=seed, batch_size=128)
    rewards = torch.tensor([float(is_correct(problems[x.prompt_index], x.text)) for x in drawn]).view(len(problems), k)
    prompts = [tokenizer(problems[x.prompt_index].prompt, add_special_tokens=False)["input_ids"] for x in drawn]
    completions = [x.tokens or [tokenizer.eos_token_id] for x in drawn]
    # -mean(A_i log pi(y_i | x_i)): the advantage-weighted likelihood, unclipped as RLOO states it
    loss = weighted_finetune_step(model, optimizer, prompts, completions, rloo_advantages(rewards).flatten(),
                                  tokenizer.eos_token_id, grad_clip=math.inf)
    return {"reward": rewards.mean().item(), "loss": loss}


def accuracy(model, tokenizer, problems, samples: int, max_new_tokens: int, seed: int) -> dict:
    """Per held-out problem: greedy right (0/1) and the share of `samples` temperature-1 samples that are right."""
    prompts = [q.prompt for q in problems]
    greedy = sample(model, tokenizer, prompts, temperature=0, max_new_tokens=max_new_tokens, batch_size=128)
    drawn = sample(model, tokenizer, prompts, num_samples=samples, temperature=1.0, max_new_tokens=max_new_tokens,
                   seed=seed, batch_size=128)
    right = np.zeros(len(problems))
    for x in drawn:
        right[x.prompt_index] += is_correct(problems[x.prompt_index], x.text) / samples
    return {"greedy": [float(is_correct(q, g.text)) for q, g in zip(problems, greedy)], "pass@1": right.tolist()}


def _compare(before: dict, after: dict) -> dict:
    out = {}
    for name in ("greedy", "pass@1"):
        iv = paired_difference(after[name], before[name])
        out[name] = {"before": float(np.mean(before[name])), "after": float(np.mean(after[name])),
                     "difference": iv.as_dict()}
    out["keeps_or_raises"] = all(out[n]["difference"]["high"] >= 0 for n in ("greedy", "pass@1"))
    return out


def measure_controls(reasoner, spec: ControlSpec, seed: int = 0) -> dict:
    """Fine-tune copies of `reasoner` (a `core.reasoner.Reasoner`) both ways and measure them against it."""
    from peft import LoraConfig, get_peft_model

    from paperzoo.core.reasoner import TraceMix, example_blocks, ladder_problems, problems, training_examples
    from paperzoo.core.reasoner_card import default_budget

    base, tok = reasoner.model, reasoner.tokenizer
    trained = reasoner.record["spec"]  # the recipe the reasoner was trained on
    held_out = problems(spec.problems, "test", seed=seed + 31)
    budget = spec.max_new_tokens or default_budget(base, tok, held_out)
    start = time.perf_counter()
    before = accuracy(base, tok, held_out, spec.samples, budget, seed)

    # SFT: the whole model, on fresh traces of its own training mix
    seq_len = trained["train"]["seq_len"]
    fresh = ladder_problems(spec.sft_steps * spec.sft_batch * 4, "train", seed=seed + 7919, mix=trained["tier_mix"],
                            distinct=False)
    blocks, labels = example_blocks(tok, training_examples(fresh, TraceMix(**trained["traces"]), seed=seed + 7919),
                                    seq_len)
    sft = copy.deepcopy(base)
    config = TrainConfig(steps=spec.sft_steps, batch_size=spec.sft_batch, seq_len=seq_len, lr=spec.sft_lr,
                         warmup_steps=max(1, spec.sft_steps // 10))
    history = train(sft, blocks, config, desc="SFT control", seed=seed, labels=labels)
    sft.eval()
    sft_after = accuracy(sft, tok, held_out, spec.samples, budget, seed)

    # RLOO with a LoRA adapter, on training problems of the whole ladder
    torch.manual_seed(seed)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    policy = lora.get_base_model()  # the LoRA layers live inside it; called directly, like any causal LM
    optimizer = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=spec.rl_lr)
    pool = problems(spec.rl_steps * spec.problems_per_step, "train", seed=seed + 104_729)
    rl_history = []
    with progress("RLOO control") as bar:
        task = bar.add_task("RLOO control", total=spec.rl_steps, status="")
        for step in range(spec.rl_steps):
            batch = pool[step * spec.problems_per_step:(step + 1) * spec.problems_per_step]
            rl_history.append(rloo_step(policy, optimizer, tok, batch, spec.k, budget, seed * 1000 + step))
            bar.update(task, advance=1, status=f"reward {rl_history[-1]['reward']:.2f}")
    rl_after = accuracy(policy, tok, held_out, spec.samples, budget, seed)

    return {
        "spec": asdict(spec), "seed": seed, "problems": len(held_out), "seconds": time.perf_counter() - start,
        "max_new_tokens": budget, "base": {n: float(np.mean(v)) for n, v in before.items()},
        "sft": {**_compare(before, sft_after), "train_loss": [round(x, 4) for x in history["train_loss"][:: 10]]},
        "rloo": {**_compare(before, rl_after), "reward_by_step": [round(h["reward"], 4) for h in rl_history]},
    }


def reasoner_controls(scale: str = "small", seed: int = 0) -> dict:
    """The controls of the cached `scale` reasoner: measured once (minutes at small), then read from the cache."""
    from paperzoo.core.reasoner import reasoner

    if scale not in CONTROLS:
        raise ValueError(f"scale must be one of {', '.join(CONTROLS)}, not {scale!r}")
    r = reasoner(scale, seed=seed)
    spec = CONTROLS[scale]
    path = store.home() / "models" / f"reasoner-controls-{scale}-{store.stable_hash(['controls-v2', r.name, asdict(spec), seed])}"

    def build(tmp: Path) -> None:
        with single_thread():
            controls = measure_controls(r, spec, seed)
        (tmp / "controls.json").write_text(json.dumps({"reasoner": r.name, **controls}, indent=1))

    return json.loads((store.cached_dir(path, build) / "controls.json").read_text())


def controls_card(controls: dict) -> dict:
    """What `paperzoo substrate` shows: each control against issue 10's A.7 target (keeps or raises accuracy)."""
    targets = {}
    for name, label in (("sft", "A.7 SFT"), ("rloo", "A.7 RLOO+LoRA")):
        c = controls[name]
        value = ", ".join(f"{m} {c[m]['before']:.3f} -> {c[m]['after']:.3f}" for m in ("greedy", "pass@1"))
        targets[f"{label} keeps or raises held-out accuracy"] = {
            "value": value, "target": "not below the base beyond the paired bootstrap interval",
            "pass": c["keeps_or_raises"]}
    return {"name": "reasoner-controls", "reasoner": controls["reasoner"], "train_seconds": controls["seconds"],
            "problems": controls["problems"], "targets": targets, "controls": controls}
