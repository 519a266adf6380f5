"""Chat with a checkpoint: python -m engine.chat CHECKPOINT_OR_RUN_DIR [temperature=0.8 top_k=50 ...]

Besides sampling settings: device=, seed=, verify_checksums=false (load without checking checksums) and
phase=MODULE (trust a phase module outside phases/ that the checkpoint names).

On a terminal it is a REPL that streams tokens; `/set key value` changes a sampling setting. Without a
terminal it reads one prompt per line from stdin and prints one completion per line, for scripts.
The checkpoint names its phase, so phase 7 and mdm checkpoints chat the same way.
"""

import dataclasses
import sys
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.cli import run_cli
from engine.config import ConfigError, parse_overrides
from engine.sampling import SamplingSettings
from phases import config_from_dict, get_phase, phase_names

HELP = "commands: /set KEY VALUE (temperature, top_k, top_p, max_new_tokens, steps), /settings, /quit"
SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(SamplingSettings) if f.name != "eos_id"}


def set_setting(settings: SamplingSettings, key: str, value: str) -> None:
    if key not in SETTING_TYPES:
        raise ConfigError(f"unknown setting '{key}'; settings: {', '.join(SETTING_TYPES)}")
    try:
        setattr(settings, key, SETTING_TYPES[key](value))
    except ValueError:
        raise ConfigError(f"setting '{key}' expects {SETTING_TYPES[key].__name__}, got '{value}'") from None


class StreamPrinter:
    """Prints decoded text as tokens arrive, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


class Chat:
    def __init__(self, path: Path, device: str):
        from data.tokenizer import load_tokenizer

        state = ckpt.load_checkpoint(path)
        self.cfg = config_from_dict(state["config"])
        self.phase = get_phase(self.cfg.phase)
        self.device = torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        model = self.phase.build_model(self.cfg)
        model.load_state_dict(state["model"])
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, dtype).eval()
        self.tokenizer = load_tokenizer(state["tokenizer"])
        print(f"loaded {path} ({self.cfg.phase}, step {state['step']})", file=sys.stderr)

    def complete(self, prompt: str, settings: SamplingSettings, on_token=None) -> str:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) or [settings.eos_id or 0]
        prompt_ids = torch.tensor([ids], device=self.device)
        new_ids = self.phase.generate(self.model, prompt_ids, settings, on_token)
        return self.tokenizer.decode(new_ids[0].tolist(), skip_special_tokens=True)


def checkpoint_to_chat(path: str) -> Path:
    """resolve_checkpoint's answer. When `path` is a run folder that holds no checkpoint (make chat-phase8
    defaults to the 1.5B run's, which a CPU machine never trains), the error names the runs of the phase the
    folder is named after (phase8_1.5b: phase8) that its parent folder does hold."""
    target = Path(path)
    untrained = path and (not target.exists() or (target.is_dir() and not ckpt.is_distributed_checkpoint(target)
                                                   and ckpt.best_checkpoint_in(target) is None))
    phase = next((p for p in phase_names() if target.name.startswith(p + "_")), None)
    if untrained and phase and target.parent.is_dir():
        runs = sorted(str(run) for run in target.parent.iterdir() if run.is_dir() and run != target
                      and any(ckpt.checkpoint_name(c).startswith(phase + "_") for c in ckpt.checkpoints_in(run)))
        if runs:
            raise ckpt.CheckpointError(f"no checkpoint in {target}/; the {phase} runs in {target.parent}/ are: "
                                       f"{', '.join(runs)} (give one as CHECKPOINT=)")
    return ckpt.resolve_checkpoint(path)


def repl(chat: Chat, settings: SamplingSettings) -> None:
    print(HELP)
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print()
            return
        words = prompt.split()
        if prompt.strip() in ("/quit", "/exit"):
            return
        if prompt.strip() == "/settings":
            print(dataclasses.asdict(settings))
        elif words and words[0] == "/set" and len(words) == 3:
            try:
                set_setting(settings, words[1], words[2])
            except ConfigError as e:
                print(f"error: {e}")
        elif prompt.startswith("/"):
            print(HELP)
        elif prompt.strip():
            print(prompt, end="", flush=True)
            chat.complete(prompt, settings, StreamPrinter(chat.tokenizer))
            print()


def main(argv: list[str]) -> None:
    path = argv[0] if argv and "=" not in argv[0] else ""
    options = ckpt.take_loading_options(parse_overrides(argv[1:] if path else argv))
    device, seed = options.pop("device", "auto"), options.pop("seed", None)
    settings = SamplingSettings()
    for key, value in options.items():
        set_setting(settings, key, value)
    chat = Chat(checkpoint_to_chat(path), device)
    settings.eos_id = chat.tokenizer.eos_token_id
    if seed is not None:
        torch.manual_seed(int(seed))
    if sys.stdin.isatty():
        repl(chat, settings)
    else:
        for line in sys.stdin:
            if line.strip():
                # one line per completion: any line break it generated (\n, \r, ...) becomes a space
                print(" ".join(chat.complete(line.rstrip("\n"), settings).splitlines()), flush=True)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
