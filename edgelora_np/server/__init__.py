"""`edgelora serve`: the engine over HTTP, for many tenants at once.

    main.py         run(options): bind, start uvicorn, load the model in a thread, print the URL
    app.py          the FastAPI app: middleware (body limit, access log, request metrics),
                    errors as {"error": {...}}, authentication, /health, /metrics
    openai_api.py   /v1/completions, /v1/chat/completions, /v1/models, vLLM's runtime adapters
    llamacpp_api.py /completion, /lora-adapters, /tokenize, /detokenize, /props (llama-server's)
    service.py      the model, engine and adapter catalog behind the routes; running a request
    tenants.py      API keys, per-tenant adapters and limits
    metrics.py      Prometheus metrics
    schemas.py      request and response bodies

docs/server.md shows every endpoint with a request and its response.
"""
