import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paperzoo.architectures.byte_latent_transformer import (
    BLTConfig, ByteLatentTransformer, CrossAttention, EntropyPatcher, HashNgramEmbedding, StridePatcher,
    decoder_cross_mask, encoder_cross_mask, entropies, entropy_patch_starts, inference_flops_per_byte, ngram_hashes,
    patch_ids, token_lm_flops_per_token)

TINY = BLTConfig(d_local=16, d_global=32, encoder_layers=1, decoder_layers=1, global_layers=1, hash_buckets=64)


class PerByteTemperatureLM(torch.nn.Module):
    """A causal byte LM whose next-byte entropy at t depends on byte t alone (so entropies vary along a row)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(256, 256, generator=g) * torch.rand(256, 1, generator=g) * 6

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_boundaries_on_hand_set_entropies_under_both_rules():
    H = torch.tensor([[math.log(256), 0.5, 2.0, 0.1, 3.0, 2.9, 0.2, 1.5]])
    # global: H(x_i) > 1.0 (byte 0 always starts)
    assert entropy_patch_starts(H, 1.0, "global")[0].tolist() == [True, False, True, False, True, True, False, True]
    # monotonic: H(x_i) - H(x_{i-1}) > 1.0; 2.9 after 3.0 is high but falling, 1.5 after 0.2 rises by 1.3
    assert entropy_patch_starts(H, 1.0, "monotonic")[0].tolist() == [True, False, True, False, True, False, False, True]
    assert StridePatcher(3)(torch.zeros(1, 7, dtype=torch.long))[0].tolist() == [
        True, False, False, True, False, False, True, False]  # bytes 0..7: one past the row


def test_entropy_patcher_opens_a_patch_at_the_byte_whose_prediction_was_uncertain():
    # position t's next-byte distribution is uniform over k_t bytes: H(x_{t+1}) = log k_t
    k = [1, 200, 1, 1, 50, 1]
    logits = torch.full((1, len(k), 256), -1e4)
    for t, kt in enumerate(k):
        logits[0, t, :kt] = 0.0
    lm = lambda input_ids: SimpleNamespace(logits=logits)
    lm.training, lm.eval, lm.train = False, lambda: None, lambda mode=True: None
    patcher = EntropyPatcher(lm, theta=math.log(10))
    H = patcher.byte_entropies(torch.zeros(1, len(k), dtype=torch.long))
    torch.testing.assert_close(H[0, 1:], torch.tensor([math.log(kt) for kt in k]), atol=1e-4, rtol=0)
    # bytes 0..6: byte 0 starts; bytes 2 and 5 follow the uncertain predictions at positions 1 and 4
    assert patcher(torch.zeros(1, len(k), dtype=torch.long))[0].tolist() == [
        True, False, True, False, False, True, False]
    torch.testing.assert_close(entropies(torch.zeros(3, 256)), torch.full((3,), math.log(256)))


def test_hash_ngrams_are_rolling_polynomials_of_the_last_n_bytes():
    ids = torch.tensor([[1, 2, 3]])
    # bytes enter as b + 1, zero-padded: n=3 windows (0,0,2), (0,2,3), (2,3,4)
    assert ngram_hashes(ids, 3, 10**9).tolist() == [[2, 2 * 257 + 3, (2 * 257 + 3) * 257 + 4]]
    assert torch.equal(ngram_hashes(ids, 3, 10**9), ngram_hashes(ids.clone(), 3, 10**9))  # deterministic
    g = torch.Generator().manual_seed(0)
    x = torch.randint(256, (1, 40), generator=g)
    i = 30
    for n in (3, 5, 8):
        inside, outside = x.clone(), x.clone()
        inside[0, i - n + 1] = (x[0, i - n + 1] + 1) % 256  # the oldest byte of g_{i,n}
        outside[0, i - n] = (x[0, i - n] + 1) % 256  # the byte just before it
        h = ngram_hashes(x, n, 4096)[0, i]
        assert ngram_hashes(inside, n, 4096)[0, i] != h
        assert ngram_hashes(outside, n, 4096)[0, i] == h
    # different n see different n-grams
    assert not torch.equal(ngram_hashes(x, 3, 4096), ngram_hashes(x, 4, 4096))


def test_the_byte_embedding_sums_the_byte_row_and_one_row_per_ngram_size():
    torch.manual_seed(0)
    emb = HashNgramEmbedding(8, (3, 4, 5), buckets=50)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    out = emb(ids)
    for t in range(5):
        expected = emb.bytes.weight[ids[0, t]].clone()
        for n, table in zip((3, 4, 5), emb.hashed):
            expected += table.weight[ngram_hashes(ids, n, 50)[0, t]]
        torch.testing.assert_close(out[0, t], expected)


def test_cross_attention_masks_own_bytes_for_patches_and_earlier_patches_for_bytes():
    # bytes 0..5 in patches {0,1} {2,3,4} {5}; the entry for byte 6 (one past the row) starts a patch
    starts = torch.tensor([[1, 0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert patch_ids(starts[:, :-1])[0].tolist() == [0, 0, 1, 1, 1, 2]
    enc = encoder_cross_mask(starts, 3)[0].int().tolist()
    assert enc == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    dec = decoder_cross_mask(starts, 3)[0].int().tolist()
    # byte t predicts byte t+1 and reads the patches before byte t+1's patch: those ended by t
    assert dec == [[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # never a patch holding a byte after t
    pid = patch_ids(starts[:, :-1])[0]
    for t in range(6):
        for p in range(3):
            if dec[t][p]:
                assert (pid == p).nonzero().max() <= t


def test_cross_attention_reads_only_what_its_mask_allows():
    torch.manual_seed(0)
    attn = CrossAttention(8, 12, heads=2)
    x, kv = torch.randn(1, 3, 8), torch.randn(1, 5, 12)
    mask = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]], dtype=torch.bool)
    out = attn(x, kv, mask)
    changed = kv.clone()
    changed[0, 2:] = torch.randn(3, 12)  # only query 1 may see these
    out2 = attn(x, changed, mask)
    torch.testing.assert_close(out2[0, 0], out[0, 0])
    assert not torch.allclose(out2[0, 1], out[0, 1])
    torch.testing.assert_close(out[0, 2], torch.zeros(8))  # nothing to attend: nothing added


@pytest.mark.parametrize("patcher", ["entropy_global", "entropy_monotonic", "stride"])
def test_the_whole_model_is_byte_causal_across_patch_boundaries(patcher):
    torch.manual_seed(0)
    lm = PerByteTemperatureLM()
    ids = torch.randint(256, (2, 48), generator=torch.Generator().manual_seed(1))
    H = EntropyPatcher(lm, 0.0).byte_entropies(ids)
    p = {"entropy_global": lambda: EntropyPatcher(lm, H.median().item(), "global"),
         "entropy_monotonic": lambda: EntropyPatcher(lm, 0.5, "monotonic"),
         "stride": lambda: StridePatcher(4)}[patcher]()
    starts = p(ids)
    lengths = torch.bincount(patch_ids(starts[:1, :-1])[0])
    assert len(lengths) >= 6 and len(set(lengths.tolist())) >= (1 if patcher == "stride" else 2)
    model = ByteLatentTransformer(TINY, p).eval()
    with torch.no_grad():
        base = model(ids).logits
        g = torch.Generator().manual_seed(2)
        for t in range(ids.shape[1] - 1):
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(256, (2, ids.shape[1] - t - 1), generator=g)
            out = model(changed).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # later bytes do depend on them


def test_the_latent_path_carries_information_from_earlier_patches():
    # with the decoder's cross-attention, a byte's logits depend on bytes outside its n-gram window and its
    # local layers' reach only through earlier patches: zeroing the cross-attention changes the logits
    torch.manual_seed(0)
    model = ByteLatentTransformer(TINY, StridePatcher(4)).eval()
    ids = torch.randint(256, (1, 32))
    with torch.no_grad():
        before = model(ids).logits
        torch.nn.init.zeros_(model.decoder_cross.wo.weight)
        after = model(ids).logits
    torch.testing.assert_close(after[0, :3], before[0, :3])  # bytes 0..2 see no ended patch
    assert not torch.allclose(after[0, 3:], before[0, 3:])


def test_loss_is_next_byte_cross_entropy_with_the_hf_shift():
    torch.manual_seed(0)
    model = ByteLatentTransformer(TINY, StridePatcher(3))
    ids = torch.randint(256, (2, 20))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    lp = out.logits[:, :-1].log_softmax(-1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    keep = labels[:, 1:] != -100
    torch.testing.assert_close(out.loss, nll[keep].mean())


def test_analytic_flops_match_torchs_counter():
    # torch's counter sees every matmul except the Llama layers' fused causal attention (sdpa on CPU);
    # the analytic count includes it densely: 4 n^2 d per layer
    c = TINY
    T, k = 48, 4
    model = ByteLatentTransformer(c, StridePatcher(k)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(256, (1, T)))
    P = T // k
    sdpa = 4 * T * T * c.d_local * (c.encoder_layers + c.decoder_layers) + 4 * P * P * c.d_global * c.global_layers
    assert counter.get_total_flops() + sdpa == pytest.approx(inference_flops_per_byte(c, T, k) * T, rel=1e-9)
    # longer patches: fewer latent steps, fewer FLOPs per byte
    assert inference_flops_per_byte(c, T, 8) < inference_flops_per_byte(c, T, 4)
    assert token_lm_flops_per_token(32, 2, 100, 16) == pytest.approx(
        (2 * (2 * 16 * 16 * 32 * 32 + 4 * 16 * 16 * 32) + 2 * 16 * 32 * 100) / 16)
