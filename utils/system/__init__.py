"""What the commands, fine-tuning and fast inference share about the machine and its processes: which
precisions the CPU computes natively (hardware.py), timing side by side and the machine's description
(timing.py), one process per device under torchrun (distributed.py), and top-1/top-5 counts over one
process or many (accuracy.py)."""
