"""Ray Serve for MTFM: one deployment per registered scenario behind `POST /<scenario>/rank`.

    app.py           the application builder (`serve run deployments/serve.yaml`)
    router.py        HTTP ingress: routing to the scenario deployments
    http_api.py      the HTTP API (router or scenario ingress): validation, 4xx errors, /healthz
    scenario.py      per-scenario deployment: its subgraph, batching, health
    batch_queue.py   request batching: what arrives while a batch scores forms the next batch
    rank_request.py  the request schema, its validation and example requests
    backends.py      PyTorch / onnxruntime / TensorRT scoring
    cuda_graphs.py   the subgraph replayed from CUDA graphs over bucketed batch shapes, also
                     against cached user sides
    onnx_export.py   the export-friendly single-request subgraph
    user_cache.py    encoded user sides kept per user for a short TTL
    metrics.py       Prometheus metrics through ray.serve.metrics
    serve_config.py  serve.yaml generated from the registry
"""
