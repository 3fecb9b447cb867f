"""The shapes CLIP: built by open_clip from the registered config, the compact tokenizer and its
errors, the contrastive loss against a plain implementation, matches, the noise-aware CLIP, and
open_clip's loading path on a local weights file."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from course_lib.data import shapes
from course_lib.models import clip as mclip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mclip.ShapesCLIP().eval()


def test_built_by_open_clip(model):
    import open_clip
    assert isinstance(model.clip, open_clip.CLIP)
    assert mclip.CONFIG_NAME in open_clip.list_models()
    assert model.clip.vocab_size == 64 and model.clip.context_length == 20


def test_tokenizer_maps_bpe_words_and_pads(model):
    tok = model.tokens(["a red circle", "a small blue square above a large green cross"])
    assert tok.shape == (2, 20) and tok.dtype == torch.long
    assert tok[0, 0] == mclip.SOT and tok[0, 4] == 63 and (tok[0, 5:] == 0).all()
    assert int(tok.max()) == 63                   # the end token is the largest id (argmax pooling)
    assert tok[1].tolist().index(63) == 10


def test_every_world_word_is_one_compact_token(model):
    for w in shapes.VOCABULARY:
        ids = model.tokens(f"a red circle {w}" if w not in (",",) else "a red circle,")
        assert int((ids[0] > 1).sum()) >= 4


@pytest.mark.parametrize("text, message", [("", "empty"), ("  ", "empty"), ("a red dragon", "outside the shapes vocabulary")])
def test_tokenizer_errors(model, text, message):
    with pytest.raises(ValueError, match=message):
        model.tokens(text)


def test_tokenizer_allow_empty_gives_the_null_caption(model):
    tok = model.tokenizer(["", "  ", "a red circle"], allow_empty=True)
    assert tok[0].tolist() == tok[1].tolist() == [mclip.SOT, 63] + [0] * 18
    assert tok[2].tolist() == model.tokens(["a red circle"])[0].tolist()
    with pytest.raises(TypeError, match="must be a string"):
        model.tokenizer([3], allow_empty=True)


def test_overlong_caption_is_cut_with_a_warning(model):
    text = " ".join(["a red circle above a blue square"] * 4)
    with pytest.warns(UserWarning, match="cut to 18"):
        tok = model.tokens(text)
    assert tok.shape == (1, 20) and tok[0, -1] == 63


def test_encoders_give_unit_vectors(model):
    x = shapes.ShapesDataset("train", 32, 4, seed=0).images
    img, txt = model(x, model.tokens(["a red circle"] * 4))
    assert img.shape == txt.shape == (4, 128)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    big = shapes.ShapesDataset("train", 64, 4, seed=0).images
    torch.testing.assert_close(model.encode_image(big), model.encode_image(F.avg_pool2d(big, 2)))
    with pytest.raises(ValueError, match="RGB images"):
        model.encode_image(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode_image(torch.full((2, 3, 32, 32), 1.5))
    with pytest.raises(ValueError, match="NaN"):
        model.encode_image(torch.full((2, 3, 32, 32), float("nan")))
    with pytest.raises(TypeError, match="floating"):
        model.encode_image(torch.zeros(2, 3, 32, 32, dtype=torch.long))


def plain_clip_loss(img, txt, scale):
    """CLIP's Figure 3, written out with loops."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        li = [scale * (img[i] @ txt[j]) for j in range(n)]
        lt = [scale * (txt[i] @ img[j]) for j in range(n)]
        total = total - torch.log(torch.exp(li[i]) / sum(torch.exp(v) for v in li)) \
                      - torch.log(torch.exp(lt[i]) / sum(torch.exp(v) for v in lt))
    return total / (2 * n)


def test_contrastive_loss_matches_plain_implementation():
    torch.manual_seed(1)
    img, txt = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    log_scale = torch.tensor(2.0)
    got = mclip.contrastive_loss(img, txt, log_scale)
    want = plain_clip_loss(img, txt, float(torch.exp(log_scale)))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    eye = torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(mclip.contrastive_loss(img, txt, log_scale, eye), got)


def test_temperature_sharpens_the_loss():
    img = torch.eye(4)
    txt = torch.eye(4)          # perfectly aligned pairs
    losses = [float(mclip.contrastive_loss(img, txt, torch.tensor(s).log())) for s in (1.0, 10.0, 100.0)]
    assert losses[0] > losses[1] > losses[2]
    assert losses[0] == pytest.approx(-torch.log(torch.tensor(torch.e / (torch.e + 3))).item(), rel=1e-5)


