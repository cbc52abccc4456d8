"""kesi_dist: distributed iterative pruning with ensemble distillation (KESI).

Imports sit at the top of every module, except a heavy one (torch, Ray, onnxruntime, timm, torch_pruning,
ffcv, numba, matplotlib, pyarrow, deepspeed, TensorBoard) where it would cost seconds to a command that
does not use it: the CLI, the config every command loads, `kesi status` and the Ray runtime's helpers
import those where they are used.
"""
__version__ = "0.1.0"
