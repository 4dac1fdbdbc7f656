"""The hand-rolled peer for serve_bench.py: FastAPI + uvicorn around SentenceTransformer.encode.

    .venv-serve-peers/bin/python tests/benchmarks/peer_st_server.py MODEL_FOLDER --port 8081
    (tests/benchmarks/serve_peers_setup.sh st makes that venv)

What a team writes by hand around the model, kept typical: a pydantic request model, a plain
`def` route (FastAPI runs it in its thread pool, so concurrent requests call `model.encode` at
the same time, each with its own batch), `model.encode(texts)` with the model's own modules
(all-MiniLM-L6-v2's pipeline ends in Normalize, so its embeddings come out unit-length, as
sentence-transformers gives them), and an OpenAI-shaped float response. `GET /ready` answers 200
once the model is loaded (it is loaded before uvicorn starts listening). Binds 127.0.0.1.
"""


import argparse
import os


def build_app(model_folder: str, model_name: str, threads: int | None):
    import torch
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel
    from sentence_transformers import SentenceTransformer

    if threads:
        torch.set_num_threads(threads)
    model = SentenceTransformer(model_folder, device="cpu")
    model.encode(["warm-up"])  # the first call builds kernels; a team's startup would do the same

    class EmbeddingRequest(BaseModel):
        input: str | list[str]
        model: str | None = None
        encoding_format: str | None = "float"
        user: str | None = None

    app = FastAPI()

    @app.get("/ready")
    def ready():
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest):
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise HTTPException(status_code=400, detail="input is empty")
        vectors = model.encode(texts)  # numpy float32, normalized by the model's Normalize module
        tokens = sum(len(ids) for ids in model.tokenizer(texts)["input_ids"])
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "model": req.model or model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="sentence-transformers model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, the cores)")
    parser.add_argument("--name", default=os.environ.get("MODEL_NAME", "all-MiniLM-L6-v2"),
                        help="model name reported in responses")
    args = parser.parse_args()

    import uvicorn

    app = build_app(args.model, args.name, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