def test_matches_make_shared_captions_positives():
    codes = torch.tensor([shapes.parse_caption("a small red circle on the left").code()] * 2
                         + [shapes.parse_caption("a large blue cross at the top").code()])
    caps = codes.clone()
    caps[1, shapes.LABEL_FIELDS.index("size0")] = -1   # "a red circle on the left" also describes scene 0
    m = mclip.caption_matches(caps, codes)
    assert m.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    torch.manual_seed(2)
    img, txt = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    logits = 20.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    want = 0.0
    for rows, mm in ((logits, m), (logits.T, m.T)):   # images over captions, captions over images
        for i in range(3):
            positives = [j for j in range(3) if mm[i, j]]
            want -= sum(torch.log_softmax(rows[i], 0)[j] for j in positives) / len(positives) / 3
    got = mclip.contrastive_loss(img, txt, torch.tensor(20.0).log(), m)
    torch.testing.assert_close(got.double(), want / 2, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(got, mclip.contrastive_loss(img, txt, torch.tensor(20.0).log()))


def test_noisy_clip_starts_as_the_clean_clip(model):
    noisy = mclip.NoisyCLIP().warm_start(model).eval()
    x = shapes.ShapesDataset("train", 32, 3, seed=0).images
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(noisy.encode_image(x, t), model.encode_image(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noisy.encode_text(["a red circle"]), model.encode_text(["a red circle"]))
    assert not any(p.requires_grad for p in noisy.text.parameters())
    assert all(p.requires_grad for p in noisy.visual.parameters())
    assert not any(k.startswith("text.clip.visual.") for k in noisy.state_dict())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        noisy.encode_image(x, torch.tensor([0, 1, 1000]))
    with pytest.raises(ValueError, match="integer tensor"):
        noisy.encode_image(x, torch.tensor([0.5, 1.0, 2.0]))


def test_training_captions_leave_out_what_they_drop():
    codes = torch.tensor([shapes.parse_caption("a small red circle on the left").code()])
    caps, cap_codes = mclip.training_captions(codes, torch.tensor([0]), torch.tensor([[True, True]]))
    assert caps == ["a red circle"]
    assert shapes.parse_caption(caps[0]).code() == cap_codes[0].tolist()


def test_hard_negatives():
    s = shapes.parse_caption("a red circle above a blue square")
    swapped, reversed_ = mclip.hard_negative_scenes(s)
    assert shapes.caption(swapped) == "a blue circle above a red square"
    assert shapes.caption(reversed_, 0).startswith("a blue square above a red circle") or \
        reversed_.canonical().objects[0].color == "blue"
    assert len(mclip.hard_negative_scenes(shapes.parse_caption("a red circle on the left"))) == 4


def test_retrieval_of_a_perfect_encoder():
    d = shapes.ShapesDataset("test", 32, 40, seed=0)
    table = {shapes.caption(s, 0): i for i, s in enumerate(d.scenes)}

    def enc_text(caps):
        return F.one_hot(torch.tensor([table.get(c, 40) for c in caps]), 41).float()

    def enc_image(x):
        idx = [next(i for i in range(40) if torch.equal(d.images[i], im)) for im in x]
        return F.one_hot(torch.tensor([table[shapes.caption(d.scenes[i], 0)] for i in idx]), 41).float()

    assert mclip.retrieval_accuracy(enc_image, enc_text, d.images, d.scenes) == 1.0
    assert mclip.retrieval_accuracy(enc_image, enc_text, d.images, d.scenes, hard_negatives=True) == 1.0


def test_open_clip_loading_path_on_a_local_file(tmp_path, model):
    from safetensors.torch import save_file
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(path))
    loaded, preprocess, tokenizer = mclip.load_open_clip(mclip.CONFIG_NAME, str(path))
    for k, v in model.clip.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert callable(preprocess) and callable(tokenizer)
    with pytest.raises(FileNotFoundError):
        mclip.load_open_clip(mclip.CONFIG_NAME, str(tmp_path / "missing.safetensors"))


def _shipped(name):
    from course_lib.training.checkpoints import CHECKPOINT_DIR
    return (CHECKPOINT_DIR / f"{name}.safetensors").exists()


@pytest.mark.skipif(not (_shipped("shapes_clip") and _shipped("shapes_noisy_clip")), reason="shapes CLIPs not built")
def test_shipped_clips_retrieve_and_the_noisy_one_reads_noise():
    from course_lib.diffusion import formulas
    from course_lib.training import checkpoints, recipes
    clean, noisy = checkpoints.load_pretrained("shapes_clip"), checkpoints.load_pretrained("shapes_noisy_clip")
    d = shapes.ShapesDataset("test", 32, 120, seed=9)
    assert mclip.retrieval_accuracy(clean.encode_image, clean.encode_text, d.images, d.scenes) >= 0.85
    t = torch.full((120,), 400)
    x_t = formulas.q_sample(recipes.get("shapes_noisy_clip").noise_schedule(), d.images, t,
                            torch.randn(d.images.shape, generator=torch.Generator().manual_seed(0)))
    on_noise = mclip.retrieval_accuracy(lambda x: noisy.encode_image(x, t[:x.shape[0]]), noisy.encode_text, x_t, d.scenes)
    clean_on_noise = mclip.retrieval_accuracy(clean.encode_image, clean.encode_text, x_t.clamp(-1, 1), d.scenes)
    assert on_noise >= clean_on_noise + 0.3, (on_noise, clean_on_noise)
    # one text space: the noisy CLIP's text tower is the clean one's
    torch.testing.assert_close(noisy.encode_text(["a red circle"]), clean.encode_text(["a red circle"]))
