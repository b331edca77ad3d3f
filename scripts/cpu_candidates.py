"""Candidates for running the VGG16 conv trunk on a CPU, side by side in one process (docs/benchmarks.md).

    pip install opencv-python-headless openvino 'flowerfeat[onnx]'   # the optional candidates; missing ones are skipped
    python scripts/cpu_candidates.py --weights vgg16_features.pth --photos DIR [--batch 16] [--winograd]

Prints images/s (best of 3) and the min cosine to torch fp32 NCHW over the batch for: torch NCHW and channels_last
(oneDNN), OpenCV DNN (classic engine, Winograd off and on), OpenVINO fp32, ONNX Runtime; NNPACK per layer (after
torch._nnpack_available(), which initialises it); with --winograd, a Winograd F(4x4,3x3) / F(6x6,3x3) convolution
written with torch ops, per layer, against oneDNN's direct convolution.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowerfeat.backbones.vgg import VGG16
from flowerfeat.bench import row_cosines
from flowerfeat.data import load_image


def best_of(fn, reps=3):
    fn()
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        y = fn()
        best = min(best, time.perf_counter() - t)
    return best, y


def libraries(feat, x, onnx_path):
    """(name, callable) for every installed candidate that runs the whole trunk."""
    out = [("torch fp32 NCHW", lambda: feat(x).numpy())]
    cl, xcl = feat.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out.append(("torch fp32 channels_last", lambda: cl(xcl).numpy()))
    if importlib.util.find_spec("cv2"):
        import cv2

        cv2.setNumThreads(torch.get_num_threads())
        for winograd in (False, True):
            net = cv2.dnn.readNetFromONNX(onnx_path, engine=cv2.dnn.ENGINE_CLASSIC)
            net.enableWinograd(winograd)
            out.append((f"OpenCV {cv2.__version__} DNN classic, Winograd {'on' if winograd else 'off'}",
                        lambda net=net: (net.setInput(x.numpy()), net.forward())[1]))  # fmt: skip
    if importlib.util.find_spec("openvino"):
        import openvino as ov

        cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        model = ov.Core().compile_model(onnx_path, "CPU", cfg)
        req = model.create_infer_request()
        out.append((f"OpenVINO {ov.__version__.split('-')[0]} fp32", lambda: req.infer({0: x.numpy()})[model.output(0)]))
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        s = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        out.append((f"ONNX Runtime {ort.__version__}", lambda: s.run(None, {"x": x.numpy()})[0]))
    return out


def winograd_matrices(points, r=3):
    """(AT, G, BT) of Winograd F(m, r) from its interpolation points (plus infinity), BT solved from the identity."""
    a = len(points) + 1
    m = a - r + 1
    AT, G = np.zeros((m, a)), np.zeros((a, r))
    for j, p in enumerate(points):
        AT[:, j] = [p**i for i in range(m)]
        G[j] = [p**k / np.prod([p - q for q in points if q != p]) for k in range(r)]
    AT[m - 1, a - 1] = G[a - 1, r - 1] = 1
    rows, rhs = [], []
    for i in range(m):
        for k in range(r):
            for col in range(a):
                eq = np.zeros((a, a))
                eq[:, col] = AT[i] * G[:, k]
                rows.append(eq.ravel())
                rhs.append(float(col == i + k))
    return AT, G, np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0].reshape(a, a)


def winograd_conv(conv, m):
    """A 3x3 'same' convolution on NHWC tensors by Winograd F(m x m, 3 x 3): transforms as matmuls, one bmm."""
    AT, G, BT = winograd_matrices({4: [0, 1, -1, 2, -2], 6: [0, 1, -1, 2, -2, 0.5, -0.5]}[m])
    a = m + 2
    g = torch.from_numpy(G)
    U = (g @ conv.weight.detach().double() @ g.T).permute(2, 3, 1, 0).reshape(a * a, conv.in_channels, -1).float()
    AT, BT = torch.from_numpy(AT).float(), torch.from_numpy(BT).float()

    def run(x):  # (N, H, W, C) -> (N, H, W, K)
        n, h, w, c = x.shape
        th, tw = math.ceil(h / m), math.ceil(w / m)
        xp = F.pad(x, (0, 0, 1, tw * m + 1 - w, 1, th * m + 1 - h))
        s = xp.stride()
        tiles = xp.as_strided((a, a, n, th, tw, c), (s[1], s[2], s[0], m * s[1], m * s[2], s[3]))
        v = torch.matmul(BT, (BT @ tiles.reshape(a, -1)).view(a, a, -1))  # B^T d B
        mm = torch.bmm(v.view(a * a, -1, c), U)  # (a*a, tiles, K)
        y = torch.matmul(AT, (AT @ mm.view(a, -1)).view(m, a, -1))  # A^T M A
        y = y.view(m, m, n, th, tw, -1).permute(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, -1)[:, :h, :w]
        return y + conv.bias.detach()

    return run


def per_layer(feat, batch, winograd):
    sizes = [224, 224, 112, 112, 56, 56, 56, 28, 28, 28, 14, 14, 14]
    convs = [m for m in feat if isinstance(m, torch.nn.Conv2d)]
    for conv, hw in zip(convs, sizes):
        x = torch.relu(torch.randn(batch, conv.in_channels, hw, hw)).contiguous(memory_format=torch.channels_last)
        cl = conv.to(memory_format=torch.channels_last)
        direct, ref = best_of(lambda: cl(x))
        line = f"{conv.in_channels:3d}->{conv.out_channels:3d} @{hw:3d}: oneDNN {direct * 1e3:5.0f} ms"
        gflop = 2 * 9 * conv.in_channels * conv.out_channels * hw * hw * batch / 1e9
        line += f" ({gflop / direct:.0f} GFLOP/s)"
        if torch._nnpack_available():  # also initialises NNPACK: without it every call fails
            t, y = best_of(lambda: torch._nnpack_spatial_convolution(x.contiguous(), conv.weight, conv.bias, (1, 1)))
            line += f" | NNPACK {t * 1e3:5.0f} ms ({gflop / t:.0f} GFLOP/s dense-equivalent)"
        if winograd:
            xn = x.permute(0, 2, 3, 1)
            for m in (4, 6):
                t, y = best_of(lambda run=winograd_conv(conv, m): run(xn))
                err = float((y.permute(0, 3, 1, 2) - ref).abs().max() / ref.abs().max())
                line += f" | F({m}) {t * 1e3:5.0f} ms (rel. error {err:.0e})"
        print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--photos", type=Path, required=True, help="a folder with images (its first --batch are used)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--winograd", action="store_true")
    a = ap.parse_args()
    feat = VGG16().load_vgg16(VGG16().resolve_weights(a.weights), "pool5").features.eval()
    files = sorted(p for p in a.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: a.batch]
    x = torch.stack([VGG16().preprocessing(VGG16().resolve_weights(a.weights)).transform()(load_image(p)) for p in files])
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        onnx_path = f"{tmp}/features.onnx"
        torch.onnx.export(feat, (x,), onnx_path, dynamo=True, input_names=["x"], external_data=False)
        ref = feat(x).numpy()
        for name, fn in libraries(feat, x, onnx_path):
            t, y = best_of(fn)
            print(f"{name:45s} {len(x) / t:6.2f} images/s  min cosine {row_cosines(y, ref).min():.7f}", flush=True)
        per_layer(feat, a.batch, a.winograd)


if __name__ == "__main__":
    main()
