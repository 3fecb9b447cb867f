"""The training loop: exact resume (bit for bit), the losses it optimises, and its bookkeeping."""
import dataclasses

import pytest
import torch

from course_lib.nn.classifier import ClassifierConfig
from course_lib.training import recipes, trainer


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def _tiny(**changes):
    base = dict(steps=6, batch_size=4, checkpoint_every=3, warmup=2)
    return dataclasses.replace(recipes.get("tiny_ddpm"), **(base | changes))


def _assert_bitwise_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"differ after resume: {different[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_exact_resume(tmp_path, monkeypatch, bf16):
    """3 steps, stop, a new call resumes to 6: the same weights, EMA and losses as 6 straight steps."""
    monkeypatch.setenv("COURSE_BF16", "1" if bf16 else "0")   # bf16 autocast even on a CPU without native bf16
    recipe, data = _tiny(bf16=bf16), _data()
    straight = trainer.train(recipe, tmp_path / "straight", data=data, progress=False, log_every=1)
    first = trainer.train(recipe, tmp_path / "resumed", steps=3, data=data, progress=False, log_every=1)
    assert first.steps == 3 and (tmp_path / "resumed" / "tiny_ddpm.state.safetensors").exists()
    resumed = trainer.train(recipe, tmp_path / "resumed", data=data, progress=False, log_every=1)
    assert resumed.start_step == 3 and resumed.steps == 6 and straight.start_step == 0
    _assert_bitwise_equal(straight.raw_model, resumed.raw_model)
    _assert_bitwise_equal(straight.model, resumed.model)  # the EMA
    assert straight.losses == first.losses + resumed.losses
    # and the run really trained: the weights moved from their initialisation
    torch.manual_seed(recipe.seed)
    init = recipe.build_model()
    assert not torch.equal(init.conv_out.weight, straight.raw_model.conv_out.weight)


def test_resume_false_starts_over_and_finished_runs_do_nothing(tmp_path):
    recipe, data = _tiny(steps=2, checkpoint_every=1), _data(8)
    a = trainer.train(recipe, tmp_path, data=data, progress=False)
    again = trainer.train(recipe, tmp_path, data=data, progress=False)  # already at step 2
    assert again.start_step == 2 and again.losses == []
    _assert_bitwise_equal(a.raw_model, again.raw_model)
    fresh = trainer.train(recipe, tmp_path, data=data, progress=False, resume=False)
    assert fresh.start_step == 0
    _assert_bitwise_equal(a.raw_model, fresh.raw_model)  # same seed, same steps


def test_result_and_callback(tmp_path):
    recipe, data = _tiny(steps=3, checkpoint_every=100), _data(8)
    seen = []
    result = trainer.train(recipe, tmp_path, data=data, progress=False, log_every=2,
                           callback=lambda step, loss: seen.append(step))
    assert seen == [0, 2] and [s for s, _ in result.losses] == [0, 2]
    assert not result.model.training and result.raw_model.training
    assert result.seconds > 0
    # the last step is always checkpointed, whatever checkpoint_every says
    assert (tmp_path / "tiny_ddpm.state.safetensors").exists()
    with pytest.raises(ValueError, match="steps must be >= 0"):
        trainer.train(recipe, tmp_path, steps=-1, data=data, progress=False)


