"""Library calls leave the caller's process as they found it: Pillow's flags and the socket
timeout here (random state, dtype policy, signal handlers and matplotlib's backend are
checked beside the code that could touch them)."""

import os
import socket

from conftest import run_python
from featurize.data.download import fetch


def test_importing_the_decoders_keeps_the_callers_pillow_flags():
    script = ("from PIL import ImageFile\n"
              "ImageFile.LOAD_TRUNCATED_IMAGES = True\n"
              "import featurize.images, featurize.pipeline, featurize.run\n"
              "assert ImageFile.LOAD_TRUNCATED_IMAGES is True\n")
    proc = run_python(script)
    assert proc.returncode == 0, proc.stderr


def test_a_download_never_sets_the_process_wide_socket_timeout(tmp_path, http_server):
    import hashlib
    served, base, _ = http_server
    payload = os.urandom(3000)
    (served / "w.bin").write_bytes(payload)
    seen = []
    real = socket.socket.connect

    def spy(sock, address):  # runs in the downloading thread, while it downloads
        seen.append(socket.getdefaulttimeout())
        return real(sock, address)
    before = socket.getdefaulttimeout()
    socket.socket.connect = spy
    try:
        path = fetch(base + "w.bin", tmp_path / "w.bin", hashlib.sha256(payload).hexdigest())
    finally:
        socket.socket.connect = real
    assert path.read_bytes() == payload
    assert seen and all(t == before for t in seen)  # never changed, not even meanwhile
    assert socket.getdefaulttimeout() == before
    assert not list(tmp_path.glob(".*part*"))  # the partial file was renamed into place
