"""``--reasoning off|on|<level>``: the chat-template arguments it stands for (torch-free).

As the reference (``dflash==0.1.0``) maps it: ``on`` / ``off`` -> ``enable_thinking`` (Qwen3
style templates); a level (``low``, ``medium``, ``high``, ...) -> ``reasoning_strength`` or
``reasoning_effort``, whichever the template names. A setting the template cannot take is
refused in one line instead of being silently ignored by the template. Unset, the
benchmarks keep their default: thinking off (``enable_thinking=False``, which a template
without the switch ignores).
"""
from __future__ import annotations

import re

from .errors import UserError

LEVEL_KEYS = ("reasoning_strength", "reasoning_effort")  # the reference's order
_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve(reasoning: str | None, enable_thinking: bool = False) -> tuple[str, bool]:
    """(setting, given explicitly) from ``--reasoning`` and its alias ``--enable-thinking``."""
    if reasoning is not None:
        reasoning = reasoning.strip()
        if not _LEVEL.match(reasoning):
            raise UserError(f"--reasoning must be off, on or a reasoning level such as high, "
                            f"got {reasoning!r}")
        low = reasoning.lower()
        reasoning = low if low in ("on", "off") else reasoning
        if enable_thinking and reasoning != "on":
            raise UserError(f"--enable-thinking means --reasoning on; it contradicts "
                            f"--reasoning {reasoning}", "give one of them")
        return reasoning, True
    return ("on", True) if enable_thinking else ("off", False)


def template_kwargs(reasoning: str, template: str | None, explicit: bool = True) -> dict:
    """Keyword arguments of ``apply_chat_template`` for ``reasoning`` under ``template`` (its
    text). ``explicit`` False (the default setting): never refused."""
    text = str(template or "")
    if reasoning in ("on", "off"):
        if explicit and "enable_thinking" not in text:
            raise UserError(f"--reasoning {reasoning}: the target's chat template has no "
                            "enable_thinking switch",
                            "leave --reasoning unset" + (", or give a level"
                                                         if _level_key(text) else ""))
        return {"enable_thinking": reasoning == "on"}
    key = _level_key(text)
    if key is None:
        raise UserError(f"--reasoning {reasoning}: the target's chat template names no "
                        f"reasoning level ({' / '.join(LEVEL_KEYS)})",
                        "use --reasoning on or off" if "enable_thinking" in text
                        else "leave --reasoning unset")
    return {key: reasoning}


def _level_key(text: str) -> str | None:
    return next((key for key in LEVEL_KEYS if key in text), None)
