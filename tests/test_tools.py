"""The environment's tool (issue 14's positive control): the arith calculator's values, the tool loop over a
GenerationEngine (stub for the loop logic, a real tiny HF model for the rest), the SFT tool form and its loss
mask, GRPO with environment tokens masked, and the spec's refusals."""
from __future__ import annotations

import json
import math
import re

import pytest

from infra.spec import ArithWorldSpec, ToyModelSpec
from meta.grammar import CALC_CLOSE, CALC_OPEN, META_CLOSE, META_OPEN, env_char_spans, strip_meta
from worlds.arith import generate_world, world_texts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = ArithWorldSpec(n_base=200, n_sft1=300, n_sft2=100, n_rl=12, n_val_per_domain=1, n_heldout=9)


@pytest.fixture(scope="module")
def world():
    return generate_world(WORLD)


@pytest.fixture(scope="module")
def tokenizer(world):
    from worlds.tokenizer import train_tokenizer

    return train_tokenizer(world_texts(world), vocab_size=400)


# ---------------------------------------------------------------- the calculator

@pytest.mark.parametrize("context,value", [
    ("check 44-7", "=37"), ("check 7-3*-3", "=16"), ("check -5+-2", "=-7"), ("check 16/8", "=2"),
    ("confidence high. check 3*(2-5)", "=-9"), ("check 2-5", "=-3"),
    ("check 7/2", None),  # inexact division
    ("check 4+", None), ("check 4+(2", None), ("check 4x2", None),  # unparsable or not well formed
    ("check 99+1", None), ("check 120-1", None),  # beyond the world's ±99
    ("44-7", None), ("check 44-7, same", None),  # no check of an expression at the end
    # brackets around a lone number: next_op cannot see past them, the value was '(' or a wrong number
    ("check (5)*2", "=10"), ("check 2*(5)", "=10"), ("check (1+2)*(3)", "=9"), ("check ((1+2))*3", "=9"),
    ("check (5)", "=5"), ("check ((-5))", "=-5"), ("check " + "(" * 500 + "7" + ")" * 500, "=7"),
    ("check 5/0", None), ("check 0/0", None), ("check " + "9" * 400 + "*9", None),  # division by 0, huge
    ("check ٣+٤", None), ("check ³+1", None),  # digits are ASCII: str.isdigit() takes these
    ("check  44-7", None), ("check 44 - 7", None), ("check\t44-7", None), ("check 44-7 ", None),  # whitespace
    ("", None), ("check", None), ("check ", None),  # nothing to evaluate
])
def test_arith_check_values(context, value):
    from worlds.arith import arith_check

    assert arith_check(context) == value


def test_tool_output_counts_errors():
    from evals.tools import ERROR_TEXT, get_tool, tool_output

    tool = get_tool("arith_check")
    assert tool_output(tool, f"2+3=5|5\n{META_OPEN}check 44-7{CALC_OPEN}") == (f"=37{CALC_CLOSE}", False)
    assert tool_output(tool, f"{META_OPEN}check 4+{CALC_OPEN}") == (f"{ERROR_TEXT}{CALC_CLOSE}", True)
    # a marker outside an open block is an error: the block closed before it
    assert tool_output(tool, f"{META_OPEN}x{META_CLOSE}check 44-7{CALC_OPEN}") == (f"{ERROR_TEXT}{CALC_CLOSE}", True)
    # a marker with nothing before it, two markers in a row, a marker inside an earlier call's output
    assert tool_output(tool, CALC_OPEN) == (f"{ERROR_TEXT}{CALC_CLOSE}", True)
    assert tool_output(tool, f"{META_OPEN}{CALC_OPEN}") == (f"{ERROR_TEXT}{CALC_CLOSE}", True)
    assert tool_output(tool, f"{META_OPEN}check 2+2{CALC_OPEN}{CALC_OPEN}") == (f"{ERROR_TEXT}{CALC_CLOSE}", True)
    assert tool_output(tool, f"{META_OPEN}check 3+{CALC_OPEN}4{CALC_OPEN}") == (f"{ERROR_TEXT}{CALC_CLOSE}", True)
    # nested blocks: the innermost open one is the block; a second check after an answered one is answered
    assert tool_output(tool, f"{META_OPEN}{META_OPEN}check 3+4{CALC_OPEN}") == (f"=7{CALC_CLOSE}", False)
    assert tool_output(tool, f"{META_OPEN}check 3+4{CALC_OPEN}=7{CALC_CLOSE} check 2*(2){CALC_OPEN}") == (
        f"=4{CALC_CLOSE}", False)
    assert get_tool("none") is None
    with pytest.raises(ValueError, match="unknown tool 'calc'.*arith_check"):
        get_tool("calc")


