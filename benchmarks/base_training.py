"""Base-model training throughput (tokens/s) and model-FLOPs utilisation.

MFU is measured against this machine's bf16 matmul peak, *measured in the same run*
with a large square matmul, so the ratio means the same on any machine.
Model FLOPs per token follow PaLM (Chowdhery et al., appendix B): 6 N for the
weights plus 12 L d T for attention scores and values.
Run: python benchmarks/base_training.py [--steps 12]
"""

import argparse

import torch

from paperzoo.core.base_card import flops_per_token, matmul_peak_flops
from paperzoo.core.models import BASE_MODELS
from paperzoo.core.training import TrainConfig, bf16_autocast_available, train


def main(steps: int) -> None:
    spec = BASE_MODELS["small"]
    torch.manual_seed(0)
    model = spec.model.build()
    cfg = spec.train
    blocks = torch.randint(0, spec.model.vocab_size, (256, cfg.seq_len))
    warm = TrainConfig(steps=2, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr)
    train(model, blocks, warm, desc="warm-up")
    history = train(model, blocks, TrainConfig(steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr),
                    desc="timed steps")
    n_params = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    per_token = flops_per_token(model, cfg.seq_len)
    peak = matmul_peak_flops()
    achieved = history["tokens_per_second"] * per_token
    print(f"bf16 autocast: {bf16_autocast_available(torch.device('cpu'))}, threads: {torch.get_num_threads()}")
    print(f"small base LM: {n_params / 1e6:.2f}M parameters outside the input embedding, {per_token / 1e6:.1f} MFLOP/token")
    print(f"training throughput: {history['tokens_per_second']:.0f} tokens/s")
    print(f"bf16 matmul peak (2048^3, measured now): {peak / 1e9:.1f} GFLOP/s")
    print(f"model FLOPs utilisation: {achieved / peak:.1%}")
    print(f"projected time for the {cfg.steps}-step small base LM: "
          f"{cfg.steps * cfg.batch_size * cfg.seq_len / history['tokens_per_second'] / 60:.1f} min")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    main(parser.parse_args().steps)
