"""Checkpoints: safetensors round trips, atomic writes, and clear errors (naming the file and
the `course train NAME` that rebuilds it) for every way a shipped checkpoint can be wrong."""
import json
import os

import pytest
import torch

from course_lib.training import checkpoints, recipes
from course_lib.training.checkpoints import CheckpointError
from course_lib.training.ema import EMA

NAME = "tiny_ddpm"


def _model(seed=0):
    model = recipes.get(NAME).build_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move the zero-initialised layers too, so equality means something
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A fake shipped checkpoint: NAME.safetensors and its card NAME.json in a temporary CHECKPOINT_DIR."""
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", tmp_path)
    model = _model()
    path = tmp_path / f"{NAME}.safetensors"
    checkpoints.save_checkpoint(path, model, {"recipe": NAME})
    checkpoints.write_card(tmp_path / f"{NAME}.json", {"name": NAME, "sha256": checkpoints.sha256(path)})
    return model, path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    path = tmp_path / "sub" / "m.safetensors"  # parent folders are created
    checkpoints.save_checkpoint(path, model, {"recipe": NAME, "steps": 3})
    fresh = recipes.get(NAME).build_model()
    assert not _same_weights(fresh, model)
    assert checkpoints.load_weights(fresh, path) is fresh and _same_weights(fresh, model)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["card"]) == {"recipe": NAME, "steps": 3}


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoints.save_checkpoint(path, _model(0))
    checkpoints.save_checkpoint(path, _model(1))  # overwrite in place
    checkpoints.write_card(tmp_path / "m.json", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.safetensors"]
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}


def test_a_crash_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    checkpoints.save_checkpoint(path, _model(0))
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, _model(1))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


def test_load_pretrained(shipped):
    model, _ = shipped
    loaded = checkpoints.load_pretrained(NAME)
    assert _same_weights(loaded, model)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("keep", [0, 8, 100, 0.5])
def test_truncated_file_is_a_clear_error(shipped, keep):
    _, path = shipped
    data = path.read_bytes()
    path.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
    # the card's sha256 no longer matches
    with pytest.raises(CheckpointError, match=f"course train {NAME}") as info:
        checkpoints.load_pretrained(NAME)
    assert str(path) in str(info.value)
    # and with a card that matches the damaged file, the safetensors reader still refuses it
    checkpoints.write_card(path.with_suffix(".json"), {"sha256": checkpoints.sha256(path)})
    with pytest.raises(CheckpointError, match=f"damaged.*course train {NAME}"):
        checkpoints.load_pretrained(NAME)


def test_sha256_mismatch(shipped):
    _, path = shipped
    card = path.with_suffix(".json")
    checkpoints.write_card(card, {"sha256": "0" * 64})
    with pytest.raises(CheckpointError, match=r"sha256 .* does not match .*course train tiny_ddpm"):
        checkpoints.load_pretrained(NAME)


def test_bit_flip_is_caught_by_sha256(shipped):
    _, path = shipped
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside a tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoints.load_pretrained(NAME)


def test_missing_file_and_card(shipped):
    _, path = shipped
    path.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*course train {NAME}"):
        checkpoints.load_pretrained(NAME)
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=f"not been built.*course train {NAME}"):
        checkpoints.load_pretrained(NAME)


def test_unknown_name_lists_known(shipped):
    with pytest.raises(KeyError, match="nosuch.*known: .*tiny_ddpm"):
        checkpoints.load_pretrained("nosuch")


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoints.save_checkpoint(path, recipes.get("fashion_classifier").build_model())
    with pytest.raises(CheckpointError, match="(?s)does not fit.*course train tiny_ddpm"):
        checkpoints.load_weights(recipes.get(NAME).build_model(), path, rebuild="course train tiny_ddpm")


def test_training_state_round_trip(tmp_path):
    model = _model(0)
    ema = EMA(_model(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    path = tmp_path / "s.safetensors"
    checkpoints.save_training_state(path, model=model, ema=ema, optimizer=opt, step=7, recipe=NAME)
    model2, ema2 = _model(2), EMA(_model(3))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert checkpoints.load_training_state(path, model=model2, ema=ema2, optimizer=opt2) == 7
    assert checkpoints.read_metadata(path) == {"step": 7, "recipe": NAME, "seconds": 0.0}
    assert _same_weights(model, model2) and _same_weights(ema.model, ema2.model)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        assert s1[i].keys() == s2[i].keys()
        assert all(torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k])) for k in s1[i])


SHIPPED = sorted(p.stem for p in checkpoints.CHECKPOINT_DIR.glob("*.json"))


@pytest.mark.skipif(not SHIPPED, reason="no shipped checkpoints in data/checkpoints yet")
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_checkpoint_loads_and_matches_its_card(name):
    card = checkpoints.read_card(name)
    assert card["sha256"] == checkpoints.sha256(checkpoints.CHECKPOINT_DIR / f"{name}.safetensors")
    assert (checkpoints.CHECKPOINT_DIR / f"{name}.safetensors").stat().st_size < 10_000_000
    model = checkpoints.load_pretrained(name)
    assert not model.training
    assert type(model) is type(recipes.get(name).build_model())


def test_warm_start_adds_a_zero_class_embedding_and_keeps_the_output(shipped):
    import dataclasses
    source, _ = shipped
    cfg = dataclasses.replace(recipes.get(NAME).model_config, num_classes=10)
    model = checkpoints.warm_start(recipes.get(NAME).build_model().__class__(cfg), NAME)
    assert torch.equal(model.class_embed.weight, torch.zeros_like(model.class_embed.weight))
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 400, 999])
    with torch.no_grad():  # any label (or the null class) gives the source model's output at step 0
        torch.testing.assert_close(model(x, t, torch.tensor([2, 7, 10])), source.eval()(x, t), rtol=0, atol=0)


def test_warm_start_refuses_a_different_architecture(shipped):
    import dataclasses
    cfg = dataclasses.replace(recipes.get(NAME).model_config, base_channels=8)
    with pytest.raises(CheckpointError, match="cannot warm-start from 'tiny_ddpm'"):
        checkpoints.warm_start(recipes.get(NAME).build_model().__class__(cfg), NAME)
