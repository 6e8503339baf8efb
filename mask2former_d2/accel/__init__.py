"""Fast formulations of the model's computations, one module per concern.

Each module here computes what a reference formulation in ``mask2former_d2.modeling`` or
``mask2former_d2.layers`` computes, faster on a CPU (less memory traffic, fewer layout
conversions, cache-sized working sets), and is held equal to that reference by a test (exactly
in float32 or within a stated tolerance). They are chosen once, when the model is built, by
``MODEL.MASK_FORMER.FAST_PATHS`` (the ``fast_paths`` constructor argument of the modules that use
them), never per call from the device; see docs/layout.md for the map.

- :mod:`.postprocessing`: semantic / panoptic / instance outputs a band of rows at a time
  (reference: :mod:`mask2former_d2.modeling.postprocessing`).
- :mod:`.ms_deform_attn`: deformable-attention sampling as one ``embedding_bag`` per query and
  head (reference: ``grid_sample`` in :mod:`mask2former_d2.layers.ms_deform_attn`).
- :mod:`.fold_bn`: batch norms (frozen, or in eval mode) folded into their convolutions at inference.
- :mod:`.pointwise_conv`: 1x1 convolutions and linear + ReLU as matrix products (reference: the
  layers themselves).
- :mod:`.layout`: channels-last test and a per-channel resize without a layout copy.
- :mod:`.precision`: low-precision inference (bf16 / fp16) and its emulation for tests.
"""