def test_spec_tool_values_are_the_registry():
    from typing import get_args

    from evals.tools import NO_TOOL, TOOLS
    from infra.spec import BaseSpec, SFTSpec
    from sft.meta_blocks import META_BLOCK_FORMS

    assert set(get_args(BaseSpec.model_fields["tool"].annotation)) == {NO_TOOL, *TOOLS}
    assert set(get_args(SFTSpec.model_fields["meta_blocks"].annotation)) == set(META_BLOCK_FORMS)


# ---------------------------------------------------------------- the tool loop: logic, with a scripted engine

class Scripted:
    """An engine that writes a check, stops at the marker, and after the environment's value writes the rest:
    the loop logic without a model. Records each call's max_new_tokens and seed."""

    def __init__(self, tokenizer, first: str, then: str):
        from evals.engine import stop_ids

        self.tokenizer, self.first, self.then = tokenizer, first, then
        self.stop = stop_ids(tokenizer)
        self.calls: list[tuple[int, int, int]] = []

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=128, seed=0,
                 banned_tokens=None, logprobs=False, stop_tokens=None):
        from evals.engine import finished

        self.calls.append((len(prompts) * n, max_new_tokens, seed))
        out = []
        for p in prompts:
            text = self.then if CALC_CLOSE in p else self.first
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            out.append([finished(self.tokenizer, ids[:max_new_tokens], self.stop + list(stop_tokens or ()))
                        for _ in range(n)])
        return out

    def facts(self):
        return {"engine": "scripted"}

    def close(self):
        pass


def test_tool_loop_appends_the_value_and_resumes(tokenizer):
    from evals.tools import ToolEngine, get_tool

    first, then = f"{META_OPEN}check 44-7{CALC_OPEN}", f", not 36, redo{META_CLOSE}44-7=37|37\n\\boxed{{37}}"
    inner = Scripted(tokenizer, first, then)
    engine = ToolEngine(inner, get_tool("arith_check"))
    (g1, g2), = engine.generate(["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"], n=2, max_new_tokens=60,
                                seed=5)
    assert g1 == g2
    assert g1.text == first + f"=37{CALC_CLOSE}" + then
    assert tokenizer.decode(g1.token_ids, skip_special_tokens=True) == g1.text
    assert g1.tool_calls == 1 and g1.tool_errors == 0 and not g1.truncated
    env = [t for t, e in zip(g1.token_ids, g1.env_mask) if e]
    assert env == tokenizer.encode(f"=37{CALC_CLOSE}", add_special_tokens=False)  # exactly the appended tokens
    n_first = len(tokenizer.encode(first, add_special_tokens=False))
    assert g1.token_ids[n_first - 1] == tokenizer.convert_tokens_to_ids(CALC_OPEN) and not g1.env_mask[n_first - 1]
    # round 1 with the whole budget, round 2 (the two rows resumed) with what is left after the first round and the
    # environment's tokens, under a seed of its own
    (rows0, budget0, seed0), (rows1, budget1, seed1) = inner.calls
    assert (rows0, budget0, seed0) == (2, 60, 5) and rows1 == 2 and seed1 != seed0
    assert budget1 == 60 - n_first - len(env)
    assert engine.facts() == {"engine": "scripted", "tool": "arith_check", "tool_calls": 2, "tool_errors": 0}


