"""Train the small digits CNN with PyTorch and export it to ONNX.

Regenerates psb_tvm/data/digits_cnn.onnx, a test model that exercises Conv,
BatchNormalization, MaxPool, Gemm and a dynamic Shape->Reshape flatten.
Usage: python tools/train_digits_cnn.py [--out PATH] [--epochs N] [--seed S]
"""

import argparse
import pathlib
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split  # noqa: E402


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, groups=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.conv3(x))
        x = x.view(x.size(0), -1)  # exported as Shape->Gather->Unsqueeze->Concat->Reshape
        return self.fc2(torch.relu(self.fc1(x)))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel in each direction (zero-filled)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DIGITS_ONNX)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits_split()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(augment(xt[idx], gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"training: {args.epochs} epochs in {time.perf_counter() - start:.1f}s")

    model.eval()
    with torch.no_grad():
        train_acc = accuracy(model(xt).numpy(), y_train)
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = accuracy(torch_logits, y_test)
    print(f"torch: train acc {train_acc:.4f}, test acc {torch_acc:.4f}")

    # TrainingMode.PRESERVE keeps BatchNormalization nodes (eval export folds them into Conv);
    # the model is in eval mode, so they are single-output inference BNs using the running stats.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # legacy-exporter deprecation; constant-folding advice (n/a in eval)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(x_test[:1]),),
            str(args.out),
            dynamo=False,
            opset_version=13,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )

    proto = onnx.load(str(args.out))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" in ops, ops
    print("onnx ops:", " ".join(ops))
    sess = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(None, {"input": x_test})[0]
    ort_acc = accuracy(ort_logits, y_test)
    print(f"onnxruntime: test acc {ort_acc:.4f}, max |logit diff| {np.abs(ort_logits - torch_logits).max():.2e}")
    assert ort_acc == torch_acc, (ort_acc, torch_acc)
    assert torch_acc >= 0.97, torch_acc
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
