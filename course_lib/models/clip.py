"""CLIP for the shapes world (Radford et al. 2021), built by open_clip's own `CLIP` class, and
the noise-aware CLIP of GLIDE (Nichol et al. 2022, sec. 2.4): lessons 06-08.

- `shapes-tiny-clip` (configs/shapes-tiny-clip.json) is an architecture registered with open_clip
  (`open_clip.add_model_config`) and built by `open_clip.create_model`: a ViT with 8x8 patches
  on 32x32 images (16 patches + a class token, 4 layers, width 128) and a causal text
  transformer (3 layers, width 128, 20 tokens), both projected to a 128-d joint space.
- Tokens come from open_clip's bundled BPE tokenizer (`open_clip.tokenizer.SimpleTokenizer`,
  no download). The shapes world uses 31 of its 49,408 tokens; `ShapesTokenizer` maps those
  to a compact vocabulary (0 pad, 1 start, 2.. the words, 63 end) so the token embedding is
  64 x 128 instead of 49,408 x 128 (25 MB). The mapping travels with the weights (a buffer), so
  a checkpoint always reads its own tokens. Empty captions and words outside the world are
  errors; a caption longer than the context is cut, with a warning.
- `contrastive_loss`: the symmetric InfoNCE loss of CLIP (Radford et al. 2021, Figure 3),
  with an optional `matches` matrix: scenes that share a caption are positives of each other
  rather than false negatives (a batch of 128 holds several "a small red circle on the left").
- `NoisyCLIP` (GLIDE sec. 2.4, appendix): the image tower also takes t and reads x_t =
  q_sample(x0, t). GLIDE never published how its noised CLIP was trained; ours: the text tower
  and temperature of the trained `shapes_clip`, frozen, and a copy of its image tower with a
  timestep embedding added to every token (zero-initialised, so step 0 is the clean CLIP),
  trained contrastively on q_sample images over all t against the frozen text embeddings. The
  clean and the noisy image towers therefore share one text space: the same g(c) serves both.

Users with internet can load any open_clip architecture and pretrained tag instead
(`load_open_clip("ViT-B-32", "laion2b_s34b_b79k")`); a local weights file works the same way.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from course_lib.data import shapes
from course_lib.nn.embeddings import TimestepEmbedding

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_NAME = "shapes-tiny-clip"
PAD, SOT = 0, 1


@functools.lru_cache(maxsize=1)
def register() -> str:
    """Register the course's open_clip configs (once per process); returns CONFIG_NAME."""
    import open_clip
    open_clip.add_model_config(CONFIG_DIR)
    return CONFIG_NAME


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@functools.lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def world_bpe_ids() -> list:
    """The open_clip BPE ids of the shapes world's words, sorted: compact id = 2 + their index."""
    return sorted({i for w in shapes.VOCABULARY for i in _bpe().encode(w)})


