"""The preprocessing contract between the input pipelines and inference.

Constants and class-id layouts that the tf.data pipelines of this package
and any other preprocessing (e.g. `spinenet_jax.inference`) must agree on.
Imports nothing beyond the standard library, so that reading them never
loads TensorFlow.

Class ids (0 is background everywhere): detection on `coco` uses the
91-slot COCO category ids 1..90 (`COCO_LABEL_MAP`); detection on any other
dataset uses TFDS label + 1; classification uses TFDS label +
`config.data.label_offset`.
"""
from __future__ import annotations

# ImageNet mean and standard deviation per channel, on [0, 1] RGB: inputs
# are (pixels / 255 - MEAN_RGB) / STDDEV_RGB.
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)

# Classification evaluation: the central square crop keeps this fraction of
# the short side before resizing (the Inception / ResNet eval crop).
CENTER_CROP_FRACTION = 0.875

# Model Garden's 91-slot COCO layout: category id -> name (0 = background;
# ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
COCO_LABEL_MAP = {
    1: 'person', 2: 'bicycle', 3: 'car', 4: 'motorcycle', 5: 'airplane',
    6: 'bus', 7: 'train', 8: 'truck', 9: 'boat', 10: 'traffic light',
    11: 'fire hydrant', 13: 'stop sign', 14: 'parking meter', 15: 'bench',
    16: 'bird', 17: 'cat', 18: 'dog', 19: 'horse', 20: 'sheep', 21: 'cow',
    22: 'elephant', 23: 'bear', 24: 'zebra', 25: 'giraffe', 27: 'backpack',
    28: 'umbrella', 31: 'handbag', 32: 'tie', 33: 'suitcase', 34: 'frisbee',
    35: 'skis', 36: 'snowboard', 37: 'sports ball', 38: 'kite',
    39: 'baseball bat', 40: 'baseball glove', 41: 'skateboard',
    42: 'surfboard', 43: 'tennis racket', 44: 'bottle', 46: 'wine glass',
    47: 'cup', 48: 'fork', 49: 'knife', 50: 'spoon', 51: 'bowl',
    52: 'banana', 53: 'apple', 54: 'sandwich', 55: 'orange', 56: 'broccoli',
    57: 'carrot', 58: 'hot dog', 59: 'pizza', 60: 'donut', 61: 'cake',
    62: 'chair', 63: 'couch', 64: 'potted plant', 65: 'bed',
    67: 'dining table', 70: 'toilet', 72: 'tv', 73: 'laptop', 74: 'mouse',
    75: 'remote', 76: 'keyboard', 77: 'cell phone', 78: 'microwave',
    79: 'oven', 80: 'toaster', 81: 'sink', 82: 'refrigerator', 84: 'book',
    85: 'clock', 86: 'vase', 87: 'scissors', 88: 'teddy bear',
    89: 'hair drier', 90: 'toothbrush',
}

# COCO category id of each TFDS `coco` label 0..79 (TFDS orders the 80
# categories by id).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42,
    43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)

# The built-in `shapes` dataset's classes; index = TFDS label.
SHAPES_CLASS_NAMES = ('circle', 'square', 'triangle')


def label_map(dataset_name: str, detection: bool, label_offset: int
              ) -> dict[int, str]:
  """Class id -> name of the model's outputs; {} where the names are unknown.

  Args:
    dataset_name: TFDS name of the training data (`config.data.name`).
    detection: True for a detection (RetinaNet) model.
    label_offset: classification only: class id = TFDS label + label_offset.
  """
  if dataset_name.startswith('shapes'):
    offset = 1 if detection else label_offset
    return {i + offset: n for i, n in enumerate(SHAPES_CLASS_NAMES)}
  if dataset_name.startswith('coco') and detection:
    return dict(COCO_LABEL_MAP)
  return {}
