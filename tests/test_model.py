"""model.py against transformers' LlamaForCausalLM (CPU, float32, built locally: no hub).

Weights go both ways: our model -> save_hf -> LlamaForCausalLM.from_pretrained, and
LlamaForCausalLM's state dict -> our parameter names -> Transformer. Logits and loss must
agree to a relative error under 1e-5 for multi-head, grouped-query and multi-query
attention, tied and untied embeddings, two rope_theta values, attn_impl math and sdpa,
rope_scaling (linear, llama3) in both config.json forms, and head_dim != dim / n_heads.
from_hf refuses, naming the key, every setting it does not compute.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sample  # noqa: E402
from model import ModelConfig, Transformer, UnsupportedCheckpoint, _HF_TO_OURS, config_from_hf  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

TOL = 1e-5
VOCAB, MAX_LEN, T = 97, 64, 48

#          n_heads, n_kv_heads, tie_embeddings, rope_theta
CASES = {"mha": (4, 4, False, 10000.0),
         "mha-tied": (4, 4, True, 500000.0),
         "gqa": (4, 2, False, 500000.0),
         "gqa-tied": (4, 2, True, 10000.0),
         "mqa": (4, 1, False, 10000.0),
         "mqa-tied-theta5e5": (4, 1, True, 500000.0)}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def our_config(case, attn_impl="math", **kw):
    n_heads, n_kv_heads, tie, theta = CASES[case]
    return ModelConfig(dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=VOCAB,
                       ffn_dim=96, norm_eps=1e-5, rope_theta=theta, max_seq_len=MAX_LEN,
                       tie_embeddings=tie, attn_impl=attn_impl, **kw)


def hf_config(cfg):
    return LlamaConfig(hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                       num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                       vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                       max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                       attn_implementation="eager")


def randomize(model, seed=0):
    """Weights far from init (norm gains too), so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


def batch(seed=1, B=2):
    x = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))
    return x, torch.cat([x[:, 1:], torch.full((B, 1), -1)], dim=1)  # last target ignored (-1)


def compare(ours, hf):
    """Our logits/loss vs transformers' on the same tokens; HF shifts labels itself."""
    x, y = batch()
    with torch.no_grad():
        logits, loss = ours(x, y)
        out = hf(input_ids=x, labels=x)
    assert logits.shape == out.logits.shape
    assert rel_err(logits, out.logits) < TOL, rel_err(logits, out.logits)
    assert abs(loss.item() - out.loss.item()) / out.loss.item() < TOL


def load_hf(directory):
    return LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()


# --------------------------------------------------------------------------- equality with transformers
@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers(case, attn_impl, tmp_path):
    """ours -> save_hf -> LlamaForCausalLM.from_pretrained: same logits and loss."""
    torch.manual_seed(0)
    ours = randomize(Transformer(our_config(case, attn_impl))).eval()
    ours.save_hf(tmp_path)
    hf = load_hf(tmp_path)
    assert hf.config.num_key_value_heads == CASES[case][1]
    assert hf.config.tie_word_embeddings == CASES[case][2]
    compare(ours, hf)


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_mapping_matches_transformers(case, attn_impl):
    """LlamaForCausalLM(config) -> state dict renamed to ours -> Transformer: same logits and loss."""
    cfg = our_config(case, attn_impl)
    torch.manual_seed(0)
    hf = randomize(LlamaForCausalLM(hf_config(cfg))).eval()
    state = {_HF_TO_OURS(k): v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    ours = Transformer(cfg)
    ours.load_state_dict(state, strict=True)
    compare(ours.eval(), hf)


def test_round_trip_export_from_pretrained_from_hf(tmp_path):
    """ours -> save_hf -> from_pretrained -> save_pretrained (sharded) -> from_hf: same weights,
    same config, same logits; and a (sharded) pytorch_model*.bin directory loads too."""
    cfg = our_config("gqa-tied")
    torch.manual_seed(0)
    ours = randomize(Transformer(cfg)).eval()
    ours.save_hf(tmp_path / "a")
    hf = load_hf(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "b" / "model.safetensors.index.json")  # really sharded
    back = Transformer.from_hf(tmp_path / "b", attn_impl="math").eval()
    assert back.config == cfg
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(ours(x)[0], back(x)[0])
    # pytorch_model.bin, two shards, as older checkpoints ship
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text((tmp_path / "b" / "config.json").read_text())
    state = dict(hf.state_dict())
    names = sorted(state)
    torch.save({k: state[k] for k in names[:5]}, tmp_path / "c" / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in names[5:]}, tmp_path / "c" / "pytorch_model-00002-of-00002.bin")
    back_bin = Transformer.from_hf(tmp_path / "c", attn_impl="math").eval()
    with torch.no_grad():
        assert torch.equal(ours(x)[0], back_bin(x)[0])


