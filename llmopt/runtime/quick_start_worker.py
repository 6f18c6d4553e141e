"""The process that answers while the engine compiles (see :mod:`llmopt.runtime.quick_start`).

Run as ``python -m llmopt.runtime.quick_start_worker '<json request>'``. It
loads the model, builds the chat prompt, and decodes with the plain Hugging
Face cache loop (no ``torch.compile``), writing one line per event to stdout:

    prompt <json token ids>     the prompt it decodes from
    progress <json message>     a loading step worth telling the user (a first conversion)
    token <id> <json text>      each new token, as soon as it is chosen, with the text it adds
    done                        the reply is complete (a stop token or max_tokens)
    error <message>             it could not go on

It exits when its parent closes the pipe to its stdin (the parent switched
to the compiled engine, finished, or died), so it never outlives the command.
"""

from __future__ import annotations

import json
import os
import sys
import threading


def chat_prompt_ids(tokenizer, prompt: str, system: str | None) -> list[int]:
    """Token ids for one user turn, ready for the reply (the chat template when the model has one)."""
    if not getattr(tokenizer, "chat_template", None):
        if system:
            raise ValueError("--system needs a model with a chat template")
        return list(tokenizer(prompt)["input_ids"])
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return encoded["input_ids"][0].tolist()  # transformers 5: a BatchEncoding


def _exit_when_parent_goes() -> None:
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or is gone
    os._exit(0)


def main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    threading.Thread(target=_exit_when_parent_goes, daemon=True).start()
    out = sys.stdout

    def emit(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    try:
        import torch

        from llmopt.models import load
        from llmopt.runtime.generate import generate_stream

        if request.get("threads"):
            torch.set_num_threads(int(request["threads"]))
        loaded = load(request["model"], progress=lambda message: emit("progress " + json.dumps(message)))
        tokenizer = loaded.tokenizer
        ids = chat_prompt_ids(tokenizer, request["prompt"], request.get("system"))
        emit("prompt " + json.dumps(ids))
        tokens: list[int] = []
        printed = ""
        for token in generate_stream(loaded.model, tokenizer, torch.tensor([ids]), request["max_tokens"],
                                     temperature=request.get("temperature", 0.0), top_k=request.get("top_k"),
                                     seed=request.get("seed")):
            tokens.append(int(token))
            text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            delta = "" if text.endswith("\ufffd") else text[len(printed):]  # wait for a whole character
            printed += delta
            emit(f"token {int(token)} {json.dumps(delta)}")
        emit("done")
    except BrokenPipeError:
        return 0
    except Exception as error:  # reported to the parent, which carries on without us
        message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        emit("error " + message.replace("\n", " "))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
