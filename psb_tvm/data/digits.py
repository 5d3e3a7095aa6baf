"""scikit-learn digits dataset split and the small CNN trained on it.

The data ships with scikit-learn (no download), so tests can check a compiled
model's accuracy end to end, deterministically.
"""

import pathlib

import numpy as np

DIGITS_ONNX = pathlib.Path(__file__).with_name("digits_cnn.onnx")


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test); x is float32 [N,1,8,8] in [0,1], y int64.

    A fixed stratified 75/25 split (random_state=0), the one the CNN was trained on.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return x_train, y_train, x_test, y_test


def digits_onnx_path() -> pathlib.Path:
    """Path of the bundled digits CNN (ONNX opset 13, input "input" [batch,1,8,8], output "logits")."""
    return DIGITS_ONNX
