"""``mmrec serve``: an OpenAI-compatible HTTP server whose sessions keep the model's memory.

Needs the ``serve`` extra (FastAPI, uvicorn): ``mmrec.serve.app.create_app(checkpoint, ...)`` builds the
application; nothing here is imported by the rest of the package but the command line.
"""
