# A tiny LLaMA on the offline pystdlib corpus (byte tokens): about two minutes on 2 CPU cores,
# with a visibly falling loss. python train.py configs/tiny.py
out_dir = "out/tiny"
dataset = "pystdlib"
device = "cpu"
dtype = "float32"

dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
vocab_size = 320  # 257 byte tokens, padded to a multiple of 64 (divides any tp up to 64)
multiple_of = 32
tie_embeddings = True

block_size = 128
batch_size = 16
micro_batch_size = 8
max_iters = 300
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 20
lr_decay_iters = 300
weight_decay = 0.1

log_interval = 10
eval_interval = 100
eval_iters = 5
checkpoint_interval = 100