def test_from_hf_untied_rope_theta_and_gqa_read_from_config(tmp_path):
    cfg = our_config("mqa")
    torch.manual_seed(0)
    hf = randomize(LlamaForCausalLM(hf_config(cfg))).eval()
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_hf(tmp_path, attn_impl="sdpa").eval()
    assert (ours.config.n_kv_heads, ours.config.rope_theta, ours.config.tie_embeddings) == (1, 10000.0, False)
    compare(ours, hf)


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@pytest.mark.parametrize("case", ["gqa", "mha-tied"])
def test_kv_cache_decoding_equals_full_forward(case, attn_impl):
    torch.manual_seed(0)
    model = randomize(Transformer(our_config(case, attn_impl))).eval()
    x, _ = batch(B=2)
    with torch.no_grad():
        full = model(x)[0]  # (B, T, V)
        cache = model.new_kv_cache(2)
        pieces = [model(x[:, :10], cache=cache, start_pos=0)[0],  # prefill
                  model(x[:, 10:15], cache=cache, start_pos=10)[0]]  # a chunk after the prefill
        pieces += [model(x[:, t:t + 1], cache=cache, start_pos=t)[0] for t in range(15, T)]  # one by one
    assert rel_err(torch.cat(pieces, dim=1), full) < TOL


def test_forward_beyond_max_seq_len_fails():
    model = Transformer(our_config("gqa"))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_kv_cache(1), start_pos=63)


def test_flops_per_token_is_palms_count():
    """6N + 12 L d T (arXiv 2204.02311, appendix B), N without the input embedding, counted by hand."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64, max_seq_len=16)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32  # wq wo, wk wv (2 kv heads of 8), w1 w2 w3, norms
    n = 2 * per_layer + 32 + 64 * 32  # final norm, output head
    assert Transformer(cfg).flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16 == 136128


# --------------------------------------------------------------------------- flash attention
@pytest.mark.parametrize("case", ["gqa", "mqa-tied-theta5e5"])
def test_flash_attn_impl_matches_math_on_cpu(case):
    """attn_impl="flash" through flash_attn's Triton kernels (in the interpreter that conftest.py
    turns on without a GPU), not its PyTorch fallback: the model's layout, GQA and prefill."""
    flash_attn = pytest.importorskip("flash_attn")
    assert flash_attn.INTERPRET or torch.cuda.is_available()
    torch.manual_seed(0)
    ref = randomize(Transformer(our_config(case, "math"))).eval()
    flash = Transformer(our_config(case, "flash")).eval()
    flash.load_state_dict(ref.state_dict())
    x, y = batch()
    with torch.no_grad():
        (l_ref, loss_ref), (l_flash, loss_flash) = ref(x, y), flash(x, y)
        cache = flash.new_kv_cache(2)  # flash prefill, then single-token decoding
        dec = torch.cat([flash(x[:, :20], cache=cache, start_pos=0)[0]] +
                        [flash(x[:, t:t + 1], cache=cache, start_pos=t)[0] for t in range(20, T)], dim=1)
    assert rel_err(l_flash, l_ref) < TOL
    assert abs(loss_flash.item() - loss_ref.item()) < TOL * loss_ref.item()
    assert rel_err(dec, l_ref) < TOL


