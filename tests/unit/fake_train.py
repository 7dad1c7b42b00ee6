"""A stand-in for recipes/train.py in the sweep tests (no training): same command line, records the
arguments it got and the config's fingerprint in OUTPUT_DIR/config.yaml and writes a one-step summary.json."""
import json
import sys
from pathlib import Path

args: dict[str, str] = {}
argv = sys.argv[1:]
i = 0
while i < len(argv):
    word = argv[i]
    if word.startswith("--") and "=" in word:
        key, value = word[2:].split("=", 1)
    elif word.startswith("--") and i + 1 < len(argv):
        key, value = word[2:], argv[i + 1]
        i += 1
    else:
        sys.exit(f"fake_train: unexpected argument {word!r}")
    args[key] = value
    i += 1
out = Path(args["output_dir"])
out.mkdir(parents=True, exist_ok=True)
# the fingerprint train.py records (the sweep compares it to tell a finished point of another config)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.config import resolve_config  # noqa: E402

fingerprint = resolve_config(args["config"], {k: v for k, v in args.items() if k != "config"}).fingerprint()
(out / "config.yaml").write_text(f"fingerprint: {fingerprint}\n" +
                                 "".join(f"{k.rsplit('.', 1)[-1]}: {v}\n" for k, v in args.items()))
(out / "summary.json").write_text(json.dumps({"stage": "finetune", "steps": 1}))
