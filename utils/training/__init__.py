"""Fine-tuning, beneath ``python -m utils.finetune``: the images and their split (data.py), the
training augmentation (augment.py), the optimizer, schedule, epoch and validation (loop.py), the
run's folder and its files (run_folder.py), resuming a run (resume.py) and its curves (plot.py)."""


class FinetuneError(ValueError):
    """A problem with the data, the options or the run to resume; the message says what to do."""
