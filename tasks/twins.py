"""Stage: the SFT-1/SFT-2 twin datasets — the meta side as given, the no-meta side with the blocks stripped,
row-for-row aligned, verified (report stored as an artifact); rows that cannot be twinned are refused on both
sides and listed."""
from __future__ import annotations

from tasks.common import Stage, StageCall, StageOutput, store

TWIN_SOURCES = ("sft1", "sft2")


def twins_body(call: StageCall) -> StageOutput:
    """Build and verify both twins of each SFT source with the base model's tokenizer; outputs
    `<source>_meta`, `<source>_nometa` and `<source>_report`."""
    from sft.twins import build_twins, load_sft_rows, write_twins
    from worlds.tokenizer import load_tokenizer

    max_length = call.config["sft.max_length"]
    tokenizer = load_tokenizer(call.input_path("base_model"))
    outputs, facts, summary = {}, {}, {}
    for name in TWIN_SOURCES:
        if name not in call.inputs:
            continue
        twinset = build_twins(load_sft_rows(call.input_path(name)), tokenizer=tokenizer, max_length=max_length)
        out = call.workdir / name
        report = write_twins(twinset, out, tokenizer=tokenizer, max_length=max_length)
        rows = len(twinset.meta)
        outputs[f"{name}_meta"] = store(call).put(out / "meta.parquet", kind="dataset", rows=rows, side="meta")
        outputs[f"{name}_nometa"] = store(call).put(out / "nometa.parquet", kind="dataset", rows=rows,
                                                    side="nometa")
        outputs[f"{name}_report"] = store(call).put(out / "report.json", kind="report")
        facts[f"{name}_report"] = {"passed": report.passed, "checks": {c.name: c.passed for c in report.checks},
                                   "rows": rows, "refused": report.refused, "mask_level": report.mask_level,
                                   "tokenizer": report.tokenizer}
        summary[f"{name}_rows"] = rows
        summary[f"{name}_refused"] = len(twinset.refused)
    return StageOutput(outputs=outputs, facts=facts, summary=summary,
                       files=[str(call.workdir / n / "report.json") for n in TWIN_SOURCES if n in call.inputs])


STAGE = Stage("twins", twins_body, config_keys=("sft.max_length",), inputs=("base_model", *TWIN_SOURCES),
              outputs=tuple(f"{n}_*" for n in TWIN_SOURCES))
