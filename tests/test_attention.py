"""worlds.model.grouped_attention against the eager attention of model families other than Qwen2 (a hub model as
model.source is loaded by load_model with twinarm's attention)."""
from __future__ import annotations


def test_grouped_attention_keeps_a_familys_attention_softcap():
    """Gemma-2's eager attention caps its scores (softcap · tanh(s / softcap), config.attn_logit_softcapping); a
    decoding step under grouped_attention must compute the same values, not the uncapped scores' softmax."""
    import torch
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as eager

    from worlds.model import grouped_attention

    cfg = Gemma2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       attn_logit_softcapping=5.0)
    module = Gemma2Attention(cfg, 0).eval()
    assert module.num_key_value_groups == 2
    gen = torch.Generator().manual_seed(0)
    q = 3 * torch.randn(2, 4, 1, 8, generator=gen)  # one decoding step over a 6-token cache
    k, v = 3 * torch.randn(2, 2, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    want, _ = eager(module, q, k, v, None, dropout=0.0, scaling=1.0, softcap=5.0)
    got, _ = grouped_attention(module, q, k, v, None, dropout=0.0, scaling=1.0, softcap=5.0)
    uncapped, _ = eager(module, q, k, v, None, dropout=0.0, scaling=1.0, softcap=None)
    assert not torch.allclose(want, uncapped, atol=1e-3)  # the cap matters at these scores: the check can fail
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
