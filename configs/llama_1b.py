# A 1.1B LLaMA (TinyLlama's shape: d2048, 16 layers, grouped-query 16/8 heads), for 1-8 GPUs.
# torchrun --nproc_per_node=8 train.py configs/llama_1b.py           (dp=8)
out_dir = "out/llama_1b"
dataset = "fineweb_edu"

dim = 2048
n_layers = 16
n_heads = 16
n_kv_heads = 8
vocab_size = 50304
ffn_dim = 8192
rope_theta = 10000.0

block_size = 2048
batch_size = 256  # about 0.5M tokens per step
micro_batch_size = 4
max_iters = 50000
learning_rate = 4e-4
min_lr = 4e-5
warmup_iters = 2000
lr_decay_iters = 50000

log_interval = 10
eval_interval = 1000
eval_iters = 50
checkpoint_interval = 1000
compile = True
