"""Checkpoints: safetensors only (never pickle), written atomically, checked by sha256.

- `save_checkpoint(path, model, card)`: the weights, with the card (a JSON-able dict) in the
  file's metadata; written to a temporary file and renamed, so a crash never leaves half a file.
- `save_training_state / load_training_state`: model, EMA, optimizer and step in one file, for
  exact resume.
- `load_pretrained(name)`: a shipped checkpoint from data/checkpoints/NAME.safetensors, its
  sha256 checked against the card data/checkpoints/NAME.json, in eval mode.
- `save_pair(path, model, card)`: weights and card as one unit. Both are written in full under
  temporary names first, the new card (holding the new weights' sha256) kept as NAME.json.pending;
  then the weights are renamed into place, then the card. A reader (`matching_card`) takes the
  card whose sha256 matches the weights, so a crash between the two renames still shows a matching
  pair, and the next writer finishes the interrupted commit (`recover_pair`).
- `check_out_dir(out)`: an output folder checked (and created) before a run spends time training.

Temporary files are named FILE.PID.RANDOM.tmp; one whose process has died (SIGKILL mid-write)
is removed by the next write into that folder.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes, load_file, save_file

CHECKPOINT_DIR = Path(os.environ.get("COURSE_CHECKPOINT_DIR", Path(__file__).resolve().parents[2] / "data" / "checkpoints"))


class CheckpointError(RuntimeError):
    pass


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- files

_TMP = re.compile(r"^(?P<file>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")   # FILE.PID.RANDOM.tmp


def _check_file_path(path, what: str = "checkpoint") -> Path:
    if isinstance(path, (str, os.PathLike)) and str(path).strip():
        path = Path(path)
        if not path.is_dir():
            return path
        raise CheckpointError(f"{what} path {path} is a folder; give the file's path (NAME.safetensors)")
    raise ValueError(f"{what} path must be a non-empty str or Path, got {path!r}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temporaries(folder) -> list:
    """Remove FILE.PID.RANDOM.tmp files in `folder` left by processes that died mid-write
    (a SIGKILL skips every `finally`). Temporaries of running processes are left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TMP.match(entry.name)
        if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _default_mode() -> int:
    """0o666 less the umask: the mode open() gives a new file (mkstemp's is 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temporary(path: Path) -> Path:
    """A new empty file beside `path`, named PATH.PID.RANDOM.tmp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _fsync(path) -> None:
    """Flush a written temporary to disk and give it the usual file mode (mkstemp's is 0o600)."""
    os.chmod(path, _default_mode())
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_tensors(tensors: dict, path: Path, metadata: dict) -> Path:
    """The tensors written in full to a temporary file beside `path`; returns its path."""
    tmp = _temporary(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_save(tensors: dict, path, metadata: dict) -> None:
    path = _check_file_path(path)
    tmp = _write_tensors(tensors, path, metadata)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _card_json(card) -> str:
    if not isinstance(card, dict):
        raise TypeError(f"card must be a dict (the model card), got {type(card).__name__}")
    try:
        return json.dumps(card, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"card must hold only JSON values (str, finite numbers, lists, dicts): {e}") from e


def save_checkpoint(path, model: torch.nn.Module, card: dict | None = None) -> None:
    """Write model's weights (state_dict) to a safetensors file, atomically, card in the metadata."""
    card = {} if card is None else card
    _card_json(card)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _atomic_save(model.state_dict(), path, {"card": card})


def write_card(path, card: dict) -> None:
    """Write a card (JSON) atomically."""
    _atomic_write_text(_check_file_path(path, "card"), _card_json(card))


def _rebuild_hint(path) -> str:
    """`course train NAME` when the file is named after a recipe, else a plain instruction."""
    from course_lib.training import recipes
    name = Path(path).name.split(".")[0]
    if name in recipes.RECIPES:
        return f"Rebuild it with `course train {name}`."
    return "Write it again (save_checkpoint) or retrain the model it came from."


def _read(path, hint: str):
    path = _check_file_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} is missing. {hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({e}). {hint}") from e


def _hint(rebuild) -> str:
    return f"Rebuild it with `{rebuild}`."


def _load_into(model, state, path, hint: str):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model ({e}). {hint}") from e
    return model


def load_weights(model: torch.nn.Module, path, *, rebuild: str | None = None) -> torch.nn.Module:
    """Load the weights in `path` into `model`. rebuild: the command named in errors
    (default: `course train NAME` for a file named after a recipe)."""
    hint = _rebuild_hint(path) if rebuild is None else _hint(rebuild)
    return _load_into(model, _read(path, hint), path, hint)


def warm_start(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Start `model` from the shipped checkpoint `name` (sha256 checked): every weight they share
    is copied; a class embedding the source lacks starts at zero, so the model's output at step 0
    is exactly the source model's. Any other difference is an error. A model with its own
    `warm_start(source_model)` method (models.clip.NoisyCLIP) decides itself what it takes."""
    if callable(getattr(model, "warm_start", None)):
        return model.warm_start(load_pretrained(name))
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
    hint = (f"Delete it to start over, or pass resume=False (`course train ... --no-resume`).")
    state = _read(path, hint)
    try:
        meta = read_metadata(path)
        step = meta["step"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"training state {path} has no readable step in its metadata ({e!r}). {hint}") from e
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"training state {path} records step={step!r}, not a count >= 0. {hint}")
    _load_into(model, {k[6:]: v for k, v in state.items() if k.startswith("model.")}, path, hint)
    _load_into(ema.model, {k[4:]: v for k, v in state.items() if k.startswith("ema.")}, path, hint)
    opt_state = {}
    for k, v in state.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    sd = optimizer.state_dict()
    sd["state"] = opt_state
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"training state {path} does not fit this optimizer ({e}). {hint}") from e
    return step


def _parse_card(path: Path, hint: str) -> dict:
    if path.is_dir():
        raise CheckpointError(f"card {path} is a folder, not a JSON file. {hint}")
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"card {path} is damaged (not valid JSON: {e}). {hint}") from e
    if not isinstance(card, dict):
        raise CheckpointError(f"card {path} is damaged: it holds a {type(card).__name__}, not a JSON object. {hint}")
    return card


def read_card(name: str) -> dict:
    path = CHECKPOINT_DIR / f"{name}.json"
    hint = f"Rebuild it with `course train {name}`."
    if not path.exists():
        raise CheckpointError(f"no card {path}: the checkpoint {name!r} has not been built. {hint}")
    return _parse_card(path, hint)


# ---------------------------------------------------------------------------- weights and card as one unit

def card_path(weights) -> Path:
    """NAME.json beside NAME.safetensors."""
    weights = Path(weights)
    return weights.with_name(weights.name.split(".")[0] + ".json")


def pending_card_path(weights) -> Path:
    """NAME.json.pending: the card of a commit in progress (see save_pair)."""
    return card_path(weights).with_name(card_path(weights).name + ".pending")


def matching_card(weights, *, hint: str | None = None) -> dict:
    """The card that describes the weights file as it is now: NAME.json, or the pending card of a
    save_pair interrupted between its two renames, whichever records the file's sha256. A missing
    file, a missing or damaged card, or a sha256 no card records is a CheckpointError. Reads only."""
    weights = _check_file_path(weights)
    hint = hint or _rebuild_hint(weights)
    main, pending = card_path(weights), pending_card_path(weights)
    if not weights.exists():
        raise CheckpointError(f"checkpoint {weights} is missing. {hint}")
    if not main.exists() and not pending.exists():
        raise CheckpointError(f"checkpoint {weights} has no card {main}, so its sha256 cannot be checked. {hint}")
    digest = sha256(weights)
    cards = [_parse_card(c, hint) for c in (main, pending) if c.exists()]
    for card in cards:
        if card.get("sha256") == digest:
            return card
    raise CheckpointError(f"checkpoint {weights} is damaged: its sha256 {digest[:12]}... does not match "
                          f"the card's {str(cards[0].get('sha256'))[:12]}.... {hint}")


def recover_pair(weights) -> None:
    """Finish or undo a save_pair that was interrupted: a pending card that matches the weights is
    renamed into place (the weights were already replaced), one that does not is removed (the
    weights were never replaced). Temporaries of dead processes are removed too. For writers."""
    weights = Path(weights)
    clean_stale_temporaries(weights.parent)
    pending = pending_card_path(weights)
    if not pending.exists():
        return
    try:
        card = json.loads(pending.read_text())
        matches = weights.exists() and isinstance(card, dict) and card.get("sha256") == sha256(weights)
    except (OSError, ValueError):
        matches = False
    if matches:
        os.replace(pending, card_path(weights))
    else:
        pending.unlink(missing_ok=True)


def save_pair(path, model: torch.nn.Module, card: dict) -> dict:
    """Write NAME.safetensors and its card NAME.json so that a reader only ever sees a matching pair.

    1. the weights, in full, to a temporary file; the card gets their file name, bytes and sha256;
    2. the card, in full, to NAME.json.pending;
    3. the weights renamed onto NAME.safetensors (now the pending card is the one that matches);
    4. the pending card renamed onto NAME.json.
    A crash before 3 leaves the old pair; between 3 and 4 matching_card finds the pending card and
    the next writer renames it (recover_pair). Returns the card as written."""
    path = _check_file_path(path)
    _card_json(card)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    recover_pair(path)
    tmp = _write_tensors(model.state_dict(), path, {"card": card})       # 1.
    try:
        card = {**card, "file": path.name, "bytes": tmp.stat().st_size, "sha256": sha256(tmp)}
        pending = pending_card_path(path)
        _atomic_write_text(pending, _card_json(card))                     # 2.
        os.replace(tmp, path)                                             # 3.
        os.replace(pending, card_path(path))                              # 4.
    finally:
        tmp.unlink(missing_ok=True)
    return card


def load_verified(model: torch.nn.Module, path, *, hint: str | None = None):
    """Load `path` into `model` after checking its bytes against its card's sha256 (one read of the
    file, so what is checked is what is loaded). Returns (model, card)."""
    path = _check_file_path(path)
    hint = hint or _rebuild_hint(path)
    card = matching_card(path, hint=hint)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != card["sha256"]:
        raise CheckpointError(f"checkpoint {path} changed while it was read. {hint}")
    try:
        state = load_bytes(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({e}). {hint}") from e
    return _load_into(model, state, path, hint), card


def check_out_dir(out) -> Path:
    """The output folder `out`, created if needed and checked to be writable, before any training:
    an empty path, a file in its place or a folder one cannot write to is a ValueError now rather
    than at the first checkpoint, steps later."""
    if out is None or not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ValueError(f"the output folder (--out / out_dir) must be a non-empty path, got {out!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {out}: {e.strerror or e}") from e
    return out


def refuse_shipped(out, name: str) -> None:
    """A CheckpointError when `out` is the shipped folder and it already holds NAME: shipped
    checkpoints are replaced only when asked (--out given explicitly, or --force)."""
    out = Path(out)
    shipped = CHECKPOINT_DIR / f"{name}.safetensors"
    if shipped.exists() and out.resolve() == CHECKPOINT_DIR.resolve():
        raise CheckpointError(f"{shipped} is a shipped checkpoint and would be replaced. Train elsewhere with "
                              f"--out DIR, or replace it on purpose with --force (or --out {CHECKPOINT_DIR}).")


def load_pretrained(name: str, *, device=None) -> torch.nn.Module:
    """A shipped checkpoint by name (see `course list`), weights checked by sha256, in eval mode, on
    `device` (default the CPU; pass runtime.device() for the GPU when present; a CUDA request without
    CUDA is runtime.DeviceError)."""
    from course_lib import runtime
    from course_lib.training import recipes
    recipe = recipes.get(name)  # unknown names fail here, listing the known ones
    hint = f"Rebuild it with `course train {name}`."
    path = CHECKPOINT_DIR / f"{name}.safetensors"
    if not (CHECKPOINT_DIR / f"{name}.json").exists() and not pending_card_path(path).exists():
        read_card(name)   # the "has not been built" error
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a safetensors file. {hint}")
    model, _ = load_verified(recipe.build_model(), path, hint=hint)
    return model.to(runtime.device(device) if device is not None else "cpu").eval().requires_grad_(False)


# ---------------------------------------------------------------------------- checks of a training run

def check_steps(steps) -> int:
    """A step count: an integer >= 0 (a float, bool or string is a ValueError, not a silent cast)."""
    try:
        if isinstance(steps, bool):
            raise TypeError
        steps = operator.index(steps)
    except TypeError:
        raise ValueError(f"steps must be >= 0 (an integer number of optimizer steps), got {steps!r}") from None
    if steps < 0:
        raise ValueError(f"steps must be >= 0 (an integer number of optimizer steps), got {steps!r}")
    return steps


def check_resume(state_path, start: int, steps: int) -> None:
    """A state file past the asked step count is an error, not a run that silently trains nothing
    and reports `steps` on its card."""
    if start > steps:
        raise ValueError(f"the training state {state_path} is already at step {start}, beyond steps={steps}: "
                         f"ask for steps >= {start} to continue it, or start over with resume=False "
                         f"(`course train ... --no-resume`)")