class ShapesTokenizer:
    """Captions -> compact token ids (B, context_length): [start, words..., end, pad...].

    bpe_ids: the BPE id of each compact word id (from the model's buffer); vocab_size: the
    model's; the end token is vocab_size - 1, the largest id, which open_clip's argmax pooling reads.
    """

    def __init__(self, bpe_ids, context_length: int, vocab_size: int):
        bpe_ids = [int(i) for i in bpe_ids]
        if len(bpe_ids) + 3 > vocab_size:
            raise ValueError(f"{len(bpe_ids)} words do not fit a vocabulary of {vocab_size}")
        self.to_compact = {b: 2 + k for k, b in enumerate(bpe_ids)}
        self.context_length, self.eot = context_length, vocab_size - 1

    @functools.lru_cache(maxsize=4096)
    def ids(self, text: str) -> tuple:
        """The compact ids of one caption, start and end included (checked, truncated with a warning)."""
        if not isinstance(text, str):
            raise TypeError(f"a caption must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("the caption is empty; describe one or two shapes, e.g. 'a red circle on the left'")
        bad = shapes.unknown_words(text)
        if bad:
            raise ValueError(f"words outside the shapes vocabulary: {bad}. The shapes world knows: "
                             f"{' '.join(sorted(w for w in shapes.VOCABULARY if w != ','))}")
        bpe = _bpe().encode(text)
        unknown = [b for b in bpe if b not in self.to_compact]
        if unknown:
            raise ValueError(f"{text!r} tokenizes to pieces outside the shapes vocabulary: "
                             f"{[_bpe().decode([b]) for b in unknown]}")
        body = [self.to_compact[b] for b in bpe]
        if len(body) + 2 > self.context_length:
            warnings.warn(f"caption of {len(body)} tokens cut to {self.context_length - 2} "
                          f"(context length {self.context_length}): {text!r}", stacklevel=3)
            body = body[:self.context_length - 2]
        return (SOT, *body, self.eot)

    def __call__(self, texts, *, allow_empty: bool = False) -> torch.Tensor:
        """(B, context_length) ids of B captions. allow_empty: "" (or blanks) becomes the empty caption
        [start, end], GLIDE's null caption for caption dropout and CFG; otherwise it is an error."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no captions given")
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            if allow_empty and isinstance(text, str) and not text.strip():
                ids = (SOT, self.eot)
            else:
                ids = self.ids(text)
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     matches: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Figure 3): logits = exp(logit_scale) * I T^T over normalised
    embeddings; cross-entropy of images over captions and of captions over images, averaged.

    matches (B, B) bool, optional: matches[i, j] when caption j describes image i. The target of
    each row is then uniform over its matches (the identity gives CLIP's loss exactly).
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image and text embeddings must both be (B, D), got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    i, t = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.float().exp().clamp(max=100) * i @ t.T          # (B images, B captions)
    if matches is None:
        labels = torch.arange(i.shape[0], device=i.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    target = matches.float() / matches.float().sum(1, keepdim=True)
    target_t = matches.T.float() / matches.T.float().sum(1, keepdim=True)
    return (-(target * logits.log_softmax(1)).sum(1).mean() - (target_t * logits.T.log_softmax(1)).sum(1).mean()) / 2


def caption_matches(caption_codes: torch.Tensor, scene_codes: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: matches[i, j] when caption j (its code, -1 where it does not say) describes scene i."""
    c, s = caption_codes[None, :, :], scene_codes[:, None, :]
    return ((c < 0) | (c == s)).all(-1)


def _check_images(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """RGB images in [-1, 1] at image_size or twice it (average-pooled down)."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"images must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != x.shape[-2] or x.shape[-1] not in (image_size, 2 * image_size):
        raise ValueError(f"CLIP takes RGB images (B, 3, {image_size}, {image_size}) or "
                         f"(B, 3, {2 * image_size}, {2 * image_size}), got {tuple(x.shape)}")
    return F.avg_pool2d(x, 2) if x.shape[-1] == 2 * image_size else x


@dataclass(frozen=True)
class ClipConfig:
    name: str = CONFIG_NAME         # an open_clip architecture registered by `register`


class ShapesCLIP(nn.Module):
    """open_clip's CLIP (`.clip`) with the shapes tokenizer. encode_image(images), encode_text(captions
    or token ids) -> unit vectors (B, 128); forward(images, tokens) -> (image, text) embeddings."""

    def __init__(self, config: ClipConfig = ClipConfig()):
        super().__init__()
        import open_clip
        register()
        self.config = config
        with _quiet_logging():  # open_clip warns "No pretrained weights loaded": intended here
            self.clip = open_clip.create_model(config.name, pretrained=None)
        self.register_buffer("vocab_bpe_ids", torch.tensor(world_bpe_ids(), dtype=torch.long))
        self.image_size = self.clip.visual.image_size[0]

    @property
    def tokenizer(self) -> ShapesTokenizer:
        key = tuple(self.vocab_bpe_ids.tolist())
        if getattr(self, "_tok_key", None) != key:
            self._tok = ShapesTokenizer(key, self.clip.context_length, self.clip.vocab_size)
            self._tok_key = key
        return self._tok

    def tokens(self, text) -> torch.Tensor:
        return self.tokenizer(text).to(self.vocab_bpe_ids.device)

    def encode_text(self, text) -> torch.Tensor:
        tokens = self.tokens(text) if isinstance(text, (str, list, tuple)) else text
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Clean images in [-1, 1] (a noisy x_t is NoisyCLIP's input; clamp samples first)."""
        x = _check_images(x, self.image_size)
        v = x.detach()
        if v.numel() and not torch.isfinite(v).all():
            raise ValueError("images contain NaN or inf")
        if v.numel() and (float(v.min()) < -1.001 or float(v.max()) > 1.001):
            raise ValueError(f"the clean CLIP reads images in [-1, 1], got values in [{float(v.min()):.3f}, "
                             f"{float(v.max()):.3f}]: clamp samples first, or use the noise-aware CLIP for x_t")
        return F.normalize(self.clip.encode_image(x), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def forward(self, x, tokens):
        return self.encode_image(x), self.encode_text(tokens)


class NoisyImageEncoder(nn.Module):
    """open_clip's VisionTransformer, reading x_t: a timestep embedding (zero-initialised output) is
    added to every token after the patch and position embeddings, as ADM adds it in every block."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        width = vit.positional_embedding.shape[-1]
        self.time_embed = TimestepEmbedding(width, width)
        last = [m for m in self.time_embed.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = self.vit
        h = v._embeds(x_t) + self.time_embed(t)[:, None, :]       # (B, 1 + patches, width)
        h = v.transformer(h)
        pooled, _ = v._pool(h)                                   # (B, width)
        return pooled @ v.proj if v.proj is not None else pooled  # (B, embed_dim)


@dataclass(frozen=True)
class NoisyClipConfig:
    name: str = CONFIG_NAME
    init_from: str | None = "shapes_clip"   # the clean CLIP whose text tower (frozen) and image tower start it
    T: int = 1000                           # the diffusion steps t indexes


class NoisyCLIP(nn.Module):
    """f(x_t, t) and g(c): encode_image(x_t, t), encode_text(captions) -> unit vectors (B, 128).
    The text tower and logit scale are a frozen clean CLIP's; only `.visual` trains."""

    def __init__(self, config: NoisyClipConfig = NoisyClipConfig()):
        super().__init__()
        self.config = config
        self.text = ShapesCLIP(ClipConfig(config.name))
        self.visual = NoisyImageEncoder(copy.deepcopy(self.text.clip.visual))
        self.text.clip.visual = nn.Identity()   # the clean image tower is not part of this model
        self.image_size = self.text.image_size

    def warm_start(self, clean: ShapesCLIP) -> "NoisyCLIP":
        """Copy a trained clean CLIP's text tower and image tower in; freeze the text tower."""
        state = {k: v for k, v in clean.state_dict().items() if not k.startswith("clip.visual.")}
        self.text.load_state_dict(state)
        self.visual.vit.load_state_dict(clean.clip.visual.state_dict())
        for p in self.text.parameters():
            p.requires_grad_(False)
        return self

    def encode_text(self, text) -> torch.Tensor:
        return self.text.encode_text(text)

    def encode_image(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t = _check_images(x_t, self.image_size)
        if not isinstance(t, torch.Tensor) or t.shape != (x_t.shape[0],) or t.dtype.is_floating_point:
            raise ValueError(f"t must be an integer tensor of shape ({x_t.shape[0]},), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if x_t.shape[0] and (int(t.min()) < 0 or int(t.max()) >= self.config.T):
            raise ValueError(f"t must lie in [0, {self.config.T - 1}], got [{int(t.min())}, {int(t.max())}]")
        return F.normalize(self.visual(x_t, t), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.text.clip.logit_scale

    def forward(self, x_t, t, tokens):
        return self.encode_image(x_t, t), self.encode_text(tokens)


# ---------------------------------------------------------------------------- training tasks

def training_captions(codes: torch.Tensor, variants: torch.Tensor, drop: torch.Tensor):
    """Captions for scene codes (B, 9): phrasing `variants` (B,), and where drop[:, 0] the sizes,
    where drop[:, 1] a single object's position, left unsaid. Returns (captions, caption codes)."""
    caps, cap_codes = [], codes.clone()
    size_cols = [shapes.LABEL_FIELDS.index(f) for f in ("size0", "size1")]
    pos_col = shapes.LABEL_FIELDS.index("position")
    for k, (code, v) in enumerate(zip(codes.tolist(), variants.tolist())):
        scene = shapes.Scene.from_code(code)
        if drop[k, 0]:
            scene = shapes.Scene(tuple(shapes.Obj(o.shape, o.color) for o in scene.objects),
                                 scene.position, scene.relation)
            cap_codes[k, size_cols] = -1
        if drop[k, 1] and len(scene.objects) == 1:
            scene = shapes.Scene(scene.objects)
            cap_codes[k, pos_col] = -1
        caps.append(shapes.caption(scene, v))
    return caps, cap_codes


def paraphrased_captions(y, g, like):
    """Training captions of a batch's scene codes y, drawn from the step's generator g (DDP-exact): a random
    phrasing each, sizes left out 30% of the time, a single object's position 20%. Returns (captions, their
    codes). The CLIPs and GLIDE (models.glide) train on these."""
    from course_lib.training.trainer import batch_rand, batch_randint
    variants = batch_randint(g, shapes.N_VARIANTS, like).cpu()
    drop = torch.stack([batch_rand(g, like) < 0.3, batch_rand(g, like) < 0.2], 1).cpu()
    return training_captions(y.cpu(), variants, drop)


def _batch_captions(model_text: ShapesCLIP, y, g, like):
    caps, cap_codes = paraphrased_captions(y, g, like)
    return model_text.tokens(caps), caption_matches(cap_codes, y.cpu()).to(like.device)


def clip_loss(model: ShapesCLIP, recipe, x0, y, g):
    """Contrastive loss of a batch of renders x0 against captions of their scenes y (codes)."""
    tokens, matches = _batch_captions(model, y, g, x0)
    img, txt = model(x0, tokens)
    return contrastive_loss(img, txt, model.logit_scale, matches)


def noisy_clip_loss(model: NoisyCLIP, recipe, x0, y, g):
    """Contrastive loss of x_t = q_sample(x0, t), t ~ U{0..T-1}, against the frozen text tower."""
    from course_lib.diffusion import formulas
    from course_lib.training.trainer import batch_randint, batch_randn
    sched = recipe.noise_schedule()
    t = batch_randint(g, sched.T, x0)
    x_t = formulas.q_sample(sched, x0, t, batch_randn(g, x0))
    tokens, matches = _batch_captions(model.text, y, g, x0)
    with torch.no_grad():
        txt = model.encode_text(tokens)
    return contrastive_loss(model.encode_image(x_t, t), txt, model.logit_scale, matches)


# ---------------------------------------------------------------------------- metrics

@torch.no_grad()
def retrieval_accuracy(encode_image, encode_text, images: torch.Tensor, scenes: list, *,
                       hard_negatives: bool = False, batch_size: int = 500) -> float:
    """Zero-shot caption retrieval: the share of images whose own caption scores highest.

    Plain: among the distinct captions (caption variant 0) of all test scenes; an image is right
    when its top caption describes its scene. Hard negatives: among its own caption and the
    captions of the same scene with the two colors swapped and with the relation reversed (two
    objects), or with another position (one object).
    """
    caps = [shapes.caption(s, 0) for s in scenes]
    if hard_negatives:
        right = 0
        for lo in range(0, len(scenes), batch_size):
            img = encode_image(images[lo:lo + batch_size])
            for k, s in enumerate(scenes[lo:lo + batch_size]):
                options = [caps[lo + k]] + [shapes.caption(n, 0) for n in hard_negative_scenes(s)]
                scores = encode_text(options) @ img[k]
                right += int(scores.argmax()) == 0
        return right / len(scenes)
    distinct = sorted(set(caps))
    txt = torch.cat([encode_text(distinct[i:i + 500]) for i in range(0, len(distinct), 500)])
    index = {c: i for i, c in enumerate(distinct)}
    right = 0
    for lo in range(0, len(scenes), batch_size):
        best = (encode_image(images[lo:lo + batch_size]) @ txt.T).argmax(1)
        right += sum(int(b) == index[caps[lo + k]] for k, b in enumerate(best.tolist()))
    return right / len(scenes)


def hard_negative_scenes(scene: shapes.Scene) -> list:
    """Scenes a caption must not be confused with: colors swapped and relation reversed (two
    objects), or every other position (one object)."""
    if len(scene.objects) == 2:
        a, b = scene.objects
        swapped = shapes.Scene((shapes.Obj(a.shape, b.color, a.size), shapes.Obj(b.shape, a.color, b.size)),
                               relation=scene.relation)
        reversed_ = shapes.Scene((a, b), relation=shapes.INVERSE[scene.relation])
        return [swapped, reversed_]
    return [shapes.Scene(scene.objects, position=p) for p in shapes.POSITIONS if p != scene.position]


def clip_metrics(model, recipe, n: int = 1000) -> dict:
    """The CLIP cards' metrics: retrieval accuracy (plain and hard negatives) on n test scenes; for
    the noisy CLIP, both against t (the clean CLIP's too, as the baseline it must beat)."""
    from course_lib.diffusion import formulas
    d = shapes.ShapesDataset("test", 32, n, recipe.seed)
    model.eval()
    if isinstance(model, ShapesCLIP):
        return {"retrieval_accuracy": round(retrieval_accuracy(model.encode_image, model.encode_text, d.images, d.scenes), 4),
                "retrieval_accuracy_hard_negatives": round(retrieval_accuracy(
                    model.encode_image, model.encode_text, d.images, d.scenes, hard_negatives=True), 4),
                "test_scenes": n, "captions": "variant 0 of each test scene's caption; hard negatives: colors "
                                               "swapped, relation reversed, or another position"}
    from course_lib.training.checkpoints import load_pretrained
    clean = load_pretrained(model.config.init_from) if model.config.init_from else None
    sched = recipe.noise_schedule()
    out = {}
    for t_val in (0, 100, 250, 500, 750, 900, 999):
        g = torch.Generator().manual_seed(1_000_003 * recipe.seed + t_val)
        t = torch.full((n,), t_val, dtype=torch.long)
        x_t = formulas.q_sample(sched, d.images, t, torch.randn(d.images.shape, generator=g))
        enc = lambda x, t_val=t_val: model.encode_image(x, torch.full((x.shape[0],), t_val, dtype=torch.long))  # noqa: E731
        out[str(t_val)] = {"retrieval": round(retrieval_accuracy(enc, model.encode_text, x_t, d.scenes), 4),
                           "hard_negatives": round(retrieval_accuracy(enc, model.encode_text, x_t, d.scenes,
                                                                      hard_negatives=True), 4)}
        if clean is not None:
            out[str(t_val)]["clean_clip_on_x_t"] = round(retrieval_accuracy(
                clean.encode_image, clean.encode_text, x_t.clamp(-1, 1), d.scenes), 4)
    return {"retrieval_accuracy_by_t": out, "test_scenes": n,
            "noise": "x_t = q_sample(x0, t) with the recipe's schedule, one fixed seed per t",
            "baseline": "clean_clip_on_x_t: the clean CLIP it started from, on the same x_t clamped to [-1, 1]"}


def load_open_clip(name: str, pretrained: str | None = None, device="cpu"):
    """Any open_clip architecture with a pretrained tag (needs internet) or a local weights file
    (.safetensors or open_clip's formats): (model, preprocess, tokenizer), as open_clip returns them.
    The course's own architecture is registered first, so 'shapes-tiny-clip' works too."""
    import open_clip
    register()
    if pretrained is not None and Path(pretrained).suffix and not Path(pretrained).exists():
        raise FileNotFoundError(f"no weights file {pretrained}")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)
