"""SAELens' training step: `SAETrainer.step` on its BatchTopK / JumpReLU / TopK training SAE (training
forward with the dead-neuron mask, loss, backward, gradient clipping, Adam, LR and coefficient
schedulers, firing bookkeeping). Its dead criterion: forward passes since fired > dead_feature_window.
bf16: SAELens' own autocast option (torch.autocast on the CPU).

`python -m jaxsae.bench.peers.saelens --architecture batchtopk --d_in 768 ...`
"""

from __future__ import annotations

import sys

from jaxsae.bench import inputs
from jaxsae.bench.options import BenchOptions
from jaxsae.bench.peers import common

AUX_K_COEFFICIENT = 1 / 32  # ours (SAELens' default is 1); it scales the loss, not the work
DEAD_WINDOW = 1000  # SAELens' default dead_feature_window, in steps


def _training_sae(opts: BenchOptions):
    import sae_lens

    shape = dict(d_in=opts.d_in, d_sae=opts.d_sae, dtype="float32", device="cpu")
    if opts.architecture == "batchtopk":
        cfg = sae_lens.BatchTopKTrainingSAEConfig(k=opts.k, aux_loss_coefficient=AUX_K_COEFFICIENT, **shape)
        return sae_lens.BatchTopKTrainingSAE(cfg)
    if opts.architecture == "topk":
        cfg = sae_lens.TopKTrainingSAEConfig(k=opts.k, aux_loss_coefficient=AUX_K_COEFFICIENT, **shape)
        return sae_lens.TopKTrainingSAE(cfg)
    if opts.architecture == "jumprelu":
        return sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(**shape))
    raise common.Unsupported(f"no SAELens peer for {opts.architecture}")


def build(opts: BenchOptions) -> common.Built:
    from sae_lens.config import SAETrainerConfig  # first: a missing library is reported, nothing else
    from sae_lens.training.sae_trainer import SAETrainer

    torch = common.setup_torch()

    sae = _training_sae(opts)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=opts.batch * 10**9,
        train_batch_size_samples=opts.batch,
        autocast=opts.dtype == "bfloat16",
        dead_feature_window=DEAD_WINDOW,
        lr_end=3e-5,  # the runner config's default (lr / 10); the trainer asserts it is set
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    dead = common.dead_index(opts)
    with torch.no_grad():
        sae.b_enc[dead] = inputs.DEAD_BIAS
        trainer.n_forward_passes_since_fired[dead] = DEAD_WINDOW + 1
    x = common.batch_tensor(opts)

    def step():
        out = trainer.step(x)
        trainer.n_training_steps += 1
        return out

    aux = opts.architecture != "jumprelu"
    notes = (
        f"SAETrainer.step, Adam, grad clip 1.0, rescale_acts_by_decoder_norm; "
        f"aux-k {'on' if aux else 'n/a (JumpReLU: L0 loss)'}; autocast {trainer_cfg.autocast}"
    )
    return common.Built(step, lambda: bool(aux and trainer.dead_neurons.any()), notes)


def name_of(opts: BenchOptions) -> str:
    return f"saelens-{opts.architecture}"


if __name__ == "__main__":
    sys.exit(common.main(name_of, build))
