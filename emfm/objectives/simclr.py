"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations").

Both augmented views go through the encoder; a projection MLP maps the pooled feature (cls token of
a ViT, global average of the U-Net's feature map) to `proj_dim`, and NT-Xent with in-batch negatives
pulls the two views of each patch together.
"""

from __future__ import annotations

from flax import nnx

from emfm.models.heads import MLP, global_feature
from emfm.objectives.contrastive import nt_xent, two_view_definition


class Heads(nnx.Module):
    def __init__(self, width: int, cfg, rngs: nnx.Rngs):
        self.projector = MLP(width, cfg.proj_hidden, cfg.proj_dim, layers=2, rngs=rngs)


def embed(encoder, heads: Heads, x):
    """`[b, proj_dim]` projections of the pooled encoder features."""
    _, aux = encoder(x)
    return heads.projector(global_feature(aux))


def pair_loss(encoder, heads: Heads, x1, x2, rng, cfg, teacher=None):
    z1, z2 = embed(encoder, heads, x1), embed(encoder, heads, x2)
    value = nt_xent(z1, z2, cfg.temperature)
    return value, {"loss": value}


DEFINITION = two_view_definition("simclr", Heads, pair_loss)