def test_lr_warm_up():
    r = _tiny(lr=1e-3, warmup=4)
    assert [trainer.lr_at(r, k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert trainer.lr_at(dataclasses.replace(r, warmup=0), 0) == 1e-3


def test_step_generators_are_distinct_and_reproducible():
    a = torch.randn(4, generator=trainer.step_generator(0, 5))
    assert torch.equal(a, torch.randn(4, generator=trainer.step_generator(0, 5)))
    assert not torch.equal(a, torch.randn(4, generator=trainer.step_generator(0, 6)))
    assert not torch.equal(a, torch.randn(4, generator=trainer.step_generator(1, 5)))


def _classifier_recipe(**changes):
    return dataclasses.replace(recipes.get("fashion_classifier"), model_config=ClassifierConfig(width=4, feature_dim=16),
                               **({"bf16": False, "warmup": 1, "checkpoint_every": 1000} | changes))


def test_classifier_overfits_a_tiny_problem(tmp_path):
    """Two classes that differ in which half (top or bottom) is bright: the loss must fall."""
    n = 16
    y = torch.arange(n) % 2
    x = torch.full((n, 1, 28, 28), -1.0)
    x[y == 0, :, :14] = 1.0
    x[y == 1, :, 14:] = 1.0
    x += 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    recipe = _classifier_recipe(steps=30, batch_size=16, lr=1e-2, weight_decay=0.0)
    result = trainer.train(recipe, tmp_path, data=(x, y), progress=False, log_every=1)
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3


def test_noisy_classify_task_runs(tmp_path):
    recipe = _classifier_recipe(task="noisy_classify", steps=1, batch_size=4, T=10)
    result = trainer.train(recipe, tmp_path, data=_data(8), progress=False)
    assert len(result.losses) == 1 and result.losses[0][1] > 0


def test_diffusion_loss_with_labels_and_learned_variance(monkeypatch):
    """A class-conditional, learned-variance model gets labels (some dropped to the null class)."""
    recipe = _tiny(model_config=dataclasses.replace(recipes.get("tiny_ddpm").model_config, num_classes=10,
                                                    learn_sigma=True), label_dropout=0.5, bf16=False)
    model = recipe.build_model()
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, t, y=None: seen.append(y) or forward(x, t, y))
    x0, y = _data(8)
    loss = trainer.diffusion_loss(model, recipe, x0, y, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    kept = seen[0] == y
    assert kept.any() and (~kept).any() and bool((seen[0][~kept] == 10).all())


def test_init_from_starts_from_the_shipped_weights(tmp_path, monkeypatch):
    """A warm-started class-conditional recipe: at step 0 it is the unconditional source for every label,
    and training from there moves the class embedding away from zero."""
    from course_lib.training import checkpoints
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", tmp_path)
    torch.manual_seed(1)
    source = recipes.get("tiny_ddpm").build_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    path = tmp_path / "tiny_ddpm.safetensors"
    checkpoints.save_checkpoint(path, source)
    checkpoints.write_card(tmp_path / "tiny_ddpm.json", {"sha256": checkpoints.sha256(path)})
    cfg = dataclasses.replace(recipes.get("tiny_ddpm").model_config, num_classes=10)
    recipe = _tiny(model_config=cfg, init_from="tiny_ddpm", label_dropout=0.1)
    start = trainer.train(recipe, tmp_path / "run0", steps=0, data=_data(8), progress=False)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 150])
    with torch.no_grad():
        for y in (torch.tensor([0, 9]), torch.tensor([10, 10])):
            torch.testing.assert_close(start.model(x, t, y), source.eval()(x, t), rtol=0, atol=0)
    moved = trainer.train(recipe, tmp_path / "run3", steps=3, data=_data(8), progress=False)
    assert moved.raw_model.class_embed.weight.abs().sum() > 0


def test_class_embedding_learning_rate_multiplier():
    cfg = dataclasses.replace(recipes.get("tiny_ddpm").model_config, num_classes=10)
    recipe = _tiny(model_config=cfg, class_embed_lr_mult=20.0)
    model = recipe.build_model()
    rest, embed = trainer.param_groups(model, recipe)
    assert [p is model.class_embed.weight for p in embed["params"]] == [True] and embed["lr_mult"] == 20.0
    assert rest["lr_mult"] == 1.0 and len(rest["params"]) == len(list(model.parameters())) - 1
    assert len(trainer.param_groups(recipes.get("tiny_ddpm").build_model(), recipe)) == 1   # no class embedding
