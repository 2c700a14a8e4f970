"""Parity with transformers' GPT2LMHeadModel on random-init models (no downloads)."""

import contextlib
import fnmatch
import json
import math
import shutil

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from transformers import GPT2Config, GPT2LMHeadModel

from common import UserError
from hf import (
    CONV1D_SUFFIXES,
    config_from_hf,
    from_pretrained,
    hf_config,
    hf_state_dict,
    load_hf_state_dict,
    save_pretrained,
)
from model import GPT, GPTConfig
from optim import adamw

# Deliberately odd shapes: 3 heads of width 16, 37 positions, a vocabulary of 101; one head; many.
SMALL_CONFIGS = [
    dict(n_layer=2, n_head=3, n_embd=48, n_positions=37, vocab_size=101),
    dict(n_layer=1, n_head=1, n_embd=8, n_positions=5, vocab_size=7),
    dict(n_layer=3, n_head=4, n_embd=64, n_positions=64, vocab_size=257),
]


def make_pair(dropout=0.0, **kw):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **kw))
    ours = GPT(config_from_hf(hf.config.to_dict()))
    load_hf_state_dict(ours, hf.state_dict())
    return hf, ours


def tokens(vocab_size, batch, length, seed=1):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def full_pair():
    return make_pair(dropout=0.1)


@pytest.mark.parametrize("kw", SMALL_CONFIGS)
def test_logits_and_loss_match_hf(kw):
    hf, ours = make_pair(**kw)
    hf.eval(), ours.eval()
    idx = tokens(kw["vocab_size"], 3, kw["n_positions"])
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, _ = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])  # HF shifts the labels inside; we take them shifted
    assert (logits - ref.logits).abs().max() < 1e-5
    assert abs(loss.item() - ref.loss.item()) < 1e-5


def test_ignore_index_matches_hf_labels():
    hf, ours = make_pair(**SMALL_CONFIGS[0])
    idx = tokens(101, 2, 20)
    labels = idx.clone()
    labels[:, 5:9] = -100
    with torch.no_grad():
        ref = hf(idx, labels=labels).loss
        _, loss = ours(idx[:, :-1], labels[:, 1:])
    assert abs(loss.item() - ref.item()) < 1e-6


def test_full_config_logits_match_hf(full_pair):
    hf, ours = full_pair
    hf.eval(), ours.eval()
    idx = tokens(50257, 2, 64)
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max() < 1e-4


@pytest.mark.parametrize("kw", SMALL_CONFIGS[:2])
def test_gradients_match_hf(kw):
    hf, ours = make_pair(**kw)
    idx = tokens(kw["vocab_size"], 4, kw["n_positions"])  # 4 * 36 rows: several chunks of the fused loss
    labels = idx.clone()
    labels[1, 2:4] = -100
    hf(idx, labels=labels).loss.backward()
    ours(idx[:, :-1], labels[:, 1:])[1].backward()  # with grad enabled: the chunked fused loss
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        ref = hf_grads[name].t() if name.endswith(CONV1D_SUFFIXES) else hf_grads[name]
        assert torch.allclose(p.grad, ref, atol=1e-6, rtol=1e-4), name


def test_round_trips_give_equal_logits(tmp_path):
    hf, ours = make_pair(**SMALL_CONFIGS[0])
    idx = tokens(101, 2, 37)
    hf.eval()
    with torch.no_grad():
        ref = hf(idx).logits
    # HF -> ours -> HF (in memory)
    back = GPT2LMHeadModel(hf.config).eval()
    back.load_state_dict(hf_state_dict(ours), strict=False)
    back.tie_weights()
    # ours -> save_pretrained -> GPT2LMHeadModel.from_pretrained
    save_pretrained(ours, tmp_path)
    loaded, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.equal(back(idx).logits, ref)
        assert torch.equal(loaded.eval()(idx).logits, ref)


