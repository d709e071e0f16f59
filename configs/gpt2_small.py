# A GPT-2-small-sized LLaMA (about 124M parameters with the GPT-2 vocabulary), for one GPU.
# Data: python prepare.py --name=fineweb_edu --source=hf:HuggingFaceFW/fineweb-edu:sample-10BT --streaming --tokenizer=gpt2
out_dir = "out/gpt2_small"
dataset = "fineweb_edu"

dim = 768
n_layers = 12
n_heads = 12
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 128
ffn_dim = 2048
tie_embeddings = True  # as GPT-2: 124M parameters

block_size = 1024
batch_size = 512  # about 0.5M tokens per step
micro_batch_size = 16
max_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
lr_decay_iters = 20000

log_interval = 10
eval_interval = 500
eval_iters = 50
checkpoint_interval = 1000
compile = True
