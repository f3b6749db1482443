"""lm-evaluation-harness against the real server on the tiny model: `local-completions` loglikelihood (multiple
choice) and loglikelihood_rolling at batch sizes 1 and 4, `local-chat-completions` generate_until. Tasks read a
local json file (tests/data/lm_eval_tiny.json; nothing is downloaded). The loglikelihoods lm-eval reports must
equal the model's own log-probabilities computed directly from one forward pass (fp32)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from dsv4_ascend.chat import encode_messages  # noqa: E402
from dsv4_ascend.engine import Engine  # noqa: E402
from dsv4_ascend.sampling import SamplingParams  # noqa: E402
from dsv4_ascend.server import BackgroundServer, create_app  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval_tiny.json"
SEQ = 128
MAX_LENGTH = 32  # lm-eval's window: short, so rolling splits each text into several windows (batched at bs 4)
# Server prefill and direct forward: the same fp32 computation on the same tokens; sums of <= 40 token logprobs.
TOL = 1e-4

TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{choices[0]}}",
                 "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def env(served_tiny, tmp_path_factory):
    model, tok, ckpt = served_tiny
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, cfg in TASKS.items():
        full = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(DATA)}},
                "test_split": "test", **cfg}
        (d / f"{name}.yaml").write_text(json.dumps(full))  # JSON is YAML
    srv = BackgroundServer(create_app(Engine(model, max_slots=4, max_seq_len=SEQ), tok,
                                      served_model_name="tiny")).start()
    tok_dir = tmp_path_factory.mktemp("tokenizer")  # the tokenizer files alone: AutoTokenizer would read config.json
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, tok_dir / name)
    yield model, tok, tok_dir, srv, TaskManager(include_path=str(d), include_defaults=False)
    srv.stop(60)


def _lp(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, one forward pass without the engine."""
    with torch.no_grad():
        lps = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
    return lps.gather(-1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0].tolist()


def _run(lm, tm, task: str, **kw) -> list[dict]:
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, log_samples=True, **kw)
    return out["samples"][task]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_local_completions_loglikelihoods_equal_the_models(env, batch_size):
    model, tok, tok_dir, srv, tm = env
    lm = LocalCompletionsAPI(base_url=srv.url + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                             tokenizer=str(tok_dir), batch_size=batch_size, max_length=MAX_LENGTH, max_retries=1)
    docs = json.loads(DATA.read_text())

    samples = _run(lm, tm, "tiny_mc")
    assert len(samples) == len(docs)
    for s in samples:
        assert len(s["resps"]) == len(docs[s["doc_id"]]["choices"])
        for (context, continuation), resp in zip((a for a in s["arguments"]), s["resps"]):
            # lm-eval's own tokenisation of the pair and its left truncation to max_length
            (ids,), (ctxlen,), _ = lm.batch_loglikelihood_requests([[(None, *lm._encode_pair(context, continuation))]])
            want = sum(_lp(model, ids)[ctxlen - 1:])
            assert resp[0][0] == pytest.approx(want, abs=TOL)

    samples = _run(lm, tm, "tiny_rolling")
    windows_seen = 0
    for s in samples:
        text = docs[s["doc_id"]]["text"]
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length - 1,
            context_len=1)]
        windows_seen += len(windows)
        want = sum(sum(_lp(model, ctx + pred)[len(ctx) - 1:]) for ctx, pred in windows)
        assert s["resps"][0][0] == pytest.approx(want, abs=TOL)
    assert windows_seen > len(docs)  # long texts span several windows (sent 4 to a request at batch size 4)


def test_local_chat_completions_generate_until(env):
    model, tok, _, srv, tm = env
    lm = LocalChatCompletion(base_url=srv.url + "/v1/chat/completions", model="tiny", max_retries=1)
    samples = _run(lm, tm, "tiny_gen", apply_chat_template=True)
    docs = json.loads(DATA.read_text())
    eng = Engine(model, max_slots=1, max_seq_len=SEQ)
    for s in samples:
        msgs = [{"role": "user", "content": docs[s["doc_id"]]["question"]}]
        (req,) = eng.generate([tok.encode(encode_messages(msgs))], SamplingParams(temperature=0, max_tokens=6))
        want = tok.decode(req.output, skip_special_tokens=True).split("\n\n")[0]
        assert s["resps"][0][0] == want
