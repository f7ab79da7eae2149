"""The environment's tools and the tool loop every generation path shares (SFT data form, RL rollouts, sweeps and
held-out generation all see the same environment; issue 14's positive control).

Inside a meta block the model writes a check and the marker CALC_OPEN (meta.grammar); generation pauses there; the
environment appends the tool's output and CALC_CLOSE; the model continues. Appended tokens are environment output:
`Generation.env_mask` marks them, and trainers give them loss mask 0 and leave them out of log-prob ratios, as
verl's multi-turn rollouts do with `response_mask` 0 on tool responses.

A tool is a name and a function (the open block's text before the marker) -> the text to append, or None when it
cannot evaluate; then ERROR_TEXT is appended and the call counted as an error. `spec.tool` names the tool for the
whole spec (it is part of the environment, like the grader): `none` runs no loop at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from meta.grammar import CALC_CLOSE, CALC_OPEN, META_CLOSE, META_OPEN

if TYPE_CHECKING:
    from evals.engine import Generation, GenerationEngine

ERROR_TEXT = "=?"  # what the environment appends when the tool cannot evaluate the check
MAX_CALLS = 16  # tool calls per generation (a world problem has at most 7 steps, each checked, plus a redirect);
# a marker after the last one ends the generation (truncated)


@dataclass(frozen=True)
class Tool:
    """name, and call(block text before the marker) -> output text to append (without CALC_CLOSE), None = error."""

    name: str
    call: Callable[[str], str | None]


def _arith_check(context: str) -> str | None:
    from worlds.arith import arith_check

    return arith_check(context)


TOOLS: dict[str, Tool] = {"arith_check": Tool("arith_check", _arith_check)}
NO_TOOL = "none"


def get_tool(name: str) -> Tool | None:
    """The tool `name` (None for 'none'); ValueError names the known tools for anything else."""
    if name == NO_TOOL:
        return None
    if name not in TOOLS:
        raise ValueError(f"tool: unknown tool {name!r}; expected one of {', '.join([NO_TOOL, *TOOLS])}")
    return TOOLS[name]


def tool_output(tool: Tool, text: str) -> tuple[str, bool]:
    """(text the environment appends after `text`, which ends on CALC_OPEN; whether the call failed). The tool sees
    the open meta block's text before the marker; a marker outside an open block is an error, as is a tool that
    returns None. The appended text always ends on CALC_CLOSE. `text` is the whole context (rendered prompt and
response so far), so a block opened in a given prefix counts."""
    body = text[:-len(CALC_OPEN)] if text.endswith(CALC_OPEN) else text
    opened = body.rfind(META_OPEN)
    value = None
    if opened >= 0 and body.rfind(META_CLOSE) < opened:
        value = tool.call(body[opened + len(META_OPEN):])
    return (ERROR_TEXT if value is None else value) + CALC_CLOSE, value is None


@dataclass
class _Row:
    context: str  # the rendered prompt
    ids: list[int]
    env: list[bool]
    logprobs: list[float] | None
    truncated: bool
    calls: int = 0
    errors: int = 0


class ToolEngine:
    """A GenerationEngine that runs `tool` for any engine (HF or vLLM, evals/engine.py's protocol).

    Each round generates with CALC_OPEN as an extra stop token; a row that stopped there gets the tool's output
    appended (tokenised on its own: it sits between two added tokens, so this is how the whole text tokenises)
    and is resumed from its prompt + response so far, as text, with the rest of its max_new_tokens budget (which
    counts environment tokens too, so no response is longer than max_new_tokens). A row resumed with fewer tokens
    left than the tool output needs, or past MAX_CALLS, ends truncated on its marker. Round r > 0 samples with
    seed_for(seed, 'tool', r), so the whole loop is as reproducible as the engine. Logprobs of environment tokens
    are NaN (no model produced them). facts() adds the tool's name and its calls and errors so far."""

    def __init__(self, engine: "GenerationEngine", tool: Tool, max_calls: int = MAX_CALLS):
        self.engine, self.tool, self.max_calls = engine, tool, max_calls
        self.tokenizer = engine.tokenizer
        self.open_id = self.tokenizer.convert_tokens_to_ids(CALC_OPEN)
        if self.tokenizer.encode(CALC_OPEN, add_special_tokens=False) != [self.open_id]:
            raise ValueError(f"tool {tool.name!r}: the tokenizer has no single token for {CALC_OPEN!r} (a tokenizer "
                             f"from before the tool markers; retrain the base model)")
        self.calls = self.errors = 0

    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, banned_tokens: list[int] | None = None,
                 logprobs: bool = False, stop_tokens: list[int] | None = None) -> list[list["Generation"]]:
        from evals.engine import Generation, seed_for

        stops = sorted({self.open_id, *(stop_tokens or ())})
        kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, banned_tokens=banned_tokens, logprobs=logprobs,
                  stop_tokens=stops)
        first = self.engine.generate(prompts, n=n, max_new_tokens=max_new_tokens, seed=seed, **kw)
        rows = [_Row(p, list(g.token_ids), [False] * len(g.token_ids),
                     list(g.logprobs) if g.logprobs is not None else None, g.truncated)
                for p, gs in zip(prompts, first) for g in gs]
        for r in range(1, self.max_calls + 2):
            todo = []
            for row in rows:
                if not row.ids or row.ids[-1] != self.open_id or row.truncated:
                    continue
                if row.calls >= self.max_calls:
                    row.truncated = True
                    continue
                # the context too: a continuation (a prefix given in the prompt) may have opened the block
                out, failed = tool_output(self.tool, row.context + self.tokenizer.decode(row.ids,
                                                                                        skip_special_tokens=True))
                out_ids = self.tokenizer.encode(out, add_special_tokens=False)
                row.calls += 1
                row.errors += failed
                if len(row.ids) + len(out_ids) >= max_new_tokens:  # no room to append it and go on
                    row.truncated = True
                    continue
                row.ids += out_ids
                row.env += [True] * len(out_ids)
                if row.logprobs is not None:
                    row.logprobs += [float("nan")] * len(out_ids)
                todo.append(row)
            if not todo:
                break
            contexts = [row.context + self.tokenizer.decode(row.ids, skip_special_tokens=True) for row in todo]
            budget = max(max_new_tokens - len(row.ids) for row in todo)
            more = self.engine.generate(contexts, n=1, max_new_tokens=budget, seed=seed_for(seed, "tool", r), **kw)
            for row, (g,) in zip(todo, more):
                left = max_new_tokens - len(row.ids)
                ids = list(g.token_ids)[:left]  # the batch ran to the largest budget: cut each row to its own
                row.ids += ids
                row.env += [False] * len(ids)
                if row.logprobs is not None:
                    row.logprobs += list(g.logprobs or [])[:left]
                row.truncated = g.truncated or len(g.token_ids) > left
        out: list[Generation] = []
        for row in rows:
            self.calls += row.calls
            self.errors += row.errors
            out.append(Generation(text=self.tokenizer.decode(row.ids, skip_special_tokens=True),
                                  token_ids=tuple(row.ids), truncated=row.truncated,
                                  logprobs=tuple(row.logprobs) if row.logprobs is not None else None,
                                  env_mask=tuple(row.env), tool_calls=row.calls, tool_errors=row.errors))
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def facts(self) -> dict[str, Any]:
        return {**self.engine.facts(), "tool": self.tool.name, "tool_calls": self.calls, "tool_errors": self.errors}

    def close(self) -> None:
        self.engine.close()


def with_tool(engine: "GenerationEngine", name: str) -> "GenerationEngine":
    """`engine` in the environment of tool `name`: a ToolEngine over it, or the engine itself for 'none'."""
    tool = get_tool(name)
    return engine if tool is None else ToolEngine(engine, tool)


def env_spans(generation: "Generation") -> list[tuple[int, int]]:
    """[start, end) token index ranges of a generation's environment tokens (empty without a tool loop)."""
    spans: list[tuple[int, int]] = []
    for i, env in enumerate(generation.env_mask or ()):
        if env and spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        elif env:
            spans.append((i, i + 1))
    return spans