def test_tool_loop_budget_error_and_max_calls(tokenizer):
    from evals.tools import ERROR_TEXT, MAX_CALLS, ToolEngine, get_tool

    tool = get_tool("arith_check")
    first = f"{META_OPEN}check 4+{CALC_OPEN}"
    n_first = len(tokenizer.encode(first, add_special_tokens=False))
    # no room left for the environment's output: the row ends truncated on its marker, nothing appended
    (g,), = ToolEngine(Scripted(tokenizer, first, "x"), tool).generate(["p"], max_new_tokens=n_first + 1)
    assert g.truncated and g.tool_calls == 1 and not any(g.env_mask) and g.text == first
    # the budget is shared by every round: never more tokens than max_new_tokens
    (g,), = ToolEngine(Scripted(tokenizer, first, "7" * 80), tool).generate(["p"], max_new_tokens=30)
    assert len(g.token_ids) == 30 and g.truncated and g.tool_errors == 1
    assert g.text.startswith(first + ERROR_TEXT + CALC_CLOSE)
    # a model that calls again and again stops after MAX_CALLS, truncated on its marker
    (g,), = ToolEngine(Scripted(tokenizer, first, f"{META_OPEN}check 1+1{CALC_OPEN}"), tool).generate(
        ["p"], max_new_tokens=400)
    assert g.tool_calls == MAX_CALLS and g.truncated and g.token_ids[-1] == tokenizer.convert_tokens_to_ids(CALC_OPEN)
    assert g.text.count(f"=2{CALC_CLOSE}") == MAX_CALLS - 1


def test_tool_loop_refuses_a_tokenizer_without_markers(tokenizer):
    from evals.tools import ToolEngine, get_tool
    from worlds.tokenizer import train_tokenizer

    old = train_tokenizer(["3+4=7"] * 5, vocab_size=300, meta_tokens=(META_OPEN, META_CLOSE))
    with pytest.raises(ValueError, match="no single token for '<\\|calc\\|>'"):
        ToolEngine(Scripted(old, "", ""), get_tool("arith_check"))


# ---------------------------------------------------------------- the tool loop on a real tiny HF model

def _favour(model, token_id: int, logit: float = 4.0) -> None:
    """Add `logit` to one token's logit (a hook on the LM head), so a random model samples it often."""
    import torch

    bias = torch.zeros(model.config.vocab_size)
    bias[token_id] = logit
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))


@pytest.fixture(scope="module")
def hf_engine(tokenizer):
    from evals.engine import HFEngine
    from worlds.model import toy_model

    model = toy_model(ToyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                   max_position=256), tokenizer, seed=3)
    _favour(model, tokenizer.convert_tokens_to_ids(CALC_OPEN))
    return HFEngine(model, tokenizer, precision="fp32", batch_size=8)


def test_tool_loop_on_a_real_model(hf_engine, tokenizer):
    from evals.engine import render_prompt
    from evals.tools import ToolEngine, get_tool

    engine = ToolEngine(hf_engine, get_tool("arith_check"))
    prompts = [render_prompt(tokenizer, p) for p in ("Compute 44-7.", "What is 3*(2-5)?")]
    # a prefix that opened a block: the tool reads it from the context
    prompts.append(render_prompt(tokenizer, "Compute 44-7.") + f"{META_OPEN}check 44-7")
    kw = dict(n=4, temperature=1.0, max_new_tokens=40, seed=11, logprobs=True)
    gens = engine.generate(prompts, **kw)

    def key(gs):  # NaN log-probs of environment tokens never compare equal: compare the rest
        return [[(g.token_ids, g.env_mask, g.text, g.truncated, g.tool_calls) for g in row] for row in gs]

    assert key(gens) == key(engine.generate(prompts, **kw))  # reproducible
    assert key(gens) != key(engine.generate(prompts, **{**kw, "seed": 12}))
    open_id, close_id = (tokenizer.convert_tokens_to_ids(t) for t in (CALC_OPEN, CALC_CLOSE))
    flat = [g for gs in gens for g in gs]
    assert sum(g.tool_calls for g in flat) >= 3, "the scaled marker should be sampled"
    for g in flat:
        ids = list(g.token_ids)
        assert len(ids) <= 40 and len(g.env_mask) == len(ids) == len(g.logprobs)
        assert tokenizer.decode(ids, skip_special_tokens=True) == g.text
        # each environment span follows a marker the model wrote and ends on the close marker
        spans = [i for i, e in enumerate(g.env_mask) if e]
        starts = [i for i in spans if not g.env_mask[i - 1]]
        assert all(ids[i - 1] == open_id for i in starts)
        assert [ids[i] for i in spans if ids[i] == close_id] == [close_id] * len(starts)
        assert all(math.isnan(g.logprobs[i]) for i in spans)
        assert not any(math.isnan(g.logprobs[i]) for i in range(len(ids)) if not g.env_mask[i])
        assert g.tool_calls >= len(starts)
    # the prefixed prompt's calls were answered by the calculator when made right away
    answered = [g for g in gens[2] if g.token_ids[:1] == (open_id,) and g.tool_calls]
    assert all(g.text.startswith(f"{CALC_OPEN}=37{CALC_CLOSE}") for g in answered)


