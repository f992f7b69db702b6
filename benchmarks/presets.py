"""The benchmark presets of issue 5 (defined in :mod:`jax_gna.bench`, so that the
installed ``jax-gna bench`` has them too).

* ``smoke``  -- three tiny 1-D/2-D/3-D problems (stride, dilation, causal); seconds on a CPU.
* ``paper``  -- the use cases, head dim 128, batch 1:
  1-D 32768, 1 head and 24 heads, window 2048, strides 1 / 256 / 2048;
  FLUX-4K 2-D 256x256, 24 heads, window 80x80, strides 1 / 16x1 / 16x16;
  HunyuanVideo 3-D 30x48x80, 24 heads, window 18x24x24 with strides 1 / 2x8x8 / 16x8x8,
  and window 30x40x40 with strides 1 / 1x32x8;
  Cosmos 3-D 16x44x80, 32 heads, windows 16x32x48 and 16x24x16, strides 1 / 1x8x16.
* ``small``  -- 2-D 128x128, 16 heads, head dim 64, kernel 13, batch 16, dilation 1 and 2.
* ``causal`` -- 3-D 30x32x32 and 60x64x64, 24 heads, head dim 128, causal in time
  (window 16x16x16: issue 5 does not name one).

Usage: ``from benchmarks.presets import PRESETS``; ``PRESETS["paper"]`` is a list of
:class:`Case`.
"""

from jax_gna.bench import PRESETS, SAMPLING, Case

__all__ = ["PRESETS", "SAMPLING", "Case"]
