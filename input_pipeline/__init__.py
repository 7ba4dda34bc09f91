"""Input pipelines (TFDS + tf.data) for SpineNet detection and classification.

Importing the package loads nothing; import the submodules you use:
`detection` and `classification` (the pipelines), `common` (datasets,
splits, `get_builder`, `num_examples`), `shapes` (the built-in synthetic
TFDS dataset, registered on import) and `contract` (normalisation and
class-id constants; standard library only, no TensorFlow).
"""
