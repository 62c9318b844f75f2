"""Models: backbone specs and families, weights, the VGGFace and dlib networks, face
alignment, preprocessing, and the Keras model builder. Importing this package registers the
backbone families (`featurize.models.registry`); nothing here imports Keras until a model
is built.
"""

from featurize.models import families as _families  # noqa: F401 - registers the families
