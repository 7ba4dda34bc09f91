"""RetinaNet detection in JAX: anchors, box coding, targets, losses, NMS.

Everything runs on device under `jax.jit` with static shapes:

- `anchors`: multilevel anchor boxes in the head's output order.
- `outputs`: the head's per-level outputs flattened in anchor order.
- `box_ops`: IoU, (dy, dx, dh, dw) encode / decode, clipping.
- `targets`: anchor labelling (Model Garden `AnchorLabeler` semantics).
- `losses`: sigmoid focal loss and Huber box loss, RetinaNet total.
- `postprocess`: top-k candidates then per-class greedy NMS.
"""

from __future__ import annotations
