# The book's LLaMA 6.7B (table 2.1): d4096, 32 layers, 32 heads, lr 3.0e-4, 4M-token batches.
# One 8-GPU node: torchrun --nproc_per_node=8 train.py configs/llama_7b.py   (tp=4 x pp=2, ZeRO-1 over dp)
out_dir = "out/llama_7b"
dataset = "fineweb_edu"

dim = 4096
n_layers = 32
n_heads = 32
vocab_size = 50304  # the gpt2 tokenizer (50257) padded to a multiple of 128; LLaMA itself used 32000
multiple_of = 256  # ffn_dim = 11008, LLaMA's rule
rope_theta = 10000.0
norm_eps = 1e-6

block_size = 2048
batch_size = 2048  # 2048 x 2048 = 4M tokens, as in the book
micro_batch_size = 1
max_iters = 250000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
lr_decay_iters = 250000
weight_decay = 0.1
grad_clip = 1.0

tp = 4
pp = 2
zero = 1
pp_schedule = "1f1b"

log_interval = 1
eval_interval = 1000
eval_iters = 20
checkpoint_interval = 500
