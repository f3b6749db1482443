"""Logprobs as the two OpenAI APIs and vLLM write them: completions' legacy {tokens, token_logprobs, top_logprobs,
text_offset} (generated tokens, and prompt tokens under `echo`), chat's [{token, logprob, bytes, top_logprobs}],
and vLLM's `prompt_logprobs` ([None, {token id: {logprob, rank, decoded_token}}, ...])."""
from __future__ import annotations

from .text import TokenText

__all__ = ["LogprobFormat"]


class LogprobFormat:
    """Formats token logprobs for responses; token texts come from a cached `TokenText`."""

    def __init__(self, tok, tok_text: TokenText) -> None:
        self.tok = tok
        self.text = tok_text

    def _top(self, top: dict[int, float] | None, n: int, token: int, logprob: float) -> dict[str, float]:
        """The top-n, then the token itself when not among them: OpenAI's legacy format "always returns the logprob
        of the sampled token" (up to n + 1 entries), and vLLM answers the same."""
        entry: dict[str, float] = {}
        for i, (t, v) in enumerate((top or {}).items()):
            if i >= n:
                break
            entry.setdefault(self.text(t)[0], v)  # ids sharing a text keep the best logprob
        entry.setdefault(self.text(token)[0], logprob)
        return entry

    def completion(self, batch: list, offset: int, top_n: int) -> dict:
        """Generated tokens [(id, logprob, top)] from character `offset` of the choice's text."""
        tokens, lps, tops, offsets = [], [], [], []
        for t, lp, top in batch:
            s = self.text(t)[0]
            tokens.append(s)
            lps.append(lp)
            tops.append(self._top(top, top_n, t, lp))
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def echo(self, ids: list[int], prompt_lps: list, top_n: int | None) -> tuple[str, dict | None]:
        """The echoed prompt text (its ids decoded as generated text is: special tokens skipped) and, when top_n is
        not None, its logprobs in the completions format (the first token's are null, as in OpenAI's and vLLM's
        answers); text offsets point into the echoed text."""
        dec = self.tok.stream_decoder(skip_special_tokens=True)
        pieces = [dec.push(t) for t in ids]
        pieces[-1] += dec.flush()
        text = "".join(pieces)
        if top_n is None:
            return text, None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for t, piece, entry in zip(ids, pieces, prompt_lps):
            out["tokens"].append(self.text(t)[0])
            out["token_logprobs"].append(None if entry is None else entry[0])
            out["top_logprobs"].append(None if entry is None else self._top(entry[2], top_n, t, entry[0]))
            out["text_offset"].append(offset)
            offset += len(piece)
        return text, out

    def prompt_logprobs(self, ids: list[int], prompt_lps: list, top_n: int) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: {logprob, rank, decoded_token}} with
        the prompt token first, then the top_n most likely tokens (ranks 1..top_n)."""
        out: list[dict | None] = []
        for t, entry in zip(ids, prompt_lps):
            if entry is None:
                out.append(None)
                continue
            lp, rank, top = entry
            d = {str(t): {"logprob": lp, "rank": rank, "decoded_token": self.text(t)[0]}}
            for r, (i, v) in enumerate(list(top.items())[:top_n]):
                d.setdefault(str(i), {"logprob": v, "rank": r + 1, "decoded_token": self.text(i)[0]})
            out.append(d)
        return out

    def chat(self, batch: list) -> list[dict]:
        """Generated tokens [(id, logprob, top)] in the chat format (top_logprobs as many as asked)."""
        out = []
        for t, lp, top in batch:
            s, b = self.text(t)
            tops = [{"token": self.text(i)[0], "logprob": v, "bytes": self.text(i)[1]} for i, v in (top or {}).items()]
            out.append({"token": s, "logprob": lp, "bytes": b, "top_logprobs": tops})
        return out
