"""``itk_infer serve``: an inference server speaking the part of the MONAI Label REST API that
3D Slicer's MONAILabel module and the ``monailabel`` Python client use.

A face over the core like the command line: the model is loaded once with
:func:`itk_infer.pipeline.load_model` and each request is answered by
:func:`itk_infer.pipeline.predict_case` in a per-request scratch folder. Modules:

* :mod:`~itk_infer.server.options` - the server's settings (host, port, token, caps);
* :mod:`~itk_infer.server.cli` - the ``serve`` subcommand: arguments, model, uvicorn;
* :mod:`~itk_infer.server.security` - Host allowlist and bearer-token middleware;
* :mod:`~itk_infer.server.store` - uploaded images on disk (uuid names, TTL, count cap);
* :mod:`~itk_infer.server.uploads` - streaming multipart parsing into the store, with caps;
* :mod:`~itk_infer.server.imagecheck` - what an uploaded file may be before ITK reads it;
* :mod:`~itk_infer.server.inference` - the model, its label names, the bounded queue;
* :mod:`~itk_infer.server.app` - the FastAPI routes.

Only :mod:`~itk_infer.server.options` and :mod:`~itk_infer.server.cli` are imported by
``itk_infer serve --help``; FastAPI, torch and SimpleITK load after parsing.
"""