def test_flash_prefill_with_a_filled_cache_equals_full_forward(monkeypatch):
    """A second chunk prefilled onto a filled cache (a chat's next turn) runs flash_attn_func with
    Tq < Tk (the causal mask bottom-right aligned) and equals the full forward."""
    flash_attn = pytest.importorskip("flash_attn")
    calls, kernel = [], flash_attn.flash_attn_func
    monkeypatch.setattr(flash_attn, "flash_attn_func",
                        lambda q, k, *a, **kw: calls.append((q.shape[1], k.shape[1])) or kernel(q, k, *a, **kw))
    torch.manual_seed(0)
    ref = randomize(Transformer(our_config("gqa", "math"))).eval()
    flash = Transformer(our_config("gqa", "flash")).eval()
    flash.load_state_dict(ref.state_dict())
    x = batch(B=2)[0][:, :20]
    with torch.no_grad():
        cache = flash.new_kv_cache(3, max_len=24)  # more rows and positions than used: k/v are strided views
        pieces = [flash(x[:, :12], cache=cache)[0], flash(x[:, 12:19], cache=cache, start_pos=12)[0],
                  flash(x[:, 19:], cache=cache, start_pos=19)[0]]  # one token: SDPA, no kernel call
        assert rel_err(torch.cat(pieces, dim=1), ref(x)[0]) < TOL
    assert calls == [(12, 12)] * 2 + [(7, 19)] * 2  # per layer: the prefill, then the chunk on the cache


def test_auto_attention_resolves_by_device(monkeypatch):
    """attn_impl="auto" (the default) is sdpa on the CPU; on CUDA with flash_attn's Triton kernels,
    flash for packed documents and from FLASH_MIN_SEQ[head dim] keys on (where it was measured at least
    as fast), sdpa elsewhere; without Triton sdpa. The config keeps "auto"."""
    from model import FLASH_MIN_SEQ, resolve_attn_impl
    assert ModelConfig().attn_impl == "auto"
    assert resolve_attn_impl("auto", "cpu") == resolve_attn_impl("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attn_impl("auto", "cpu", 4096, docs=True) == "sdpa"
    assert [resolve_attn_impl(i, "cuda") for i in ("flash", "sdpa", "math")] == ["flash", "sdpa", "math"]
    flash_attn = pytest.importorskip("flash_attn")
    monkeypatch.setattr(flash_attn, "HAVE_TRITON", True)
    assert FLASH_MIN_SEQ == {64: 1024, 128: 2048}
    for head_dim, min_seq in FLASH_MIN_SEQ.items():
        assert resolve_attn_impl("auto", "cuda:0", min_seq, head_dim=head_dim) == "flash"
        assert resolve_attn_impl("auto", "cuda:0", min_seq - 1, head_dim=head_dim) == "sdpa"  # cuDNN's is faster
        assert resolve_attn_impl("auto", "cuda:0", min_seq - 1, docs=True, head_dim=head_dim) == "flash"
    assert resolve_attn_impl("auto", "cuda:0", 1024) == "sdpa"  # head dim 128 by default
    assert resolve_attn_impl("auto", "cuda:0", 8192, head_dim=96) == "sdpa"  # no Hopper kernels at 96
    assert resolve_attn_impl("auto", "cuda:0", 256, docs=True, head_dim=96) == "flash"
    # the same inside torch.compile's trace, which is where a training step resolves it
    assert torch.compile(lambda x: resolve_attn_impl("auto", "cuda", 64, True) == "flash" and x + 1,
                         fullgraph=True)(torch.ones(1))
    assert torch.compile(lambda x: resolve_attn_impl("auto", "cuda", 1024, head_dim=64) == "flash" and x + 1,
                         fullgraph=True)(torch.ones(1))
    monkeypatch.setattr(flash_attn, "HAVE_TRITON", False)
    assert resolve_attn_impl("auto", "cuda", 4096, docs=True) == "sdpa"
    # on the CPU an "auto" model computes as an "sdpa" one
    torch.manual_seed(0)
    auto = randomize(Transformer(our_config("gqa", "auto"))).eval()
    sdpa = Transformer(our_config("gqa", "sdpa")).eval()
    sdpa.load_state_dict(auto.state_dict())
    x = batch()[0]
    with torch.no_grad():
        assert torch.equal(auto(x)[0], sdpa(x)[0])


# --------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("kw, words", [
    (dict(dim=64, n_heads=5), ["dim=64", "n_heads=5"]),
    (dict(dim=64, n_heads=4, n_kv_heads=3), ["n_heads=4", "n_kv_heads=3"]),
    (dict(dim=36, n_heads=4), ["36/4=9", "odd", "RoPE"]),
    (dict(dim=64, n_heads=4, attn_impl="fast"), ["attn_impl='fast'"]),
    (dict(dim=64, n_heads=4, vocab_size=0), ["vocab_size=0"]),
])
def test_bad_config_fails_at_construction_naming_keys(kw, words):
    with pytest.raises(ValueError) as e:
        ModelConfig(**kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_hf_config_fails_in_from_hf(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=3,
        vocab_size=10, intermediate_size=32, rms_norm_eps=1e-6)))
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        Transformer.from_hf(tmp_path)


