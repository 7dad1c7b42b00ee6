"""A look inside a finetune run's memory: `python recipes/inspect.py RUN [--top_slots N] [--background_batches N]`.

Writes RUN/inspect.md (per fact: updated rows, their background DF, overlaps; the rows most facts updated and
the tokens that read them; the base's slot usage) and RUN/inspect_overlap.png (fact × fact Jaccard heatmap).
See training/inspect_run.py.

The file name shadows the standard library's `inspect` for every script in this folder (a script's folder is
sys.path[0]). Imported under that name (by dataclasses, asyncio, torch, ... in train.py or sweep.py), this
file therefore loads the real standard-library module and hands it over; run as a script, it leaves the
folder off sys.path before importing anything.
"""
import sys

if __name__ != "__main__":
    import importlib.util
    import os
    import sysconfig

    _spec = importlib.util.spec_from_file_location("inspect", os.path.join(sysconfig.get_path("stdlib"), "inspect.py"))
    _std = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _std       # the import statement returns what sys.modules holds after this file ran
    _spec.loader.exec_module(_std)
else:
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

    from training.inspect_run import inspect_run

    USAGE = """usage: recipes/inspect.py RUN [--top_slots N] [--background_batches N]

RUN                   a finetune run directory of a value-row method (sparse, tf_only, memory_all)
--top_slots N         rows (updated by the most facts) whose background readers are listed (default 10)
--background_batches  background batches the base model reads for that analysis (default 20; 0 skips it)
Writes RUN/inspect.md and RUN/inspect_overlap.png."""

    def main(argv: list[str]) -> int:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return 0 if argv else 2
        run, opts = argv[0], {"top_slots": 10, "background_batches": 20}
        for arg in argv[1:]:
            key, _, value = arg.lstrip("-").partition("=")
            if key not in opts or not value.lstrip("-").isdigit():
                print(f"error: unknown or malformed option {arg!r}\n{USAGE}", file=sys.stderr)
                return 2
            opts[key] = int(value)
        try:
            result = inspect_run(run, **opts)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {Path(run) / 'inspect.md'} and {Path(run) / 'inspect_overlap.png'}: {result['facts']} facts, "
              f"{result['rows_updated']} rows updated, Jaccard mean {result['jaccard_mean']:.3f} max {result['jaccard_max']:.3f}")
        return 0

    sys.exit(main(sys.argv[1:]))
