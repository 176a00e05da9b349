"""Synthetic anomalies pasted into normal images (DRAEM/MemSeg style), generated on the fly: what
CPR trains its local branch on, and any method can validate or choose settings on.

A Perlin-noise blob mask (random scale and rotation, thresholded) chooses where; the content is
either a texture image (a user folder, or a built-in procedural texture) or the image itself,
photometrically and geometrically altered and cut into shuffled tiles; it is alpha-blended in.
Every function takes an explicit key and works on one image, so ``jax.vmap`` makes a batch and a
seed reproduces it exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxad.runtime import compilation

MAX_RES_LOG2 = 5  # Perlin lattice resolution 2^U{0..5} per axis


def _fade(t: jax.Array) -> jax.Array:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin(key: jax.Array, size: int, res: jax.Array, angle: jax.Array) -> jax.Array:
    """2-D Perlin gradient noise [size, size] with ``res`` = (ry, rx) lattice cells (traced ints ≤ 32)
    over a grid rotated by ``angle`` (radians) about the centre; values roughly in [−1, 1]."""
    n = 2 ** MAX_RES_LOG2
    theta = jax.random.uniform(key, (n, n), jnp.float32, 0.0, 2.0 * math.pi)
    grads = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
    t = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size - 0.5
    y, x = jnp.meshgrid(t, t, indexing="ij")
    c, s = jnp.cos(angle), jnp.sin(angle)
    u = (c * y - s * x + 0.5) * res[0]
    v = (s * y + c * x + 0.5) * res[1]
    i0, j0 = jnp.floor(u), jnp.floor(v)
    fy, fx = u - i0, v - j0
    i0, j0 = i0.astype(jnp.int32), j0.astype(jnp.int32)

    def corner(di: int, dj: int) -> jax.Array:
        g = grads[jnp.mod(i0 + di, res[0]), jnp.mod(j0 + dj, res[1])]  # periodic lattice
        return g[..., 0] * (fy - di) + g[..., 1] * (fx - dj)

    wy, wx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return math.sqrt(2.0) * (top * (1 - wy) + bottom * wy)


def perlin_mask(key: jax.Array, size: int, allowed: jax.Array, threshold: float = 0.5,
                min_area: float = 1e-3, tries: int = 8) -> jax.Array:
    """Binary float mask [size, size]: thresholded Perlin noise (scale 2^U{0..5} per axis, rotation
    U(±90°)) inside ``allowed`` (bool [size, size], the foreground). ``tries`` draws are made and the
    first covering at least ``min_area`` of the image is kept (all zeros if none does)."""

    def draw(k: jax.Array) -> jax.Array:
        k_noise, k_shape = jax.random.split(k)
        u = jax.random.uniform(k_shape, (3,), jnp.float32)
        res = 2 ** jnp.minimum(jnp.floor(u[:2] * (MAX_RES_LOG2 + 1)), MAX_RES_LOG2).astype(jnp.int32)
        angle = (u[2] - 0.5) * math.pi
        return (perlin(k_noise, size, res, angle) > threshold) & allowed

    masks = jax.vmap(draw)(jax.random.split(key, tries))
    big = masks.mean(axis=(1, 2)) >= min_area
    first = jnp.argmax(big)
    return jnp.where(big[first], masks[first], False).astype(jnp.float32)


def procedural_texture(key: jax.Array, size: int) -> jax.Array:
    """A random colour texture [size, size, 3] in [0, 1]: fractal Perlin noise plus oriented stripes,
    mapped between two random colours, with fine grain. Stands in for DTD when no folder is given."""
    k_noise, k_grain, k_draw = jax.random.split(key, 3)
    octave = jnp.arange(4)
    res = jnp.stack([2 ** (octave + 1)] * 2, -1)
    noise = jax.vmap(lambda o, r: perlin(jax.random.fold_in(k_noise, o), size, r, jnp.float32(0.0)))(octave, res)
    base = jnp.sum(noise / (2.0 ** octave)[:, None, None], 0)
    u = jax.random.uniform(k_draw, (10,), jnp.float32)
    direction, frequency, weight, gain = u[0] * math.pi, 2.0 + 22.0 * u[1], u[2], 2.0 + 6.0 * u[3]
    colours = u[4:10].reshape(2, 3)
    t = jnp.arange(size, dtype=jnp.float32) / size
    y, x = jnp.meshgrid(t, t, indexing="ij")
    stripes = jnp.sin(2 * math.pi * frequency * (x * jnp.cos(direction) + y * jnp.sin(direction)))
    mix = jax.nn.sigmoid(gain * (base + weight * stripes))[..., None]
    grain = 0.05 * jax.random.normal(k_grain, (size, size, 1), jnp.float32)
    return jnp.clip(colours[0] * (1 - mix) + colours[1] * mix + grain, 0.0, 1.0)


def _photometric_and_geometric_ops(image: jax.Array, u: jax.Array) -> list:
    """The operations to draw from; u ∈ [0, 1) sets the strength of the photometric ones."""
    mean = image.mean()
    return [
        lambda: jnp.clip(image * (0.6 + 0.8 * u), 0, 1),  # brightness
        lambda: jnp.clip((image - mean) * (0.5 + u) + mean, 0, 1),  # contrast
        lambda: jnp.clip(image, 1e-6, 1) ** (0.5 + 1.5 * u),  # gamma
        lambda: image[..., jnp.array([1, 2, 0])],  # hue rotation by channel roll
        lambda: 1.0 - image,  # inversion
        lambda: image[:, ::-1],  # horizontal flip
        lambda: image[::-1],  # vertical flip
        lambda: jnp.rot90(image),  # rotation by 90° (square images)
    ]


def random_ops(key: jax.Array, image: jax.Array, count: int = 3) -> jax.Array:
    """``count`` operations drawn at random (with repetition) from photometric and geometric ones."""
    u = jax.random.uniform(key, (count, 2), jnp.float32)
    for pick, strength in u:
        ops = _photometric_and_geometric_ops(image, strength)
        image = jax.lax.switch(jnp.minimum((pick * len(ops)).astype(jnp.int32), len(ops) - 1), ops)
    return image


def tile_grid(size: int, tiles: int = 16) -> int:
    """The largest tile count per side ≤ ``tiles`` that divides ``size``."""
    return max(t for t in range(1, tiles + 1) if size % t == 0)


def shuffle_tiles(key: jax.Array, image: jax.Array, tiles: int = 16) -> jax.Array:
    """Cut a square image into a tiles×tiles grid and permute the tiles at random."""
    size = image.shape[0]
    g = tile_grid(size, tiles)
    t = size // g
    blocks = image.reshape(g, t, g, t, -1).transpose(0, 2, 1, 3, 4).reshape(g * g, t, t, -1)
    blocks = blocks[jax.random.permutation(key, g * g)]
    return blocks.reshape(g, g, t, t, -1).transpose(0, 2, 1, 3, 4).reshape(image.shape)


def salt_and_pepper(image: jax.Array, snr: jax.Array, u: jax.Array) -> jax.Array:
    """Replace a fraction 1 − snr of the pixels by black or white (half each); u [H, W] uniform."""
    hit = u > snr
    white = u > snr + 0.5 * (1.0 - snr)
    return jnp.where(hit[..., None], white[..., None].astype(image.dtype), image)


def augment(key: jax.Array, image: jax.Array, p: float = 0.3) -> jax.Array:
    """Independent salt-and-pepper (snr ~ U(0.97, 1)) and lightness ×(1 + U(±0.1)), each with prob p."""
    k_pixels, k_draw = jax.random.split(key)
    u = jax.random.uniform(k_draw, (4,), jnp.float32)
    noisy = salt_and_pepper(image, 0.97 + 0.03 * u[1], jax.random.uniform(k_pixels, image.shape[:2]))
    image = jnp.where(u[0] < p, noisy, image)
    scale = 1.0 + 0.2 * (u[3] - 0.5)
    return jnp.where(u[2] < p, jnp.clip(image * scale, 0.0, 1.0), image)


def texture_bank(key: jax.Array, count: int, size: int) -> jax.Array:
    """``count`` procedural textures [count, size, size, 3], made once per fit (one compiled call)."""
    return compilation.jit(jax.vmap(procedural_texture, in_axes=(0, None)), static_argnums=1)(jax.random.split(key, count), size)


def synthesize(key: jax.Array, image: jax.Array, allowed: jax.Array, textures: jax.Array,
               p_anomaly: float = 0.9, p_texture: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """One training query: (image with a blended-in anomaly, its binary mask) — or, with
    probability 1 − p_anomaly, the image unchanged and an empty mask.

    Source: with p_texture a random one of ``textures`` [T, S, S, 3] (a user folder or
    :func:`texture_bank`), otherwise the image after 3 random ops, tile-shuffled. Blend β ~ U(0.5, 1)."""
    k_mask, k_texture, k_tiles, k_ops, k_draw = jax.random.split(key, 5)
    u = jax.random.uniform(k_draw, (3,), jnp.float32)
    mask = perlin_mask(k_mask, image.shape[0], allowed) * (u[0] < p_anomaly)
    texture = textures[jax.random.randint(k_texture, (), 0, textures.shape[0])]
    shuffled = shuffle_tiles(k_tiles, random_ops(k_ops, image))
    source = jnp.where(u[1] < p_texture, texture, shuffled)
    beta = 0.5 + 0.5 * u[2]
    m = mask[..., None]
    return (1 - m) * image + m * (beta * source + (1 - beta) * image), mask


def paste(keys: jax.Array, images: jax.Array, textures: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One synthetic anomaly in each of ``images`` [B, H, W, 3] (anywhere in the image), drawn with
    its own key of ``keys`` [B] → (images, masks [B, H, W]); for choosing settings on held-out normal
    images without test data. An image pasted with the same key gets the same anomaly in any batch."""
    allowed = jnp.ones(images.shape[1:3], bool)
    synth = jax.vmap(lambda k, im: synthesize(k, im, allowed, textures, p_anomaly=1.0))
    return compilation.jit(synth)(keys, images)
