"""Does shapes_glide fail at relations because its attention does not know where it is?

ADM's attention layers (and so shapes_glide's, at 8x8 and in the middle) have no position
embedding: an image position knows its place only through the convolutions' zero padding. A
caption such as "a red circle left of a blue square" asks the left positions to attend to one
object's tokens and the right ones to the other's. This experiment fine-tunes the shipped
shapes_glide for STEPS more steps in two arms that differ in one thing:

    pos  UNetConfig(attention_positions=True): a learned (C, H, W) embedding, zero at init, added
         to each attention block's normalised input (step 0 is exactly shapes_glide)
    ctl  the same model without it (so "more steps" alone is measured too)
    bidir  the text tower made bidirectional (GlideConfig(text_causal=False), as GLIDE's text
         transformer is): shapes_clip's tower is causal, so the first-named object's tokens never
         read the relation after them ("a red circle left of ..." cannot tell the red circle it is
         the left one); everything else as ctl
    shipped  no training: the shipped shapes_glide measured here the same way (STEPS = 0), because
         its card was measured under bf16 autocast on another machine

Same recipe otherwise (shapes_glide's, lr warm-up 50 steps, fp32, seed 0), then the recipe's own
evaluation (report.measure: 20 samples x 8 prompts per kind, 50 DDPM steps, CFG s=1 and s=3), and
glide.swap_preference: on 200 two-object test scenes, how much lower the denoising loss is with the
true caption than with the same words naming the objects in swapped places, per t (0: blind to order);
and the two-object samples at s=3 (report.measure's own: same prompts, seed and steps) split by what they get
wrong about the relation (eval.attributes.relation_split: the axis, the order, or neither).

usage: OMP_NUM_THREADS=1 COURSE_THREADS=1 python experiments/glide_positions.py pos|ctl|bidir|shipped STEPS [--probe]
Writes runs/glide_positions_ARM_STEPS/ (training state) and experiments/results/glide_positions_ARM_STEPS.json.
--probe: the arm already trained (its state in runs/), add only the order preference and the relation split
to its results file.
"""
import dataclasses
import json
import sys
import time

import torch

from course_lib import runtime
from course_lib.eval import attributes, report
from course_lib.models import glide
from course_lib.training import checkpoints, recipes, trainer

arm, steps, probe_only = sys.argv[1], int(sys.argv[2]), "--probe" in sys.argv[3:]
if arm not in ("pos", "ctl", "bidir", "shipped"):
    raise SystemExit("arm must be pos, ctl, bidir or shipped")
base = recipes.get("shapes_glide")
cfg = base.model_config
cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, attention_positions=(arm == "pos")),
                          text_causal=(arm != "bidir"))
r = dataclasses.replace(base, model_config=cfg, init_from="shapes_glide", steps=steps, warmup=50, bf16=False,
                        checkpoint_every=250)
t0 = time.time()
if arm == "shipped":
    model, steps = checkpoints.load_pretrained("shapes_glide"), 0
else:
    model = trainer.train(r, f"runs/glide_positions_{arm}_{steps}", steps=steps, progress=False, log_every=50,
                          callback=lambda s, l: print(f"step {s} loss {l:.5f} {time.time() - t0:.0f}s",
                                                      flush=True)).model
train_s = time.time() - t0
print("trained", steps, "in", round(train_s), "s", flush=True)
results = f"experiments/results/glide_positions_{arm}_{steps}.json"
order = [{"t": p.t, "gain": round(p.gain, 7), "gain_interval": [round(v, 7) for v in p.gain_interval],
          "share_true_lower": round(p.share, 3)} for p in glide.swap_preference(model.eval(), "order")]
caps = [p for p in glide.TWO_OBJECT_PROMPTS for _ in range(max(1, r.eval_samples // (2 * len(glide.ONE_OBJECT_PROMPTS))))]
x = glide.sample(model, caps, steps=r.eval_steps, scale=3.0, seed=r.seed, bf16=r.bf16, progress=False).clamp(-1, 1)
split = attributes.relation_breakdown(x, caps)._asdict()
print("two-object samples at s=3:", split, flush=True)
if probe_only:
    out = json.load(open(results))
    out["metrics"]["order_preference"] = order
    out["metrics"]["two_object_s3_relation_split"] = split
    json.dump(out, open(results, "w"), indent=1)
    print(json.dumps(order, indent=1))
    raise SystemExit(0)
m = report.measure(r, model, device="cpu")
m["order_preference"] = order
m["two_object_s3_relation_split"] = split
out = {"arm": arm, "steps": steps, "train_seconds": round(train_s, 1), "threads": torch.get_num_threads(),
       "hardware": runtime.hardware("cpu"), "torch": torch.__version__, "measured": time.strftime("%Y-%m-%d"),
       "metrics": m}
json.dump(out, open(results, "w"), indent=1)
print(json.dumps(m, indent=1))
