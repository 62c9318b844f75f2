"""Data: listing datasets and their manifests, image bytes from files, URLs and object stores,
decoding, and dataset downloads (`fetch_lfw`). Imports only featurize.settings, .errors
and .atomic."""
