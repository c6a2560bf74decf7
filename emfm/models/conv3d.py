"""3D convolutions through XLA's 2D convolution on CPU.

XLA's CPU backend runs 3D convolutions far slower than 2D ones: a 3x3x3 training step on
2 x 16 x 64 x 64 x 16 voxels takes about 250-480 ms on a 2-core CPU, the same step folded onto 2D
convolutions 60-90 ms. So on CPU a stride-1 'SAME' 3D convolution with kernel (kz, ky, kx) is
computed depth-folded, over the b * z sections as 2D images:
  "fold": the kz depth-shifted copies of the zero-padded input stacked along channels, one 2D
      convolution with kernel (ky, kx, kz * cin, cout);
  "fold_sum": the sum of kz 2D convolutions of the depth-shifted sections.
With kz == 1 both are one 2D convolution over the sections. Measured on a 2-core CPU
(benchmarks/bench_conv3d_cpu.py, experiments/benchmarks/conv3d_cpu.md) both are 2-9x faster than
the native 3D convolution. "fold" is the faster below 32 input channels (its longer contraction
keeps the matrix products efficient); from 32 on "fold_sum" was faster on a busy machine and
level or slower on a quieter one, and "auto" takes it from `FOLD_SUM_FROM` channels on. The
result is the same convolution (fp32 rounding aside); gradients flow through the same
formulation. Other backends keep the native convolution (`jax.lax.conv_general_dilated`).

`conv_general_dilated` has the signature of `jax.lax.conv_general_dilated` and is handed to
`nnx.Conv(..., conv_general_dilated=...)`, so the modules keep their parameters (`kernel`
[kz, ky, kx, cin, cout], `bias`) and existing checkpoints load unchanged. Which formulation runs
is decided at trace time: `impl` ("auto": folded on CPU, native elsewhere; "native"; "fold";
"fold_sum") is set by `EMFM_CONV3D` or, for a block of code, `with use_impl("native"): ...`
(functions already compiled keep the formulation they were traced with).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "native", "fold", "fold_sum")
_impl = [os.environ.get("EMFM_CONV3D", "auto")]
_DN_2D = ("NHWC", "HWIO", "NHWC")


FOLD_SUM_FROM = 32  # "auto" on CPU: "fold" below this many input channels, "fold_sum" from it on


def current_impl(cin: int | None = None) -> str:
    """The formulation a 3D convolution with `cin` input channels traced now uses: "native",
    "fold" or "fold_sum"."""
    impl = _impl[-1]
    if impl not in IMPLS:
        raise ValueError(f"EMFM_CONV3D={impl!r}: use one of {IMPLS}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "native"
        return "fold_sum" if cin is not None and cin >= FOLD_SUM_FROM else "fold"
    return impl


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Trace 3D convolutions with `impl` inside the block (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"3D convolution impl {impl!r}: use one of {IMPLS}")
    _impl.append(impl)
    try:
        yield
    finally:
        _impl.pop()


def _pad_depth(x: jax.Array, kz: int) -> jax.Array:
    """Zero-pad axis 1 (depth) as 'SAME' does: (kz - 1) // 2 before, kz // 2 after."""
    return jnp.pad(x, ((0, 0), ((kz - 1) // 2, kz // 2)) + ((0, 0),) * (x.ndim - 2))


def _conv2d(x: jax.Array, w: jax.Array, precision, preferred) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        w,
        (1, 1),
        "SAME",
        dimension_numbers=_DN_2D,
        precision=precision,
        preferred_element_type=preferred,
    )


def conv3d_native(x, kernel, *, precision=None, preferred_element_type=None) -> jax.Array:
    """`x` [b, z, y, x, cin] * `kernel` [kz, ky, kx, cin, cout], 'SAME', stride 1: XLA's own
    3D convolution."""
    return lax.conv_general_dilated(
        x,
        kernel,
        (1, 1, 1),
        "SAME",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _fold(x, kernel, precision, preferred_element_type):
    b, d, h, w, c = x.shape
    kz, ky, kx, _, cout = kernel.shape
    if kz == 1:
        xs = x
    else:
        xp = _pad_depth(x, kz)
        xs = jnp.concatenate([xp[:, i : i + d] for i in range(kz)], axis=-1)
    w2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(ky, kx, kz * c, cout)
    y = _conv2d(xs.reshape(b * d, h, w, kz * c), w2, precision, preferred_element_type)
    return y.reshape(b, d, h, w, cout)


def conv3d_fold(x, kernel, *, precision=None, preferred_element_type=None) -> jax.Array:
    """The same convolution as `conv3d_native`: the kz depth-shifted copies of the padded input
    stacked along channels, one 2D convolution with kernel [ky, kx, kz * cin, cout] over the
    b * z sections. The stacked copy is rebuilt for the backward pass rather than kept, so a
    training step holds no more activations than with the native convolution."""
    f = functools.partial(_fold, precision=precision, preferred_element_type=preferred_element_type)
    return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)(x, kernel)


def conv3d_fold_sum(x, kernel, *, precision=None, preferred_element_type=None) -> jax.Array:
    """The same convolution as `conv3d_native`: the sum of kz 2D convolutions of the depth-shifted
    sections (no stacked copy of the input)."""
    b, d, h, w, c = x.shape
    kz = kernel.shape[0]
    xp = _pad_depth(x, kz) if kz > 1 else x
    y = None
    for i in range(kz):
        xi = xp[:, i : i + d].reshape(b * d, h, w, c)
        yi = _conv2d(xi, kernel[i], precision, preferred_element_type)
        y = yi if y is None else y + yi
    return y.reshape(b, d, h, w, -1)


FORMULATIONS = {"native": conv3d_native, "fold": conv3d_fold, "fold_sum": conv3d_fold_sum}


def conv3d(x, kernel, *, impl: str | None = None, precision=None, preferred_element_type=None):
    """3D 'SAME' stride-1 convolution, NDHWC input and DHWIO kernel, in the formulation `impl`
    (default: `current_impl(cin)`)."""
    impl = current_impl(x.shape[-1]) if impl is None else impl
    fn = FORMULATIONS[impl]
    return fn(x, kernel, precision=precision, preferred_element_type=preferred_element_type)


def conv3d_transpose_blocks(x, kernel, bias=None) -> jax.Array:
    """`nnx.ConvTranspose` with kernel size = stride (no overlap), 'VALID', NDHWC, as one einsum:
    each voxel becomes a kz x ky x kx block, `out[f * i + a] = x[i] @ kernel[f - 1 - a]`
    (`lax.conv_transpose` flips the kernel). XLA's CPU transposed 3D convolution took about 15x
    as long in a training step (2 x 8 x 32 x 32 x 32 voxels, factor 2, 2-core CPU)."""
    b, d, h, w, _ = x.shape
    kz, ky, kx, _, cout = kernel.shape
    y = jnp.einsum("bzyxc,pqrco->bzpyqxro", x, kernel[::-1, ::-1, ::-1])
    y = y.reshape(b, d * kz, h * ky, w * kx, cout)
    return y if bias is None else y + bias


def _is_default(v: Sequence[int] | None) -> bool:
    return v is None or all(int(s) == 1 for s in v)


def _foldable(*conv) -> bool:
    """Whether the positional arguments `conv` of `lax.conv_general_dilated` describe a stride-1,
    undilated, ungrouped 'SAME' NDHWC / DHWIO 3D convolution."""
    lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dims, groups, batch_groups = conv
    if lhs.ndim != 5 or groups != 1 or batch_groups != 1:
        return False
    if not (_is_default(strides) and _is_default(lhs_dilation) and _is_default(rhs_dilation)):
        return False
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dims)
    if tuple(dn.lhs_spec) != (0, 4, 1, 2, 3) or tuple(dn.rhs_spec) != (4, 3, 0, 1, 2):
        return False  # not NDHWC / DHWIO
    if tuple(dn.out_spec) != (0, 4, 1, 2, 3):
        return False
    if isinstance(padding, str):
        return padding.upper() == "SAME"
    same = [((k - 1) // 2, k // 2) for k in rhs.shape[:3]]
    return [tuple(int(q) for q in p) for p in padding] == same


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
):
    """Drop-in for `jax.lax.conv_general_dilated` (as `nnx.Conv(conv_general_dilated=...)`): a
    stride-1 'SAME' NDHWC 3D convolution runs in the formulation `current_impl(cin)`; anything
    else goes to lax unchanged."""
    # lax.conv_general_dilated's positional arguments
    conv = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    conv += (feature_group_count, batch_group_count)
    impl = current_impl(lhs.shape[-1] if lhs.ndim == 5 else None)
    if impl != "native" and not kwargs.get("out_sharding") and _foldable(*conv):
        return conv3d(
            lhs, rhs, impl=impl, precision=precision, preferred_element_type=preferred_element_type
        )
    return lax.conv_general_dilated(
        *conv, precision=precision, preferred_element_type=preferred_element_type, **kwargs
    )
