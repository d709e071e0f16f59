"""model.py against transformers on a real published checkpoint (SmolLM2-135M-Instruct:
30 layers, d576, 9/3 heads, tied embeddings, rope theta 1e5), not only on random weights."""
import torch

from model import Transformer


def test_published_checkpoint_logits_equal_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM
    ours = Transformer.from_hf(smollm2_dir, attn_impl="math").eval()
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = ours(tokens)
        b = theirs(tokens).logits
    assert ours.config.tie_embeddings and ours.config.n_kv_heads == 3 and ours.config.rope_theta == 1e5
    assert (a - b).abs().max() / b.abs().max() < 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))