def test_from_pretrained_reads_every_hf_layout(tmp_path):
    hf, _ = make_pair(dropout=0.1, **SMALL_CONFIGS[0])  # in train mode dropout would make the logits differ
    idx = tokens(101, 1, 10)
    with torch.no_grad():
        ref = hf.eval()(idx).logits
    hf.save_pretrained(tmp_path / "safetensors")
    hf.save_pretrained(tmp_path / "safetensors-shards", max_shard_size="100KB")  # model.safetensors.index.json
    for folder in ["bin", "bin-shards", "compiled", "bare"]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(hf.config.to_json_string())
    # pytorch_model.bin, one file and sharded, as huggingface_hub writes them (as transformers 4's save_pretrained)
    for folder, shard_size in [("bin", "5GB"), ("bin-shards", "100KB")]:
        save_torch_state_dict(hf.state_dict(), tmp_path / folder, max_shard_size=shard_size, safe_serialization=False)
    # pytorch_model.bin from a torch.compile'd model, and GPT2Model keys without 'transformer.'
    for folder, rename in [
        ("compiled", lambda n: "_orig_mod." + n),
        ("bare", lambda n: n.removeprefix("transformer.")),
    ]:
        torch.save({rename(n): t for n, t in hf.state_dict().items()}, tmp_path / folder / "pytorch_model.bin")
    assert len(list((tmp_path / "safetensors-shards").glob("model-*.safetensors"))) > 1
    assert len(list((tmp_path / "bin-shards").glob("pytorch_model-*.bin"))) > 1
    for folder in ["safetensors", "safetensors-shards", "bin", "bin-shards", "compiled", "bare"]:
        model = from_pretrained(tmp_path / folder)
        assert not model.training  # eval mode, as HF's from_pretrained: the README's "same logits" as they are
        with torch.no_grad():
            assert (model(idx)[0] - ref).abs().max() < 1e-6, folder


def test_hub_models_fetch_config_and_one_format_of_weights(tmp_path, monkeypatch):
    """The Hub played by local folders: a repo with both formats gives its safetensors alone, one with
    sharded pickles those shards."""
    import huggingface_hub

    hf, _ = make_pair(**SMALL_CONFIGS[0])
    hub = tmp_path / "hub"
    hf.save_pretrained(hub / "both")
    save_torch_state_dict(hf.state_dict(), hub / "both", safe_serialization=False)
    (hub / "bin-shards").mkdir()
    (hub / "bin-shards" / "config.json").write_text(hf.config.to_json_string())
    save_torch_state_dict(hf.state_dict(), hub / "bin-shards", max_shard_size="100KB", safe_serialization=False)

    def snapshot_download(repo_id, allow_patterns):
        snapshot = tmp_path / "cache" / repo_id
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in (hub / repo_id).iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):  # as huggingface_hub matches
                shutil.copy(path, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # no local directory is called like the repos
    idx = tokens(101, 1, 10)
    with torch.no_grad():
        ref = hf.eval()(idx).logits
    for repo, fetched in [
        ("both", {"config.json", "model.safetensors"}),
        ("bin-shards", {p.name for p in (hub / "bin-shards").iterdir()}),
    ]:
        model = from_pretrained(repo)
        assert {p.name for p in (tmp_path / "cache" / repo).iterdir()} == fetched
        with torch.no_grad():
            assert (model(idx)[0] - ref).abs().max() < 1e-6, repo


def test_default_config_size_and_init_match_hf(full_pair):
    hf, _ = full_pair
    torch.manual_seed(1)
    ours = GPT(GPTConfig())
    assert ours.num_params() == 124_439_808 == hf.num_parameters()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params[name]
        for stat in (torch.mean, torch.std):
            assert abs(stat(p).item() - stat(ref).item()) < 2e-4, (name, stat.__name__)
    block = ours.transformer.h[0]
    assert abs(block.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(24)) < 1e-4
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 1e-4
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_optimizer_groups_match_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    hf, ours = make_pair(**SMALL_CONFIGS[0])
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.01, report_to=[])
    decay_names = set(Trainer(model=hf, args=args).get_decay_parameter_names(hf))
    decay_names.remove("lm_head.weight")  # HF lists the tied embedding under both names
    ours_by_id = {id(p): n for n, p in ours.named_parameters()}
    groups = adamw(ours, lr=1e-3, weight_decay=0.01).param_groups
    assert {ours_by_id[id(p)] for p in groups[0]["params"]} == decay_names
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(ours.parameters()))


def test_dropout_acts_in_train_mode_only():
    _, ours = make_pair(dropout=0.1, **SMALL_CONFIGS[2])
    idx = tokens(257, 2, 16)
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(idx)[0], ours(idx)[0])
        ours.train()
        assert not torch.equal(ours(idx)[0], ours(idx)[0])


