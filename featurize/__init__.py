"""Run a frozen pretrained backbone once per image and cache the embeddings to HDF5."""
