"""The DDIM path is what it was before the issue 20-22 sessions touched the DDPO update loop (``ratio_by_step``).

``tests/data/ddim_golden_3432769.safetensors`` holds a shapes-model rollout (trajectory, log-probs) and the
gradients of every optimizer step of a DDPO-IS and a GRPO (KL anchor) update on it, computed by
``tests/ddim_golden.py`` with the code of commit 3432769 (how: that file's docstring). The current code must give the
same trajectories, log-probs, gradients and update metrics: bit-identical on the machine that wrote the file, and
within float32 kernel differences (a few 1e-5 of each tensor's scale) on another CPU. The committed
shapes tables are checked by ``tests/test_bench.py::test_bench_report_regenerates_the_committed_shapes_tables_byte_for_byte``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "data" / "ddim_golden_3432769.safetensors"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.usefixtures("one_thread")
def test_ddim_trajectories_log_probs_and_update_gradients_equal_the_commit_before() -> None:
    from safetensors.torch import load_file

    from ddim_golden import METRIC_KEYS, fingerprint

    old, new = load_file(str(GOLDEN)), fingerprint()
    assert set(old) == set(new)
    # Tolerances are relative to each tensor's scale: float32 kernels differ between CPUs (an AVX2 AMD EPYC gives the
    # golden's latents to 7e-5 and its gradients to 5e-5 of their largest value, and approx_kl, a difference of nearly
    # equal log-probs, to 6e-4 of itself; the machine that wrote it, exactly). The bounds are about 4x (2x for
    # approx_kl) the largest of those differences.
    scale = lambda t: float(t.abs().max())  # noqa: E731
    torch.testing.assert_close(new["latents"], old["latents"], rtol=0, atol=3e-4 * scale(old["latents"]))
    torch.testing.assert_close(new["log_probs"], old["log_probs"], rtol=0, atol=1e-6)
    for algo in ("ddpo-is", "grpo"):
        g_old, g_new = old[f"{algo}/grads"], new[f"{algo}/grads"]
        assert g_old.shape[0] == 2 and float(g_old.norm()) > 0  # two optimizer steps, a real gradient
        torch.testing.assert_close(g_new, g_old, rtol=0, atol=3e-4 * scale(g_old))
        torch.testing.assert_close(new[f"{algo}/metrics"], old[f"{algo}/metrics"], rtol=1e-3, atol=1e-6,
                                   equal_nan=True)
    # The second micro-batch really replays off-policy (some ratios clipped), so the PPO path is exercised.
    clipfrac = METRIC_KEYS.index("clipfrac")
    assert float(old["ddpo-is/metrics"][clipfrac]) > 0
