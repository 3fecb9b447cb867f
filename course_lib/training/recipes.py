"""Named training recipes: everything needed to rebuild a shipped checkpoint with
`course train NAME`. A recipe is data (a frozen dataclass); the loop is `trainer.train`.

Sized to train on 2 CPU cores in about an hour, minutes on a GPU. bf16 autocast is used where the
hardware has native bf16 (runtime.bf16_is_fast), fp32 elsewhere; each card records the hardware.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from course_lib.diffusion.schedules import NoiseSchedule, schedule as make_schedule
from course_lib.models.clip import ClipConfig, NoisyCLIP, NoisyClipConfig, ShapesCLIP
from course_lib.models.glide import Glide, GlideConfig
from course_lib.nn.attributes import AttributeClassifier, AttributeClassifierConfig
from course_lib.nn.classifier import ClassifierConfig, FashionClassifier, NoisyClassifier, NoisyClassifierConfig
from course_lib.nn.unet import UNet, UNetConfig, preset


@functools.lru_cache(maxsize=None)
def _schedule(name: str, T: int) -> NoiseSchedule:
    return make_schedule(name, T)


@functools.lru_cache(maxsize=2)
def _fashion(split: str):
    from course_lib.data import fashion_mnist
    d = fashion_mnist.load(split)
    return d.images, d.labels


@functools.lru_cache(maxsize=4)
def _shapes(split: str, size: int, n: int, seed: int):
    from course_lib.data.shapes import ShapesDataset
    d = ShapesDataset(split, size, n, seed)
    return d.images, d.labels


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model_config: object            # UNetConfig or ClassifierConfig
    task: str                       # "diffusion" | "classify" | "noisy_classify" (trainer.TASKS)
    steps: int                      # optimizer steps
    batch_size: int
    lr: float                       # AdamW peak learning rate, after `warmup` linear steps
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0          # max gradient norm (0: no clipping)
    ema_decay: float = 0.999
    schedule: str = "cosine"        # the noise schedule ("linear" or "cosine")
    T: int = 1000                   # diffusion steps
    label_dropout: float = 0.0      # share of labels replaced by the null class (classifier-free guidance)
    seed: int = 0
    bf16: bool = True               # bf16 autocast where the hardware has native bf16 (runtime.bf16_is_fast);
                                    # the CLIP recipes train in fp32 (their losses run no autocast)
    checkpoint_every: int = 500
    data: str = "fashion_mnist"
    eval_samples: int = 1000        # samples drawn for the card's FID
    eval_steps: int = 100           # respaced sampling steps for the card's FID
    init_from: str | None = None    # warm start: a shipped checkpoint whose weights the model starts from
    class_embed_lr_mult: float = 1.0  # learning rate of the class embedding, as a multiple of lr
    data_size: int = 0              # shapes: items rendered for training (0: the dataset's own split)
    image_size: int = 32            # shapes: render size

    def build_model(self) -> torch.nn.Module:
        if isinstance(self.model_config, UNetConfig):
            return UNet(self.model_config)
        if isinstance(self.model_config, ClassifierConfig):
            return FashionClassifier(self.model_config)
        if isinstance(self.model_config, NoisyClassifierConfig):
            return NoisyClassifier(self.model_config)
        if isinstance(self.model_config, AttributeClassifierConfig):
            return AttributeClassifier(self.model_config)
        if isinstance(self.model_config, ClipConfig):
            return ShapesCLIP(self.model_config)
        if isinstance(self.model_config, NoisyClipConfig):
            return NoisyCLIP(self.model_config)
        if isinstance(self.model_config, GlideConfig):
            return Glide(self.model_config)
        raise TypeError(f"recipe {self.name}: no model for {type(self.model_config).__name__}")

    def noise_schedule(self) -> NoiseSchedule:
        return _schedule(self.schedule, self.T)

    def load_data(self, split: str = "train"):
        """(images, labels) of a split: Fashion-MNIST, or `data_size` shapes scenes (test: 2000)
        rendered at `image_size` from the recipe's seed, labels their scene codes."""
        if self.data == "fashion_mnist":
            return _fashion(split)
        if self.data == "shapes":
            return _shapes(split, self.image_size, self.data_size if split == "train" else 2000, self.seed)
        raise ValueError(f"recipe {self.name}: unknown dataset {self.data!r}")


