"""Fast inference and export of ResNets of torchvision's layout: ``optimize_for_inference``
(optimize.py) folds BatchNorm (fold.py) and runs the model with fused oneDNN convolutions on the CPU
(fused.py), in ONNX Runtime or OpenVINO, or on the fastest of them (backends.py), or in INT8
quantized from calibration images (quantize.py); export.py writes and checks TorchScript,
torch.export and ONNX files; runtimes.py says which runtimes are installed, compare.py how far outputs
differ, and speed_table.py measures a model's variants against eager. Nothing here
imports ``models``: a model says whether the fused path reproduces its forward (``model.fusable()``)."""
