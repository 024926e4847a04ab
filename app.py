"""WSGI entry point (``gunicorn -c gunicorn.conf.py app:app``) and a quick try (``python app.py``).

``python app.py`` starts the embedded Ray head itself (unless RAY_ADDRESS is set), serves
with Flask's threaded development server, and stops the head on exit. Use gunicorn for
anything real.
"""
from gateway import Settings, create_app

app = create_app()

if __name__ == "__main__":
    from gateway.cluster import EmbeddedHead, export_embedded_env

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
        tls = (settings.certfile, settings.keyfile) if settings.certfile else None  # GATEWAY_CERTFILE/KEYFILE
        app.run(host=host or "127.0.0.1", port=int(port), threaded=True, ssl_context=tls)
    finally:
        if head is not None:
            head.stop()
