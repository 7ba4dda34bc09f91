"""Input pipelines (TFDS + tf.data) for SpineNet detection and classification.

`import input_pipeline` registers the built-in `shapes` TFDS dataset and
exposes the `detection` and `classification` pipelines.
"""
from input_pipeline import shapes
from input_pipeline import common
from input_pipeline import detection
from input_pipeline import classification
from input_pipeline.common import default_data_config
from input_pipeline.common import get_builder
from input_pipeline.common import num_examples

__all__ = ['classification', 'common', 'default_data_config', 'detection',
           'get_builder', 'num_examples', 'shapes']
