"""One process's share of an embedding run: its chunks of images through the model, each chunk written
as a part of the features folder as soon as all its rows are in."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from utils.features.folder import FeatureFolder, Row
from utils.images.dataset import ImageFiles, batches

# backend="auto" sets up each runtime (an ONNX export, compilations) and races them: seconds to a minute
# on a CPU, which a job pays back only if it is long. Shorter ones stay on the model they start with.
AUTO_PAYS_AFTER = 60.0  # seconds of work left, as the second batch measures it


def embed_chunks(model: nn.Module, folder: FeatureFolder, rows: list[Row], starts: list[int], *, batch_size: int,
                 workers: int, device: torch.device, size: int, file_dtype: str, show: bool,
                 later: Callable[[], nn.Module] | None = None) -> tuple[int, float, nn.Module]:
    """The chunks of ``rows`` that begin at ``starts``, embedded by ``model`` (decoded in ``workers``) into
    ``size`` columns of ``file_dtype`` and written to ``folder``; the images done, their seconds and the
    model that did the most. ``later()`` takes over after the second batch if the work left would take
    AUTO_PAYS_AFTER seconds or more. An unreadable image gets a zero row and its error, so that the
    folder lists it and gives it no feature."""
    chunk = folder.chunk
    order = [i for start in starts for i in range(start, min(start + chunk, len(rows)))]
    loader = batches(ImageFiles([rows[i].file for i in order], model.preprocess, strict=False), batch_size,
                     workers, device)
    open_chunks: dict[int, tuple[np.ndarray, list[str], list[int]]] = {}
    begin, embedded = time.perf_counter(), 0
    with torch.inference_mode(), tqdm(total=len(order), unit="image", disable=not show or None, file=sys.stderr,
                                      smoothing=0.1) as bar:
        for indices, images, _, errors in loader:
            n = len(indices)
            if n < batch_size and getattr(model, "choices", None) is not None:  # "auto": pad the last batch
                images = torch.cat([images, images.new_zeros(batch_size - n, *images.shape[1:])])  # not to race again
            tick = time.perf_counter()
            out = model(images.to(device, non_blocking=True))[:n].float().cpu().numpy()
            if later is not None and embedded:  # timed on the second batch: the first pays one-time warm-ups
                if (time.perf_counter() - tick) / n * (len(order) - embedded - n) >= AUTO_PAYS_AFTER:
                    model = later()
                later = None
            embedded += n
            for j, (k, error) in enumerate(zip(indices.tolist(), errors)):
                row = order[k]
                start = row - row % chunk
                if start not in open_chunks:  # its buffer, made once
                    length = min(chunk, len(rows) - start)
                    open_chunks[start] = (np.zeros((length, size), dtype=file_dtype), [""] * length, [0])
                features, errs, done = open_chunks[start]
                if error:
                    errs[row - start] = error
                else:
                    features[row - start] = out[j]
                done[0] += 1
                if done[0] == len(errs):
                    folder.write_part(start, features, errs)
                    del open_chunks[start]
            bar.update(n)
    return len(order), time.perf_counter() - begin, model
