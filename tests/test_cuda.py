"""The CUDA path (``make gpu-check`` runs this file on a GPU; without CUDA every test here skips).

On CUDA the model takes other code paths than on the CPU (PyTorch's fused attention instead of the explicit small
one, the library dropout instead of the 16-bit one, bfloat16 autocast in training): these tests pin that the
paths agree with the CPU's where they must.
"""

from dataclasses import replace

import pytest
import torch

from ktlib.bench import synthetic_batch
from ktlib.config import model_config
from ktlib.model import SETTINGS, KTModel
from ktlib.runs import load_or_train, plan
from ktlib.train import eval_loader, evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

SMALL = dict(d=16, heads=4, layers=2, mem_layers=2, kt_layers=2, text_dropout=0.0, embed_dropout=0.0,
             relu_dropout=0.0, res_dropout=0.0, out_dropout=0.0, attn_dropout={"l": 0.0, "a": 0.0, "v": 0.0})


@pytest.mark.parametrize("alignment", ["aligned", "unaligned"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_forward_on_cuda_equals_the_cpu(setting, alignment):
    torch.manual_seed(0)
    cfg = model_config("mosi", alignment, setting=setting, **SMALL)
    model = KTModel(cfg).eval()
    batch = synthetic_batch(cfg, 6)
    with torch.no_grad():
        cpu = model(batch)
        gpu = model.to("cuda")({k: v.to("cuda") for k, v in batch.items()}).cpu()
    assert gpu.shape == cpu.shape
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=2e-3)


def test_kt_on_cuda_never_reads_audio_at_test():
    torch.manual_seed(0)
    cfg = model_config("mosi", "unaligned", setting="kt", **SMALL)
    model = KTModel(cfg).to("cuda").eval()
    batch = {k: v.to("cuda") for k, v in synthetic_batch(cfg, 6).items()}
    poisoned = dict(batch, a=torch.full_like(batch["a"], float("nan")))
    with torch.no_grad():
        torch.testing.assert_close(model(poisoned), model(batch), atol=0, rtol=0)


def test_a_run_trained_on_cuda_reads_back_on_the_cpu(mosi, tmp_path):
    job = plan(mosi, ["language_vision"], [1], "smoke")[0]
    train_cfg = replace(job.train, device="cuda", amp=False)
    run = load_or_train(job.model, train_cfg, mosi, tmp_path, progress=False)
    assert run.config["train"]["device"] == "cuda"
    model = run.load_model()  # onto the CPU
    assert next(model.parameters()).device.type == "cpu"
    _, metrics, pred = evaluate(model, eval_loader(mosi, "test", 16, "language_vision"), torch.device("cpu"))
    assert pred.shape[0] == len(mosi["test"])
    assert metrics["mae"] == pytest.approx(run.metrics["test"]["mae"], abs=1e-3)