def test_bad_input_gives_clear_errors(tmp_path):
    hf, ours = make_pair(**SMALL_CONFIGS[0])
    with pytest.raises(ValueError, match="38 tokens exceed the context of 37 tokens"):
        ours(tokens(101, 1, 38))
    state = hf.state_dict()
    with pytest.raises(ValueError, match="missing .*'transformer.h.1.mlp.c_fc.weight'"):
        load_hf_state_dict(ours, {n: t for n, t in state.items() if n != "transformer.h.1.mlp.c_fc.weight"})
    with pytest.raises(ValueError, match="has shape"):
        load_hf_state_dict(ours, {**state, "transformer.wpe.weight": torch.zeros(36, 48)})
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_hf_state_dict(ours, {**state, "transformer.h.9.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="model_type None"):
        config_from_hf({"n_layer": 2, "learning_rate": 1e-3})  # e.g. a training config, not a model's
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf({**hf_config(GPTConfig()), "activation_function": "relu"})
    with pytest.raises(UserError, match="has none of model.safetensors, .*pytorch_model.bin"):
        (tmp_path / "config.json").write_text(json.dumps(hf_config(GPTConfig())))
        from_pretrained(tmp_path)
    with pytest.raises(UserError, match="could not be fetched"):
        from_pretrained("no-such-user/no-such-model")
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=50, n_head=3)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"n_embd": "48"}, 'config.json sets n_embd="48"; set it to a positive integer'),
        ({"n_head": 0}, "config.json sets n_head=0; set it to a positive integer"),
        ({"n_layer": 2.0}, "config.json sets n_layer=2.0; set it to a positive integer"),
        ({"vocab_size": -1}, "config.json sets vocab_size=-1; set it to a positive integer"),
        ({"n_positions": True}, "config.json sets n_positions=true; set it to a positive integer"),
        ({"n_head": 5}, "config.json: n_embd=48 is not divisible by n_head=5"),
        (
            {"resid_pdrop": 1.0, "embd_pdrop": 1.0, "attn_pdrop": 1.0},
            r"sets resid_pdrop=1.0; set it to a number in \[0, 1\)",
        ),
        ({"layer_norm_epsilon": 0}, "sets layer_norm_epsilon=0; set it to a finite number above 0"),
        ({"initializer_range": None}, "sets initializer_range=null; set it to a finite number, 0 or more"),
        ({"n_inner": 192.0}, r"sets n_inner=192.0; this model's MLP is 4 \* n_embd = 192 wide: set it to 192 or null"),
    ],
)
def test_each_config_json_value_is_checked_naming_its_key(edit, message):
    """A hand-edited config.json is one line naming the key, not a TypeError or ZeroDivisionError later."""
    saved = hf_config(GPTConfig(n_layer=2, n_head=3, n_embd=48, block_size=37, vocab_size=101))
    with pytest.raises(UserError, match=message):
        config_from_hf({**saved, **edit})


def test_a_config_json_without_a_size_or_not_an_object_is_named():
    saved = hf_config(GPTConfig())
    del saved["n_head"]
    with pytest.raises(UserError, match="config.json has no n_head; add it, a positive integer"):
        config_from_hf(saved)
    with pytest.raises(UserError, match="config.json holds a JSON list; expected an object"):
        config_from_hf([saved])


