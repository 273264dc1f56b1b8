"""Greedy generation with ONNX Runtime and the exported KV cache, mirroring ``eval.torch_greedy_generate``.

``OrtCausalLM(session, tokenizer).generate_fn(max_new_tokens)`` is a ``generate_fn`` that
``edge_lora.eval.score`` accepts, so every ONNX artifact (fp32, quantized, hot-swapped) is scored by the same
loop. ``run_options`` carries an active LoRA adapter for hot-swap sessions.

On edge_lora's fused decoder graph (export.graph = "fused") greedy decoding keeps the KV cache in shared,
preallocated buffers (edge_lora.runtimes.kv_loop.SharedKV) when the adapter is given as ``lora`` tensors
(``HotswapSession.lora_feeds``): IO binding cannot carry a RunOptions adapter. With ``run_options`` alone it
takes the plain loop, which is slower but applies the adapter.
"""

from __future__ import annotations

import numpy as np

from edge_lora.runtimes.ort_session import empty_past, full_feeds, lora_feeds


class OrtCausalLM:
    def __init__(self, session, tokenizer=None, run_options=None, lora: dict | None = None):
        from edge_lora.runtimes.kv_loop import is_fused

        self.session = session
        self.tokenizer = tokenizer
        self.run_options = run_options
        self.lora = lora
        self.fused = is_fused(session)
        self.output_names = [o.name for o in session.get_outputs()]
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
        # Some exports (optimum's Gemma) take no position_ids and count positions from 0 in every row, so a
        # left-padded row would run at shifted positions: such graphs decode prompts of one length at a time.
        self.takes_positions = "position_ids" in {i.name for i in session.get_inputs()}

    @property
    def shared_kv(self) -> bool:
        """Shared KV buffers only when the adapter (if any) comes as tensors: see the module docstring."""
        return self.fused and (self.run_options is None or self.lora is not None)

    def _run(self, feeds):
        feeds.update(lora_feeds(self.session, self.lora))
        outs = self.session.run(self.output_names, feeds, self.run_options)
        return dict(zip(self.output_names, outs))

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits (batch × length × vocab) of whole sequences in one pass."""
        return self._run(full_feeds(self.session, np.asarray(input_ids), attention_mask, lora=self.lora or {}))["logits"]

    def step(self, input_ids, attention_mask, past):
        """One decode step. ``past`` maps past_key_values.* names to arrays (empty on the first step)."""
        positions = np.clip(attention_mask.cumsum(-1) - 1, 0, None)[:, -input_ids.shape[1]:]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **past}
        if self.takes_positions:
            feeds["position_ids"] = positions
        out = self._run(feeds)
        new_past = {name: out[name.replace("past_key_values", "present")] for name in self.past_names}
        return out["logits"][:, -1, :], new_past

    def greedy_ids(self, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int = 0,
                   stop_ids: set[int] | None = None, stop_on_newline: bool = False) -> list[list[int]]:
        """Left-padded batched greedy decoding; returns the new token ids per row."""
        lengths = {len(p) for p in prompt_ids}
        if not self.takes_positions and len(lengths) > 1:
            out: list[list[int]] = [[] for _ in prompt_ids]
            for n in sorted(lengths):
                rows = [i for i, p in enumerate(prompt_ids) if len(p) == n]
                for i, ids in zip(rows, self.greedy_ids([prompt_ids[i] for i in rows], max_new_tokens, pad_id,
                                                        stop_ids, stop_on_newline)):
                    out[i] = ids
            return out
        width = max(len(p) for p in prompt_ids)
        input_ids = np.array([[pad_id] * (width - len(p)) + list(p) for p in prompt_ids], dtype=np.int64)
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], dtype=np.int64)
        if self.shared_kv:
            from edge_lora.runtimes.kv_loop import SharedKV

            kv = SharedKV(self.session, width + max_new_tokens, len(prompt_ids), self.lora)

            def step(ids, mask, past):
                return kv.step(ids), past
        else:
            step = self.step
        past = {} if self.shared_kv else empty_past(self.session, len(prompt_ids))
        generated: list[list[int]] = [[] for _ in prompt_ids]
        done = [False] * len(prompt_ids)
        stop_ids = stop_ids or set()
        step_ids = input_ids
        for _ in range(max_new_tokens):
            logits, past = step(step_ids, mask, past)
            next_ids = logits.argmax(-1)
            for row, tok in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                if tok in stop_ids:
                    done[row] = True
                    continue
                generated[row].append(tok)
                if stop_on_newline and "\n" in self.tokenizer.decode([tok]):
                    done[row] = True
            if all(done):
                break
            step_ids = next_ids[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=-1)
        return generated

    def generate(self, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
        """Same contract and stopping rule as ``eval.torch_greedy_generate``."""
        from edge_lora.eval import stop_token_ids

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id or 0
        encoded = [tok(p)["input_ids"] for p in prompts]
        ids = self.greedy_ids(encoded, max_new_tokens, pad_id, stop_token_ids(tok), stop_on_newline=True)
        return [tok.decode(g, skip_special_tokens=True) for g in ids]

    def generate_fn(self, max_new_tokens: int = 16):
        return lambda prompts: self.generate(prompts, max_new_tokens)
