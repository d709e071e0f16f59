# The book's LLaMA 13.0B (table 2.1): d5120, 40 layers, 40 heads, lr 3.0e-4, 4M-token batches.
# Two or more 8-GPU nodes, e.g. torchrun --nnodes=2 --nproc_per_node=8 ... train.py configs/llama_13b.py
out_dir = "out/llama_13b"
dataset = "fineweb_edu"

dim = 5120
n_layers = 40
n_heads = 40
vocab_size = 50304  # the gpt2 tokenizer (50257) padded to a multiple of 128; LLaMA itself used 32000
multiple_of = 256  # ffn_dim = 13824
norm_eps = 1e-6

block_size = 2048
batch_size = 2048
micro_batch_size = 1
max_iters = 250000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
lr_decay_iters = 250000

tp = 8
pp = 2
zero = 1

log_interval = 1
eval_interval = 1000
eval_iters = 20
checkpoint_interval = 500