def loss_and_grads(loss_fn, x, weight, targets, micro_steps=1):
    """The loss and the gradients of x and weight, accumulated over micro_steps calls scaled by 1/micro_steps."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    for _ in range(micro_steps):
        loss = loss_fn(x, weight, targets)
        (loss / micro_steps).backward()
    return loss.detach(), x.grad, weight.grad


def plain_cross_entropy(x, weight, targets):
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, weight).float(), targets, ignore_index=-100)


def fused_loss_as_run_in(case: str):
    """linear_cross_entropy compiled for the "compiled" case, and the autocast of the "bf16 autocast" case."""
    from loss import linear_cross_entropy

    fused = (
        torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
        if case == "compiled"
        else linear_cross_entropy
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if case == "bf16 autocast" else contextlib.nullcontext()
    return fused, autocast


@pytest.mark.parametrize(
    "case", ["chunks", "ignored targets", "fewer rows than a chunk", "bf16 autocast", "accumulation", "compiled"]
)
def test_fused_loss_matches_cross_entropy(case):
    from loss import linear_cross_entropy

    torch.manual_seed(0)
    rows = 20 if case == "fewer rows than a chunk" else 300  # chunks of 32 rows (x's width on CPU)
    x, weight = torch.randn(rows, 32), torch.randn(1000, 32) * 0.5
    targets = torch.randint(0, 1000, (rows,))
    if case == "ignored targets":
        targets[::3] = -100
    fused, autocast = fused_loss_as_run_in(case)
    micro_steps = 2 if case == "accumulation" else 1
    with autocast:
        (loss, gx, gw), (ref_loss, ref_gx, ref_gw) = (
            loss_and_grads(fn, x, weight, targets, micro_steps) for fn in (fused, plain_cross_entropy)
        )
    tolerance = 0.02 if case == "bf16 autocast" else 1e-5  # bf16 logits in both; summed in another order
    assert abs(loss.item() - ref_loss.item()) < tolerance * ref_loss.item()
    assert (gx - ref_gx).abs().max() < tolerance * ref_gx.abs().max()
    assert (gw - ref_gw).abs().max() < tolerance * ref_gw.abs().max()
    assert gw.dtype == gx.dtype == torch.float32
    with torch.no_grad(), autocast:  # evaluation takes the loss-only path
        assert abs(linear_cross_entropy(x, weight, targets).item() - ref_loss.item()) < tolerance * ref_loss.item()


def test_fused_loss_checks_targets_and_agrees_on_all_ignored_batches():
    from loss import linear_cross_entropy

    x, weight = torch.randn(10, 8), torch.randn(50, 8)
    for bad in (-5, 50):
        targets = torch.zeros(10, dtype=torch.long)
        targets[3] = bad
        with pytest.raises(IndexError):
            plain_cross_entropy(x, weight, targets)
        with pytest.raises(RuntimeError, match=r"targets must be in \[0, 50\) or -100"):
            loss_and_grads(linear_cross_entropy, x, weight, targets)
    ignored = torch.full((10,), -100)
    loss, gx, gw = loss_and_grads(linear_cross_entropy, x, weight, ignored)
    ref_loss, ref_gx, ref_gw = loss_and_grads(plain_cross_entropy, x, weight, ignored)
    assert loss.isnan() and ref_loss.isnan() and linear_cross_entropy(x, weight, ignored).isnan()
    assert torch.equal(gx, ref_gx) and torch.equal(gw, ref_gw)  # zeros: nothing to learn from


def tied_weight_and_seen(vocab_size=1000, seen_tokens=300, width=32):
    """A weight (vocab_size, width) whose rows of the tokens outside `seen` are tied, as train.py starts them."""
    from loss import tie_unseen_rows

    torch.manual_seed(0)
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    seen[torch.randperm(vocab_size)[:seen_tokens]] = True
    weight = torch.randn(vocab_size, width) * 0.5
    tie_unseen_rows(weight, seen)
    return weight, seen


@pytest.mark.parametrize("case", ["fp32", "bf16 autocast", "compiled"])
def test_the_compact_softmax_is_the_whole_vocabularys(case):
    from loss import CompactVocab, linear_cross_entropy

    weight, seen = tied_weight_and_seen()
    vocab = CompactVocab.of(weight, seen)
    assert len(vocab.column_rows) == 301  # 300 seen tokens and one column for the other 700
    seen_ids = seen.nonzero().squeeze(1)
    x, targets = torch.randn(300, 32), seen_ids[torch.randint(0, 300, (300,))]
    targets[::7] = -100
    compact, autocast = fused_loss_as_run_in(case)
    with autocast:
        loss, gx, gw = loss_and_grads(lambda x, w, t: compact(x, w, t, vocab), x, weight, targets)
        ref_loss, ref_gx, ref_gw = loss_and_grads(plain_cross_entropy, x, weight, targets)
    tolerance = 0.02 if case == "bf16 autocast" else 1e-5  # bf16: one rounded probability for 700
    assert abs(loss.item() - ref_loss.item()) < tolerance * ref_loss.item()
    assert (gx - ref_gx).abs().max() < tolerance * ref_gx.abs().max()
    assert (gw - ref_gw).abs().max() < tolerance * ref_gw.abs().max()
    unseen_grads = gw[~seen]
    assert (unseen_grads == unseen_grads[0]).all() and unseen_grads.abs().sum() > 0  # the tied rows stay tied
    # Evaluation may meet tokens the training data lacks: their logit is the shared row's, exactly.
    anywhere = torch.randint(0, 1000, (300,))
    assert (~seen[anywhere]).sum() > 100
    with torch.no_grad(), autocast:
        ref = plain_cross_entropy(x, weight, anywhere).item()
        assert abs(linear_cross_entropy(x, weight, anywhere, vocab).item() - ref) < tolerance * ref


def test_the_compact_softmax_needs_tied_rows_and_seen_targets():
    from loss import CompactVocab, linear_cross_entropy

    weight, seen = tied_weight_and_seen()
    untied = weight.clone()
    untied[(~seen).nonzero()[1]] += 1e-3
    assert CompactVocab.of(untied, seen) is None  # a pretrained model's rows differ: the whole softmax
    one_unseen = torch.ones(1000, dtype=torch.bool)
    one_unseen[5] = False
    assert CompactVocab.of(weight, one_unseen) is None  # nothing to gain
    vocab = CompactVocab.of(weight, seen)
    targets = seen.nonzero().squeeze(1)[:10].clone()
    targets[3] = (~seen).nonzero()[0, 0]  # learning an unseen token would give its row a gradient of its own
    with pytest.raises(RuntimeError, match="a target the training data never contains"):
        linear_cross_entropy(torch.randn(10, 32, requires_grad=True), weight, targets, vocab)
    with pytest.raises(RuntimeError, match=r"targets must be in \[0, 1000\) or -100"):
        linear_cross_entropy(torch.randn(10, 32), weight, torch.full((10,), 1000), vocab)
