"""The examples run end to end (short settings) and show what they claim."""
import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_trains_eager_and_fused_alike(capsys):
    result = load_example("digits").main(["--epochs", "3", "--threads", "1"])
    out = capsys.readouterr().out
    assert "test accuracy" in out and "speedup" in out
    eager, fused = result["eager"]["accuracy"], result["fused"]["accuracy"]
    assert eager > 0.9  # 450 test images; a working net gets well above this after 3 epochs
    assert abs(eager - fused) <= 1 / 450 + 1e-12  # float rounding may flip at most a near tie
