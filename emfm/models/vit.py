"""Vision Transformer encoder for 2D and 3D EM (Dosovitskiy et al. 2021), NNX.

Input is channel-last, `[b, y, x, c]` (2D patch size) or `[b, z, y, x, c]` (3D patch size,
anisotropic allowed, e.g. 4x16x16 for thick sections). The encoder can run on a subset of tokens
(`ids_keep`, for MAE) and returns `(tokens, aux)`:
  tokens: `[b, 1 + r + n, d]` final normed sequence (cls, r registers, n patch tokens);
  aux: {"cls": [b, d], "registers": [b, r, d], "patch_tokens": [b, n, d],
        "patch_map": [b, *grid, d] (only when all tokens are kept),
        "blocks": {i: [b, n, d] patch tokens after block i} for the requested blocks}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from emfm.errors import UserError
from emfm.models.layers import Block, gather_tokens, layer_norm, run_blocks
from emfm.models.patch_embed import PatchEmbed, grid_shape
from emfm.models.pos_embed import sincos_embedding

# Width, depth, heads of the ViT family: B, L, H from Dosovitskiy et al. 2021 ("An image is worth
# 16x16 words", Table 1); Ti and S from Touvron et al. 2021 (DeiT, Table 1).
SIZES: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, heads=3),
    "S": dict(width=384, depth=12, heads=6),
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1024, depth=24, heads=16),
    "H": dict(width=1280, depth=32, heads=16),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass(frozen=True)
class ViTSpec:
    """Resolved architecture (size table plus overrides)."""

    patch_size: tuple[int, ...]
    in_channels: int = 1
    width: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    num_registers: int = 0
    dtype: str = "float32"
    remat: bool = False

    @classmethod
    def from_config(cls, cfg) -> ViTSpec:
        if cfg.size not in SIZES:
            raise UserError(f"model.size={cfg.size!r}: known sizes are {', '.join(SIZES)}")
        base = dict(SIZES[cfg.size])
        for k in ("width", "depth", "heads"):
            if getattr(cfg, k) is not None:
                base[k] = int(getattr(cfg, k))
        same = ("in_channels", "mlp_ratio", "num_registers", "dtype", "remat")
        return cls(patch_size=tuple(cfg.patch_size), **{k: getattr(cfg, k) for k in same}, **base)

    @property
    def ndim(self) -> int:
        return len(self.patch_size)


class ViT(nnx.Module):
    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        dt = DTYPES[spec.dtype]
        self.patch_embed = PatchEmbed(
            spec.patch_size, spec.in_channels, spec.width, dtype=dt, rngs=rngs
        )
        init = nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, spec.width), jnp.float32))
        self.registers = (
            nnx.Param(init(rngs.params(), (1, spec.num_registers, spec.width), jnp.float32))
            if spec.num_registers
            else None
        )
        self.blocks = nnx.List(
            [
                Block(spec.width, spec.heads, spec.mlp_ratio, dtype=dt, rngs=rngs)
                for _ in range(spec.depth)
            ]
        )
        self.norm = layer_norm(spec.width, dtype=dt, rngs=rngs)

    @property
    def num_prefix(self) -> int:
        return 1 + self.spec.num_registers

    def grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        return grid_shape(spatial, self.spec.patch_size)

    def _check(self, x) -> None:
        if x.ndim != self.spec.ndim + 2:
            raise UserError(
                f"ViT with patch size {self.spec.patch_size} takes [b, "
                f"{'z, ' * (self.spec.ndim == 3)}y, x, c] "
                f"input; got shape {x.shape}"
            )
        if x.shape[-1] != self.spec.in_channels:
            raise UserError(
                f"ViT expects {self.spec.in_channels} channel(s); input has {x.shape[-1]}"
            )

    def embed(self, x: Float[Array, "b *sp c"]) -> Float[Array, "b n d"]:
        """Patch embedding plus fixed position embedding for this input's grid."""
        self._check(x)
        pos = jnp.asarray(sincos_embedding(self.spec.width, self.grid(x.shape[1:-1])))
        return self.patch_embed(x) + pos[None].astype(self.patch_embed.proj.dtype)

    def __call__(
        self,
        x: Float[Array, "b *sp c"],
        *,
        ids_keep: Int[Array, "b k"] | None = None,
        return_blocks: Sequence[int] = (),
    ) -> tuple[Float[Array, "b t d"], dict]:
        self._check(x)
        b = x.shape[0]
        grid = self.grid(x.shape[1:-1])
        t = embedded = self.embed(x)
        if ids_keep is not None:
            t = gather_tokens(t, ids_keep)
        prefix = [jnp.broadcast_to(self.cls_token[...], (b, 1, self.spec.width))]
        if self.registers is not None:
            prefix.append(
                jnp.broadcast_to(self.registers[...], (b, self.spec.num_registers, self.spec.width))
            )
        t = jnp.concatenate([p.astype(t.dtype) for p in prefix] + [t], axis=1)
        t, outs = run_blocks(self.blocks, t, remat=self.spec.remat, collect=tuple(return_blocks))
        t = self.norm(t).astype(jnp.float32)
        npre = self.num_prefix
        aux = {
            "cls": t[:, 0],
            "registers": t[:, 1:npre],
            "patch_tokens": t[:, npre:],
            "blocks": {i: o[:, npre:].astype(jnp.float32) for i, o in outs.items()},
        }
        if ids_keep is None:
            aux["patch_map"] = t[:, npre:].reshape(b, *grid, self.spec.width)
            aux["embed_map"] = embedded.astype(jnp.float32).reshape(b, *grid, self.spec.width)
        return t, aux


def count_params(module: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
