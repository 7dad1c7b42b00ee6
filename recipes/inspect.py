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

    from training.inspect_run import main

    sys.exit(main(sys.argv[1:]))
