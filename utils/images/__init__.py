"""Images in, tensors out: decoding any image input (decode.py), the evaluation transform
(preprocess.py), what the networks take (tensors.py), finding image files (files.py), reading them as a
Dataset (dataset.py) and the bundled sample photos (samples.py)."""
