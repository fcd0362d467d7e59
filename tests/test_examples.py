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


def test_pinn_fused_loss_is_eager_loss_and_training_converges(capsys):
    result = load_example("pinn").main(["--steps", "300", "--points", "64", "--timing-rounds", "1"])
    out = capsys.readouterr().out
    assert "max |u - sin|" in out and "training step" in out
    loss = result["initial_loss"]
    assert abs(loss["fused"] - loss["eager"]) <= 1e-5 * abs(loss["eager"])  # float32, the same parameters
    assert result["max_error"] < 0.1  # untrained: ~1 (u ~ 0 against sin); 300 Adam steps get well below
