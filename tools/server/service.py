"""The zoom service shared by the REST app and the MCP server: images, episodes and zoom reads.

The semantics are the training ones: episodes hold observations (`image_k` overviews, then `obs_N` crops)
and `zoom_in(bbox, source)` boxes are in the frame of the named observation, through the same
`tools.protocol.Episode` the trainer uses. A stateless `zoom` reads an image id + a native-pixel, image-CRS
or lon/lat box. Callers name images by id only; files come from the operator's manifest/folders under
allowed roots (see SECURITY.md).

Every read runs in a thread pool under `asyncio.wait_for` (a slow read → ToolTimeoutError, 504) and a
concurrency limit whose slot is released only when the read thread really ends (saturation →
ServerBusyError, 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from tools import errors as E
from tools.errors import ServerBusyError, ToolError, UnknownEpisodeError
from tools.server.config import ServeConfig
from tools.server.encoding import FORMATS, encode_image, finite_json, observation_payload, public_error

log = logging.getLogger("knowzoom.server")

T = TypeVar("T")


@dataclass
class _EpisodeSlot:
    episode: Any
    image_ids: list[str]
    created: float
    last_used: float
    lock: threading.Lock
    owner: str = ""


class EpisodeRegistry:
    """Bounded, expiring map episode id → Episode, fair between clients.

    A client (`owner`) holds at most `max_per_owner` episodes: beyond that its own least recently used one
    goes. When the whole registry is full, the least recently used episode of the client holding the most
    is evicted, so one client opening many episodes never evicts a lighter client's.
    """

    def __init__(self, max_episodes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 max_per_owner: int | None = None):
        self.max_episodes = int(max_episodes)
        self.max_per_owner = int(max_per_owner or max_episodes)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self._slots: OrderedDict[str, _EpisodeSlot] = OrderedDict()
        self._lock = threading.Lock()
        self.n_evicted = 0
        self.n_expired = 0

    def _purge(self, now: float) -> None:
        for eid in [e for e, s in self._slots.items() if now - s.last_used > self.ttl_s]:
            del self._slots[eid]
            self.n_expired += 1

    def _evict_lru_of(self, owner: str) -> None:
        victim = next(e for e, s in self._slots.items() if s.owner == owner)  # OrderedDict: LRU first
        del self._slots[victim]
        self.n_evicted += 1

    def add(self, episode: Any, image_ids: list[str], owner: str = "") -> str:
        now = self.clock()
        eid = secrets.token_urlsafe(16)  # unguessable: one agent cannot drive another's episode
        with self._lock:
            self._purge(now)
            counts: dict[str, int] = {}
            for s in self._slots.values():
                counts[s.owner] = counts.get(s.owner, 0) + 1
            while counts.get(owner, 0) >= self.max_per_owner:
                self._evict_lru_of(owner)
                counts[owner] -= 1
            while len(self._slots) >= self.max_episodes:
                heaviest = max(counts, key=lambda o: counts[o])
                self._evict_lru_of(heaviest)
                counts[heaviest] -= 1
            self._slots[eid] = _EpisodeSlot(episode, list(image_ids), now, now, threading.Lock(), owner)
        return eid

    def owners(self) -> dict[str, int]:
        """Episodes held per client (for tests and /health)."""
        with self._lock:
            out: dict[str, int] = {}
            for s in self._slots.values():
                out[s.owner] = out.get(s.owner, 0) + 1
            return out

    def get(self, eid: str) -> _EpisodeSlot:
        now = self.clock()
        with self._lock:
            self._purge(now)
            slot = self._slots.get(eid) if isinstance(eid, str) else None
            if slot is None:
                raise UnknownEpisodeError(detail=f"episode {str(eid)[:40]!r} not found")
            slot.last_used = now
            self._slots.move_to_end(eid)
            return slot

    def remove(self, eid: str) -> bool:
        with self._lock:
            return self._slots.pop(eid, None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._purge(self.clock())
            return len(self._slots)


class ZoomService:
    """Images, episodes and zoom reads with timeouts, a concurrency limit and caps (transport-agnostic)."""

    def __init__(self, cfg: ServeConfig, store: Any | None = None):
        from tools.security import resolve_under_roots, sniff_driver

        self.cfg = cfg
        self.zcfg = cfg.zoom_config()
        self.store = store if store is not None else build_store(cfg)
        # Defence in depth beside the store's own root check: every served file must still resolve under
        # the roots and start with TIFF/PNG/JPEG magic bytes; others are refused (logged, then "unknown").
        self.served: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        roots = cfg.roots() or [str(r) for r in getattr(self.store, "roots", [])]
        for image_id in self.store.ids():
            try:
                real = resolve_under_roots(self.store.path(image_id), roots)
                self.served[image_id] = sniff_driver(real)
            except ToolError as e:
                self.refused[image_id] = str(e)
                log.warning("refusing to serve %r: %s", image_id, e)
        self.episodes = EpisodeRegistry(cfg.max_episodes, cfg.episode_ttl_s,
                                        max_per_owner=cfg.max_episodes_per_client)
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.read_threads, thread_name_prefix="kz-read")
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self.inflight = 0
        self.n_timeouts = 0
        self.n_busy = 0

    # -- plumbing ---------------------------------------------------------------------------------------
    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.cfg.max_concurrency), loop
        return self._sem

    async def run_read(self, fn: Callable[[], T]) -> T:
        """Run blocking read work in the pool under the concurrency limit and the request timeout."""
        from tools.security import gdal_env

        sem = self._semaphore()
        try:
            await asyncio.wait_for(sem.acquire(), timeout=self.cfg.queue_timeout_s)
        except TimeoutError:
            self.n_busy += 1
            raise ServerBusyError(detail=f"{self.cfg.max_concurrency} reads in flight") from None
        self.inflight += 1

        def work() -> T:
            with gdal_env():
                return fn()

        fut = asyncio.get_running_loop().run_in_executor(self.pool, work)

        def release(_: Any) -> None:  # the slot frees when the thread ends, not when the caller gives up
            self.inflight -= 1
            sem.release()

        fut.add_done_callback(release)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=self.cfg.request_timeout_s)
        except TimeoutError:
            self.n_timeouts += 1
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # swallow the late result/error
            raise E.ToolTimeoutError(detail=f"read exceeded {self.cfg.request_timeout_s}s") from None

    def check_id(self, image_id: Any) -> str:
        """An id that names a served image, else UnknownImageError (never reveals why)."""
        if not isinstance(image_id, str) or len(image_id) > self.cfg.max_id_length or image_id not in self.served:
            raise E.UnknownImageError(detail=f"image id {str(image_id)[:80]!r} not served")
        return image_id

    def check_format(self, fmt: Any) -> str:
        if fmt not in FORMATS:
            raise E.BadBoxError(f"format must be one of {', '.join(FORMATS)}.")
        return fmt

    def _read_guard(self, image_id: str, fn: Callable[[], T]) -> T:
        """Map low-level read failures of a served file to the scrubbed UnreadableImageError."""
        try:
            return fn()
        except ToolError:
            raise
        except (OverflowError, RecursionError) as e:  # numbers/nesting from the request, not the file
            raise E.BadBoxError(detail=f"{type(e).__name__} on {image_id}") from None
        except (OSError, ValueError, RuntimeError, MemoryError) as e:
            if isinstance(e, (ValueError,)) and "bbox" in str(e).lower():
                raise E.BadBoxError(detail=str(e)) from e
            log.warning("read of %r failed: %r", image_id, e)
            raise E.UnreadableImageError(detail=f"{image_id}: {e!r}") from e
        except Exception as e:  # noqa: BLE001 - rasterio raises its own hierarchy; never a 500 for a file
            log.exception("read of %r failed: %r", image_id, e)  # full trace in the log, scrubbed answer
            raise E.UnreadableImageError(detail=f"{image_id}: {e!r}") from e

    @contextlib.contextmanager
    def _holding(self, slot: _EpisodeSlot) -> Iterator[None]:
        """One call at a time per episode; a call that waits past the request timeout is a ToolTimeoutError."""
        if not slot.lock.acquire(timeout=self.cfg.request_timeout_s):
            raise E.ToolTimeoutError(detail="episode busy")
        try:
            yield
        finally:
            slot.lock.release()

    def _encoded(self, obs: Any, fmt: str) -> tuple[dict[str, Any], bytes | None]:
        """(payload, image bytes) of an observation: json carries the PNG inside the payload (bytes None)."""
        data = encode_image(obs.image, "png" if fmt == "json" else fmt, self.cfg)
        return observation_payload(obs, fmt, self.cfg, data), (None if fmt == "json" else data)

    # -- images ---------------------------------------------------------------------------------------
    def list_images(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        ids = sorted(self.served)
        limit = self.cfg.max_list if limit is None else max(0, min(int(limit), self.cfg.max_list))
        offset = max(0, int(offset))
        return {"images": ids[offset:offset + limit], "total": len(ids), "offset": offset, "limit": limit}

    async def image_info(self, image_id: str) -> dict[str, Any]:
        image_id = self.check_id(image_id)
        info = await self.run_read(lambda: self._read_guard(image_id, lambda: self.store.info(image_id)))
        d = info.to_dict() if hasattr(info, "to_dict") else dataclasses.asdict(info)
        d.pop("path", None)  # never reveal paths
        d.pop("meta", None)
        d["bands"] = d.get("count")
        return finite_json(d)

    def tools(self) -> dict[str, Any]:
        from tools.protocol import system_prompt, zoom_tool_schema

        # strict form: OpenAI strict function calling accepts it as is (same tool, same semantics)
        return {"tools": [zoom_tool_schema(self.cfg.frame, strict=True)], "frame": self.cfg.frame,
                "system_prompt": system_prompt(self.cfg.frame), "max_turns": self.cfg.max_turns}

    # -- episodes -------------------------------------------------------------------------------------
    def _need_episodes(self) -> None:
        if self.cfg.stateless_only:
            raise E.LimitError("Episodes are disabled on this server (stateless_only); use /zoom.")

    async def start_episode(self, image_ids: Any, fmt: str = "json", owner: str = "") -> dict[str, Any]:
        from tools.protocol import Episode

        self._need_episodes()
        fmt = self.check_format(fmt)
        if not isinstance(image_ids, list) or not image_ids:
            raise E.ToolCallParseError("image_ids must be a non-empty list of image ids.")
        if len(image_ids) > self.cfg.max_images_per_episode:
            raise E.LimitError(f"At most {self.cfg.max_images_per_episode} images per episode.")
        ids = [self.check_id(i) for i in image_ids]

        def make() -> tuple[Any, list[dict[str, Any]]]:
            ep = self._read_guard(ids[0], lambda: Episode(self.store, ids, self.zcfg))
            obs = self._read_guard(ids[0], ep.initial_observations)
            return ep, [observation_payload(o, fmt, self.cfg) for o in obs]

        ep, payloads = await self.run_read(make)
        eid = self.episodes.add(ep, ids, owner)
        return {"episode_id": eid, "frame": self.cfg.frame, "max_turns": self.cfg.max_turns,
                "expires_after_idle_s": self.cfg.episode_ttl_s, "observations": finite_json(payloads)}

    async def episode_zoom(self, eid: str, bbox: Any, source: Any = "image_0",
                           fmt: str = "json") -> tuple[dict[str, Any], bytes | None]:
        """zoom_in on an episode; returns (observation payload, image bytes or None for json)."""
        self._need_episodes()
        fmt = self.check_format(fmt)
        slot = self.episodes.get(eid)
        if not isinstance(source, str) or len(source) > 64:
            raise E.UnknownSourceError(detail=f"bad source {str(source)[:64]!r}")

        def work() -> tuple[dict[str, Any], bytes | None]:
            with self._holding(slot):
                obs = self._read_guard(slot.image_ids[0], lambda: slot.episode.zoom_in(bbox, source))
            return self._encoded(obs, fmt)

        payload, data = await self.run_read(work)
        return finite_json(payload), data

    async def episode_call(self, eid: str, name: Any = None, arguments: Any = None,
                           text: Any = None) -> dict[str, Any]:
        """Execute one tool call as in training: errors come back as the text the model would see.

        `arguments` may be an object or the JSON string of an OpenAI tool call; a malformed string is the
        model's mistake and comes back as error text, like a malformed `text`."""
        from tools.protocol import ToolCall, parse_arguments, parse_turn

        self._need_episodes()
        slot = self.episodes.get(eid)
        if text is not None:
            if not isinstance(text, str):
                raise E.ToolCallParseError()
            parsed = parse_turn(text)
            if parsed.error is not None:
                return {"text": parsed.error.model_message(), "error": public_error(parsed.error),
                        "observation": None}
            if parsed.tool_call is None:
                return {"text": E.ToolCallParseError().model_message(),
                        "error": public_error(E.ToolCallParseError()), "observation": None}
            call = parsed.tool_call
        else:
            if not isinstance(name, str) or not isinstance(arguments, (dict, str)):
                raise E.ToolCallParseError()
            try:
                args = parse_arguments(arguments)
            except E.ToolCallParseError as e:
                return {"text": e.model_message(), "error": public_error(e), "observation": None}
            call = ToolCall(name=name, arguments=args)

        def work() -> dict[str, Any]:
            with self._holding(slot):
                res = slot.episode.execute(call)
            out: dict[str, Any] = {"text": res.text, "error": public_error(res.error) if res.error else None,
                                   "observation": None}
            if res.observation is not None:
                out["observation"] = observation_payload(res.observation, "json", self.cfg)
            return out

        return finite_json(await self.run_read(work))

    def episode_state(self, eid: str) -> dict[str, Any]:
        self._need_episodes()
        slot = self.episodes.get(eid)
        ep = slot.episode
        return finite_json({"episode_id": eid, "image_ids": slot.image_ids, "n_calls": ep.n_calls,
                             "n_errors": ep.n_errors, "observations": [o.to_dict() for o in ep.observations.values()]})

    async def episode_observation(self, eid: str, name: Any, fmt: str) -> tuple[dict[str, Any], bytes | None]:
        self._need_episodes()
        fmt = self.check_format(fmt)
        slot = self.episodes.get(eid)
        obs = slot.episode.observations.get(name) if isinstance(name, str) else None
        if obs is None:
            raise E.UnknownSourceError(detail=f"no observation {str(name)[:64]!r}")

        payload, data = await self.run_read(lambda: self._encoded(obs, fmt))
        return finite_json(payload), data

    def end_episode(self, eid: str) -> dict[str, Any]:
        self._need_episodes()
        if not self.episodes.remove(eid):
            raise UnknownEpisodeError()
        return {"episode_id": eid, "ended": True}

    # -- stateless zoom -------------------------------------------------------------------------------
    def _to_native(self, info: Any, box: tuple[float, float, float, float], box_crs: str) -> tuple[float, ...]:
        if box_crs == "native":
            return box
        if info.transform is None or info.crs is None:
            raise E.BadBoxError("This image has no georeference; give a native pixel box.")
        from tools.zoom import crs_box_to_native, lonlat_box_to_native

        if box_crs == "lonlat":
            return lonlat_box_to_native(box, info.crs, info.transform, (info.width, info.height))
        return crs_box_to_native(box, info.transform)

    async def zoom(self, image_id: Any, bbox: Any, box_crs: str = "native", max_pixels: Any = None,
                   fmt: str = "json") -> tuple[dict[str, Any], bytes | None]:
        """Stateless zoom: native-pixel / image-CRS / lon-lat box of an image id → one observation."""
        from tools.zoom import check_box, read_region

        fmt = self.check_format(fmt)
        image_id = self.check_id(image_id)
        if box_crs not in ("native", "crs", "lonlat"):
            raise E.BadBoxError("box_crs must be native, crs or lonlat.")
        box = check_box(bbox, wrap_x=box_crs == "lonlat")  # a lon/lat box may cross the antimeridian
        zcfg = self.zcfg
        if max_pixels is not None:
            if isinstance(max_pixels, bool) or not isinstance(max_pixels, int):
                raise E.LimitError("max_pixels must be an integer.")
            if not self.zcfg.min_pixels <= max_pixels <= self.cfg.max_output_pixels:
                raise E.LimitError(
                    f"max_pixels must be between {self.zcfg.min_pixels} and {self.cfg.max_output_pixels}."
                )
            zcfg = dataclasses.replace(self.zcfg, max_pixels=int(max_pixels))

        def work() -> tuple[dict[str, Any], bytes | None]:
            info = self._read_guard(image_id, lambda: self.store.info(image_id))
            native = self._to_native(info, box, box_crs)
            obs = self._read_guard(image_id, lambda: read_region(self.store, image_id, native, zcfg, name="obs_1"))
            return self._encoded(obs, fmt)

        payload, data = await self.run_read(work)
        return finite_json(payload), data

    def health(self) -> dict[str, Any]:
        from tools.security import lockdown_report

        rep = lockdown_report()
        skipped = len(getattr(self.store, "manifest_problems", []))
        return {"status": "ok", "images": len(self.served), "refused_images": len(self.refused) + skipped,
                "episodes": len(self.episodes), "inflight": self.inflight, "timeouts": self.n_timeouts,
                "busy_rejections": self.n_busy, "gdal_drivers_locked": bool(rep and rep.drivers_locked)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def build_store(cfg: ServeConfig) -> Any:
    """The ImageStore of a config: manifest and/or folders, under the allowed roots. With
    `manifest_errors: skip` bad entries are skipped and listed in `store.manifest_problems`."""
    from tools.store import ImageStore

    store = ImageStore(cfg.roots(), max_open=cfg.store_max_open)
    if cfg.manifest_errors == "skip":
        if cfg.manifest:
            store.register_manifest(cfg.manifest, problems=store.manifest_problems)
        for d in cfg.image_dirs:
            store.register_folder(d, problems=store.manifest_problems)
        for p in store.manifest_problems:
            log.warning("skipped image entry %s", p)
        if not store.ids():
            from pipeline.core.errors import ConfigError

            raise ConfigError("No image could be registered: " + "; ".join(store.manifest_problems[:5]))
        return store
    from pipeline.core.errors import ConfigError

    try:
        if cfg.manifest:
            store.register_manifest(cfg.manifest)
        for d in cfg.image_dirs:
            store.register_folder(d)
    except (ToolError, ValueError, RecursionError, OSError) as e:  # ValueError: a non-UTF-8 manifest
        raise ConfigError(f"cannot register the images: {str(e)[:300]}; fix that entry, or set "
                          "manifest_errors: skip to serve the others") from None
    if not store.ids():
        where = " and ".join(x for x in [cfg.manifest and f"manifest {cfg.manifest}",
                                         cfg.image_dirs and f"image_dirs {cfg.image_dirs}"] if x)
        raise ConfigError(f"nothing to serve: {where} list no images; point them at images.jsonl lines "
                          '{"id", "path"} or folders with .tif/.png/.jpg files')
    return store


__all__ = ["ZoomService", "EpisodeRegistry", "build_store"]
