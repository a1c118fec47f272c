import os
import pathlib
import tempfile

# No downloads at test time, caches under our control, quiet Ray.
_CACHE = pathlib.Path(os.environ.get("IMPRINT_TEST_CACHE", pathlib.Path(__file__).resolve().parents[1] / ".cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(_CACHE / "hf"))
os.environ.setdefault("TORCH_HOME", str(_CACHE / "torch"))
os.environ.setdefault("MPLCONFIGDIR", str(_CACHE / "mpl"))
os.environ.setdefault("IMPRINT_CACHE", str(_CACHE / "imprint"))
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    from pipeline.models import build_tiny

    return build_tiny("cpu", torch.float32)


class CountingNet:
    """Wraps a denoiser and counts its (batched) calls and rows."""

    def __init__(self, net):
        self.net = net
        self.calls = 0
        self.rows = 0
        self.dtype = getattr(net, "dtype", None)

    def __call__(self, x, t, emb):
        self.calls += 1
        self.rows += x.shape[0]
        return self.net(x, t, emb)


@pytest.fixture
def counting():
    return CountingNet
