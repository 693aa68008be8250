"""TEST AND DEMO ONLY: the tiny DeepSeek-V3 model directory for CPU serving.

The model is ``test/data/tiny_dsv3`` in the repository: a ``config.json`` (4 layers,
hidden 64, 16 routed experts + 1 shared, top-4 of 4 groups, MLA, yarn rope, which the
CPU rope path requires) and a 512-token byte-level BPE tokenizer. There are no
weights: servers run with ``--load-format dummy``.

The tokenizer files are shipped (21 KB) because training is only deterministic for a
fixed Python stdlib; ``build_tokenizer`` regenerates them (BPE trained on the first 60
``*.py`` files of the running interpreter's stdlib, sorted by name)::

    python -m sglang_moe_lb.testing.cpu_serving.model_dir --rebuild-tokenizer DIR

``prepare_model_dir(overrides)`` writes a variant (config keys overridden) into a
cache directory, for tests that need another shape.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path

MODEL_NAME = "tiny_dsv3"
VOCAB_SIZE = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "model_max_length": 512,
    "add_bos_token": False,
    "chat_template": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    ),
}


def repo_root() -> Path:
    # python/sglang_moe_lb/testing/cpu_serving/model_dir.py -> repository root
    return Path(__file__).resolve().parents[4]


def source_model_dir() -> Path:
    """The shipped model directory (override with SGLANG_MOE_LB_TINY_MODEL_DIR)."""
    env = os.environ.get("SGLANG_MOE_LB_TINY_MODEL_DIR")
    path = Path(env) if env else repo_root() / "test" / "data" / MODEL_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"tiny model config not found at {path}/config.json; the CPU harness needs a source checkout "
            "(editable install) or SGLANG_MOE_LB_TINY_MODEL_DIR pointing at a copy of test/data/tiny_dsv3"
        )
    return path


def cache_root() -> Path:
    return Path(os.environ.get("SGLANG_MOE_LB_CACHE", Path.home() / ".cache" / "sglang_moe_lb"))


def build_tokenizer(dest: Path | str, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train the byte-level BPE tokenizer into ``dest`` (deterministic for a given stdlib)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    corpus = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:60]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(corpus, trainer)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1) + "\n")
    return dest


def prepare_model_dir(overrides: dict | None = None, cache_dir: Path | str | None = None) -> Path:
    """A directory usable as ``--model-path`` / ``--tokenizer``.

    Without ``overrides`` this is the shipped directory itself. With them, a copy whose
    ``config.json`` has those keys replaced, under the cache directory (named by content).
    """
    src = source_model_dir()
    has_tokenizer = all((src / f).is_file() for f in TOKENIZER_FILES)
    if not overrides and has_tokenizer:
        return src
    config = json.loads((src / "config.json").read_text())
    config.update(overrides or {})
    text = json.dumps(config, indent=1, sort_keys=True) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    dest = Path(cache_dir) if cache_dir else cache_root() / f"{MODEL_NAME}-{digest}"
    if not (dest / "config.json").is_file() or (dest / "config.json").read_text() != text:
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        if has_tokenizer:
            for f in TOKENIZER_FILES:
                shutil.copyfile(src / f, tmp / f)
        else:
            build_tokenizer(tmp, int(config.get("vocab_size", VOCAB_SIZE)))
        (tmp / "config.json").write_text(text)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild-tokenizer", metavar="DIR", help="train the tokenizer into DIR")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    if args.rebuild_tokenizer:
        print(build_tokenizer(args.rebuild_tokenizer, args.vocab_size))
    else:
        print(prepare_model_dir())


if __name__ == "__main__":
    main()
