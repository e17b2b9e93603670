"""prepare-images under the GDAL lock-down (issue 14): no network from GDAL (a loopback listener receives
nothing), VRT/WMS documents named like rasters and symlinks out of the input folder are refused, sidecars are
not read, bad files are skipped and reported, and the stage fails unless `allow_failures` is set. Also: every
raster open of the project's packages goes through `tools.security.open_raster`."""

from __future__ import annotations

import ast
import json
import socket
import threading
from pathlib import Path

import pytest
from tools_fixtures import make_raster

from pipeline.cli import main
from tools.errors import ForbiddenPathError, PrepareFailedError, UnreadableImageError
from tools.prepare import PrepareImagesConfig
from tools.prepare import run as prepare
from tools.security import open_raster

REPO = Path(__file__).resolve().parents[1]


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections (and closes each at once)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():  # bounded by stop()
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def stop(self) -> int:
        self._stop.set()
        self._t.join(timeout=5)
        self.sock.close()
        return self.connections


def vrt(source: str, size: int = 64) -> str:
    return (f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><VRTRasterBand dataType="Byte" band="1">'
            f"<SimpleSource><SourceFilename>{source}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>"
            "</VRTRasterBand></VRTDataset>")


def wms(url: str) -> str:
    return (f'<GDAL_WMS><Service name="WMS"><ServerUrl>{url}</ServerUrl><Layers>x</Layers></Service>'
            "<DataWindow><UpperLeftX>0</UpperLeftX><UpperLeftY>64</UpperLeftY><LowerRightX>64</LowerRightX>"
            "<LowerRightY>0</LowerRightY><SizeX>64</SizeX><SizeY>64</SizeY></DataWindow></GDAL_WMS>")


@pytest.fixture()
def listener():
    lis = Listener()
    yield lis
    lis.stop()


def test_plain_gdal_would_connect(tmp_path: Path, listener: Listener) -> None:
    """Control: the listener does see GDAL's requests when a VRT is opened the unguarded way."""
    import rasterio

    p = tmp_path / "net.vrt"
    p.write_text(vrt(f"/vsicurl/http://127.0.0.1:{listener.port}/x.tif"))
    with rasterio.Env(GDAL_HTTP_MAX_RETRY="0", GDAL_HTTP_TIMEOUT="2"):
        try:
            with rasterio.open(p) as ds:
                ds.read(1)
        except Exception:  # noqa: BLE001 - the read fails; the point is the connection attempt
            pass
    assert listener.stop() >= 1


def _hostile_input(tmp_path: Path, port: int) -> tuple[Path, Path]:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    make_raster(outside / "secret.tif", 300, 200)
    make_raster(src / "good.tif", 600, 400)
    make_raster(src / "sub" / "plain.png", 300, 200, driver="PNG")
    url = f"http://127.0.0.1:{port}"
    (src / "net.tif").write_text(vrt(f"/vsicurl/{url}/x.tif"))  # VRT named .tif → network
    (src / "net.png").write_text(vrt(f"/vsicurl/{url}/y.png"))
    (src / "wms.tif").write_text(wms(f"{url}/wms?"))
    (src / "outside.tif").write_text(vrt(str(outside / "secret.tif"), 300))  # VRT named .tif → a file outside
    (src / "link_out.tif").symlink_to(outside / "secret.tif")  # symlink out of the input folder
    (src / "link_in.tif").symlink_to(src / "good.tif")  # a symlink that stays inside is fine
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    # sidecars of a good file that would reach the network if GDAL probed them
    (src / "good.tif.ovr").write_text(vrt(f"/vsicurl/{url}/ovr.tif"))
    (src / "good.tif.aux.xml").write_text(f"<PAMDataset><Metadata><MDI key='x'>{url}</MDI></Metadata></PAMDataset>")
    (src / "good.tif.msk").write_text(vrt(f"/vsicurl/{url}/msk.tif"))
    return src, outside


def test_prepare_is_locked_down_and_honest(tmp_path: Path, listener: Listener) -> None:
    src, _ = _hostile_input(tmp_path, listener.port)
    out = tmp_path / "out"
    cfg = PrepareImagesConfig(input_dir=str(src), output_dir=str(out))
    with pytest.raises(PrepareFailedError) as e:
        prepare(cfg)
    msg = str(e.value)
    assert "6 of 9 source files could not be converted" in msg and "--allow_failures" in msg
    for name in ("net.tif", "net.png", "wms.tif", "outside.tif", "link_out.tif", "broken.png"):
        assert name in msg
    assert listener.stop() == 0  # GDAL never connected
    ids = sorted(json.loads(x)["id"] for x in (out / "images.jsonl").read_text().splitlines())
    assert ids == ["good", "link_in", "sub__plain"]  # the others are neither converted nor listed
    failed = {json.loads(x)["source"]: json.loads(x)["error"] for x in (out / "failed.jsonl").read_text().splitlines()}
    assert "outside the allowed roots" in failed["link_out.tif"] and "not a TIFF, PNG or JPEG" in failed["outside.tif"]
    assert not (out / "outside.tif").exists() and not (out / "net.tif").exists()
    assert [p.name for p in src.rglob("*.aux.xml")] == ["good.tif.aux.xml"] and not list(out.glob("*.aux.xml"))
    # allow_failures: same work, exit 0, failures still listed; the converted files are skipped on a rerun
    s = prepare(PrepareImagesConfig(input_dir=str(src), output_dir=str(out), allow_failures=True))
    assert s["failed"] == 6 and s["skipped"] == 3 and s["converted"] == 0 and len(s["errors"]) == 6


def test_cli_exit_code_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _hostile_input(tmp_path, 9)  # port 9 (discard): nothing listens, nothing should try
    args = ["prepare-images", "--input_dir", str(src), "--output_dir", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "could not be converted" in err and "link_out.tif" in err
    assert main([*args, "--allow_failures"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["failed"] == 6 and "Traceback" not in cap.err


def test_open_raster_refusals(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    make_raster(root / "a.tif", 64, 64)
    (root / "x.tif").write_text(vrt("/etc/hostname"))
    (root / "out.tif").symlink_to(tmp_path / "elsewhere.tif")
    make_raster(tmp_path / "elsewhere.tif", 64, 64)
    with open_raster(root / "a.tif", [root]) as ds:
        assert ds.driver == "GTiff" and ds.read(1).shape == (64, 64)
    with pytest.raises(UnreadableImageError):
        open_raster(root / "x.tif")
    with pytest.raises(ForbiddenPathError):
        open_raster(root / "out.tif", [root])
    for bad in ("/vsicurl/http://127.0.0.1:9/a.tif", "http://127.0.0.1:9/a.tif", "WMS:http://x", root / "nope.tif"):
        with pytest.raises((ForbiddenPathError, UnreadableImageError)):
            open_raster(bad)
    from tools.store import ImageStore

    store = ImageStore([root])
    store.register("x", root / "x.tif")  # registration checks the place; the open checks the content
    with pytest.raises(UnreadableImageError):
        store.info("x")


def test_every_raster_open_goes_through_the_guard() -> None:
    """No package module calls rasterio.open for reading except tools/security.py (writes are ours)."""
    offenders = []
    for pkg in ("tools", "pipeline", "rl", "sft", "kg_qa_builder"):
        for f in (REPO / pkg).rglob("*.py"):
            if f == REPO / "tools" / "security.py":
                continue
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "open" and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "rasterio"):
                    continue
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                if not (isinstance(mode, ast.Constant) and str(mode.value).startswith("w")):
                    offenders.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], f"use tools.security.open_raster for reads: {offenders}"
