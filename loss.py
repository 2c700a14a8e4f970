"""The output layer's loss, fused: cross-entropy of x @ weight.T without holding the (N, vocab) logits."""

import torch

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss, as in HF

# Rows per chunk of the output layer's loss on a GPU (on CPU: n_embd, see linear_cross_entropy).
# Chunk logits of 4096 x 50257 fp32 are 0.8 GB: large matmuls, a fixed and small part of memory.
GPU_LOSS_CHUNK_ROWS = 4096


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight), targets, ignore_index=IGNORE_INDEX), to float rounding,
    gradients included, without ever holding the (N, vocab) logits.

    With a 50257-way output, the logits and their log-softmax cost more than the whole model at
    small widths (memory-bound passes over N * 50257 floats), and at GPT-2 small on a GPU they are
    13 GB at 64 x 1024 tokens in fp32. Here the rows go in chunks: each chunk's logits are computed,
    softmaxed in place and, when gradients are needed, turned straight into the gradients
    (softmax - one_hot) / N @ weight and its transpose @ x, which backward only scales (so gradient
    accumulation's loss scaling reaches them). Under autocast the matmuls run in its dtype, as
    nn.Linear's would, and the softmax in fp32. Plain tensor code with no data-dependent shapes and
    no host reads, so torch.compile traces it whole. Targets are checked as F.cross_entropy checks
    them (in [0, vocab) or IGNORE_INDEX); with none counted the mean is nan, as F.cross_entropy's.

    x: (N, C), weight: (vocab, C), targets: (N,). On CPU a chunk has C rows, so its logits (C, vocab)
    are as big as the weight gradient (vocab, C) that every chunk adds to: at small widths chunks stay
    in cache, at large ones the additions stay a small part of the matmuls (timings against the plain
    version: BENCHMARKS.md, train).
    """
    chunk_rows = x.shape[1] if x.device.type == "cpu" else GPU_LOSS_CHUNK_ROWS
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, chunk_rows)
    return _chunked_cross_entropy(x, weight, targets, chunk_rows)


class LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with gradients, computed in the forward pass while each chunk's logits are at hand."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows: int):
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = _chunked_cross_entropy(x, weight, targets, chunk_rows, grad_x, grad_weight)
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None


def _chunked_cross_entropy(x, weight, targets, chunk_rows: int, grad_x=None, grad_weight=None) -> torch.Tensor:
    """The mean loss, chunk_rows rows at a time; given grad_x and grad_weight, also fills in its gradients."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    counted = targets != IGNORE_INDEX
    # On a GPU an asynchronous check (a device-side assert, as F.cross_entropy's): no host read.
    torch._assert_async(
        ((targets >= 0) & (targets < weight.shape[0]) | ~counted).all(),
        f"cross-entropy targets must be in [0, {weight.shape[0]}) or {IGNORE_INDEX} (ignored)",
    )
    n_counted = counted.sum()
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    weight = weight.to(dtype)  # cast once, not once per chunk
    for start in range(0, x.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        x_chunk, counted_chunk = x[rows].to(dtype), counted[rows]
        target = targets[rows].clamp(min=0).unsqueeze(1)  # (n, 1); ignored rows are masked out below
        logits = (x_chunk @ weight.t()).float()  # (n, V)
        target_logit = logits.gather(1, target).squeeze(1)
        row_max = logits.amax(1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # unnormalized, in place: one exp per logit
        row_sum = probs.sum(1, keepdim=True)
        loss += torch.where(counted_chunk, (row_sum.log() + row_max).squeeze(1) - target_logit, 0).sum()
        if grad_x is None:
            continue
        # d(mean loss)/d(logits) = (softmax - one_hot) * counted / n_counted, in place
        row_scale = (counted_chunk / n_counted.clamp(min=1)).unsqueeze(1)  # (n, 1): 0 for rows that don't count
        probs.mul_(row_scale / row_sum)
        if torch.compiler.is_compiling():  # inductor realizes a scatter's whole destination; a comparison fuses
            one_hot = torch.arange(probs.shape[1], device=x.device) == target  # (n, V)
            probs.addcmul_(one_hot, row_scale, value=-1)  # one kernel with the multiply and the cast
        else:  # eager: a scatter touches n elements, a comparison all n * V
            probs.scatter_add_(1, target, -row_scale)
        probs = probs.to(dtype)
        grad_x[rows] = probs @ weight
        if dtype == torch.float32:
            grad_weight.addmm_(probs.t(), x_chunk)  # in place: no (V, C) temporary per chunk
        else:  # a (V, C) temporary: CPU has no low-precision matmul into fp32, inductor splits one into mm + add
            grad_weight += probs.t() @ x_chunk
    return loss / n_counted
