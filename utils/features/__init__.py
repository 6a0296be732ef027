"""Frozen features: a folder of image embeddings that survives stops and many processes (folder.py,
embedding.py), and the probes that read it: kNN (knn.py) and a linear head (linear.py)."""
