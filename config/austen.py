# A small GPT-2 on the six Austen novels (data/austen), sized for a 2-core CPU (the README gives the
# times measured on CPUs with and without native bf16), or a GPU:
#   python prepare.py --dataset=austen && python train.py config/austen.py && python sample.py
# The output layer is most of the work at this width, so time goes with tokens seen; the settings below
# reach the lowest loss found for the time (bench.py --sections=quickstart compares them with the
# runners-up; BENCHMARKS.md has the sweep). One epoch is 933 steps.
# device, dtype and compile are TrainConfig's: a visible GPU, compiled, else the CPU, eager; bf16
# autocast where the device runs it natively (GPUs, CPUs with AVX512-BF16 or AMX), fp32 elsewhere
# (emulated bf16 is many times slower).

run_name = "austen"
data_dir = "data/austen"

# model: 4 layers of width 128 (7.3M parameters, 6.5M of them the token embedding); the loss's softmax
# takes 15,182 columns: the 15,181 tokens the novels contain and one for the rest (loss.CompactVocab)
block_size = 256
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # about two passes over the data: nothing to overfit yet

# 4 sequences of 256 tokens per step, 1,600 steps: 1.64M tokens, 1.71 epochs, in the time AdamW took for 2,000
batch_size = 4
max_steps = 1600

# Muon on the blocks' matrices, AdamW on the rest, warmup-stable-decay: val 4.21 after 1,600 steps where AdamW
# (lr 2e-3, the best of its sweep) gave 4.52 after 2,000 with linear decay, 4.46 with wsd
# (bench.py --sections=quickstart, BENCHMARKS.md)
optimizer = "muon"
muon_learning_rate = 0.01  # of 0.005, 0.01 and 0.02 (0.005 ended within 0.004 of it)
learning_rate = 2e-3  # AdamW's, on the embeddings, LayerNorms and biases
warmup_ratio = 0.05
lr_decay = "wsd"  # the peak until the last 20% of the steps, then linearly to 0

eval_interval = 400  # and at the end; the whole val split (37k tokens)
tasks = ""  # no zero-shot tasks, so that evals stay quick on a CPU; each eval samples "I was telling her that"
log_interval = 10
checkpoint_interval = 1000
keep_checkpoints = 2
wandb_log = False
