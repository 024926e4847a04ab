"""ASGI entry point (``gunicorn -c gunicorn.conf.py app:app``) and a quick try (``python app.py``).

``app`` is the gateway's ASGI front (``gateway.front``): chat calls on each worker's event
loop, the other routes in the Flask app ``flask_app``. ``python app.py`` starts the embedded
Ray head itself (unless RAY_ADDRESS is set), serves with one uvicorn process, and stops the
head on exit. Use gunicorn for anything real.
"""
from gateway import Settings, create_app

flask_app = create_app()
app = flask_app.extensions["front"]

if __name__ == "__main__":
    import uvicorn

    from gateway.head import EmbeddedHead, export_embedded_env
    from gateway.secrecy import keep_to_itself

    keep_to_itself()  # no Ray process may read this one's environment or memory (gateway.secrecy)
    settings = Settings.from_env()
    settings.check_bind()
    head = None
    if settings.embedded:
        head = EmbeddedHead(settings)
        export_embedded_env(head.start())
    host, _, port = settings.bind.rpartition(":")
    app.extensions["gateway"].start_in_background()  # connect, apply GATEWAY_ENDPOINTS_FILE; /readyz tells when done
    try:
        uvicorn.run(app, host=host or "127.0.0.1", port=int(port), loop="asyncio", lifespan="on", access_log=False,
                    ssl_certfile=settings.certfile, ssl_keyfile=settings.keyfile)  # TLS: GATEWAY_CERTFILE/KEYFILE
    finally:
        if head is not None:
            head.stop()
