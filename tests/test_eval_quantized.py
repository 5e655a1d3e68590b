"""`quantscale eval` on a `save_quantized` checkpoint keeps its static activation scales."""

import torch

from quantscale.commands.eval import _evaluate_path
from quantscale.export.fake_quant import save_quantized
from quantscale.orchestrator import load_model, quantize_model


def test_eval_loads_quantlinears_with_static_scales(tiny_llama, tmp_path, monkeypatch):
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(tiny_llama, "W8A8", list(calib.split(2)), method="rtn")
    save_quantized(tiny_llama, tmp_path / "q")
    seen = {}

    def fake_evaluate(model, tokenizer, tasks, *rest):
        seen["model"] = model
        return {"ppl": 1.0}

    monkeypatch.setattr("quantscale.commands.eval.load_tokenizer", lambda *a: None)
    monkeypatch.setattr("quantscale.commands.eval.evaluate", fake_evaluate)
    args = type(
        "A",
        (),
        {"dtype": "float32", "n_tokens": 8, "n_items": 1, "seq_len": 8, "reader": "quantscale"},
    )()
    _evaluate_path(tmp_path / "q", None, args, ["ppl"])
    reloaded, _ = load_model(tmp_path / "q")
    names = [n for n, b in seen["model"].named_buffers() if n.endswith("input_scale")]
    assert names and names == [n for n, _ in reloaded.named_buffers() if n.endswith("input_scale")]
    ids = calib[:1]
    with torch.inference_mode():
        torch.testing.assert_close(seen["model"](ids).logits, tiny_llama(ids).logits)