# --------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script, first_line", [
    ("sample.py", "Generate text from a trained model"),
    ("eval_ppl.py", "Perplexity of a model on a text file or a prepared token file"),
])
def test_script_help_says_what_it_does(script, first_line):
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    usage, description = r.stdout.split("\n\n")[:2]
    assert usage.startswith("usage:")
    assert description.startswith(first_line), r.stdout[:500]  # what it does, right after usage
    assert "--init_from" in r.stdout and "--device" in r.stdout and "--dtype" in r.stdout
    with open(os.path.join(ROOT, script)) as f:
        assert f.readline().startswith('"""' + first_line)  # the file's first line too


# --------------------------------------------------------------------------- rope_scaling, head_dim
# original context 32 < T = 48; at head_dim 16, theta 1e4 the wavelengths 2 pi 1e4^(i/8) are 6.3
# (< 32/4: kept), 19.9 (between: interpolated) and >= 62.8 (> 32/1: divided by factor)
SCALINGS = {"linear": {"rope_type": "linear", "factor": 4.0},
            "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}


def hf_llama(seed=0, theta=10000.0, scaling=None, **kw):
    """A randomized transformers Llama: dim 64, 4 q heads, 2 kv heads, untied."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=MAX_LEN,
                      rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": theta},
                      attn_implementation="eager", **kw)
    torch.manual_seed(seed)
    return randomize(LlamaForCausalLM(cfg), seed).eval()


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rope_scaling_matches_transformers(kind, form, tmp_path):
    """transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older files a top-level
    rope_theta + rope_scaling (here with the old "type" key for linear). Both give transformers'
    logits, which differ from plain RoPE's (the scaling is not a no-op here)."""
    hf = hf_llama(theta=500000.0, scaling=SCALINGS[kind])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == kind
    if form == "rope_scaling":
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        if kind == "linear":
            rope["type"] = rope.pop("rope_type")
        config["rope_scaling"] = rope
        (tmp_path / "config.json").write_text(json.dumps(config))
    ours = Transformer.from_hf(tmp_path, attn_impl="math").eval()
    assert ours.config.rope_scaling == SCALINGS[kind] and ours.config.rope_theta == 500000.0
    compare(ours, hf)
    plain = Transformer(ModelConfig(**{**vars(ours.config), "rope_scaling": None})).eval()
    plain.load_state_dict(ours.state_dict())
    x, _ = batch()
    with torch.no_grad():
        assert rel_err(plain(x)[0], ours(x)[0]) > 1e-3


def test_llama3_top_level_original_max_position_embeddings_wins(tmp_path):
    """transformers' LlamaRotaryEmbedding takes a top-level original_max_position_embeddings over
    the rope dict's (and the dict's over max_position_embeddings)."""
    hf = hf_llama(scaling=SCALINGS["llama3"], original_max_position_embeddings=16)
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 16  # as the model used it
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"]["original_max_position_embeddings"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = Transformer.from_hf(tmp_path, attn_impl="math").eval()
    assert ours.config.rope_scaling["original_max_position_embeddings"] == 16
    compare(ours, hf)
    del config["original_max_position_embeddings"], config["rope_parameters"]["original_max_position_embeddings"]
    assert config_from_hf(config).rope_scaling["original_max_position_embeddings"] == MAX_LEN


def test_head_dim_not_dim_over_heads_matches_transformers(tmp_path):
    """head_dim 24 with dim 64 and 4 heads: q/k/v project to 96 and 48 channels."""
    hf = hf_llama(head_dim=24)
    hf.save_pretrained(tmp_path / "a")
    ours = Transformer.from_hf(tmp_path / "a", attn_impl="sdpa").eval()
    assert ours.config.head_dim == 24 and ours.layers["0"].attention.wq.weight.shape == (96, 64)
    compare(ours, hf)
    ours.save_hf(tmp_path / "b")
    compare(ours, load_hf(tmp_path / "b"))


def test_save_hf_config_round_trip_and_generation_config(tmp_path):
    """head_dim, llama3 rope_scaling and bos/eos ids: save_hf -> AutoModelForCausalLM (equal logits),
    GenerationConfig; -> from_hf (the same ModelConfig); transformers' own save_pretrained
    (rope_parameters form) -> from_hf too."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, vocab_size=VOCAB, ffn_dim=96,
                      rope_theta=500000.0, rope_scaling=SCALINGS["llama3"], max_seq_len=MAX_LEN, attn_impl="math")
    torch.manual_seed(0)
    ours = randomize(Transformer(cfg)).eval()
    ours.save_hf(tmp_path / "a", bos_token_id=1, eos_token_id=[2, 3])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a", attn_implementation="eager", dtype=torch.float32).eval()
    assert hf.config.head_dim == 24 and (hf.config.bos_token_id, hf.config.eos_token_id) == (1, [2, 3])
    assert {**hf.config.rope_parameters, "rope_theta": None} == {**SCALINGS["llama3"], "rope_theta": None}
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    compare(ours, hf)
    gen = GenerationConfig.from_pretrained(tmp_path / "a")
    assert (gen.bos_token_id, gen.eos_token_id) == (1, [2, 3])
    assert Transformer.from_hf(tmp_path / "a", attn_impl="math").config == cfg
    hf.save_pretrained(tmp_path / "b")
    assert "rope_parameters" in json.loads((tmp_path / "b" / "config.json").read_text())
    assert Transformer.from_hf(tmp_path / "b", attn_impl="math").config == cfg
    # no ids given: null, not LlamaConfig's defaults 1 and 2
    ours.save_hf(tmp_path / "c")
    c = transformers.AutoConfig.from_pretrained(tmp_path / "c")
    assert (c.bos_token_id, c.eos_token_id) == (None, None)
    assert GenerationConfig.from_pretrained(tmp_path / "c").eos_token_id is None


# --------------------------------------------------------------------------- what from_hf refuses
HF_BASE = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, intermediate_size=96, rms_norm_eps=1e-5, max_position_embeddings=MAX_LEN)


@pytest.mark.parametrize("key, value, words", [
    ("attention_bias", True, []),
    ("mlp_bias", True, []),
    ("hidden_act", "gelu", []),
    ("sliding_window", 4096, []),
    ("layer_types", ["full_attention"], []),
    ("partial_rotary_factor", 0.5, []),
    ("attention_dropout", 0.1, ["0.0"]),
    ("quantization_config", {"quant_method": "gptq"}, ["dequantize"]),
    ("model_type", "mistral", ["Mistral", "sliding-window"]),
    ("model_type", "qwen2", ["Qwen2", "biases"]),
    ("model_type", "gpt_neox", []),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, ["'dynamic'", "linear, llama3"]),
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, ["'yarn'"]),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, ["'longrope'"]),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.25}, ["0.25"]),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, ["high_freq_factor"]),
])
def test_from_hf_refuses_what_it_does_not_compute(key, value, words, tmp_path):
    """One line naming the file, the key and its value, before any weight is read."""
    (tmp_path / "config.json").write_text(json.dumps({**HF_BASE, key: value}))
    with pytest.raises(UnsupportedCheckpoint) as e:
        Transformer.from_hf(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "config.json") in msg
    for w in [key] + ([] if key.startswith("rope_") else [repr(value)]) + words:
        assert w in msg, (w, msg)


def test_from_hf_notes_unknown_keys_and_accepts_known_harmless_ones(capsys):
    harmless = dict(pretraining_tp=2, rope_interleaved=False, is_llama_config=True, torch_dtype="bfloat16",
                    bos_token_id=0, eos_token_id=0, use_cache=True, transformers_version="4.40.0",
                    attention_dropout=0.0, rope_scaling=None, hidden_act="silu")
    assert config_from_hf({**HF_BASE, **harmless}) == config_from_hf(HF_BASE)
    assert capsys.readouterr().err == ""
    config_from_hf({**HF_BASE, "qk_layernorm": True})
    assert "qk_layernorm" in capsys.readouterr().err


def test_every_llama_config_field_is_classified():
    """A field transformers' LlamaConfig gains (a new Llama option) must be added to one of
    model.py's lists: read, fixed to the implemented value, or harmless."""
    import dataclasses
    import model
    known = model._HF_READ | set(model._HF_FIXED) | model._HF_HARMLESS
    names = {f.name for f in dataclasses.fields(LlamaConfig)} | set(transformers.PretrainedConfig().to_dict())
    assert names - known == set()


# --------------------------------------------------------------------------- KV cache sized to the request
def test_new_kv_cache_max_len_and_its_bound():
    model = Transformer(our_config("gqa", head_dim=24))
    k, v = model.new_kv_cache(3, max_len=10)[1]
    assert k.shape == v.shape == (3, 10, 2, 24)
    assert model.new_kv_cache(1)[0][0].shape == (1, MAX_LEN, 2, 24)
    with pytest.raises(ValueError, match="KV cache's 10 positions"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_kv_cache(1, max_len=10), start_pos=9)


def test_generate_sizes_the_cache_to_the_request_with_the_same_tokens(monkeypatch):
    """generate() allocates prompt + max_new_tokens positions; greedy tokens equal those with
    a cache for the whole context; stats count the tokens."""
    torch.manual_seed(0)
    model = randomize(Transformer(our_config("gqa", "sdpa"))).eval()
    prompt, n = [5, 9, 2, 7, 1], 20
    new_kv_cache, lengths = model.new_kv_cache, []

    def spy(batch_size, dtype=None, device=None, max_len=None, full=False):
        cache = new_kv_cache(batch_size, dtype, device, None if full else max_len)
        lengths.append(cache[0][0].shape[1])
        return cache
    monkeypatch.setattr(model, "new_kv_cache", spy)
    stats = {}
    sized = list(sample.generate(model, prompt, n, temperature=0, stats=stats))
    monkeypatch.setattr(model, "new_kv_cache", lambda *a, **k: spy(*a, **k, full=True))
    full = list(sample.generate(model, prompt, n, temperature=0))
    assert lengths == [len(prompt) + n, MAX_LEN]
    assert len(sized) == n and sized == full
    assert (stats["prompt_tokens"], stats["new_tokens"], stats["decode_steps"]) == (5, n, n - 1)
    assert stats["prefill_s"] > 0 and stats["decode_s"] > 0
    assert "5 prompt tokens, 20 new" in sample.throughput(stats) and "tokens/s" in sample.throughput(stats)
