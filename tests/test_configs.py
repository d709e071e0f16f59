"""Every shipped config loads, builds a valid model config and fits the layout its header names."""
import glob
import os

import pytest
import torch

import parallel
import finetune
import train
from model import Transformer
from util import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# (world, dp) of the launches in the headers
LAYOUT = {"tiny": (1, 1), "gpt2_small": (1, 1), "llama_1b": (8, 8), "llama_7b": (8, 1), "llama_13b": (16, 1),
          "sft_smollm2": (1, 1)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_config_loads_and_fits_its_layout(path):
    name = os.path.basename(path)[:-3]
    # finetune.py's configs (sft_*) have its keys; their model's shape comes from init_from=hf:<dir>
    cfg = train.load_config([path], finetune.FinetuneConfig if name.startswith("sft_") else train.Config)
    mcfg = train.model_config(cfg)
    world, dp = LAYOUT[name]
    assert parallel.check_layout(world, cfg.tp, cfg.pp, cfg) == dp
    bad = cfg.tp * cfg.pp * (cfg.batch_size // cfg.micro_batch_size + 1)  # dp * micro_batch_size > batch_size
    with pytest.raises(parallel.LayoutError, match=f"batch_size={cfg.batch_size} is not divisible"):
        parallel.check_layout(bad, cfg.tp, cfg.pp, cfg)
    if name.startswith("sft_"):
        return
    with torch.device("meta"):
        n = Transformer(mcfg).num_params()
    expected = {"tiny": (0.5e6, 1e6), "gpt2_small": (120e6, 130e6), "llama_1b": (1.0e9, 1.3e9),
                "llama_7b": (6.5e9, 7.0e9), "llama_13b": (12.8e9, 13.5e9)}[name]
    assert expected[0] < n < expected[1], f"{name}: {n / 1e6:.1f}M parameters"