RECIPES = {r.name: r for r in [
    Recipe("fashion_classifier",
           "Evaluation classifier on clean Fashion-MNIST (FID features, class accuracy). Never used for guidance.",
           ClassifierConfig(), task="classify", steps=3000, batch_size=128, lr=2e-3, warmup=100,
           weight_decay=1e-4, ema_decay=0.998),
    Recipe("fashion_ddpm",
           "Unconditional eps-prediction ADM UNet with learned variance (L_hybrid), cosine schedule, T=1000.",
           preset("fashion", learn_sigma=True), task="diffusion", steps=6000, batch_size=64, lr=1e-3),
    Recipe("fashion_cond",
           "Class-conditional eps-prediction ADM UNet (class embedding added to the timestep embedding, "
           "null class 10, label dropout 0.1 so one model is conditional and unconditional), learned variance, "
           "cosine schedule, T=1000. Warm-started from fashion_ddpm with a zero class embedding, so step 0 "
           "is exactly the unconditional model and training only has to learn what the label adds; the "
           "class embedding learns 20x faster than the rest (at 1x, 500 steps left the labels almost unused: "
           "15% class accuracy) and the EMA is short (0.995) because the run is.",
           preset("fashion", learn_sigma=True, num_classes=10), task="diffusion", steps=1200, batch_size=64,
           lr=1e-3, warmup=50, label_dropout=0.1, init_from="fashion_ddpm", class_embed_lr_mult=20.0,
           ema_decay=0.995, eval_samples=500, eval_steps=50),
    Recipe("fashion_noisy_classifier",
           "Noise-aware classifier p(y | x_t, t) for classifier guidance (ADM: the UNet's downsampling half "
           "with attention pooling), trained on q_sample(x0, t) over all t, cosine schedule, T=1000.",
           NoisyClassifierConfig(), task="noisy_classify", steps=2000, batch_size=128, lr=1e-3, warmup=100,
           weight_decay=0.05, ema_decay=0.999),
    Recipe("shapes_attributes",
           "Evaluation attribute classifier of the shapes world: reads object count, each object's shape, "
           "color and size, and the position (one object) or axis (two objects) from 32x32 or 64x64 renders "
           "(64 is average-pooled to 32). The judge of caption accuracy; never used for guidance.",
           AttributeClassifierConfig(), task="attributes", steps=3000, batch_size=128, lr=2e-3, warmup=100,
           weight_decay=1e-4, ema_decay=0.998, data="shapes", data_size=40_000),
    Recipe("shapes_clip",
           "A tiny CLIP built by open_clip (architecture shapes-tiny-clip: ViT with 8x8 patches on 32x32, "
           "4 layers, width 128; causal text transformer, 3 layers, width 128, 20 tokens of open_clip's BPE "
           "mapped to the shapes world's words; 128-d joint space), trained with the symmetric InfoNCE "
           "loss on renders and paraphrased captions (sizes left out 30% of the time, a single object's "
           "position 20%); scenes sharing a caption count as positives of each other.",
           ClipConfig(), task="clip", steps=3000, batch_size=128, lr=1e-3, warmup=200, weight_decay=0.1,
           ema_decay=0.998, data="shapes", data_size=40_000, bf16=False),
    Recipe("shapes_noisy_clip",
           "Noise-aware CLIP (GLIDE sec. 2.4): shapes_clip's text tower and temperature, frozen, and a copy "
           "of its image tower that also takes t (a timestep embedding added to every token, zero-initialised "
           "so step 0 is the clean CLIP), trained contrastively on x_t = q_sample(x0, t), t uniform over "
           "0..999 of the cosine schedule, against the frozen text embeddings.",
           NoisyClipConfig(), task="noisy_clip", steps=3000, batch_size=128, lr=5e-4, warmup=100,
           weight_decay=0.1, ema_decay=0.998, data="shapes", data_size=40_000, init_from="shapes_clip", bf16=False),
    Recipe("shapes_ddpm",
           "Unconditional eps-prediction ADM UNet on 32x32 RGB shapes scenes (the model CLIP guidance steers "
           "in lesson 06), cosine schedule, T=1000, fixed small variance.",
           preset("shapes"), task="diffusion", steps=8000, batch_size=64, lr=1e-3, warmup=200,
           checkpoint_every=250, data="shapes", data_size=30_000, eval_samples=500, eval_steps=50),
    Recipe("shapes_glide",
           "GLIDE in miniature (lesson 07): a text tower trained jointly with the shapes ADM UNet; the end token's "
           "embedding is added to the timestep embedding and every token, projected to 128, is joined to the keys "
           "and values of every attention layer (8x8 and the middle; a 16x16 attention doubled the step's cost on "
           "the CPU); captions paraphrased as the CLIPs' and empty 15% of the time (one model for CFG). Two warm "
           "starts for the CPU budget: the UNet from shapes_ddpm, the text tower (open_clip's, 3 causal layers of "
           "width 128) from shapes_clip's, then both trained together on the diffusion loss; the new projections and "
           "text keys/values learn 10x faster. (GLIDE trains its text transformer from scratch: here a 2-layer "
           "transformer from scratch had color and shape at chance after 1000 steps, twice.)",
           GlideConfig(text_encoder="clip"), task="glide", steps=4500, batch_size=64, lr=5e-4, warmup=200,
           label_dropout=0.15, class_embed_lr_mult=10.0, checkpoint_every=250, data="shapes", data_size=30_000,
           init_from="shapes_ddpm", eval_samples=320, eval_steps=50),
    Recipe("shapes_glide_inpaint",
           "GLIDE's inpainting model (sec. 4): shapes_glide fine-tuned with four extra input channels, the "
           "known image times the mask and the mask (1 = known), zero-initialised so step 0 is shapes_glide; "
           "masks are a random half of the image or a random rectangle (sides 8-24 px).",
           GlideConfig(unet=preset("shapes", context_dim=128, cond_channels=4), kind="inpaint", text_encoder="clip"),
           task="glide_inpaint", steps=1200, batch_size=64, lr=1e-3, warmup=100, label_dropout=0.15,
           checkpoint_every=250, data="shapes", data_size=30_000, init_from="shapes_glide",
           eval_samples=200, eval_steps=50),
    Recipe("shapes_upsampler",
           "GLIDE's text-conditional upsampler, 32 -> 64 px: a 64 px ADM UNet (levels 64, 32, 16, 8; attention "
           "with the text tokens at 8x8 and the middle) given the 32 px area average, upsampled bilinearly, as "
           "three extra input channels, after Gaussian noise augmentation q_sample(low, s) with s = 0 half the "
           "time and uniform in 0..499 otherwise; s enters through a second timestep embedding.",
           GlideConfig(unet=UNetConfig(image_size=64, in_channels=3, base_channels=32, channel_mults=(1, 1, 2, 2),
                                       num_res_blocks=1, attention_resolutions=(8,), context_dim=128,
                                       cond_channels=3), kind="upsample"),
           task="glide_upsample", steps=3000, batch_size=32, lr=1e-3, warmup=200, label_dropout=0.15,
           checkpoint_every=250, data="shapes", data_size=20_000, image_size=64, eval_samples=100, eval_steps=50),
    Recipe("tiny_ddpm",
           "A toy UNet for tests and the visible training demonstration of lesson 02 (not shipped).",
           preset("tiny"), task="diffusion", steps=200, batch_size=32, lr=1e-3, warmup=20,
           checkpoint_every=50, eval_samples=200, eval_steps=20),
]}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe or checkpoint {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
