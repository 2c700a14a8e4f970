"""The output layer's loss, fused: cross-entropy of x @ weight.T without holding the (N, vocab) logits."""

import math

import numpy as np
import torch

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss, as in HF

# Rows per chunk of the output layer's loss on a GPU (on CPU: n_embd, see linear_cross_entropy): chunk logits
# of GPU_LOSS_CHUNK_ROWS x vocab make large matmuls in a fixed, small part of the GPU's memory.
GPU_LOSS_CHUNK_ROWS = 4096


class CompactVocab:
    """The softmax over the tokens the training data contains, with every other token in one column: the same
    loss and gradients as over the whole vocabulary, to float rounding, for (seen + 1) / vocab of the output
    layer's work.

    A token the training data never contains is never an input and never a target, so its row of the tied
    embedding only ever gets the softmax's gradient sum_n p(token | n) x_n / N. Rows that start equal get
    equal gradients and equal AdamW updates, so they stay equal, bit for bit (tie_unseen_rows starts a new
    model's so). Then the K unseen tokens have one logit, x . w, and the softmax's sum holds K equal terms:
    one column of logit x . w + log K, whose gradient, divided by K, is each of their rows' gradient.
    A model whose unseen rows differ (a pretrained one) gets None from `of`: its softmax stays whole.
    """

    def __init__(self, seen: torch.Tensor):
        """seen: (vocab,) bool, the tokens the training data contains; at least two must be unseen."""
        seen_ids, self.unseen_ids = seen.nonzero().squeeze(1), (~seen).nonzero().squeeze(1)
        self.column_rows = torch.cat([seen_ids, self.unseen_ids[:1]])  # (columns,): each column's row, the unseen last
        self.token_column = torch.full_like(seen, len(seen_ids), dtype=torch.long)  # (vocab,)
        self.token_column[seen_ids] = torch.arange(len(seen_ids), device=seen.device)
        self.log_unseen = math.log(len(self.unseen_ids))

    @classmethod
    def of(cls, weight: torch.Tensor, seen: torch.Tensor) -> "CompactVocab | None":
        """The compact softmax for weight (vocab, C) and the training data's seen tokens, or None where the
        unseen rows are not all equal or fewer than two."""
        unseen = weight[~seen]
        if len(unseen) < 2 or not (unseen == unseen[:1]).all():
            return None
        return cls(seen)

    def select(self, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The columns' rows of weight (vocab, C) -> (columns, C), whose gradient reaches every row
        (CompactRows), and targets (N,) as columns, IGNORE_INDEX kept."""
        columns = torch.where(targets == IGNORE_INDEX, IGNORE_INDEX, self.token_column[targets.clamp(min=0)])
        return CompactRows.apply(weight, self.column_rows, self.unseen_ids), columns


def tie_unseen_rows(weight: torch.Tensor, seen: torch.Tensor) -> None:
    """Zeroes the rows of a new model's weight (vocab, C) of every token the training data never contains, so
    that its training can take the CompactVocab softmax, starting where GPT-2's independent draws start on
    average. Their logits start at 0, the mean of independently drawn rows' logits, and they add nothing to
    x's gradient, as K independent rows nearly do (their p-weighted sum averages out, ~1/sqrt(K)); rows tied
    to one draw w would instead push every position along w, by K times one row's share, at the start."""
    with torch.no_grad():
        weight[~seen] = 0


class CompactRows(torch.autograd.Function):
    """weight (vocab, C) -> the CompactVocab columns' rows (columns, C) = weight[column_rows]; backward gives
    each of unseen_ids's rows 1/K of the last column's gradient."""

    @staticmethod
    def forward(ctx, weight, column_rows, unseen_ids):
        ctx.save_for_backward(column_rows, unseen_ids)
        ctx.vocab_size = weight.shape[0]
        return weight.index_select(0, column_rows)

    @staticmethod
    def backward(ctx, grad_columns):
        column_rows, unseen_ids = ctx.saved_tensors
        grad = grad_columns.new_empty((ctx.vocab_size, grad_columns.shape[1]))  # every row is written below
        grad[column_rows[:-1]] = grad_columns[:-1]
        grad[unseen_ids] = grad_columns[-1] / len(unseen_ids)
        return grad, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: CompactVocab | None = None
) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight), targets, ignore_index=IGNORE_INDEX), to float rounding,
    gradients included, without ever holding the (N, vocab) logits. With vocab, over its columns: the same
    value while its unseen tokens' rows are equal (CompactVocab.of checks, and training keeps them so as long
    as no unseen token is an input or, with gradients, a target: that one is checked here).

    With a 50257-way output, the logits and their log-softmax cost more than the whole model at
    small widths (memory-bound passes over N * 50257 floats), and at GPT-2 small on a GPU they are
    the largest tensors of the step. Here the rows go in chunks: each chunk's logits are computed,
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
    counted = targets != IGNORE_INDEX
    # On a GPU an asynchronous check (a device-side assert, as F.cross_entropy's): no host read.
    torch._assert_async(
        ((targets >= 0) & (targets < weight.shape[0]) | ~counted).all(),
        f"cross-entropy targets must be in [0, {weight.shape[0]}) or {IGNORE_INDEX} (ignored)",
    )
    chunk_rows = x.shape[1] if x.device.type == "cpu" else GPU_LOSS_CHUNK_ROWS
    with_grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    log_unseen = None
    if vocab is not None:
        (weight, targets), log_unseen = vocab.select(weight, targets), vocab.log_unseen
        if with_grads:  # an unseen target would give its row a gradient of its own: the rows would part
            torch._assert_async(
                ((targets < len(vocab.column_rows) - 1) | ~counted).all(),
                "a target the training data never contains: the CompactVocab was made for other data",
            )
    if with_grads:
        return LinearCrossEntropy.apply(x, weight, targets, chunk_rows, log_unseen)
    return _chunked_cross_entropy(x, weight, targets, chunk_rows, log_unseen)


class LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with gradients, computed in the forward pass while each chunk's logits are at hand."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows: int, log_unseen: float | None):
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = _chunked_cross_entropy(x, weight, targets, chunk_rows, log_unseen, grad_x, grad_weight)
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


def _chunked_cross_entropy(
    x, weight, targets, chunk_rows: int, log_unseen: float | None = None, grad_x=None, grad_weight=None
) -> torch.Tensor:
    """The mean loss, chunk_rows rows at a time; given grad_x and grad_weight, also fills in its gradients.
    With log_unseen, the last column stands for the CompactVocab's unseen tokens: their log-count joins
    its logit in the softmax's sum, not in a target's own logit."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    counted = targets != IGNORE_INDEX
    n_counted = counted.sum()
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    weight = weight.to(dtype)  # cast once, not once per chunk
    for start in range(0, x.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        x_chunk, counted_chunk = x[rows].to(dtype), counted[rows]
        target = targets[rows].clamp(min=0).unsqueeze(1)  # (n, 1); ignored rows are masked out below
        logits = (x_chunk @ weight.t()).float()  # (n, V)
        target_logit = logits.gather(1, target).squeeze(1)
        if log_unseen is not None:
            logits[:, -1] += log_unseen
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


def compact_output_layer(model, tokens_present: np.ndarray, new_model: bool) -> str:
    """Gives a GPT's loss the softmax over the tokens the train data contains (tokens_present: (data vocab,)
    bool; CompactVocab), a new model's rows of the others tied (at zero) first; says which softmax the model
    takes. A loaded model whose unseen rows differ (a pretrained one) keeps the whole softmax."""
    weight = model.lm_head.weight
    seen = torch.from_numpy(tokens_present).to(weight.device)
    seen = torch.cat([seen, seen.new_zeros(len(weight) - len(seen))])  # a model vocabulary beyond the data's
    if new_model:
        tie_unseen_rows(weight, seen)
    model.compact_vocab = CompactVocab.of(weight, seen)
    if model.compact_vocab is None:
        return f"softmax over all {len(weight):,} tokens"
    return (
        f"softmax over the {int(seen.sum()):,} tokens of the train split, the other {int((~seen).sum()):,} "
        "(one shared row) as one column"
    )
