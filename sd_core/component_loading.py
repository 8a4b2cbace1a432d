"""Cold-start overlap: a diffusers folder's components (text encoders, VAE) loaded as their files land, the UNet still
downloading; the pipeline is then assembled from them (``from_pretrained(folder, **components)``)."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

log = logging.getLogger("sd_core.pipelines")

LIBRARIES = ("diffusers", "transformers")  # component classes loaded early; pipeline-module classes wait (rare)
MODEL_INDEX = "model_index.json"


class Arrivals:
    """What a folder download (``storage.fetch(..., watch=)``) has put in its staging folder so far.

    The fetch thread calls ``listing``, ``arrived`` per finished file and ``committing`` before the staging folder is
    renamed into the cache; a loader thread asks ``complete()`` for the components whose files are all in and reads
    them inside ``reading()``, which ``committing`` waits for (and after which no read of staging starts)."""

    def __init__(self):
        self._cond = threading.Condition()
        self.root: Path | None = None  # staging/data while the download runs; None before and after
        self._expected: set[str] = set()
        self._landed: set[str] = set()
        self._readers = 0
        self._closed = False

    # --- the fetch thread ---
    def listing(self, root: Path, rels: list[str]) -> None:
        with self._cond:
            self.root, self._expected, self._landed = root, set(rels), set()
            self._cond.notify_all()

    def arrived(self, rel: str) -> None:
        with self._cond:
            self._landed.add(rel)
            self._cond.notify_all()

    def committing(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._readers == 0)
            self.root = None
            self._cond.notify_all()

    # --- the loader thread ---
    def wake(self, _future=None) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def complete(self) -> set[str]:
        """Top-level folders (components) all of whose listed files have landed, once model_index.json has."""
        with self._cond:
            if self._closed or self.root is None or MODEL_INDEX not in self._landed:
                return set()
            folders = {rel.split("/", 1)[0] for rel in self._expected if "/" in rel}
            return {f for f in folders if all(r in self._landed for r in self._expected if r.startswith(f + "/"))}

    def pending(self) -> list[str]:
        """Components (top-level folders) and files still downloading."""
        with self._cond:
            return sorted({rel.split("/", 1)[0] for rel in self._expected - self._landed})

    @contextlib.contextmanager
    def reading(self):
        """The staging root, held against the commit's rename for the block; None once the download committed."""
        with self._cond:
            if self._closed or self.root is None:
                yield None
                return
            self._readers += 1
            root = self.root
        try:
            yield root
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()


def component_kwargs(folder: Path, name: str, variant: str | None, common: dict) -> dict | None:
    """How diffusers' from_pretrained would load component ``name`` of ``folder`` (diffusers' load_sub_model), or None
    for one left to from_pretrained (no safetensors weights, a pipeline-module or unknown class)."""
    sub = folder / name
    weights = [p.name for p in sub.iterdir() if p.name.endswith(".safetensors")] if sub.is_dir() else []
    if not weights:
        return None
    kwargs = {"torch_dtype": common["dtype"], "use_safetensors": common.get("use_safetensors")}
    if variant and any(f".{variant}." in w for w in weights):
        kwargs["variant"] = variant
    if common.get("device_map") is not None:
        kwargs["device_map"] = common["device_map"]
    return kwargs


def load_component(folder: Path, name: str, entry, kwargs: dict):
    """Component ``name`` loaded from ``folder/name`` with the class model_index.json names for it."""
    library, class_name = entry
    module = importlib.import_module(library)
    cls = getattr(module, class_name)
    if library == "transformers":  # transformers >= 4.56 names it dtype (diffusers passes it so)
        kwargs = {("dtype" if k == "torch_dtype" else k): v for k, v in kwargs.items()}
    return cls.from_pretrained(str(folder / name), local_files_only=True, **kwargs)


def load_while_fetching(arrivals: Arrivals, fetching: Future, common: dict, variant: str | None,
                        skip: set[str] = frozenset()) -> dict:
    """Until ``fetching`` (the folder's download) ends: load each component whose files have all landed. Returns
    {name: module} for ``from_pretrained(folder, **components)``; a component that fails here is left to it."""
    fetching.add_done_callback(arrivals.wake)
    loaded: dict[str, object] = {}
    tried: set[str] = set(skip)
    while not fetching.done():
        ready = sorted(arrivals.complete() - tried)
        if not ready:
            arrivals.wait(0.5)
            continue
        name = ready[0]
        tried.add(name)
        with arrivals.reading() as root:
            if root is None:
                break
            try:
                entry = json.loads((root / MODEL_INDEX).read_text()).get(name)
                kwargs = component_kwargs(root, name, variant, common)
                if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in LIBRARIES) or kwargs is None:
                    continue
                started = time.perf_counter()
                loaded[name] = load_component(root, name, entry, kwargs)
                log.info("loaded component %s while the download runs (%.2fs; still downloading: %s)", name,
                         time.perf_counter() - started, ", ".join(arrivals.pending()) or "nothing")
            except Exception as exc:  # from_pretrained loads it (and reports a real problem) once the folder is in
                log.warning("early load of component %s failed (%s: %s); loading it with the pipeline", name,
                            type(exc).__name__, str(exc)[:200])
    return loaded
