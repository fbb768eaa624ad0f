"""dictionary_learning's BatchTopK step: `BatchTopKTrainer.update(step, x)` (batch top-k forward,
threshold EMA, aux-k on dead latents, backward, gradient projection, clipping, its Adam and LR
schedule, unit-norm decoder). Its dead criterion: tokens since fired ≥ 10M. The threshold EMA starts at
step 0 (its default 1000 would leave it out of a short benchmark; ours computes it every step).
It has no bf16 option, so bf16 is skipped.

`python -m jaxsae.bench.peers.dictionary_learning --d_in 768 ...`
"""

from __future__ import annotations

import sys
import types

from jaxsae.bench import inputs
from jaxsae.bench.options import BenchOptions
from jaxsae.bench.peers import common


def _import_trainer():
    """The trainer class; dictionary_learning imports nnsight (not needed here) at module level."""
    if "nnsight" not in sys.modules:
        sys.modules["nnsight"] = types.SimpleNamespace(LanguageModel=object)
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

    return BatchTopKTrainer


def build(opts: BenchOptions) -> common.Built:
    trainer_cls = _import_trainer()  # first: a missing library is reported, nothing else
    torch = common.setup_torch()
    if opts.architecture != "batchtopk":
        raise common.Unsupported(f"no dictionary_learning peer for {opts.architecture}")
    if opts.dtype != "float32":
        raise common.Unsupported("dictionary_learning: bf16 not supported (no dtype option)")
    trainer = trainer_cls(
        steps=10**9,
        activation_dim=opts.d_in,
        dict_size=opts.d_sae,
        k=opts.k,
        layer=0,
        lm_name="bench",
        device="cpu",
        seed=0,
        warmup_steps=1,
        threshold_start_step=0,
    )
    x = common.batch_tensor(opts)
    trainer.update(0, x)  # step 0 sets b_dec to the geometric median: set-up, not a training step
    dead = common.dead_index(opts)
    with torch.no_grad():
        trainer.ae.encoder.bias[dead] = inputs.DEAD_BIAS
        trainer.num_tokens_since_fired[dead] = trainer.dead_feature_threshold
    counter = {"step": 1}

    def step():
        counter["step"] += 1
        return trainer.update(counter["step"], x)

    notes = "BatchTopKTrainer.update: its Adam, aux-k on (auxk_alpha 1/32), grad clip, unit-norm decoder"
    return common.Built(step, lambda: trainer.dead_features > 0, notes)


def name_of(opts: BenchOptions) -> str:
    return "dictionary-learning-batchtopk"


if __name__ == "__main__":
    sys.exit(common.main(name_of, build))
