"""Checkpoints: safetensors only (never pickle), written atomically, checked by sha256.

- `save_checkpoint(path, model, card)`: the weights, with the card (a JSON-able dict) in the
  file's metadata; written to a temporary file and renamed, so a crash never leaves half a file.
- `save_training_state / load_training_state`: model, EMA, optimizer and step in one file, for
  exact resume.
- `load_pretrained(name)`: a shipped checkpoint from data/checkpoints/NAME.safetensors, its
  sha256 checked against the card data/checkpoints/NAME.json, in eval mode.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = Path(os.environ.get("COURSE_CHECKPOINT_DIR", Path(__file__).resolve().parents[2] / "data" / "checkpoints"))


class CheckpointError(RuntimeError):
    pass


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save(tensors: dict, path, metadata: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, model: torch.nn.Module, card: dict | None = None) -> None:
    """Write model's weights (state_dict) to a safetensors file, atomically, card in the metadata."""
    _atomic_save(model.state_dict(), path, {"card": card or {}})


def write_card(path, card: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _read(path, rebuild: str):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} is missing. Rebuild it with `{rebuild}`.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({e}). Rebuild it with `{rebuild}`.") from e


def load_weights(model: torch.nn.Module, path, *, rebuild: str = "course train NAME") -> torch.nn.Module:
    state = _read(path, rebuild)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model ({e}). "
                              f"Rebuild it with `{rebuild}`.") from e
    return model


def warm_start(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Start `model` from the shipped checkpoint `name` (sha256 checked): every weight they share
    is copied; a class embedding the source lacks starts at zero, so the model's output at step 0
    is exactly the source model's. Any other difference is an error."""
    source = load_pretrained(name).state_dict()
    own = model.state_dict()
    missing = sorted(set(own) - set(source))
    extra = sorted(set(source) - set(own))
    reshaped = sorted(k for k in set(own) & set(source) if own[k].shape != source[k].shape)
    if extra or reshaped or any(not k.startswith("class_embed.") for k in missing):
        raise CheckpointError(f"cannot warm-start from {name!r}: it lacks {missing}, has extra {extra}, "
                              f"differs in shape at {reshaped}; only a class embedding may be new")
    with torch.no_grad():
        for k in missing:
            own[k].zero_()
    model.load_state_dict({**own, **source})
    return model


def save_training_state(path, *, model, ema, optimizer, step: int, recipe: str, seconds: float = 0.0) -> None:
    """Everything exact resume needs: weights, EMA weights, optimizer moments, step (and the
    wall time spent so far, so a resumed run's card reports the whole time)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.model.state_dict().items()}
    opt = optimizer.state_dict()
    for i, s in opt["state"].items():
        tensors |= {f"opt.{i}.{k}": torch.as_tensor(v) for k, v in s.items()}
    _atomic_save(tensors, path, {"step": step, "recipe": recipe, "seconds": seconds})


def read_metadata(path) -> dict:
    """The JSON metadata in a safetensors file's header (no tensors are read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n)).get("__metadata__", {})
    return {k: json.loads(v) for k, v in meta.items()}


def load_training_state(path, *, model, ema, optimizer) -> int:
    """Restore what save_training_state wrote; returns the step to continue from."""
    state = _read(path, "delete it and train again")
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    ema.model.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
    opt_state = {}
    for k, v in state.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    sd = optimizer.state_dict()
    sd["state"] = opt_state
    optimizer.load_state_dict(sd)
    return int(read_metadata(path)["step"])


def read_card(name: str) -> dict:
    path = CHECKPOINT_DIR / f"{name}.json"
    if not path.exists():
        raise CheckpointError(f"no card {path}: the checkpoint {name!r} has not been built. "
                              f"Rebuild it with `course train {name}`.")
    return json.loads(path.read_text())


def load_pretrained(name: str, *, device=None) -> torch.nn.Module:
    """A shipped checkpoint by name (see `course list`), weights checked by sha256, in eval mode."""
    from course_lib.training import recipes
    recipe = recipes.get(name)  # unknown names fail here, listing the known ones
    card = read_card(name)
    path = CHECKPOINT_DIR / f"{name}.safetensors"
    rebuild = f"course train {name}"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} is missing. Rebuild it with `{rebuild}`.")
    digest = sha256(path)
    if digest != card.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is damaged: its sha256 {digest[:12]}... does not match "
                              f"the card's {str(card.get('sha256'))[:12]}.... Rebuild it with `{rebuild}`.")
    model = load_weights(recipe.build_model(), path, rebuild=rebuild)
    return model.to(device or "cpu").eval().requires_grad_(False)
