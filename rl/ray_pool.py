"""A pool of Ray actors that run zoom episodes next to open rasters (the `EpisodeBackend` for Ray runs).

Each actor holds one `ImageStore` (readers cached, so many rollouts share open datasets) and the episodes
started on it; the caller keeps every episode's image ids and calls, so an episode lost to an actor restart is
replayed on the new actor and the call goes on. Facts measured here (DESIGN.md) that shape it:
- `num_cpus=0`: I/O actors holding a CPU starve the trainer on small machines;
- `max_restarts=-1, max_task_retries=3`: a killed actor comes back and in-flight calls are retried;
- the store is opened lazily on first use: an `__init__` that raises kills the actor for good;
- `GDAL_CACHEMAX` per actor (GDAL's default is 5% of RAM per process);
- every `ray.get` has a timeout; results are pickled PIL images (Ray's numpy arrays would be read-only).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl.errors import EpisodeLostError, ToolBackendError

log = logging.getLogger(__name__)


class EpisodeWorker:
    """The actor body (also usable in-process for tests): episodes keyed by rollout id over one store."""

    def __init__(self, manifest: str, roots: list[str] | None, zoom_cfg: dict[str, Any]):
        self.manifest = str(manifest)
        self.roots = [str(r) for r in roots] if roots else None
        self.zoom_cfg_dict = dict(zoom_cfg)
        self._store: Any = None
        self._cfg: Any = None
        self._episodes: dict[str, Any] = {}
        self.calls = 0

    def _ready(self) -> None:
        if self._store is None:  # lazy: never raise in __init__
            from tools.store import ImageStore
            from tools.zoom import ZoomConfig

            self._store = ImageStore.from_manifest(self.manifest, roots=self.roots)
            self._cfg = ZoomConfig(**self.zoom_cfg_dict)

    def ping(self) -> int:
        import os

        return os.getpid()

    def start(self, key: str, image_ids: list[str]) -> list[Any]:
        from tools.protocol import Episode

        self._ready()
        ep = Episode(self._store, list(image_ids), self._cfg)
        self._episodes[key] = ep
        return list(ep.initial_observations())

    def replay(self, key: str, image_ids: list[str], calls: list[tuple[str, dict]]) -> None:
        """Rebuild a lost episode: same images, same calls in order (deterministic reads)."""
        self.start(key, image_ids)
        for name, args in calls:
            self.execute(key, name, args)

    def execute(self, key: str, name: str, arguments: dict) -> Any:
        from tools.protocol import ToolCall

        self.calls += 1
        ep = self._episodes.get(key)
        if ep is None:
            raise EpisodeLostError(f"episode {key} is not on this worker (restarted?)")
        return ep.execute(ToolCall(name=name, arguments=dict(arguments)))

    def close(self, key: str) -> None:
        self._episodes.pop(key, None)


@dataclass
class _Track:
    actor: int
    image_ids: list[str]
    calls: list[tuple[str, dict]] = field(default_factory=list)


class RayEpisodePool:
    """Round-robin pool of `EpisodeWorker` actors with sticky episodes, replay on loss, and timeouts."""

    def __init__(self, manifest: str | Path, zoom_cfg: dict[str, Any], *, n_actors: int = 2,
                 roots: list[str] | None = None, call_timeout_s: float = 30.0, max_attempts: int = 4,
                 gdal_cachemax_mb: int = 256, name_prefix: str | None = None):
        import ray

        if not ray.is_initialized():
            raise ToolBackendError("Ray is not initialised; call ray.init() (or run under Ray Train) first")
        self.call_timeout_s = float(call_timeout_s)
        self.max_attempts = int(max_attempts)
        self.counters = {"calls": 0, "replays": 0, "actor_errors": 0, "timeouts": 0}
        remote = ray.remote(
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=3,
            runtime_env={"env_vars": {"GDAL_CACHEMAX": str(int(gdal_cachemax_mb)),
                                      "OMP_NUM_THREADS": "1"}},
        )(EpisodeWorker)
        opts: dict[str, Any] = {}
        # Any: Ray types a handle's methods as the plain methods of EpisodeWorker, without `.remote`
        self.actors: list[Any] = []
        for i in range(int(n_actors)):
            if name_prefix:
                opts = {"name": f"{name_prefix}-{i}", "lifetime": None}
            self.actors.append(remote.options(**opts).remote(str(manifest), roots, dict(zoom_cfg)))
        self._tracks: dict[str, _Track] = {}
        self._next = 0
        self._lock = threading.Lock()

    # -- helpers -------------------------------------------------------------------------------------
    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref, timeout=self.call_timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> list[int]:
        """Pids of all actors once they answer (raises ToolBackendError on timeout)."""
        import ray

        try:
            return ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise ToolBackendError(f"Ray episode actors did not start within {timeout_s}s") from e

    def _call(self, key: str, method: str, *args: Any) -> Any:
        """Call an actor method for an episode; replay the episode if its actor lost it; retry dead actors."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        tr = self._tracks[key]
        last: BaseException | None = None
        for attempt in range(self.max_attempts):
            actor = self.actors[tr.actor]
            try:
                return self._get(getattr(actor, method).remote(key, *args))
            except RayTaskError as e:
                cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
                if isinstance(cause, EpisodeLostError) or "EpisodeLostError" in str(e):
                    self.counters["replays"] += 1
                    try:
                        self._get(actor.replay.remote(key, tr.image_ids, tr.calls))
                    except (RayActorError, GetTimeoutError, RayTaskError) as e2:
                        last = e2
                    continue
                raise ToolBackendError(f"{method} failed on actor {tr.actor}: {e}") from e
            except RayActorError as e:  # died and retries ran out: it restarts (max_restarts=-1); wait, go on
                self.counters["actor_errors"] += 1
                last = e
                time.sleep(min(0.5 * (attempt + 1), 2.0))
            except GetTimeoutError as e:
                self.counters["timeouts"] += 1
                last = e  # the ref is abandoned; the actor finishes or restarts on its own
        raise ToolBackendError(f"{method} for episode {key} failed after {self.max_attempts} attempts: {last}")

    # -- EpisodeBackend ------------------------------------------------------------------------------
    def start(self, key: str, image_ids: list[str]) -> list[Any]:
        with self._lock:
            idx = self._next % len(self.actors)
            self._next += 1
        self._tracks[key] = _Track(actor=idx, image_ids=list(image_ids))
        return self._start(key)

    def _start(self, key: str) -> list[Any]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        tr = self._tracks[key]
        last: BaseException | None = None
        for attempt in range(self.max_attempts):
            try:
                return self._get(self.actors[tr.actor].start.remote(key, tr.image_ids))
            except (RayActorError, GetTimeoutError) as e:
                self.counters["actor_errors"] += 1
                last = e
                time.sleep(min(0.5 * (attempt + 1), 2.0))
            except ray.exceptions.RayTaskError as e:
                raise ToolBackendError(f"start failed: {e}") from e
        raise ToolBackendError(f"start for episode {key} failed after {self.max_attempts} attempts: {last}")

    def execute(self, key: str, name: str, arguments: dict) -> Any:
        self.counters["calls"] += 1
        result = self._call(key, "execute", name, dict(arguments))
        self._tracks[key].calls.append((name, dict(arguments)))
        return result

    def close(self, key: str) -> None:
        tr = self._tracks.pop(key, None)
        if tr is not None:
            self.actors[tr.actor].close.remote(key)  # fire and forget

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:  # already gone
                log.debug("kill actor: %s", e)
        self.actors = []
