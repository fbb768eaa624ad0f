"""sparsify's TopK step, as its Trainer does it for one SparseCoder (loss_fn fvu, optimizer adam):
decoder rows set to unit norm, forward with the dead mask (aux-k on: auxk_alpha 1/32), loss
fvu + auxk_alpha·auxk, backward (its fused sparse encoder backward and embedding_bag decoder),
gradient made orthogonal to the decoder rows, torch.optim.Adam, firing bookkeeping in tokens.
Its dead criterion: tokens since fired > dead_feature_threshold (10M). Not timed: its LR scheduler.
sparsify trains float32 and autocasts only on CUDA, so bf16 is skipped.

`python -m jaxsae.bench.peers.sparsify --d_in 768 ...`
"""

from __future__ import annotations

import sys

from jaxsae.bench import inputs
from jaxsae.bench.options import BenchOptions
from jaxsae.bench.peers import common

AUXK_ALPHA = 1 / 32  # sparsify's default is 0 (aux-k off); ours is 1/32
DEAD_TOKENS = 10_000_000  # sparsify's default dead_feature_threshold


def build(opts: BenchOptions) -> common.Built:
    from sparsify import SparseCoder, SparseCoderConfig  # first: a missing library is reported, nothing else

    torch = common.setup_torch()

    if opts.dtype != "float32":
        raise common.Unsupported("sparsify: bf16 not supported on the CPU (it autocasts on CUDA only)")
    sae = SparseCoder(opts.d_in, SparseCoderConfig(num_latents=opts.d_sae, k=opts.k), "cpu", torch.float32)
    # the Trainer's Adam learning rate for this width
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (opts.d_sae / 2**14) ** 0.5)
    since_fired = torch.zeros(opts.d_sae, dtype=torch.long)
    dead = common.dead_index(opts)
    with torch.no_grad():
        sae.encoder.bias[dead] = inputs.DEAD_BIAS
        since_fired[dead] = DEAD_TOKENS + 1
    x = common.batch_tensor(opts)
    seen = {"aux": False}

    def step():
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > DEAD_TOKENS
        seen["aux"] = bool(dead_mask.any())
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + AUXK_ALPHA * out.auxk_loss).backward()
        did_fire = torch.zeros(opts.d_sae, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
        return out

    notes = (
        "Trainer step for one SparseCoder: torch.optim.Adam, aux-k on (auxk_alpha 1/32), unit-norm decoder"
    )
    return common.Built(step, lambda: seen["aux"], notes)


def name_of(opts: BenchOptions) -> str:
    return "sparsify-topk"


if __name__ == "__main__":
    sys.exit(common.main(name_of, build))
