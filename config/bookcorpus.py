# The recipe: GPT-2 small (GPT2Config() defaults, 124M parameters) from scratch on BookCorpus,
# one epoch, as the HF Trainer ran it. Prepare the data once with `python prepare.py`, then
#   torchrun --standalone --nproc_per_node=8 train.py config/bookcorpus.py
# 64 sequences of 1024 tokens (65,536 tokens) per optimizer step, as the recipe's 8 GPUs x 8 per
# GPU, on any number of GPUs: each runs the largest micro-batch that fits and accumulates the rest,
# so 1 GPU trains on the same batches in the same order with the same schedule as 8:
#   python train.py config/bookcorpus.py

run_name = "bookcorpus"
data_dir = "data/bookcorpus"

# model: GPT2Config()
block_size = 1024
vocab_size = 50257
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.1

# batch and length
batch_size = 64  # sequences per optimizer step over all GPUs; micro_batch_size: the largest that fits
epochs = 1

# AdamW (no weight decay on biases and LayerNorm), 5% linear warmup, cosine to 0, clip 1.0
learning_rate = 2.5e-4
beta1, beta2 = 0.9, 0.999
eps = 1e-8
weight_decay = 0.01
warmup_ratio = 0.05
grad_clip = 1.0

# eval on the whole val split every 500 steps; checkpoint every 5000, keep the last 10
eval_interval = 500
# At each eval also HellaSwag (Rowan/hellaswag's 10,042 validation items, scored as lm-eval scores them;
# offline: hellaswag_file = a JSONL of its rows) and a sample of "I was telling her that" (TrainConfig's
# default). An estimate, not measured: ~0.8 PFLOP of forward passes (40k endings of ~80 tokens at 124M),
# seconds to a minute on one H100 in bf16, split over the job's GPUs.
tasks = "hellaswag"
log_interval = 10
checkpoint_interval = 5000
keep_checkpoints = 10
wandb_log = True
wandb_project = "gpt2-bookcorpus"
