"""evaluation/llama_cpp_parity.py, the quantized GGUF check's two decoders and their comparison,
without llama.cpp: a stand-in with llama_cpp.Llama's interface (tokenize, reset, eval, scores,
n_tokens, detokenize) runs our model by plain full forwards, no KV cache. Our static-cache decode
must then agree with it token for token, and a stand-in that slips one token must be counted."""
from __future__ import annotations

import numpy as np
import torch


from evaluation import llama_cpp_parity as parity
from evaluation.runner import run_task
from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.tokenizer import Tokenizer


class FakeLlama:
    """llama_cpp.Llama's decoding interface over a full forward per step (the naive reference)."""

    def __init__(self, model, tok, flip_at: int | None = None):
        self.model, self.tok, self.flip_at = model, tok, flip_at
        self.tokens: list[int] = []
        self.scores = np.zeros((256, model.config.vocab_size), dtype=np.float32)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        return self.tok.encode(text.decode())

    def reset(self) -> None:
        self.tokens = []

    @torch.no_grad()
    def eval(self, ids: list[int]) -> None:
        self.tokens += ids
        logits = self.model(torch.tensor([self.tokens])).logits[0, -1].numpy()
        if self.flip_at is not None and self.n_tokens == self.flip_at:
            logits = -logits       # the argmax changes: one slipped token
        self.scores[self.n_tokens - 1] = logits

    def detokenize(self, ids: list[int], special: bool = False) -> bytes:
        return self.tok.decode(ids).encode()


def test_decoders_agree_and_a_slip_is_counted(monkeypatch):
    monkeypatch.setattr(parity, "last_logits", lambda llm: llm.scores[llm.n_tokens - 1])
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0)).eval()
    tok = Tokenizer.from_dir()
    items = [{"id": str(i), "question": q, "answer": "#### 3"}
             for i, q in enumerate(["What is 1 plus 2?", "Tom has 3 apples.", "Add 4 and 5."])]
    ref, same, slipped = parity.Decoded(), parity.Decoded(), parity.Decoded()
    ours = run_task("gsm8k", items, tok, parity.ours(model, tok, 12, ref), batch_size=1)
    theirs = run_task("gsm8k", items, tok, parity.llama_cpp(FakeLlama(model, tok), 2, 12, same),
                      batch_size=1)
    assert [r["prediction"] for r in theirs] == [r["prediction"] for r in ours]
    a = parity.agreement(ref, same)
    assert a == {"same_answers": 3, "n": 3, "token_agreement": 1.0, "same_prompt_tokens": 3}
    assert ref.decode_tokens == sum(max(0, len(v) - 1) for v in ref.ids.values()) > 0
    prompt_len = len(next(iter(ref.prompt_ids.values())))
    flip = FakeLlama(model, tok, flip_at=prompt_len + 4)  # the 6th answer token of that prompt
    run_task("gsm8k", items, tok, parity.llama_cpp(flip, 2, 12, slipped), batch_size=1)
    b = parity.agreement(ref, slipped)
    assert b["same_answers"] <= 2 and b["token_agreement"] < 1.0
