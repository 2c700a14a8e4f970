"""Hugging Face GPT-2 checkpoints: config.json both ways, HF's tensor names and layouts, reading
single or sharded safetensors and .bin weights, fetching from the Hub, saving what GPT2LMHeadModel loads.

Our parameter names are HF's; only HF's Conv1D weights, stored (in, out), are transposed to nn.Linear's (out, in).
"""

import json
import math
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

from checksums import CHECKSUMS, Damaged, checksum_problem
from common import UserError, first_sentence
from model import GPT, GPTConfig

# Our Linear layers that are Conv1D in HF: their weights are stored transposed there.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# An HF checkpoint's weights, looked for in this order: one file or an index of shards, safetensors
# before pickles; and the files to fetch from the Hub for each format, safetensors first.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_WEIGHT_PATTERNS = (WEIGHT_FILES[:2] + ("model-*.safetensors",), WEIGHT_FILES[2:] + ("pytorch_model-*.bin",))
MODEL_FILES = ("config.json", "model.safetensors")  # what save_pretrained writes


def hf_config(config: GPTConfig) -> dict:
    """GPTConfig as the config.json of an HF GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": config.initializer_range,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    }


# What config_from_hf reads of a config.json: (its default where GPT-2's may leave it out, None where it
# never does; what the value must be, as an error says it; the check of a value as json reads it).
POSITIVE_INTEGER = ("a positive integer", lambda value: type(value) is int and value > 0)
PROBABILITY = ("a number in [0, 1)", lambda value: type(value) in (int, float) and 0 <= value < 1)
CONFIG_VALUES = {
    "n_positions": (None, POSITIVE_INTEGER),
    "vocab_size": (None, POSITIVE_INTEGER),
    "n_layer": (None, POSITIVE_INTEGER),
    "n_head": (None, POSITIVE_INTEGER),
    "n_embd": (None, POSITIVE_INTEGER),
    "resid_pdrop": (0.1, PROBABILITY),
    "embd_pdrop": (0.1, PROBABILITY),
    "attn_pdrop": (0.1, PROBABILITY),
    "layer_norm_epsilon": (
        1e-5,
        ("a finite number above 0", lambda value: type(value) in (int, float) and 0 < value < math.inf),
    ),
    "initializer_range": (
        0.02,
        ("a finite number, 0 or more", lambda value: type(value) in (int, float) and 0 <= value < math.inf),
    ),
}


def config_from_hf(hf: dict) -> GPTConfig:
    """Reads an HF GPT-2 config.json; refuses variants this model does not implement, and any value of the
    wrong type or range (a hand-edited file), naming its key."""
    if not isinstance(hf, dict):
        raise UserError(f"config.json holds a JSON {type(hf).__name__}; expected an object of GPT-2's keys")
    if hf.get("model_type") != "gpt2":
        raise UserError(
            f"config.json has model_type {hf.get('model_type')!r}; only HF GPT-2 checkpoints (model_type 'gpt2') load"
        )
    values = {}
    for key, (default, (said, holds)) in CONFIG_VALUES.items():
        if key not in hf and default is None:
            raise UserError(
                f"config.json has no {key}; add it, {said} (the value the checkpoint was saved with), "
                "or pass an intact checkpoint"
            )
        values[key] = hf.get(key, default)
        if not holds(values[key]):
            raise UserError(
                f"config.json sets {key}={json.dumps(values[key])}; set it to {said} "
                "(the value the checkpoint was saved with)"
            )
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "tie_word_embeddings": (True,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise UserError(f"config.json sets {key}={hf[key]!r}; this model supports only {allowed[0]!r}")
    n_inner = 4 * values["n_embd"]
    if hf.get("n_inner") is not None and (type(hf["n_inner"]) is not int or hf["n_inner"] != n_inner):
        raise UserError(
            f"config.json sets n_inner={json.dumps(hf['n_inner'])}; this model's MLP is 4 * n_embd = {n_inner} wide: "
            f"set it to {n_inner} or null"
        )
    dropouts = {values[key] for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) > 1:
        raise UserError(
            f"config.json has different dropouts {sorted(dropouts)}; this model uses one rate for all three"
        )
    try:
        return GPTConfig(
            block_size=values["n_positions"],
            vocab_size=values["vocab_size"],
            n_layer=values["n_layer"],
            n_head=values["n_head"],
            n_embd=values["n_embd"],
            dropout=float(dropouts.pop()),
            layer_norm_epsilon=float(values["layer_norm_epsilon"]),
            initializer_range=float(values["initializer_range"]),
        )
    except UserError as e:  # GPTConfig's own check: n_head must divide n_embd
        raise UserError(f"config.json: {e}") from None


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under HF's names and layouts (no lm_head.weight: it is tied to wte)."""
    return {
        name: (t.t() if name.endswith(CONV1D_SUFFIXES) else t).contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }


def load_hf_state_dict(model: GPT, hf_state: dict[str, torch.Tensor]) -> None:
    """Copies HF-named weights into model; any missing, unexpected or misshaped tensor is an error."""
    ours = model.state_dict()
    loaded = {}
    for name, tensor in hf_state.items():
        name = name.replace("_orig_mod.", "")  # saved from a torch.compile'd model
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model checkpoints (e.g. the original 'gpt2') lack the prefix
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old HF versions saved the causal mask as a buffer
        if name not in ours:
            raise UserError(f"checkpoint has unexpected tensor '{name}'; is it a GPT-2 checkpoint?")
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if tensor.shape != ours[name].shape:
            raise UserError(
                f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(ours[name].shape)}"
            )
        loaded[name] = tensor
    loaded.setdefault("lm_head.weight", loaded.get("transformer.wte.weight"))
    missing = [n for n in ours if n not in loaded or loaded[n] is None]
    if missing:
        raise UserError(
            f"checkpoint is missing {len(missing)} tensors, e.g. '{missing[0]}'; it is incomplete or not GPT-2"
        )
    model.load_state_dict(loaded)


def save_pretrained(model: GPT, directory) -> None:
    """Writes config.json + model.safetensors that GPT2LMHeadModel.from_pretrained loads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")


def from_pretrained(path_or_name: str, dropout: float | None = None) -> GPT:
    """Loads an HF GPT-2 checkpoint directory (or a Hub name such as 'gpt2', when online), in eval
    mode as HF's from_pretrained: call .train() to train it. Weights come from model.safetensors,
    pytorch_model.bin (weights_only: no code runs) or either's shards (*.index.json). A directory with
    a checksums.sha256 (train.py's checkpoints) has its model files verified first (Damaged if not)."""
    directory = Path(path_or_name)
    if not directory.is_dir():
        directory = download(str(path_or_name))
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{config_path} not found; expected an HF GPT-2 checkpoint directory (config.json and its weights)"
        )
    if (directory / CHECKSUMS).is_file() and (problem := checksum_problem(directory, MODEL_FILES)):
        raise Damaged(problem, "pass an intact HF GPT-2 directory")
    try:
        try:
            config = config_from_hf(json.loads(config_path.read_text()))
        except UserError as e:  # its messages start with "config.json": which one
            raise UserError(f"{directory}/{e}") from None
        weights = read_weights(directory)
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        KeyError,
        SafetensorError,
        pickle.UnpicklingError,
        RuntimeError,
    ) as e:
        # a damaged file, or a config.json without a key GPT-2 needs; the readers have their own error types
        raise UserError(
            f"{directory}: its model does not load ({first_sentence(e)}); pass an intact HF GPT-2 directory "
            "(a damaged ckpt_* directory: move it aside, and --resume=auto takes the one before)"
        ) from None
    if dropout is not None:
        config.dropout = dropout
    model = GPT(config)
    load_hf_state_dict(model, weights)
    return model.eval()


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: from its one weights file, or from the shards its index lists."""
    from safetensors.torch import load_file

    found = next((name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if found is None:
        raise UserError(f"{directory} has none of {', '.join(WEIGHT_FILES)}; is it an HF GPT-2 checkpoint?")
    index = json.loads((directory / found).read_text()) if found.endswith(".index.json") else None
    state = {}
    for name in sorted(set(index["weight_map"].values())) if index else [found]:
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path} not found, though {found} lists it; download or copy the checkpoint again")
        state.update(
            load_file(path)
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    return state


def download(name: str) -> Path:
    """Fetches config.json and the weights of a Hub model: its safetensors (one file or shards) if it has
    them, else its pytorch_model.bin (likewise). Offline, or from a local cache with HF_HUB_OFFLINE=1,
    it fails fast with one line."""
    from huggingface_hub import snapshot_download

    try:
        for weights in HUB_WEIGHT_PATTERNS:
            directory = Path(snapshot_download(name, allow_patterns=["config.json", *weights]))
            if any((directory / weights_file).is_file() for weights_file in WEIGHT_FILES):
                return directory
    except Exception as e:  # the Hub client raises many types (connection, auth, not found)
        raise UserError(
            f"'{name}' is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}); pass a local checkpoint directory, or a Hub name such as gpt2 when online"
        ) from None
    raise UserError(f"the Hub model '{name}' has none of {', '.join(WEIGHT_FILES)}; is it a GPT-2 model?")