# ---------------------------------------------------------------- SFT data in tool form

def test_tool_form_of_real_rows(world, tokenizer):
    from sft.meta_blocks import meta_block_form
    from sft.twins import strip_row
    from worlds.arith import evaluate, parse

    rows = world["sft1"] + world["sft2"]
    tooled, facts = meta_block_form(rows, "tool")
    assert facts["meta_blocks"] == "tool"
    assert facts["tool_calls_written"] == sum(r["messages"][-1]["content"].count(CALC_OPEN) for r in tooled)
    call = re.compile(r"check ([^ :]+)" + re.escape(CALC_OPEN) + "(.*?)" + re.escape(CALC_CLOSE))
    redirects = 0
    for old, new in zip(rows, tooled):
        before, after = old["messages"][-1]["content"], new["messages"][-1]["content"]
        assert strip_row(new) == strip_row(old)  # the stripped twins are equal: blocks removed entirely
        assert new["wrong_prefix"] == old["wrong_prefix"] and after.startswith(new["wrong_prefix"] or "")
        calls = call.findall(after)
        assert len(calls) == after.count(CALC_OPEN) and calls
        assert all(value == f"={evaluate(parse(expr))}" for expr, value in calls)  # the exact values
        # every step line after the wrong prefix follows a block whose last call checks that very step
        trained = after[len(new["wrong_prefix"] or ""):]
        for line in trained.split("\n"):
            step = line.rsplit(META_CLOSE, 1)[-1]
            if re.fullmatch(r"-?\d+[-+*/]-?\d+=-?\d+\|.+", step):
                assert line != step and call.findall(line)[-1][0] == step.split("=")[0], line
        assert CALC_OPEN not in (new["wrong_prefix"] or "")  # the masked prefix is never rewritten
        first = before[len(old["wrong_prefix"] or ""):].split(META_CLOSE)[0]
        if old["kind"] == "redirect" and ", not " in first and ": " in first and "first" not in first \
                and "rest" not in first:  # a caught arithmetic slip: the call replaces the recomputation
            redirects += 1
            head = after[len(old["wrong_prefix"]):].split(META_CLOSE)[0]
            assert re.fullmatch(re.escape(META_OPEN) + r"check \S+" + re.escape(CALC_OPEN) + r"=-?\d+"
                                + re.escape(CALC_CLOSE) + r", not -?\d+, redo(\. confidence: [\d.]+)?", head), head
    assert redirects > 5


def test_tool_form_refuses_other_sources(world):
    from infra.errors import DataError
    from sft.meta_blocks import meta_block_form

    rows = [dict(world["sft1"][0]), {**world["sft1"][1], "source": "gsm8k"}]
    with pytest.raises(DataError, match="row 1 \\(id 'arith-sft1-000001'\\).*source is 'gsm8k'"):
        meta_block_form(rows, "tool")
    with pytest.raises(ValueError, match="unknown form 'fancy'"):
        meta_block_form(rows, "fancy")
    assert meta_block_form(rows, "as_written") == (rows, {"meta_blocks": "as_written"})


def test_sft_loss_mask_leaves_environment_output_untrained(tokenizer):
    from sft.masks import IGNORE, loss_mask

    response = f"2+3=5|5-44\n{META_OPEN}check 5-44{CALC_OPEN}=-39{CALC_CLOSE}, same{META_CLOSE}5-44=-39|-39\n" \
               f"\\boxed{{-39}}"
    messages = [{"role": "user", "content": "Compute 2+3-44."}, {"role": "assistant", "content": response}]
    ids, labels = loss_mask(tokenizer, messages, None, 256)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    trained = "".join(text[a:b] for (a, b), y in zip(offsets, labels) if y != IGNORE)
    (s, e), = env_char_spans(text)
    assert text[s:e] == f"=-39{CALC_CLOSE}"
    assert trained == response.replace(f"=-39{CALC_CLOSE}", "") + "<|im_end|>"  # the marker trained, the value not
    assert env_char_spans("a<|calc|>=3") == [(9, 11)]  # an unclosed call runs to the end


