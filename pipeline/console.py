"""What a stage prints besides its own lines: the libraries' noise off, their real news in one line.

`transformers` draws a "Loading weights" bar for every `from_pretrained` and a "Writing model
shards" bar for every `save_pretrained`, and logs a `<Class> LOAD REPORT` table whenever a
checkpoint's keys differ from the model's. In this pipeline most such tables are expected (the
warm-up loads an encoder from a masked-LM directory, whose `mlm_head.*` weights are "UNEXPECTED")
and mean nothing to a user; weights that are really missing do matter. `quiet_libraries()` (called
once per command by the CLI) turns the bars off, keeps the hub's download bars as they were and
the project's own tqdm bars untouched, drops a report that only lists unexpected keys, and turns
one that lists missing or resized weights into a single plain line.
"""

from __future__ import annotations

import logging
import re

# Loggers that emit the load report: `modeling_utils` passes its own logger to
# `log_state_dict_report`, whose fallback is the `loading_report` module's.
REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_HEAD = re.compile(r"^(?P<cls>\S+) LOAD REPORT from: (?P<src>.*)$")
STATUSES = ("MISSING", "MISMATCH", "UNEXPECTED", "CONVERSION")


def parse_load_report(message: str) -> tuple[str, str, dict[str, list[str]]] | None:
    """(model class, source, {status: [key patterns]}) of a transformers load report, or None."""
    lines = _ANSI.sub("", message).splitlines()
    head = _HEAD.match(lines[0].strip()) if lines else None
    if head is None:
        return None
    rows: dict[str, list[str]] = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) >= 2 and cells[1] in STATUSES:
            rows.setdefault(cells[1], []).append(cells[0])
    return head["cls"], head["src"], rows


def summarize_load_report(cls: str, source: str, rows: dict[str, list[str]]) -> str | None:
    """One plain line for what matters in a report (None when nothing does).

    A report whose rows cannot be read (another transformers table layout) still gets a line:
    missing weights must never pass unsaid.
    """
    if not rows:
        return f"warning: {cls} from {source}: transformers reports weights that differ from the checkpoint"
    parts = []
    for status, what in (("MISSING", "not in the checkpoint"), ("MISMATCH", "of another shape in the checkpoint")):
        keys = rows.get(status, [])
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            parts.append(f"{len(keys)} weight group(s) {what}, initialised at random: {shown}")
    if rows.get("CONVERSION"):
        parts.append(f"{len(rows['CONVERSION'])} weight group(s) could not be converted")
    if not parts:
        return None
    return f"warning: {cls} from {source}: " + "; ".join(parts)


class LoadReportFilter(logging.Filter):
    """Drops or rewrites `transformers`' LOAD REPORT records (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - never break logging
            return True
        if "LOAD REPORT" not in message:
            return True
        parsed = parse_load_report(message)
        if parsed is None:
            return True
        line = summarize_load_report(*parsed)
        if line is None:
            return False
        record.msg, record.args = line, ()
        return True


_installed = False


def quiet_libraries() -> None:
    """Once per process: transformers' bars off, its load reports filtered (module docstring)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in REPORT_LOGGERS:
        logging.getLogger(name).addFilter(LoadReportFilter())
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' own tqdm: "Loading weights", "Writing model shards"
    if not hub_bars_off:
        enable_progress_bars()  # ... which also turned off the hub's download bars: those stay
