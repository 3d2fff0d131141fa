"""Data augmentation that runs on the device, inside the jitted training step.

Every transformation is one random affine map (shift, rotation, zoom) plus an optional
smooth elastic displacement, applied by bilinear resampling with a black background, so the
cost is one gather per pixel whatever is switched on. Randomness comes only from the key
passed in, which the training step derives from the seed and the step number.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """Strengths of each transformation; all zero means no augmentation.

    Attributes:
      shift: maximum shift in pixels along each axis.
      rotate: maximum rotation in degrees.
      scale: zoom factor drawn from ``[1 - scale, 1 + scale]``.
      elastic: strength in pixels of the elastic displacement (sigma 4 pixels, as in Simard
        et al. 2003).
    """

    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0
    elastic: float = 0.0

    @property
    def enabled(self) -> bool:
        return any((self.shift, self.rotate, self.scale, self.elastic))


def _gaussian_kernel(sigma: float) -> jax.Array:
    radius = int(3 * sigma)
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _smooth_noise(key: jax.Array, shape: tuple[int, int, int], sigma: float) -> jax.Array:
    """Uniform noise ``[B, H, W]`` blurred with a separable Gaussian, scaled to unit std."""
    noise = jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
    k = _gaussian_kernel(sigma)
    blur = jax.vmap(lambda img: jax.scipy.signal.convolve(img, k[:, None], mode="same"))(noise)
    blur = jax.vmap(lambda img: jax.scipy.signal.convolve(img, k[None, :], mode="same"))(blur)
    return blur / (jnp.std(blur, axis=(1, 2), keepdims=True) + 1e-6)


def augment(key: jax.Array, images: jax.Array, settings: AugmentSettings) -> jax.Array:
    """Randomly transforms a batch of images.

    Args:
      key: PRNG key.
      images: float ``[B, H, W]`` with background 0.
      settings: the strengths.

    Returns:
      float ``[B, H, W]``, the transformed images (the input unchanged when disabled).
    """
    if not settings.enabled:
        return images
    b, h, w = images.shape
    k_shift, k_rot, k_scale, k_elastic = jax.random.split(key, 4)
    shift = jax.random.uniform(k_shift, (b, 2), minval=-settings.shift, maxval=settings.shift)
    angle = jnp.deg2rad(jax.random.uniform(k_rot, (b,), minval=-settings.rotate, maxval=settings.rotate))
    zoom = 1.0 + jax.random.uniform(k_scale, (b,), minval=-settings.scale, maxval=settings.scale)

    # Inverse map: for each output pixel, where to read in the input.
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    cr, cc = (h - 1) / 2.0, (w - 1) / 2.0
    dr, dc = rows[None] - cr - shift[:, 0, None, None], cols[None] - cc - shift[:, 1, None, None]
    cos, sin = (jnp.cos(angle) / zoom)[:, None, None], (jnp.sin(angle) / zoom)[:, None, None]
    src_r = cr + cos * dr - sin * dc
    src_c = cc + sin * dr + cos * dc
    if settings.elastic:
        k_r, k_c = jax.random.split(k_elastic)
        src_r = src_r + settings.elastic * _smooth_noise(k_r, (b, h, w), 4.0)
        src_c = src_c + settings.elastic * _smooth_noise(k_c, (b, h, w), 4.0)

    def resample(img, r, c):
        return jax.scipy.ndimage.map_coordinates(img, [r, c], order=1, mode="constant", cval=0.0)

    return jax.vmap(resample)(images, src_r, src_c)
