# LoRA supervised fine-tuning of SmolLM2-135M-Instruct (or any hf:<dir> Llama) on chat JSON lines:
#   python finetune.py configs/sft_smollm2.py --init_from=hf:DIR --data=chat.jsonl
# Full fine-tuning: --lora_rank=0 --learning_rate=2e-5. The model's shape comes from DIR.
out_dir = "out/sft_smollm2"
block_size = 512
batch_size = 16
micro_batch_size = 4
max_iters = 200
learning_rate = 2e-4  # LoRA takes ~10x full fine-tuning's rate
min_lr = 2e-5
warmup_iters = 10
lr_decay_iters = 200
weight_decay = 0.0
grad_clip = 1.0
log_interval = 10
eval_interval = 50
eval_iters = 10
checkpoint_interval = 100

lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = "q,k,v,o,gate,up,down"
val_fraction = 0.05