# ---------------------------------------------------------------- GRPO: environment tokens in no term

def test_grpo_loss_leaves_environment_tokens_out():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from infra.spec import RLSpec
    from rl.grpo import _actor_config, _collate, grpo_loss, response_logprobs

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation="eager")).eval()
    rows = [([3, 4, 5], [7, 8, 9, 10, 11], [1.0, -0.5, 2.0, 0.3, 1.0], [1, 1, 0, 0, 1]),
            ([6], [12, 13, 14], [-1.0, 0.5, -2.0], [1, 0, 1])]
    batch = _collate(rows, pad_id=0, device="cpu")
    assert batch["resp_mask"].tolist() == [[1, 1, 0, 0, 1], [1, 0, 1, 0, 0]]
    cfg = _actor_config(RLSpec(n=1, batch_size=2, mini_batch_size=2, kl_loss=True, kl_coef=0.3, entropy_coeff=0.01))
    new_lp, ent = response_logprobs(model, batch, "cpu", "fp32", 0.7, with_entropy=True)
    new_lp.retain_grad()
    old = new_lp.detach() + 0.05 * torch.randn_like(new_lp)
    ref = new_lp.detach() - 0.1 * torch.rand_like(new_lp)
    loss, _ = grpo_loss(old, new_lp, batch["adv"], batch["resp_mask"], cfg, ref_lp=ref, entropy=ent)
    loss.backward()
    mask = batch["resp_mask"].bool()
    assert torch.all(new_lp.grad[~mask] == 0) and torch.any(new_lp.grad[mask] != 0)
    # by hand (ratios inside the clip range): token-mean over the policy tokens only
    m = mask.float()
    ratio = torch.exp(new_lp.detach() - old)
    assert torch.all((ratio > 0.8) & (ratio < 1.28))
    pg = (-batch["adv"] * ratio * m).sum() / m.sum()
    d = ref - new_lp.detach()
    kl = ((torch.exp(d) - d - 1).clamp(-10, 10) * m).sum() / m.sum()
    expected = pg - 0.01 * (ent.detach() * m).sum() / m.sum() + 0.3 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the environment tokens' advantages change nothing
    adv = batch["adv"].clone()
    adv[~mask] = 100.0
    again, _ = grpo_loss(old, new_lp.detach(), adv, batch["resp_mask"], cfg, ref_lp=ref, entropy=ent.detach())
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_train_grpo_with_the_tool_records_calls(tmp_path, world, tokenizer, monkeypatch):
    import pandas as pd

    import worlds.model

    from infra.spec import ComputeSpec, GraderSpec, RLSpec
    from rl.grpo import train_grpo
    from worlds.model import toy_model

    model = toy_model(ToyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                   max_position=256), tokenizer, seed=0)
    init = tmp_path / "init"
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    real_load = worlds.model.load_model  # the policy samples the marker often (a hook does not survive saving)

    def load_favoured(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        _favour(loaded, tokenizer.convert_tokens_to_ids(CALC_OPEN))
        return loaded

    monkeypatch.setattr(worlds.model, "load_model", load_favoured)
    rl = RLSpec(steps=1, batch_size=2, mini_batch_size=1, n=4, max_response_length=24, save_freq=1, test_freq=1,
                temperature=1.0)
    out = train_grpo(init, world["rl"], world["val"][:2], rl, GraderSpec(workers=1),
                     ComputeSpec(device="cpu", precision="fp32"), 0, tmp_path / "run", tool="arith_check")
    assert out["facts"]["tool"] == "arith_check"
    rollouts = pd.read_parquet(tmp_path / "run" / "rollouts" / "step-0000001.parquet")
    assert rollouts["tool_calls"].sum() > 0
    for _, r in rollouts.iterrows():
        spans = json.loads(r["env_spans"])
        assert len(spans) <= r["tool_calls"] and all(0 < s < e <= r["n_tokens"] for s, e in spans)
    assert any(k == "train/tool/call_rate" and v > 0 for k, v, _ in out["metrics"])


# ---------------------------------------------------------------- the spec

def test_spec_refuses_a_tool_form_without_the_tool(tmp_path):
    from infra.errors import SpecError
    from infra.spec import BaseSpec, load_spec

    with pytest.raises(ValueError, match="sft.meta_blocks 'tool'.*tool is 'none'"):
        BaseSpec.model_validate({"sft": {"meta_blocks": "tool"}})
    with pytest.raises(ValueError, match="strip_meta trains on the no-meta twin"):
        BaseSpec.model_validate({"tool": "arith_check", "sft": {"meta_blocks": "tool", "strip_meta": True}})
    assert BaseSpec.model_validate({"tool": "arith_check", "sft": {"meta_blocks": "tool"}}).tool == "arith_check"
    with pytest.raises(ValueError, match="verl executor's rollouts have no tool loop"):
        BaseSpec.model_validate({"tool": "arith_check", "executor": {"kind": "verl"}})
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\narms:\n  positive:\n    overrides: {sft.meta_blocks: tool}\n")
    with pytest.raises(SpecError, match="arms.positive.overrides: .*sft.meta_blocks 'tool'.*set tool: arith_check"):
        load_spec(spec)
    spec.write_text("name: s\nbase:\n  tool: arith_check\narms:\n  positive:\n    overrides: {sft.meta_blocks: tool}\n"
                    "  other:\n    overrides: {tool: none}\n")
    with pytest.raises(SpecError, match=r"s.yaml:\d+: arms.other.overrides: tool is the environment"):
        load_spec(spec)
    spec.write_text("name: s\nbase:\n  tool: arith_check\narms:\n  positive:\n    overrides: {sft.meta_blocks: tool}\n"
                    "  control:\n    overrides: {sft.strip_meta: true}\n")
    assert load_spec(spec).base.tool == "arith_check"


def test_reward_pipeline_scores_tool_form_blocks():
    """PMI-shift and the regions see a tool call as block content: the markers and the value are 'meta' tokens,
    the first block is the one scored, and a response with a block per step is scored, not refused."""
    from types import SimpleNamespace

    from infra.spec import REGIONS, RLSpec
    from meta.grammar import char_regions, find_blocks
    from rewards.pipeline import Sample, score_batch
    from rewards.scorer import PieceTokenizer, TableScorer

    tok = PieceTokenizer(pieces=(META_OPEN, META_CLOSE, CALC_OPEN, CALC_CLOSE, "\\boxed{"))

    class Grader:
        def grade(self, responses, golds):
            return [SimpleNamespace(correct=r.endswith("{37}"), extracted=None, timed_out=False) for r in responses]

    first = f"{META_OPEN}check 44-7{CALC_OPEN}=37{CALC_CLOSE}, not 36, redo{META_CLOSE}"
    texts = [f"44-7=36|36\n{first}44-7\n{META_OPEN}check 44-7{CALC_OPEN}=37{CALC_CLOSE}{META_CLOSE}44-7=37|37\n"
             f"\\boxed{{37}}", "44-7=36|36\n\\boxed{36}"]
    blocks = find_blocks(texts[0])
    assert len(blocks) == 2 and blocks[0].content == f"check 44-7{CALC_OPEN}=37{CALC_CLOSE}, not 36, redo"
    calc_at = texts[0].index(CALC_OPEN)
    assert next(r for s, e, r in char_regions(texts[0]) if s <= calc_at < e) == "meta"
    assert strip_meta(texts[0]) == "44-7=36|36\n44-7\n44-7=37|37\n\\boxed{37}"
    out = score_batch([[Sample("Q: ", t, tok.encode(t), "37") for t in texts]], rl=RLSpec(reward="pmishift"), step=0,
                      grader=Grader(), tokenizer=tok, scorer=TableScorer(tok, {}),
                      make_decoys=lambda golds: ["38"] * len(golds))
    rec = out.records[0]
    assert rec["signal_value"] is not None and rec["format_class"] == "discard"  # two blocks: a one-block format
    assert rec["blocks"][0]["end"] == len("44-7=36|36\n" + first)
    k = tok.tokens(texts[0]).index(CALC_OPEN)
    assert REGIONS[out.region_ids[0][k]] == "meta"
