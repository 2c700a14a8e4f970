# The recipe's model on the recipe's data (config/bookcorpus.py: GPT-2 124M, BookCorpus, 64 x 1024 tokens a
# step), trained the way this project's measurements say is cheapest: Muon on the blocks' matrices, AdamW on
# the embeddings, LayerNorms and biases, warmup-stable-decay, 0.6x the recipe's tokens. The checkpoints are
# GPT-2's, as the recipe's.
#   torchrun --standalone --nproc_per_node=8 train.py config/bookcorpus_muon.py
# Measured (BENCHMARKS.md, optimizer; CPU): on a 6-layer, 256-wide GPT-2 on the Austen shards, 1,024 tokens a
# step, Muon (lr 0.01, c_attn as q, k, v apart) + wsd reached in 0.6x the tokens a lower val loss (4.877, 3
# seeds; lr 0.005: 4.868) than AdamW at its swept optimum in all of them (4.993 with linear decay; 4.893 with
# wsd too, the margin then about the seeds' spread). Not measured: this model, this data, this batch (64x
# those tokens; the speedrun's Muon takes 0.05 at 512x), a GPU; the lr carries over widths by torch's
# 'original' adjustment (sqrt(max(1, rows / cols)) per matrix).
import pathlib
import runpy

globals().update(runpy.run_path(str(pathlib.Path(__file__).with_name("bookcorpus.py"))))  # then what differs:

run_name = "bookcorpus_muon"
optimizer = "muon"
muon_learning_rate = 0.01
muon_momentum = 0.95
muon_weight_decay = 0.0
lr_decay = "wsd"
cooldown_ratio = 0.2
epochs = 1
max_steps = 11_000  # 0.6x the recipe's one epoch (~1.2B tokens, ~18,300 steps of 65,536 tokens)
