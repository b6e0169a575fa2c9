"""``edgeship chat``: stream a greedy reply from one artifact of an LLM bundle, with the bundle's chat template.

Device side: the bundle's ``tokenizer/tokenizer.json`` through the ``tokenizers`` package and its chat template
through jinja2 (the way transformers renders it), no torch and no transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import BundleError, InputError, RuntimeMissingError
from edgeship.manifest import Bundle, load_bundle
from edgeship.profiling.llm.runtime import open_llm


class ChatTokenizer:
    """Encode a chat-templated conversation and decode tokens, from the files an LLM bundle carries."""

    def __init__(self, bundle: Bundle) -> None:
        llm = bundle.manifest.llm or {}
        tok_dir = bundle.root / str(llm.get("tokenizer", "tokenizer"))
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeMissingError("chat needs the tokenizers package: pip install 'edgeship[llm]'") from None
        try:
            self._tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
            cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
            self.template = (bundle.root / str(llm["chat_template"])).read_text(encoding="utf-8")
        except (OSError, ValueError, KeyError, Exception) as e:
            raise BundleError(f"{bundle.root}: tokenizer or chat template missing or unreadable ({e}); re-export") from None
        self.specials = {k: v for k, v in cfg.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")
                         and isinstance(v, str)}

    def render(self, messages: list[dict[str, str]]) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise InputError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template).render(messages=messages, add_generation_prompt=True, **self.specials)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self._tok.encode(self.render(messages), add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


def stream_reply(runtime: Any, tok: ChatTokenizer, prompt_ids: list[int], max_new: int,
                 eos: set[int]) -> Iterator[str]:
    """Greedy decode, yielding the text each new token adds (decoding the whole reply keeps multi-byte glyphs whole)."""
    runtime.check_room(len(prompt_ids) + max_new)
    if getattr(runtime, "timed_generation", False):  # an engine that generates by itself (LiteRT-LM), stop tokens too
        yield from runtime.stream_text(prompt_ids, max_new)
        return
    logits = runtime.append(prompt_ids)
    out: list[int] = []
    shown = ""
    for _ in range(max_new):
        nxt = int(np.argmax(logits))
        if nxt in eos:
            break
        out.append(nxt)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            yield text[len(shown):]
            shown = text
        logits = runtime.append([nxt])


def chat(bundle_dir: str | Path, artifact: str | None, prompt: str, new_tokens: int, threads: int | None,
         write: Callable[[str], None]) -> str:
    bundle = load_bundle(bundle_dir, verify=True)
    if bundle.manifest.llm is None:
        raise BundleError(f"{bundle_dir} is not an LLM bundle (export a *ForCausalLM model to chat with it)")
    arts = bundle.manifest.artifacts
    art = bundle.manifest.artifact(artifact) if artifact else arts[0]
    tok = ChatTokenizer(bundle)
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    rt = open_llm(art.format, bundle.path_of(art), art.runtime, threads=threads)
    try:
        if len(ids) + new_tokens > rt.max_context:
            raise InputError(f"the prompt ({len(ids)} tokens with the chat template) plus --new-tokens {new_tokens} "
                             f"exceed {art.key}'s max context {rt.max_context}; shorten the prompt or lower "
                             "--new-tokens, or re-export with a larger --max-context")
        eos = {int(e) for e in bundle.manifest.llm["generation"]["eos_token_ids"]}
        parts = []
        for piece in stream_reply(rt, tok, ids, new_tokens, eos):
            parts.append(piece)
            write(piece)
        return "".join(parts)
    finally:
        rt.close()
