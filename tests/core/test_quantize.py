"""INT8 quantization (`kesi_dist.quantize`): calibration reads held-out training images only, never the
test split, and the quantized model is onnxruntime's QDQ int8 with per-channel weights. No Ray.
The quantize stage of every method's run, the report, the model card and its snippet in a fresh process
are in tests/methods/test_methods.py (its `finished_run`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kesi_dist.data.beton import BetonFile
from kesi_dist.data.holdout import holdout_indices
from kesi_dist.errors import UsageError
from kesi_dist.models import build_model
from kesi_dist.quantize import HoldoutReader, quantize_model


def test_calibration_reads_only_held_out_images(tiny_data, monkeypatch):
    """Every file the calibration opens, through onnxruntime's real `quantize_static`, is train.beton, and
    every image it serves is one of the held-out positions; the test split (val.beton) is never opened."""
    opened = []
    init = BetonFile.__init__

    def spy(self, path, *a, **kw):
        opened.append(Path(path).name)
        init(self, path, *a, **kw)

    monkeypatch.setattr(BetonFile, "__init__", spy)
    reader = HoldoutReader(tiny_data, holdout=0.1, seed=0, resolution=16, augment="cifar", images=40)
    torch.manual_seed(0)
    model = build_model("resnet20", 4, [4, 4, 4, 8, 8, 8, 16, 16, 16]).eval()
    fp32, int8 = quantize_model(model, reader, resolution=16)
    labels = BetonFile(Path(tiny_data) / "train.beton").labels
    held = set(holdout_indices(labels, 0.1, seed=0).tolist())
    assert opened and set(opened) == {"train.beton"}, opened
    assert len(reader.positions) >= 40 and set(reader.positions) <= held  # the calibrator may read it more than once
    assert len(set(reader.positions)) == 40
    first = list(reader.positions[:40])
    reader.rewind()
    reader.positions.clear()
    while reader.get_next() is not None:
        pass
    assert reader.positions == first  # the same images in the same order: the stage and `kesi export --int8` agree

    # onnxruntime's QDQ int8: weights int8 with one scale per output channel, activations uint8.
    graph = onnx.load_from_string(int8).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    inits = {t.name: t for t in graph.initializer}
    conv_w = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    deq_w = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in conv_w]
    assert deq_w and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in deq_w)
    assert all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in deq_w)  # per channel
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)).numpy()
    import onnxruntime as ort

    ref, got = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                for m in (fp32, int8))
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert np.abs(got - ref).max() < 0.2 * np.abs(ref).max() + 1e-3


def test_no_held_out_split_no_calibration(tiny_data):
    with pytest.raises(UsageError, match=r"data.holdout: 0"):
        HoldoutReader(tiny_data, holdout=0, seed=0, resolution=16, augment="cifar")
